"""Pods, run as the kubelet runs them.

A `Pod` gets its own network namespace and address, its containers' images
pulled from the harness registry (ErrImagePull otherwise), its volumes
written as the kubelet writes them (ConfigMap, Secret and projected volumes
through the atomic `..data` symlink, owned by root and the pod's fsGroup,
with their modes), `/etc/hosts` and `/etc/resolv.conf` pointing at cluster
DNS, and the environment the kubelet builds (service links unless
`enableServiceLinks: false`, envFrom, env with `$(VAR)` expansion and the
Downward API). Init containers run in order; restartable ones (native
sidecars) start first and stop last. Startup, liveness and readiness probes
(gRPC, HTTP, TCP, exec) run with their periods and thresholds; a container
that exits is restarted per the restart policy with a back-off (shortened
from the kubelet's 10 s..5 min to keep tests short). Deletion marks the pod
terminating at once (it leaves Service endpoints), runs preStop hooks, sends
SIGTERM and, at `terminationGracePeriodSeconds`, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.cluster.harness import probes
from tests.cluster.harness.images import Image, ImagePullError, interpreter_prefix
from tests.cluster.harness.objects import (
    Obj,
    ObjectError,
    expand,
    labels_of,
    resource_field,
    service_link_env,
)

if TYPE_CHECKING:
    from tests.cluster.harness.cluster import Cluster

LAUNCHER = Path(__file__).with_name("launcher.py")
REPO = Path(__file__).resolve().parents[3]
NODE_NAME = "node-1"
NODE_ALLOCATABLE = {
    "cpu": Decimal(os.cpu_count() or 1),
    "memory": Decimal(8 * 2**30),
    "ephemeral-storage": Decimal(20 * 2**30),
}
# The kubelet backs off 10 s, doubling to 5 min; shortened here.
RESTART_BACKOFF = (0.5, 1.0, 2.0, 4.0)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class PodSetupError(RuntimeError):
    """The pod cannot start yet (missing image, Secret, ConfigMap...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class ContainerState:
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    exit_code: int | None = None
    message: str = ""


@dataclass
class Probe:
    spec: Obj
    kind: str  # startup | liveness | readiness

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))

    @property
    def initial_delay(self) -> float:
        return float(self.spec.get("initialDelaySeconds", 0))

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))

    @property
    def success_threshold(self) -> int:
        return int(self.spec.get("successThreshold", 1))


