"""bench/balance: lbserver against what users run today, on loopback.

    python -m bench.balance [--quick] [--out docs/benchmarks.md]

Reproduces the situation of issue 4 with real processes on 127.0.0.1:
simulated OAP pods (`backend.py`: capacity slots held for a service time,
utilization reported to lbserver through an in-process Registrar), 20 client
channels with skewed call rates (`client.py`), and six ways of balancing
them side by side (`modes.py`): (a) random backend per connection, (b) least
connections at connect time, (c) nginx `grpc_pass` round robin, (d) grpcio's
native grpclb policy via lbserver, (e) agent-shim proxy via lbserver, (f) as
(d) with lbserver learning the backends from a fake Kubernetes API and their
load from its own scrapes of their Prometheus telemetry (no registrar). Cases
(`cases.py`): 2 and 5 equal backends, 5 with one at half capacity at 50% and
65% load, and the convergence of a joining, a drained and a killed backend.
`infra.py` starts and stops the processes; `report.py` turns the recordings
into figures and the `## Balance (bench/balance)` section of
docs/benchmarks.md. A full run takes about 8 minutes on 2 cores; `--quick`
(equal-5 and hetero-50 with short windows, convergence under (d) only) under 2
minutes. nginx is installed with apt-get when missing. Process logs, the
client plans and results, the backends' buckets and lbserver's lists over time
are kept in --log-dir for a closer look.
"""
