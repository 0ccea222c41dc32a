"""Fixtures for the interop tests (tests/interop, docs/interop.md).

The peers are installed by scripts/install-interop-peers once, after
collection and before the first test (a first Go build can outlast a test's
timeout): a missing or stale grpc-go peer or @grpc/grpc-js is built, never
skipped; if that fails, every interop test fails with the script's output.

- `rigs` (session): one `Rig` per backend implementation, started on first
  use and shared by the tests that only make calls: a backend `<impl>-1`, a
  scripted balancer listing it, and `agent-shim proxy` in front.
- `processes` (function) and `rig_factory` (function): private rigs for the
  tests that stop or kill backends.
When a test fails, the logs of the processes it used are added to its report.
"""

from __future__ import annotations

import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.interop.harness import BalancerLoop, Rig, RigFactory, RigPool, install_peers
from tests.support.processes import ProcessManager

_HERE = Path(__file__).resolve().parent
_INSTALL = pytest.StashKey[subprocess.CompletedProcess[str] | Exception]()
_MANAGERS = pytest.StashKey[list[ProcessManager]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(_HERE in Path(str(item.path)).parents for item in session.items):
        try:
            result: subprocess.CompletedProcess[str] | Exception = install_peers()
        except Exception as err:  # a timeout: reported by every test
            result = err
        session.stash[_INSTALL] = result


@pytest.fixture(scope="session", autouse=True)
def interop_peers(request: pytest.FixtureRequest) -> None:
    result = request.session.stash.get(_INSTALL, None)
    if result is None:  # collected another way: install now
        result = install_peers()
        request.session.stash[_INSTALL] = result
    if isinstance(result, Exception):
        pytest.fail(f"scripts/install-interop-peers failed: {result!r}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"scripts/install-interop-peers exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}",
            pytrace=False,
        )


def _track(request: pytest.FixtureRequest, manager: ProcessManager) -> None:
    request.node.stash.setdefault(_MANAGERS, []).append(manager)


@pytest.fixture(scope="session")
def balancer_loop() -> Iterator[BalancerLoop]:
    loop = BalancerLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def _rig_pool(
    tmp_path_factory: pytest.TempPathFactory, balancer_loop: BalancerLoop
) -> Iterator[RigPool]:
    pool = RigPool(ProcessManager(tmp_path_factory.mktemp("interop-shared")), balancer_loop)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def rigs(request: pytest.FixtureRequest, _rig_pool: RigPool) -> RigPool:
    _track(request, _rig_pool.processes)
    return _rig_pool


@pytest.fixture
def processes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessManager]:
    manager = ProcessManager(tmp_path_factory.mktemp("interop"))
    _track(request, manager)
    try:
        yield manager
    finally:
        manager.cleanup()


@pytest.fixture
def rig_factory(processes: ProcessManager, balancer_loop: BalancerLoop) -> Iterator[RigFactory]:
    started: list[Rig] = []

    def start(backends: list[tuple[str, str]]) -> Rig:
        rig = Rig(processes, balancer_loop)
        started.append(rig)
        return rig.start(backends)

    try:
        yield start
    finally:
        for rig in started:
            rig.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    managers = item.stash.get(_MANAGERS, [])
    if managers and report.failed and call.when in ("setup", "call"):
        report.sections.append(
            ("interop processes", "\n".join(m.all_logs(tail=6000) for m in managers))
        )
    return report
