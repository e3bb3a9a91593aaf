"""The Kubernetes mutating admission webhook that injects the zonegate sidecar."""
