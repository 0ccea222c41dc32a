"""bench/scale: control-plane scale of one `lbserver serve` process.

N concurrent BalanceLoad streams (each its own connection) from several
client processes: the balancer's RSS and idle CPU with all of them open, and
the fan-out latency from one membership change (a Registry heartbeat or
deregistration) to every stream receiving the new list; beside them, in the
same run, the same for N xDS (ADS) streams on a second balancer (raw ADS
clients subscribing LDS -> CDS -> EDS and ACKing every response;
`--protocol grpclb|xds|both`); then the Registry heartbeat rate at which the
balancer's CPU reaches one core. `python -m bench.scale --help`; results go
to docs/benchmarks.md, section `## Control-plane scale (bench/scale)` (the
xDS figures in its subsection "xDS streams beside BalanceLoad").
"""
