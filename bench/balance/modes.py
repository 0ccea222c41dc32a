"""The balancing modes bench/balance compares, and how each one wires the
20 client channels to the backends.

(a) random   kube-proxy in iptables mode: each connection goes to a random
             endpoint, and gRPC keeps that one connection for good.
(b) lc       IPVS least-connection: each new connection goes to the backend
             with the fewest connections so far (clients connect one by one).
(c) nginx    nginx `grpc_pass` to an upstream of every backend, round robin
             per request (the seed's proposal 1): a proxy in the data path.
(d) grpclb   grpcio's native grpclb policy, balancer found through DNS SRV
             `_grpclb._tcp.<name>`: lbserver's weighted lists, per call.
(e) proxy    `agent-shim proxy`: clients connect to one local proxy, which
             balances every call with lbserver's lists.
(f) kube     grpcio's native grpclb policy as (d), but lbserver learns the
             backends from a (fake) Kubernetes API's EndpointSlices and
             their load from its own scrapes of each backend's Prometheus
             telemetry: no registrar (issue 16's zero-touch path).

Client call rates are skewed the way agent traffic is (a few busy services,
a long tail): rate of client k proportional to 1/(k+1)^s, shuffled with a
fixed seed so that connection order says nothing about rate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .client import ChannelSpec


@dataclass(frozen=True)
class Mode:
    key: str
    letter: str
    label: str


RANDOM = Mode("random", "a", "random per connection (kube-proxy iptables)")
LEAST_CONN = Mode("lc", "b", "least connections at connect (IPVS lc)")
NGINX = Mode("nginx", "c", "nginx grpc_pass round robin")
GRPCLB = Mode("grpclb", "d", "grpclb via lbserver (grpcio native)")
PROXY = Mode("proxy", "e", "agent-shim proxy via lbserver")
KUBE = Mode("kube", "f", "grpclb via lbserver, Kubernetes discovery + scrape")
MODES: tuple[Mode, ...] = (RANDOM, LEAST_CONN, NGINX, GRPCLB, PROXY, KUBE)


@dataclass(frozen=True)
class Targets:
    """Where the clients of each mode connect."""

    backends: tuple[str, ...]  # HOST:PORT of every backend, in order
    nginx: str = ""  # HOST:PORT of nginx
    proxy: str = ""  # HOST:PORT of agent-shim proxy
    grpclb: str = ""  # dns://DNS/NAME:PORT, a name with a _grpclb._tcp SRV record
    kube: str = ""  # the same for the service lbserver learns from Kubernetes


def client_rates(clients: int, total_rate: float, exponent: float, seed: int) -> list[float]:
    """Calls per second of each client: Zipf-like with `exponent`, summing to
    `total_rate`, in a seeded random order."""
    raw = [1.0 / (k + 1) ** exponent for k in range(clients)]
    scale = total_rate / sum(raw)
    rates = [r * scale for r in raw]
    random.Random(f"{seed}/rates").shuffle(rates)
    return rates


def random_assignment(clients: int, backends: int, seed: int) -> list[int]:
    """(a): a uniformly random backend per connection."""
    rng = random.Random(f"{seed}/random")
    return [rng.randrange(backends) for _ in range(clients)]


def least_conn_assignment(clients: int, backends: int) -> list[int]:
    """(b): in connection order, the backend with the fewest connections (the
    first such backend on ties, as IPVS scans its list)."""
    connections = [0] * backends
    chosen = []
    for _ in range(clients):
        index = min(range(backends), key=lambda b: connections[b])
        connections[index] += 1
        chosen.append(index)
    return chosen


def channels_for(
    mode: Mode, rates: Sequence[float], targets: Targets, seed: int
) -> list[ChannelSpec]:
    """One channel per client, pointed where `mode` sends it."""
    n = len(rates)
    if mode is RANDOM or mode is LEAST_CONN:
        backends = targets.backends
        picks = (
            random_assignment(n, len(backends), seed)
            if mode is RANDOM
            else least_conn_assignment(n, len(backends))
        )
        return [ChannelSpec(id=i, target=backends[picks[i]], rate=rates[i]) for i in range(n)]
    if mode is NGINX:
        return [ChannelSpec(id=i, target=targets.nginx, rate=rates[i]) for i in range(n)]
    if mode is GRPCLB:
        return [
            ChannelSpec(id=i, target=targets.grpclb, rate=rates[i], grpclb=True) for i in range(n)
        ]
    if mode is KUBE:
        return [
            ChannelSpec(id=i, target=targets.kube, rate=rates[i], grpclb=True) for i in range(n)
        ]
    if mode is PROXY:
        return [ChannelSpec(id=i, target=targets.proxy, rate=rates[i]) for i in range(n)]
    raise ValueError(f"unknown mode {mode.key}")


def nginx_config(prefix: str, listen: str, backends: Sequence[str]) -> str:
    """An nginx.conf for (c): HTTP/2 (h2c) on `listen`, `grpc_pass` to an
    upstream holding every backend (round robin, the default), with upstream
    keepalive. One worker process, so that the round robin is one sequence.
    Everything nginx writes stays under `prefix`."""
    servers = "\n".join(f"        server {b};" for b in backends)
    return f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    # Long-lived client connections, as agents keep them (the default would
    # close an HTTP/2 connection after 1000 requests).
    keepalive_requests 1000000;
    keepalive_timeout 3600s;
    upstream oap {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 3600s;
    }}
    server {{
        listen {listen} http2;
        location / {{
            grpc_pass grpc://oap;
            grpc_read_timeout 60s;
            grpc_send_timeout 60s;
        }}
    }}
}}
"""
