"""xDS for the balancer's lists: what exists and what a client is told.

`resources` builds the Listener, RouteConfiguration, Cluster and
ClusterLoadAssignment of a service from its list; `protocol` keeps one ADS
stream's state-of-the-world bookkeeping (versions, nonces, ACK and NACK).
Both are pure; the gRPC stream is lbserver.services.ads. This module stays
free of the Envoy protos so that config can name its choices.
"""

from __future__ import annotations

from typing import Literal

# How endpoint lists are laid out in localities (config option xds_localities).
Localities = Literal["backend", "zone"]
