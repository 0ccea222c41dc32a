"""lbserver: a lookaside gRPC load balancer speaking the grpclb protocol."""

__version__ = "0.1.0"
