"""The cluster harness: runs the rendered chart as a kubelet, cluster DNS,
kube-proxy and the control plane would, on one machine without a cluster.

    async with ClusterHarness.started(tmp_path, helm_binary) as k8s:
        await k8s.sh("helm install lbserver charts/lbserver -n skywalking")

See cluster.py for what is emulated and how, kubelet.py for pods, cli.py for
the commands documentation may use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.harness.cli import Commands, ControlServer, install_shims
from tests.cluster.harness.cluster import Cluster
from tests.cluster.harness.images import ROOT

__all__ = ["ClusterHarness", "ShellResult"]


@dataclass(frozen=True)
class ShellResult:
    code: int
    output: str


class ClusterHarness:
    def __init__(self, work: Path, helm_binary: Path) -> None:
        self.work = work
        self.cluster = Cluster(work / "cluster")
        self.commands = Commands(self.cluster, helm_binary)
        self.bin = work / "bin"
        self._control = ControlServer(self.commands, work / "control.sock")

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, work: Path, helm_binary: Path) -> AsyncIterator[ClusterHarness]:
        harness = cls(work, helm_binary)
        try:
            await harness.cluster.start()
            install_shims(harness.bin)
            await harness._control.start()
            yield harness
        finally:
            await harness._control.close()
            await harness.cluster.close()

    async def sh(
        self, script: str, *, cwd: Path = ROOT, check: bool = True, limit: float = 300
    ) -> ShellResult:
        """Runs shell commands as a user would, with kubectl, helm and docker
        talking to this cluster."""
        env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "LBCLUSTER_SOCKET": str(self.work / "control.sock"),
        }
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), limit)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(
                f"timed out after {limit}s running:\n{script}\n{self.cluster.describe()}"
            ) from None
        assert process.returncode is not None
        result = ShellResult(process.returncode, out.decode(errors="replace"))
        if check and result.code != 0:
            raise AssertionError(
                f"exit {result.code} from:\n{script}\noutput:\n{result.output}\n"
                f"cluster:\n{self.cluster.describe()}"
            )
        return result
