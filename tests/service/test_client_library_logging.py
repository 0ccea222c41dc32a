"""Library code logs like a library: an application that never configured
structlog gets nothing on its stdout from `agent_shim.balanced_channel` (sync
and aio) or `lbserver.registrar.Registrar`; their lines go to the standard
`logging` module under `agent_shim.*` / `lbserver.*`, so the application's
logging configuration decides what is shown and where.

Each case runs in a fresh interpreter (no structlog configuration, no logging
handlers) against a balancer and backends started here on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Callable

import pytest

from tests.service.conftest import Harness
from tests.service.test_registrar import FakeRegistry, start_registry
from tests.support.eventually import eventually
from tests.support.processes import REPO_ROOT
from tests.support.shim_echo import EchoBackend
from tests.support.shim_fixtures import weighted
from tests.support.shim_lb import SERVICE, balancer_address

pytestmark = pytest.mark.timeout(60)

_PRELUDE = """
import asyncio
import logging
import sys

if sys.argv[1] == "debug":
    logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
"""

CHANNEL_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    from google.protobuf.wrappers_pb2 import StringValue

    import agent_shim
    from tests.support.shim_echo import EchoStub

    kind, balancer, service = sys.argv[2:5]
    if kind == "sync":
        channel = agent_shim.balanced_channel(balancer, service)
        reply = EchoStub(channel).Unary(StringValue(value="hi"), timeout=10)
        channel.close()
    else:

        async def call():
            channel = agent_shim.aio_balanced_channel(balancer, service)
            try:
                return await EchoStub(channel).Unary(StringValue(value="hi"), timeout=10)
            finally:
                await channel.close()

        reply = asyncio.run(call())
    assert reply.value.endswith(":hi"), reply
    """
)

REGISTRAR_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    from lbserver.registrar import Registrar


    async def register(balancer):
        async with Registrar([balancer], "oap", "127.0.0.1", 11800, interval=0.1):
            # Until the test closes stdin: it has seen registration happen.
            await asyncio.to_thread(sys.stdin.read)

    asyncio.run(register(sys.argv[2]))
    """
)


async def run_python(
    script: str, *args: str, until: Callable[[], object] | None = None
) -> tuple[str, str]:
    """Runs `script` in a fresh interpreter; its stdout and stderr. With
    `until`, its stdin stays open until `until()` holds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE if until is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if until is not None:
        await eventually(until, "the script's progress", within=45)
    # An input (even none) closes stdin once written.
    stdin = b"" if until is not None else None
    out, err = await asyncio.wait_for(process.communicate(stdin), 45)
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


@pytest.mark.parametrize("kind", ["sync", "aio"])
async def test_balanced_channel_prints_nothing_to_stdout(
    harness: Harness, echoes: list[EchoBackend], kind: str
) -> None:
    running = await weighted(harness, echoes)
    out, err = await run_python(CHANNEL_SCRIPT, "quiet", kind, balancer_address(running), SERVICE)
    assert out == ""
    # logging's default: nothing below WARNING, and none happened here.
    assert err == ""


@pytest.mark.parametrize("kind", ["sync", "aio"])
async def test_balanced_channel_logs_through_the_logging_module(
    harness: Harness, echoes: list[EchoBackend], kind: str
) -> None:
    running = await weighted(harness, echoes)
    out, err = await run_python(CHANNEL_SCRIPT, "debug", kind, balancer_address(running), SERVICE)
    assert out == ""
    lines = err.splitlines()
    started = [line for line in lines if "balancer stream started" in line]
    assert started, err
    assert started[0].startswith("agent_shim.selector DEBUG balancer stream started ")
    assert f"service={SERVICE}" in started[0]
    received = [line for line in lines if "server list received" in line]
    assert received, err
    assert received[0].startswith("agent_shim.selector INFO server list received ")
    assert "backends=2" in received[0]


async def test_registrar_library_prints_nothing_to_stdout() -> None:
    fake = FakeRegistry()
    server, address = await start_registry(fake)

    def registration() -> Callable[[], bool]:
        # The registrar logs its registration on the first answer, before it
        # sends the second heartbeat.
        before = len(fake.heartbeats)
        return lambda: len(fake.heartbeats) >= before + 2

    try:
        out, err = await run_python(REGISTRAR_SCRIPT, "quiet", address, until=registration())
        assert out == ""
        assert err == ""
        out, err = await run_python(REGISTRAR_SCRIPT, "debug", address, until=registration())
    finally:
        await server.stop(None)
    assert out == ""
    registered = [line for line in err.splitlines() if "registered with balancer" in line]
    assert registered, err
    assert registered[0].startswith("lbserver.registrar INFO registered with balancer ")
    assert "service=oap" in registered[0] and f"balancer={address}" in registered[0]
    assert fake.heartbeats and fake.deregistrations
