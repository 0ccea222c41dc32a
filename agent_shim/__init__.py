"""agent_shim: per-call balancing for gRPC clients that cannot use the grpclb
policy themselves (SkyWalking agents): a Python channel and a sidecar proxy."""

__version__ = "0.1.0"
