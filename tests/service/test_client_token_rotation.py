"""Token rotation against real balancers: `lbserver register --token-file`
and `lbserver status --token-file` with a file of several tokens, a file
rewritten mid-run the way kubelet updates a mounted Secret, and balancers
that each accept one token (the balancer's own token file is single-token
today)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from lbserver.cli import build_parser, main
from lbserver.cli.register import build_registrar
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.registrar import Registrar
from lbserver.server import RunningServer
from tests.service.harness import Harness
from tests.support.eventually import eventually

pytestmark = pytest.mark.timeout(60)

WAIT = 15.0
OLD = "old-token-2025"
NEW = "new-token-2026"
SWITCHED = "switched registration token"


class SecretVolume:
    """A Secret mounted the way kubelet does it: `token -> ..data/token`,
    `..data -> ..<timestamp>`; an update writes a new timestamped directory
    and swaps `..data` atomically (rename of a new symlink over it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0
        self.token_file = root / "token"

    def write(self, text: str) -> None:
        self.versions += 1
        version = f"..2026_01_01_00_00_{self.versions:02d}"
        (self.root / version).mkdir()
        (self.root / version / "token").write_text(text)
        staged = self.root / "..data_tmp"
        staged.symlink_to(version)
        os.replace(staged, self.root / "..data")
        if not self.token_file.is_symlink():
            self.token_file.symlink_to("..data/token")


def wrong_token_failures() -> float:
    value = REGISTRY.get_sample_value(
        "lbserver_auth_failures_total", {"call": "heartbeat", "reason": "wrong_token"}
    )
    return value or 0.0


async def backends(running: RunningServer, token: str) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        state = await pb_grpc.AdminStub(channel).GetState(
            pb.GetStateRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    return [b.instance_id for s in state.services for b in s.backends]


async def eventually_registered(running: RunningServer, token: str, instance: str) -> None:
    async def registered() -> bool:
        return instance in await backends(running, token)

    await eventually(registered, f"{instance} registered", within=WAIT)


def registrar_for(*balancers: RunningServer, token_file: Path) -> Registrar:
    """What `lbserver register --token-file` builds."""
    argv = ["register", "--service", "oap", "--backend", "127.0.0.1:11800", "--probe", "none"]
    argv += ["--interval", "0.2", "--token-file", str(token_file)]
    for running in balancers:
        argv += ["--balancer", f"127.0.0.1:{running.port}"]
    return build_registrar(build_parser().parse_args(argv))


@contextlib.asynccontextmanager
async def running(registrar: Registrar) -> AsyncIterator[None]:
    task = asyncio.create_task(registrar.run())
    try:
        yield
    finally:
        await registrar.stop()
        await task


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_register_falls_back_to_the_second_token_without_losing_a_heartbeat(
    harness: Harness, tmp_path: Path
) -> None:
    balancer = await harness.start(auth_token=NEW)
    token_file = tmp_path / "token"
    token_file.write_text(f"{OLD}\n{NEW}\n")
    registrar = registrar_for(balancer, token_file=token_file)
    before = wrong_token_failures()
    with capture_logs() as logs:
        async with running(registrar):
            await eventually_registered(balancer, NEW, "127.0.0.1:11800")
            # The heartbeat stream was refused with the first token and
            # reopened with the second at once: no heartbeat was rejected.
            assert not events(logs, "balancer rejected heartbeat")
            assert await registrar.drain() == 1
            # Later heartbeats keep the token that worked: the first token
            # was refused once, not once per heartbeat.
            assert wrong_token_failures() == before + 1
        assert await backends(balancer, NEW) == []  # deregistered with the token that works
    switched = events(logs, SWITCHED)
    assert len(switched) == 1
    assert switched[0]["balancer"] == f"127.0.0.1:{balancer.port}"
    assert (switched[0]["token_number"], switched[0]["tokens"]) == (2, 2)
    assert OLD not in str(logs) and NEW not in str(logs)  # tokens never logged
    assert wrong_token_failures() == before + 1


async def test_each_balancer_keeps_the_token_it_accepts(harness: Harness, tmp_path: Path) -> None:
    """Mid-rotation: one replica knows only the old token, one only the new."""
    on_old = await harness.start(auth_token=OLD)
    on_new = await harness.start(auth_token=NEW)
    token_file = tmp_path / "token"
    token_file.write_text(f"{NEW}\n{OLD}\n")
    registrar = registrar_for(on_old, on_new, token_file=token_file)
    with capture_logs() as logs:
        async with running(registrar):
            await eventually_registered(on_old, OLD, "127.0.0.1:11800")
            await eventually_registered(on_new, NEW, "127.0.0.1:11800")
            assert await registrar.drain() == 2
    assert [entry["balancer"] for entry in events(logs, SWITCHED)] == [f"127.0.0.1:{on_old.port}"]
    assert not events(logs, "balancer rejected heartbeat")


async def test_register_picks_up_a_rotated_secret_without_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    on_old = await harness.start(auth_token=OLD)
    on_new = await harness.start(auth_token=NEW)
    volume = SecretVolume(tmp_path)
    volume.write(f"{OLD}\n")
    registrar = registrar_for(on_old, on_new, token_file=volume.token_file)
    with capture_logs() as logs:
        async with running(registrar):
            await eventually_registered(on_old, OLD, "127.0.0.1:11800")
            assert "127.0.0.1:11800" not in await backends(on_new, NEW)
            # The rotation starts: kubelet swaps the Secret's files.
            volume.write(f"{NEW}\n{OLD}\n")
            await eventually_registered(on_new, NEW, "127.0.0.1:11800")
            assert "127.0.0.1:11800" in await backends(on_old, OLD)
            assert await registrar.drain() == 2
            # The rotation ends: the old token is withdrawn. The stream that
            # was opened with it is reopened with the new token, which the
            # replica still on the old one refuses.
            mark = len(logs)
            volume.write(f"{NEW}\n")
            await eventually(
                lambda: events(logs[mark:], "balancer rejected heartbeat"),
                "the refusal of the reopened stream",
                within=WAIT,
            )
    rejected = events(logs[mark:], "balancer rejected heartbeat")
    assert [(e["balancer"], e["code"]) for e in rejected] == [
        (f"127.0.0.1:{on_old.port}", "PERMISSION_DENIED")
    ]
    # Before the rotation only the replica on the new token refused.
    assert [e["balancer"] for e in events(logs[:mark], "balancer rejected heartbeat")] == [
        f"127.0.0.1:{on_new.port}"
    ]
    assert len(events(logs, "token file changed")) == 2


async def test_status_tries_the_next_token(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    balancer = await harness.start(auth_token=NEW)
    token_file = tmp_path / "token"
    token_file.write_text(f"\n  {OLD}  \n\n{NEW}\n")
    argv = ["status", "--balancer", f"127.0.0.1:{balancer.port}", "--json"]
    argv += ["--token-file", str(token_file)]
    # The sync CLI in a thread: the balancer runs on this event loop.
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    # The in-process balancer's own log lines may share stdout.
    document = json.loads(out[out.index('{\n  "balancer"') :])
    assert document["balancer"] == f"127.0.0.1:{balancer.port}"


async def test_status_with_no_accepted_token_exits_1(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    balancer = await harness.start(auth_token=NEW)
    token_file = tmp_path / "token"
    token_file.write_text(f"{OLD}\nanother-old-one\n")
    argv = ["status", "--balancer", f"127.0.0.1:{balancer.port}", "--token-file", str(token_file)]
    assert await asyncio.to_thread(main, argv) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
