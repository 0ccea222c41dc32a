"""bench/xds_weights: do grpcio's xDS clients reproduce lbserver's weights?

    python -m bench.xds_weights [--quick] [--out docs/benchmarks.md]

gRPC's xDS clients weigh localities (xds_wrr_locality / weighted_target over
the localities of a ClusterLoadAssignment) but pick endpoints *within* a
locality with round_robin, which ignores an endpoint's
`load_balancing_weight`. lbserver's option `xds_localities` chooses how a
service's list is laid out for xDS: `backend` (every backend its own
locality, locality weight = endpoint weight = its entries in the grpclb list)
or `zone` (one locality per registration zone weighted by the sum of its
backends' entries, each endpoint carrying its own). This benchmark measures
both with grpcio's own xDS client.

For every case (static weights 1:1:2 and 1:2:3:4, all backends registered in
one zone) and every layout, `run.py` starts a real `lbserver serve` with that
layout, counting backends (tests/support/backends.py, in this process) and one
`lbserver register --weight W --zone Z` per backend; then, one after the
other, two client processes (`client.py`) make the same bounded number of
sequential unary calls and count which backend answered each:

- grpcio's xDS client: target `xds:///oap`, GRPC_XDS_BOOTSTRAP = the
  project's docs/xds/bootstrap.json with only `server_uri` changed to the
  balancer's address;
- the reference: grpcio's grpclb policy against the same balancer, found the
  native way (DNS SRV `_grpclb._tcp.<name>` from an in-process DNS server,
  tests/support/dns.py), round robin over lbserver's weighted list.

`report.py` turns the counts into each backend's share against its target
share (its weight / the sum of the weights), the largest absolute error in
percentage points, and writes the `## xDS weights: locality per backend vs per
zone` section of docs/benchmarks.md. Process logs and the raw results stay in
--log-dir (a new temp folder by default). `--quick` makes 1000 measured calls
per client run instead of 10000 (`--calls N` sets any number); on 2 cores a
quick run takes about 15 s, a full one about a minute.
"""
