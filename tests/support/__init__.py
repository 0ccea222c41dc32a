"""Test harness shared by the service and end-to-end tests.

- `tests.support.dns`: an in-process DNS server whose records a test changes at
  run time (SRV `_grpclb._tcp.<name>` to find the balancer, A records of
  `<name>` as grpclb fallback addresses).
- `tests.support.backends`: counting test backends (a generic unary method that
  records the `lb-token` of every call) and grpclb client helpers.
- `tests.support.processes`: `lbserver serve` / `lbserver register` as real
  subprocesses, with bounded start/stop and captured logs.
"""
