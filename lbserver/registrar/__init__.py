"""The backend side: keeps one backend registered with every balancer replica.

Used by `lbserver register` (the sidecar) and directly by backends written in
Python::

    from lbserver.registrar import PrometheusLoadProbe, Registrar

    probe = PrometheusLoadProbe("http://127.0.0.1:1234/metrics",
                                requests_metric="trace_in_latency_count")
    registrar = Registrar(["lbserver-0:11810", "lbserver-1:11810"], "oap",
                          "10.0.0.7", 11800, load=probe)
    task = asyncio.create_task(registrar.run())
    ...
    await registrar.drain()   # optional: leave the server lists, keep running
    await registrar.stop()    # deregisters from every balancer
    await task

or ``async with Registrar(...) as registrar: ...`` which runs it in the
background and stops (deregistering) on exit.

Replicas share no store, so every balancer gets its own heartbeat loop on its
own channel; one balancer being down never delays the others.

The constructors run the balancer's own validation
(lbserver.domain.validation) on the registration: whatever a balancer would
refuse raises lbserver.errors.InvalidArgumentError (a ValueError, naming the
field) here instead of being retried forever.

Registry calls carry ``authorization: Bearer <token>`` when `token` is given:
one token (str), a sequence of tokens, or a callable returning the current
sequence (called before every heartbeat, so keep it cheap; `lbserver
register --token-file` passes a reader that re-reads the file when it
changes, so a rotated Kubernetes Secret needs no restart). The first token is
sent first. A balancer that answers UNAUTHENTICATED or PERMISSION_DENIED is
asked again at once with the next token (each token at most once per
heartbeat), so a rotation where balancers and registrars learn the new token
at different moments loses no heartbeat. Per balancer the registrar then
keeps the token that balancer accepted, for as long as the sequence still
holds it, and logs when it switches. A HeartbeatStream is authorized once,
when it opens: a stream refused at its opening is reopened with the next
token, and an open stream whose token has left the sequence is reopened with
a current one.

The load a heartbeat carries comes from `load`: a `PrometheusLoadProbe`, a
fixed `static_load(...)`, or any callable returning a `LoadReport`. A
`probe` (`GrpcProbe`, `TcpProbe`, `make_probe`) reports the backend DRAINING
while it does not answer.

Logs go to the standard `logging` module (loggers `lbserver.registrar` and
`lbserver.loadprobe`) unless the application configured structlog, which
then gets them; nothing is printed to stdout.
"""

# Re-exported because `lbserver status` imports them from here; new code
# imports lbserver.addresses.
from lbserver.domain.model import LoadReport
from lbserver.registrar._backendprobe import (
    PROBE_KINDS,
    BackendProbe,
    GrpcProbe,
    TcpProbe,
    make_probe,
)
from lbserver.registrar._cpus import available_cpus, container_cpu_limit, default_cpus, parse_cpus
from lbserver.registrar._loadprobe import DEFAULT_CPU_METRIC, PrometheusLoadProbe
from lbserver.registrar._registrar import LoadCallback, Registrar
from lbserver.registrar._resolve import Resolver, resolve_balancer
from lbserver.registrar._selector import MetricSelector, parse_selector
from lbserver.registrar._static_load import static_load
from lbserver.registrar._tokens import TokenSource

__all__ = [
    "DEFAULT_CPU_METRIC",
    "PROBE_KINDS",
    "BackendProbe",
    "GrpcProbe",
    "LoadCallback",
    "LoadReport",
    "MetricSelector",
    "PrometheusLoadProbe",
    "Registrar",
    "Resolver",
    "TcpProbe",
    "TokenSource",
    "available_cpus",
    "container_cpu_limit",
    "default_cpus",
    "make_probe",
    "parse_cpus",
    "parse_selector",
    "resolve_balancer",
    "static_load",
]
