"""zonegate sidecar: a reverse/forward proxy that exchanges bearer tokens on outbound calls."""
