"""The development kit: the demo, a dev OpenID Provider and zone backends (PEPs)."""