class Container:
    def __init__(self, pod: Pod, spec: Obj, kind: str) -> None:
        self.pod = pod
        self.spec = spec
        self.kind = kind  # init | sidecar | main
        self.name: str = spec["name"]
        self.image: Image | None = None
        self.status = ContainerState()
        self.last_termination: ContainerState | None = None
        self.restart_count = 0
        self.started = False
        # Set once the container counts as started (startup probe passed).
        self.started_event = asyncio.Event()
        self.ready = False
        self._pid: int | None = None
        self._pid_file: Path | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.env: dict[str, str] = {}
        self.argv: list[str] = []
        self.uid = 0
        self.gid = 0
        self.groups: list[int] = []
        self.log_paths: list[Path] = []
        self.exited = asyncio.Event()
        self._probe_tasks: list[asyncio.Task[None]] = []
        self._killing = False
        self._log_copy: asyncio.Task[None] | None = None

    # -- what `kubectl logs` shows

    def logs(self, previous: bool = False) -> str:
        paths = self.log_paths[:-1] if previous else self.log_paths[-1:]
        if not paths:
            return ""
        return paths[-1].read_text(errors="replace")

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths)

    # -- running

    def prepare(self) -> None:
        """Image, user, environment and command; PodSetupError when the
        kubelet would refuse to create the container."""
        pod = self.pod
        try:
            self.image = pod.cluster.registry.pull(self.spec["image"])
        except ImagePullError as err:
            raise PodSetupError("ErrImagePull", str(err)) from None
        self.uid, self.gid, self.groups = pod.security_identity(self.spec, self.image)
        self.env = pod.container_env(self.spec)
        command = self.spec.get("command")
        args = self.spec.get("args")
        if command:
            argv = list(command) + list(args or [])
        elif args is not None:
            argv = list(self.image.entrypoint) + list(args)
        else:
            argv = list(self.image.entrypoint) + list(self.image.cmd)
        if not argv:
            raise PodSetupError("CreateContainerError", "no command specified")
        self.argv = [expand(str(a), self.env) for a in argv]

    def process_env(self) -> dict[str, str]:
        assert self.image is not None
        env = dict(self.image.env)
        env["HOSTNAME"] = self.pod.hostname
        env.update(self.env)
        env.setdefault("HOME", "/root" if self.uid == 0 else "/")
        return env

    async def start(self) -> None:
        assert self.image is not None
        pod = self.pod
        attempt = len(self.log_paths)
        log_path = pod.dir / "logs" / f"{self.name}-{attempt}.log"
        # The runtime creates the log file before the container runs: a read
        # right after the start finds it, empty (the copy task opens it late).
        log_path.touch()
        self.log_paths.append(log_path)
        scratch = pod.dir / "rootfs" / f"{self.name}-{attempt}"
        scratch.mkdir(parents=True)
        pid_file = pod.dir / "run" / f"{self.name}-{attempt}.pid"
        spec = {
            "mode": "run",
            "netns": f"/run/netns/{pod.netns}",
            "hostname": pod.hostname,
            "scratch": str(scratch),
            "open_paths": [str(interpreter_prefix()), str(REPO)],
            "image_binds": [{"source": b.source, "target": b.target} for b in self.image.binds],
            "mounts": pod.container_mounts(self.spec),
            "read_only_root": bool(pod.security(self.spec).get("readOnlyRootFilesystem")),
            "uid": self.uid,
            "gid": self.gid,
            "groups": self.groups,
            "env": self.process_env(),
            "argv": self.argv,
            "workdir": self.spec.get("workingDir") or self.image.workdir,
            "pid_file": str(pid_file),
        }
        spec_path = pod.dir / "run" / f"{self.name}-{attempt}.json"
        spec_path.write_text(json.dumps(spec))
        self.exited.clear()
        self._killing = False
        # Like a container runtime: the container's stdout and stderr are a
        # pipe (any user can write /dev/stdout), copied to the log file.
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(LAUNCHER),
            str(spec_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        self._log_copy = asyncio.create_task(_copy_log(self.process.stdout, log_path))
        deadline = time.monotonic() + 20
        while not pid_file.exists():
            if self.process.returncode is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        self._pid_file = pid_file
        self.status = ContainerState("running", "")
        pod.event(f"Started container {self.name}")

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._log_copy is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._log_copy, 5)
        self.status = ContainerState(
            "terminated", "Completed" if code == 0 else "Error", code, self._tail()
        )
        self.last_termination = self.status
        self._pid = None
        self._pid_file = None
        self.ready = False
        self.exited.set()
        return code

    def _tail(self) -> str:
        text = self.logs()
        return "\n".join(text.splitlines()[-5:])

    @property
    def pid(self) -> int | None:
        """The host pid of the container's PID 1, once the launcher wrote it
        (it may write it late on a busy machine: read it when needed)."""
        if self._pid is None and self._pid_file is not None and self._pid_file.exists():
            with contextlib.suppress(ValueError, OSError):
                self._pid = int(self._pid_file.read_text())
        return self._pid

    def signal(self, sig: int) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def kill(self, grace: float, *, run_pre_stop: bool = True) -> None:
        """preStop (within the grace), SIGTERM, then SIGKILL at the grace."""
        if self.pid is None:
            return
        self._killing = True
        deadline = time.monotonic() + max(grace, 0.0)
        if run_pre_stop:
            await self._pre_stop(deadline)
        self.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), max(0.0, deadline - time.monotonic()))
        if not self.exited.is_set():
            self.pod.event(f"Killing container {self.name} with SIGKILL (grace period over)")
            self.signal(signal.SIGKILL)
            try:
                await asyncio.wait_for(self.exited.wait(), 10)
            except TimeoutError:
                # Never hang the harness: the launcher goes too (its death
                # kills the container through PR_SET_PDEATHSIG).
                self.pod.event(f"container {self.name} survived SIGKILL; killing its launcher")
                if self.process is not None and self.process.returncode is None:
                    self.process.kill()

    async def _pre_stop(self, deadline: float) -> None:
        hook = ((self.spec.get("lifecycle") or {}).get("preStop")) or {}
        if not hook:
            return
        remaining = max(0.0, deadline - time.monotonic())
        try:
            if "exec" in hook:
                code, out = await self.exec(hook["exec"]["command"], limit=remaining)
                if code != 0:
                    self.pod.event(f"PreStop exec hook of {self.name} failed ({code}): {out}")
            elif "sleep" in hook:
                await asyncio.sleep(min(remaining, float(hook["sleep"]["seconds"])))
            elif "httpGet" in hook:
                get = hook["httpGet"]
                port = probes.resolve_port(get["port"], [self.spec])
                await probes.http_probe(
                    self.pod.cluster.node_netns,
                    get.get("host") or self.pod.ip,
                    port,
                    get.get("path", "/"),
                    remaining,
                )
        except TimeoutError:
            self.pod.event(f"PreStop hook of {self.name} did not finish within the grace period")

    async def exec(
        self, argv: Sequence[str], limit: float | None = None, *, stdin: bytes | None = None
    ) -> tuple[int, str]:
        """Runs a command in this container (its namespaces, root, user and
        environment): exit code and combined output."""
        if self.pid is None:
            return 126, f"container {self.name} is not running"
        spec = {
            "mode": "exec",
            "target_pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "groups": self.groups,
            "env": self.process_env(),
            "argv": list(argv),
            "workdir": self.spec.get("workingDir") or (self.image.workdir if self.image else "/"),
        }
        spec_path = self.pod.dir / "run" / f"exec-{secrets.token_hex(6)}.json"
        spec_path.write_text(json.dumps(spec))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(LAUNCHER),
            str(spec_path),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(stdin), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        finally:
            spec_path.unlink(missing_ok=True)
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace")

    # -- probes

    def probe(self, kind: str) -> Probe | None:
        spec = self.spec.get(f"{kind}Probe")
        return Probe(spec, kind) if spec else None

    def start_probes(self) -> None:
        startup = self.probe("startup")
        if startup is None:
            self.started = True
            self.started_event.set()
        self._probe_tasks = [
            asyncio.create_task(self._run_probes(), name=f"probes {self.pod.name}/{self.name}")
        ]

    def stop_probes(self) -> None:
        for task in self._probe_tasks:
            task.cancel()
        self._probe_tasks = []

    async def _run_probes(self) -> None:
        startup = self.probe("startup")
        if startup is not None:
            if not await self._probe_until(startup):
                await self._restart_for(startup)
                return
            self.started = True
            self.started_event.set()
            self.pod.changed()
        readiness = self.probe("readiness")
        liveness = self.probe("liveness")
        if readiness is None:
            self.ready = True
            self.pod.changed()
        tasks = []
        if readiness is not None:
            tasks.append(asyncio.create_task(self._readiness_loop(readiness)))
        if liveness is not None:
            tasks.append(asyncio.create_task(self._liveness_loop(liveness)))
        try:
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _probe_once(self, probe: Probe) -> tuple[bool, str]:
        spec = probe.spec
        netns = self.pod.cluster.node_netns
        try:
            if "grpc" in spec:
                return await probes.grpc_probe(
                    netns,
                    self.pod.ip,
                    int(spec["grpc"]["port"]),
                    spec["grpc"].get("service") or "",
                    probe.timeout,
                )
            if "httpGet" in spec:
                get = spec["httpGet"]
                port = probes.resolve_port(get["port"], [self.spec])
                headers = [(h["name"], h["value"]) for h in get.get("httpHeaders") or []]
                return await probes.http_probe(
                    netns,
                    get.get("host") or self.pod.ip,
                    port,
                    get.get("path", "/"),
                    probe.timeout,
                    headers,
                )
            if "tcpSocket" in spec:
                port = probes.resolve_port(spec["tcpSocket"]["port"], [self.spec])
                return await probes.tcp_probe(netns, self.pod.ip, port, probe.timeout)
            if "exec" in spec:
                code, out = await self.exec(spec["exec"]["command"], limit=probe.timeout)
                return code == 0, out
        except TimeoutError:
            return False, f"probe timed out after {probe.timeout}s"
        except LookupError as err:
            return False, str(err)
        return False, f"unsupported probe {sorted(spec)}"

    async def _probe_until(self, probe: Probe) -> bool:
        """The startup probe: True on success, False after failureThreshold."""
        await asyncio.sleep(probe.initial_delay)
        failures = 0
        while True:
            ok, message = await self._probe_once(probe)
            if ok:
                return True
            failures += 1
            if failures >= probe.failure_threshold:
                self.pod.event(f"Startup probe of {self.name} failed: {message}")
                return False
            await asyncio.sleep(probe.period)

    async def _readiness_loop(self, probe: Probe) -> None:
        await asyncio.sleep(probe.initial_delay)
        successes = failures = 0
        while True:
            ok, message = await self._probe_once(probe)
            if ok:
                successes, failures = successes + 1, 0
                if not self.ready and successes >= probe.success_threshold:
                    self.ready = True
                    self.pod.changed()
            else:
                successes, failures = 0, failures + 1
                if self.ready and failures >= probe.failure_threshold:
                    self.ready = False
                    self.pod.event(f"Readiness probe of {self.name} failed: {message}")
                    self.pod.changed()
                elif not self.ready and failures == 1:
                    self.pod.last_probe_message = message
            await asyncio.sleep(probe.period)

    async def _liveness_loop(self, probe: Probe) -> None:
        await asyncio.sleep(probe.initial_delay)
        failures = 0
        while True:
            ok, message = await self._probe_once(probe)
            failures = 0 if ok else failures + 1
            if failures >= probe.failure_threshold:
                self.pod.event(f"Liveness probe of {self.name} failed: {message}")
                await self._restart_for(probe)
                return
            await asyncio.sleep(probe.period)

    async def _restart_for(self, probe: Probe) -> None:
        self.pod.event(f"Container {self.name} failed {probe.kind} probe, will be restarted")
        self.pod.cluster.spawn(self.kill(self.pod.grace_period()))


