"""Fixtures for the end-to-end tests: DNS, counting backends, lbserver processes.

- `dns_server` -> `DnsServer`: loopback DNS answering `_grpclb._tcp.<name>`.
- `backend_fleet` -> `FleetFactory`: `backend_fleet(n, prefix="backend")` starts n
  counting backends; all are stopped at teardown.
- `processes` -> `ProcessManager`: starts `lbserver serve` / `lbserver register`;
  every process is stopped at teardown, and when a test fails the processes'
  logs are added to its report (section "lbserver processes").
- `balancer` -> `BalancerProcess`: one `lbserver serve` with `E2E_BALANCER_ENV`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Protocol

import pytest

from tests.support.backends import BackendFleet
from tests.support.dns import DnsServer
from tests.support.processes import BalancerProcess, ProcessManager

# Fast heartbeats, and no startup grace: a fresh balancer answers unknown
# services with fallback at once. Tests about restarts set their own grace.
E2E_BALANCER_ENV: dict[str, str] = {
    "LBSERVER_HEARTBEAT_INTERVAL": "1",
    "LBSERVER_STARTUP_GRACE": "0",
}

_PROCESSES_KEY = pytest.StashKey[ProcessManager]()


class FleetFactory(Protocol):
    def __call__(self, n: int, prefix: str = "backend") -> BackendFleet: ...


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as dns:
        yield dns


@pytest.fixture
def backend_fleet() -> Iterator[FleetFactory]:
    fleets: list[BackendFleet] = []

    def start(n: int, prefix: str = "backend") -> BackendFleet:
        fleet = BackendFleet(n, prefix=prefix)
        fleets.append(fleet)
        return fleet.start()

    try:
        yield start
    finally:
        for fleet in fleets:
            fleet.stop()


@pytest.fixture
def processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessManager]:
    manager = ProcessManager(tmp_path_factory.mktemp("lbserver-logs"))
    request.node.stash[_PROCESSES_KEY] = manager
    try:
        yield manager
    finally:
        manager.cleanup()


@pytest.fixture
def balancer(processes: ProcessManager) -> BalancerProcess:
    return processes.start_balancer(env=E2E_BALANCER_ENV)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    manager = item.stash.get(_PROCESSES_KEY, None)
    if manager is not None and report.failed and call.when in ("setup", "call"):
        report.sections.append(("lbserver processes", manager.all_logs()))
    return report
