"""A registration token rotated under a running balancer: its token file,
mounted the way kubelet mounts a Secret, is swapped atomically mid-run. The
balancer takes the new tokens without a restart, refuses a token once it is
removed (new calls and open HeartbeatStreams alike), counts calls made with
a previous token, and keeps its last tokens when the file goes bad."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import RunningServer
from tests.service.harness import Harness
from tests.service.test_heartbeat_stream import exchange
from tests.service.test_registry_admin import valid
from tests.support.eventually import eventually
from tests.unit.test_serve_token_reload import NEW, OLD, SecretVolume

pytestmark = pytest.mark.timeout(60)

# Far longer than the balancer's one-second look at its token file takes.
WAIT = 15.0
UNUSABLE = "registration token file unusable; keeping the last good tokens"


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def previous_token_calls(call: str) -> float:
    value = REGISTRY.get_sample_value("lbserver_auth_previous_token_total", {"call": call})
    return value or 0.0


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


class Caller:
    """Registry and Admin calls to one balancer with a chosen token."""

    def __init__(self, harness: Harness, running: RunningServer) -> None:
        channel = harness.channel(running)
        self.registry = pb_grpc.RegistryStub(channel)
        self.admin = pb_grpc.AdminStub(channel)

    async def admin_code(self, token: str) -> grpc.StatusCode:
        try:
            await self.admin.GetState(pb.GetStateRequest(), metadata=bearer(token), timeout=WAIT)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async def heartbeat_code(self, token: str) -> grpc.StatusCode:
        try:
            await self.registry.Heartbeat(valid(), metadata=bearer(token), timeout=WAIT)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async def until(self, token: str, code: grpc.StatusCode) -> None:
        """Waits until an Admin call with `token` gets `code`: the balancer
        has looked at its changed file."""

        async def answered() -> bool:
            return await self.admin_code(token) == code

        await eventually(answered, f"{code.name} for the token", within=WAIT)


async def test_a_swapped_secret_takes_effect_without_a_restart(
    harness: Harness, tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    volume = SecretVolume(tmp_path)
    volume.write(f"{OLD}\n")
    running = await harness.start(auth_token_file=str(volume.token_file))
    caller = Caller(harness, running)
    assert await caller.heartbeat_code(OLD) == grpc.StatusCode.OK
    assert await caller.heartbeat_code(NEW) == grpc.StatusCode.PERMISSION_DENIED
    stream = caller.registry.HeartbeatStream(None, metadata=bearer(OLD))
    assert (await exchange(stream, valid())).code == 0

    # Step 1 of a rotation: NEW first, OLD still accepted.
    volume.write(f"{NEW}\n{OLD}\n")
    await caller.until(NEW, grpc.StatusCode.OK)
    admin_before = previous_token_calls("admin")
    heartbeat_before = previous_token_calls("heartbeat")
    assert await caller.admin_code(OLD) == grpc.StatusCode.OK
    assert await caller.heartbeat_code(OLD) == grpc.StatusCode.OK
    assert await caller.heartbeat_code(NEW) == grpc.StatusCode.OK
    # The stream opened with OLD lives on; its heartbeats count as previous-token ones.
    assert (await exchange(stream, valid())).code == 0
    assert previous_token_calls("admin") == admin_before + 1
    assert previous_token_calls("heartbeat") == heartbeat_before + 2
    [reloaded] = [entry for entry in logs if entry["event"] == "registration tokens reloaded"]
    assert reloaded["tokens"] == 2

    # Step 3: OLD removed. New calls with it are refused, and so is the
    # stream that presented it, at its next heartbeat.
    volume.write(f"{NEW}\n")
    await caller.until(OLD, grpc.StatusCode.PERMISSION_DENIED)
    assert await caller.heartbeat_code(OLD) == grpc.StatusCode.PERMISSION_DENIED
    assert await caller.heartbeat_code(NEW) == grpc.StatusCode.OK
    await stream.write(valid())
    assert await asyncio.wait_for(stream.code(), WAIT) == grpc.StatusCode.PERMISSION_DENIED

    # A file made empty keeps the last tokens: never none, never open.
    volume.write("")
    await eventually(
        lambda: any(entry["event"] == UNUSABLE for entry in logs),
        "the empty file seen",
        within=WAIT,
    )
    assert await caller.admin_code(NEW) == grpc.StatusCode.OK
    assert await caller.heartbeat_code(NEW) == grpc.StatusCode.OK
    assert await caller.heartbeat_code(OLD) == grpc.StatusCode.PERMISSION_DENIED
    assert await caller.admin_code("") == grpc.StatusCode.UNAUTHENTICATED
    assert running.tokens is not None and running.tokens.tokens == (NEW,)
    assert NEW not in str(logs) and OLD not in str(logs)
    assert [entry["event"] for entry in logs].count(UNUSABLE) == 1


async def test_a_stream_on_the_current_token_survives_a_rotation(
    harness: Harness, tmp_path: Path
) -> None:
    volume = SecretVolume(tmp_path)
    volume.write(f"{NEW}\n{OLD}\n")
    running = await harness.start(auth_token_file=str(volume.token_file))
    caller = Caller(harness, running)
    stream = caller.registry.HeartbeatStream(None, metadata=bearer(NEW))
    assert (await exchange(stream, valid())).code == 0
    volume.write(f"{NEW}\n")
    await caller.until(OLD, grpc.StatusCode.PERMISSION_DENIED)
    assert (await exchange(stream, valid())).code == 0
    await stream.done_writing()
    assert await asyncio.wait_for(stream.code(), WAIT) == grpc.StatusCode.OK