class Pod:
    def __init__(self, cluster: Cluster, obj: Obj) -> None:
        self.cluster = cluster
        self.obj = obj
        metadata = obj["metadata"]
        self.name: str = metadata["name"]
        self.namespace: str = metadata.get("namespace") or "default"
        self.uid = secrets.token_hex(8)
        self.spec: Obj = obj["spec"]
        self.labels = labels_of(obj)
        self.owner: str | None = metadata.get("_owner")
        self.hostname = self.spec.get("hostname") or self.name
        self.ip = ""
        self.netns = ""
        self.dir = cluster.work / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.phase = "Pending"
        self.reason = ""
        self.deletion_started: float | None = None
        self.gone = asyncio.Event()
        self.events: list[str] = []
        self.last_probe_message = ""
        self.created = time.monotonic()
        restart_policy = self.spec.get("restartPolicy", "Always")
        self.restart_policy: str = restart_policy
        init_specs = self.spec.get("initContainers") or []
        self.containers: list[Container] = [
            Container(self, c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
            for c in init_specs
        ] + [Container(self, c, "main") for c in self.spec.get("containers") or []]
        self._task: asyncio.Task[None] | None = None
        self._supervisors: list[asyncio.Task[None]] = []
        self._volume_versions: dict[str, str] = {}

    # -- status

    def __repr__(self) -> str:
        return f"<Pod {self.namespace}/{self.name} {self.phase} ip={self.ip}>"

    @property
    def terminating(self) -> bool:
        return self.deletion_started is not None

    @property
    def ready(self) -> bool:
        if self.phase != "Running":
            return False
        relevant = [c for c in self.containers if c.kind in ("sidecar", "main")]
        return bool(relevant) and all(c.ready and c.status.state == "running" for c in relevant)

    def container(self, name: str | None = None) -> Container:
        mains = [c for c in self.containers if c.kind == "main"]
        if name is None:
            return mains[0]
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(f"pod {self.name} has no container {name!r}")

    @property
    def restarts(self) -> int:
        return sum(c.restart_count for c in self.containers)

    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.created:7.2f}s {text}")

    def changed(self) -> None:
        self.cluster.pods_changed()

    def describe(self) -> str:
        lines = [
            f"Pod {self.namespace}/{self.name} ip={self.ip} phase={self.phase} "
            f"ready={self.ready} reason={self.reason}"
        ]
        for c in self.containers:
            lines.append(
                f"  {c.kind} {c.name}: {c.status.state} {c.status.reason} "
                f"exit={c.status.exit_code} restarts={c.restart_count} ready={c.ready}"
            )
            tail = c.logs().splitlines()[-15:]
            lines += [f"    | {line}" for line in tail]
        lines += [f"  event {e}" for e in self.events[-15:]]
        return "\n".join(lines)

    def grace_period(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    # -- security

    def security(self, container: Obj) -> Obj:
        merged: Obj = dict(self.spec.get("securityContext") or {})
        merged.update(container.get("securityContext") or {})
        return merged

    def security_identity(self, container: Obj, image: Image) -> tuple[int, int, list[int]]:
        context = self.security(container)
        image_uid, image_gid = image.uid_gid()
        uid = context.get("runAsUser", image_uid)
        if context.get("runAsNonRoot"):
            if uid is None:
                raise PodSetupError(
                    "CreateContainerConfigError",
                    f"container has runAsNonRoot and image has non-numeric user ({image.user}), "
                    "cannot verify user is non-root",
                )
            if int(uid) == 0:
                raise PodSetupError(
                    "CreateContainerConfigError",
                    "container has runAsNonRoot and image will run as root",
                )
        if uid is None:
            raise PodSetupError(
                "CreateContainerConfigError", f"image user {image.user!r} is not numeric"
            )
        gid = context.get("runAsGroup", image_gid if image_gid is not None else 0)
        pod_context = self.spec.get("securityContext") or {}
        groups = [int(gid), *[int(g) for g in pod_context.get("supplementalGroups") or []]]
        if pod_context.get("fsGroup") is not None:
            groups.append(int(pod_context["fsGroup"]))
        return int(uid), int(gid), sorted(set(groups))

    # -- environment

    def field_value(self, path: str) -> str:
        metadata = self.obj["metadata"]
        if path == "metadata.name":
            return self.name
        if path == "metadata.namespace":
            return self.namespace
        if path == "metadata.uid":
            return self.uid
        if path.startswith("metadata.labels['"):
            return str(self.labels.get(path[len("metadata.labels['") : -2], ""))
        if path.startswith("metadata.annotations['"):
            key = path[len("metadata.annotations['") : -2]
            return str((metadata.get("annotations") or {}).get(key, ""))
        if path in ("status.podIP", "status.podIPs"):
            return self.ip
        if path == "status.hostIP":
            return self.cluster.node_ip
        if path == "spec.nodeName":
            return NODE_NAME
        if path == "spec.serviceAccountName":
            return self.service_account
        raise PodSetupError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")

    @property
    def service_account(self) -> str:
        return str(self.spec.get("serviceAccountName") or "default")

    def container_env(self, container: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.spec.get("enableServiceLinks", True):
            for service in self.cluster.services_in(self.namespace):
                env.update(service_link_env(service))
        env.update(service_link_env(self.cluster.master_service()))
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            data = self.cluster.object_data(kind, self.namespace, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodSetupError(
                    "CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found'
                )
            for key, value in data.items():
                env[prefix + key] = value.decode(errors="replace")
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[name] = self.field_value(source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                ref = source["resourceFieldRef"]
                target = self._container_spec(ref.get("containerName") or container["name"])
                env[name] = resource_field(
                    target, ref["resource"], ref.get("divisor"), NODE_ALLOCATABLE
                )
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "ConfigMap" if "configMapKeyRef" in source else "Secret"
                ref = source.get("configMapKeyRef") or source["secretKeyRef"]
                data = self.cluster.object_data(kind, self.namespace, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodSetupError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}",
                    )
                env[name] = data[ref["key"]].decode(errors="replace")
        return env

    def _container_spec(self, name: str) -> Obj:
        for c in self.containers:
            if c.name == name:
                return c.spec
        raise PodSetupError("CreateContainerConfigError", f"no container {name!r} in the pod")

    # -- volumes

    def _volume_files(self, volume: Obj) -> tuple[dict[str, tuple[bytes, int]], bool] | None:
        """{relative path: (content, mode)} and whether it is a read-only kind;
        None for an emptyDir; PodSetupError when a source is missing."""
        default_mode = 0o644
        if "configMap" in volume or "secret" in volume:
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            source = volume.get("configMap") or volume["secret"]
            name = source.get("name") or source.get("secretName")
            mode = int(source.get("defaultMode", default_mode))
            return self._source_files(kind, name, source, mode), True
        if "projected" in volume:
            projected = volume["projected"]
            mode = int(projected.get("defaultMode", default_mode))
            files: dict[str, tuple[bytes, int]] = {}
            for src in projected.get("sources") or []:
                if "secret" in src or "configMap" in src:
                    kind = "ConfigMap" if "configMap" in src else "Secret"
                    ref = src.get("configMap") or src["secret"]
                    files.update(self._source_files(kind, ref["name"], ref, mode))
                elif "serviceAccountToken" in src:
                    token = self.cluster.service_account_token(self.namespace, self.service_account)
                    files[src["serviceAccountToken"]["path"]] = (token.encode(), mode)
                elif "downwardAPI" in src:
                    for item in src["downwardAPI"].get("items") or []:
                        value = self.field_value(item["fieldRef"]["fieldPath"])
                        files[item["path"]] = (value.encode(), int(item.get("mode", mode)))
            return files, True
        if "downwardAPI" in volume:
            mode = int(volume["downwardAPI"].get("defaultMode", default_mode))
            files = {}
            for item in volume["downwardAPI"].get("items") or []:
                value = self.field_value(item["fieldRef"]["fieldPath"])
                files[item["path"]] = (value.encode(), int(item.get("mode", mode)))
            return files, True
        if "emptyDir" in volume:
            return None
        raise PodSetupError(
            "FailedMount", f"volume {volume['name']}: kind {sorted(volume)} is not supported here"
        )

    def _source_files(
        self, kind: str, name: str, source: Obj, mode: int
    ) -> dict[str, tuple[bytes, int]]:
        data = self.cluster.object_data(kind, self.namespace, name)
        if data is None:
            if source.get("optional"):
                return {}
            raise PodSetupError(
                "FailedMount",
                f'MountVolume.SetUp failed: {kind.lower()} "{name}" not found',
            )
        items = source.get("items")
        if not items:
            return {key: (value, mode) for key, value in data.items()}
        files = {}
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise PodSetupError(
                    "FailedMount",
                    f'MountVolume.SetUp failed: configmap/secret "{name}" has no key {item["key"]}',
                )
            files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
        return files

    def write_volumes(self) -> None:
        """Creates or updates every volume's directory (atomic writer layout)."""
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        for volume in self.all_volumes():
            target = self.dir / "volumes" / volume["name"]
            result = self._volume_files(volume)
            if result is None:
                if not target.exists():
                    target.mkdir(parents=True)
                    os.chmod(target, 0o777)
                    if fs_group is not None:
                        os.chown(target, 0, int(fs_group))
                        os.chmod(target, 0o2777)
                continue
            files, _ = result
            version = json.dumps(
                {k: [v.hex(), m] for k, (v, m) in sorted(files.items())}, sort_keys=True
            )
            if self._volume_versions.get(volume["name"]) == version:
                continue
            _atomic_write(target, files, fs_group)
            self._volume_versions[volume["name"]] = version

    def all_volumes(self) -> list[Obj]:
        volumes = list(self.spec.get("volumes") or [])
        if self.automount_token():
            volumes.append(
                {
                    "name": "kube-api-access",
                    "projected": {
                        "defaultMode": 0o644,
                        "sources": [
                            {"serviceAccountToken": {"path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                            {
                                "downwardAPI": {
                                    "items": [
                                        {
                                            "path": "namespace",
                                            "fieldRef": {"fieldPath": "metadata.namespace"},
                                        }
                                    ]
                                }
                            },
                        ],
                    },
                }
            )
        return volumes

    def automount_token(self) -> bool:
        if "automountServiceAccountToken" in self.spec:
            return bool(self.spec["automountServiceAccountToken"])
        account = self.cluster.get("ServiceAccount", self.namespace, self.service_account)
        if account is not None and "automountServiceAccountToken" in account:
            return bool(account["automountServiceAccountToken"])
        return True

    def container_mounts(self, container: Obj) -> list[dict[str, Any]]:
        mounts: list[dict[str, Any]] = [
            {
                "source": str(self.dir / name),
                "target": f"/etc/{name}",
                "readonly": False,
                "file": True,
            }
            for name in ("hosts", "resolv.conf", "hostname")
        ]
        names = {v["name"] for v in self.all_volumes()}
        volume_mounts = list(container.get("volumeMounts") or [])
        if self.automount_token() and not any(
            m["mountPath"] == SERVICE_ACCOUNT_DIR for m in volume_mounts
        ):
            volume_mounts.append(
                {"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}
            )
        for mount in volume_mounts:
            if mount["name"] not in names:
                raise PodSetupError(
                    "CreateContainerConfigError",
                    f"volumeMount {mount['name']!r} refers to no volume of the pod",
                )
            source = self.dir / "volumes" / mount["name"]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append(
                {
                    "source": str(source),
                    "target": mount["mountPath"],
                    "readonly": bool(mount.get("readOnly")),
                    "file": source.is_file(),
                }
            )
        return mounts

    def write_files(self) -> None:
        for sub in ("logs", "run", "rootfs", "volumes"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        domain = self.cluster.domain
        (self.dir / "hosts").write_text(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{self.ip}\t{self.hostname}\n"
        )
        (self.dir / "resolv.conf").write_text(
            f"search {self.namespace}.svc.{domain} svc.{domain} {domain}\n"
            f"nameserver {self.cluster.dns_ip}\noptions ndots:5\n"
        )
        (self.dir / "hostname").write_text(self.hostname + "\n")
        for path in (self.dir / "hosts", self.dir / "resolv.conf", self.dir / "hostname"):
            os.chmod(path, 0o644)

    # -- lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")

    async def _setup(self) -> None:
        """Waits (as the kubelet retries) until images, Secrets and ConfigMaps are there."""
        delay = 0.2
        while True:
            try:
                for c in self.containers:
                    c.prepare()
                self.write_volumes()
                return
            except (PodSetupError, ObjectError) as err:
                reason = err.reason if isinstance(err, PodSetupError) else "Invalid"
                if self.reason != reason or not self.events or str(err) not in self.events[-1]:
                    self.event(str(err))
                self.reason = reason
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _run(self) -> None:
        try:
            self.ip = self.cluster.allocate_pod_ip()
            self.dir.mkdir(parents=True)
            self.write_files()
            await self._setup()
            self.netns = self.cluster.network.add_pod(self.ip)
            self.reason = ""
            self.event(f"Scheduled; pod IP {self.ip}")
            self.changed()
            for c in self.containers:
                if c.kind == "init":
                    if not await self._run_init(c):
                        self.phase = "Failed"
                        self.reason = "Init:Error"
                        self.changed()
                        return
                elif c.kind == "sidecar":
                    self._supervisors.append(asyncio.create_task(self._supervise(c)))
                    await c.started_event.wait()
            self.phase = "Running"
            mains = [c for c in self.containers if c.kind == "main"]
            main_tasks = [asyncio.create_task(self._supervise(c)) for c in mains]
            self._supervisors += main_tasks
            self.changed()
            await asyncio.gather(*main_tasks, return_exceptions=True)
            if not self.terminating:
                codes = [c.status.exit_code for c in mains]
                self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
                for c in self.containers:
                    if c.kind == "sidecar":
                        await c.kill(self.grace_period())
                self.changed()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.phase = "Failed"
            self.reason = f"HarnessError: {err!r}"
            self.event(self.reason)
            self.changed()

    async def _run_init(self, c: Container) -> bool:
        attempt = 0
        while not self.terminating:
            await c.start()
            code = await c.wait()
            if code == 0:
                return True
            c.restart_count += 1
            if self.restart_policy == "Never":
                return False
            await asyncio.sleep(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)])
            attempt += 1
        return False

    async def _supervise(self, c: Container) -> None:
        attempt = 0
        while not self.terminating:
            await c.start()
            c.start_probes()
            self.changed()
            code = await c.wait()
            c.stop_probes()
            c.started = False
            c.started_event.clear()
            self.changed()
            if self.terminating:
                return
            done = self.restart_policy == "Never" or (
                self.restart_policy == "OnFailure" and code == 0
            )
            if done and c.kind != "sidecar":
                return
            c.restart_count += 1
            c.status = ContainerState("waiting", "CrashLoopBackOff", code, c.status.message)
            self.event(f"Back-off restarting container {c.name} (exit {code})")
            await asyncio.sleep(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)])
            attempt += 1

    async def delete(self, grace: float | None = None) -> None:
        """Terminates the pod as the kubelet does and waits until it is gone."""
        if self.deletion_started is None:
            self.deletion_started = time.monotonic()
            self.event("Killing (pod deleted)")
            self.changed()
            self.cluster.spawn(self._terminate(self.grace_period() if grace is None else grace))
        await self.gone.wait()

    async def _terminate(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        try:
            mains = [c for c in self.containers if c.kind == "main" and c.pid is not None]
            await asyncio.gather(*(c.kill(grace) for c in mains))
            for c in reversed([c for c in self.containers if c.kind == "sidecar"]):
                # Sidecars stop after the main containers, within what is left
                # of the grace period (at least two seconds).
                await c.kill(max(2.0, deadline - time.monotonic()))
        finally:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            for task in self._supervisors:
                task.cancel()
            for c in self.containers:
                c.stop_probes()
                c.signal(signal.SIGKILL)
            if self.netns:
                self.cluster.network.remove_pod(self.netns)
            self.phase = "Terminated"
            self.gone.set()
            self.cluster.pod_gone(self)

    async def kill_now(self) -> None:
        """Everything SIGKILLed (harness shutdown)."""
        await self.delete(grace=0)


async def _copy_log(stream: asyncio.StreamReader, path: Path) -> None:
    with path.open("ab", buffering=0) as log:
        while chunk := await stream.read(65536):
            log.write(chunk)


def _atomic_write(target: Path, files: Mapping[str, tuple[bytes, int]], fs_group: Any) -> None:
    """The kubelet's AtomicWriter: files in a timestamped directory, `..data`
    pointing at it (swapped with a rename), and a symlink per top-level name."""
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o755 if fs_group is None else 0o2755)
    if fs_group is not None:
        os.chown(target, 0, int(fs_group))
    stamp = target / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(4)}"
    stamp.mkdir()
    for path, (content, mode) in files.items():
        file = stamp / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content)
        if fs_group is not None:
            os.chown(file, 0, int(fs_group))
            mode |= 0o440
        os.chmod(file, mode)
    old = os.readlink(target / "..data") if (target / "..data").is_symlink() else None
    tmp = target / "..data_tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(stamp.name, tmp)
    os.rename(tmp, target / "..data")
    tops = {Path(p).parts[0] for p in files}
    for top in tops:
        link = target / top
        if not link.is_symlink():
            os.symlink(f"..data/{top}", link)
    for entry in target.iterdir():
        if entry.is_symlink() and entry.name not in tops and entry.name != "..data":
            entry.unlink()
    if old is not None and old != stamp.name:
        shutil.rmtree(target / old, ignore_errors=True)


__all__ = ["Container", "Pod", "PodSetupError", "field"]
