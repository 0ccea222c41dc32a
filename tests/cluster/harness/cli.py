"""`kubectl`, `helm` and `docker` for the harness cluster.

Documentation commands run as written in a shell whose PATH starts with
small shims (`shim.py`) that send their argv to the test's `ControlServer`;
`Commands` carries them out against the `Cluster`:

- `helm install|upgrade|test|uninstall|template|lint|get values`: the chart is
  rendered by the real helm (`helm template`, with the same flags), hooks are
  kept for `helm test`, objects applied in Helm's install order. `helm
  template` cannot run `lookup`: a Secret whose data changes between two
  renders of the same values (generated at random) keeps the data already in
  the cluster, as the chart's `lookup` does in a real install.
- `kubectl apply|create namespace|create secret generic|patch|get|delete|exec|
  logs|rollout status|rollout restart`: the subset the docs use; anything
  else fails loudly so that a doc cannot quietly rely on it.
- `docker build|tag|push`: no engine runs here; `build` reads the Dockerfile
  of the context (its image config, see `images.py`) and `push` makes the tag
  pullable by the cluster. Pods whose image was never pushed get ErrImagePull.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.harness.cluster import Cluster, ClusterError, Release, objects_in
from tests.cluster.harness.images import Image, image_from_dockerfile
from tests.cluster.harness.kubelet import Pod
from tests.cluster.harness.objects import Obj, ObjectError, annotations_of, name_of, strategic_merge

SHIM = Path(__file__).with_name("shim.py")

# Helm's InstallOrder (pkg/releaseutil/kind_sorter.go), the kinds that matter here.
INSTALL_ORDER = [
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "Ingress",
]


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Result:
    code: int = 0
    stdout: str = ""
    stderr: str = ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise CommandError(f"{self.prog}: {message}", 2)


@dataclass
class BuiltImage:
    image: Image
    context: str


@dataclass
class Commands:
    cluster: Cluster
    helm_binary: Path
    built: dict[str, BuiltImage] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    async def run(self, argv: Sequence[str], cwd: str, stdin: str) -> Result:
        self.log.append(shlex.join(argv))
        tool, args = argv[0], list(argv[1:])
        out: list[str] = []
        try:
            handler = {"kubectl": self.kubectl, "helm": self.helm, "docker": self.docker}[tool]
            code = await handler(args, Path(cwd), stdin, out)
            return Result(code, "".join(out))
        except CommandError as err:
            return Result(err.code, "".join(out), f"{err}\n")
        except (ClusterError, ObjectError) as err:
            return Result(1, "".join(out), f"Error from server: {err}\n")

    # ------------------------------------------------------------------ helm

    async def helm(self, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        if not args:
            raise CommandError("helm: a command is required", 1)
        command, rest = args[0], args[1:]
        if command in ("template", "lint", "version", "show"):
            result = await self._helm_raw([command, *rest], cwd)
            out.append(result.stdout)
            if result.code:
                raise CommandError(result.stderr.strip(), result.code)
            return 0
        if command in ("install", "upgrade"):
            return await self._helm_install(command, rest, cwd, out)
        if command == "test":
            return await self._helm_test(rest, out)
        if command in ("uninstall", "delete"):
            return await self._helm_uninstall(rest, out)
        if command == "get" and rest[:1] == ["values"]:
            parser = _Parser(prog="helm get values")
            parser.add_argument("name")
            parser.add_argument("-n", "--namespace", default="default")
            opts = parser.parse_args(rest[1:])
            release = self._release(opts.namespace, opts.name)
            out.append(yaml.safe_dump(release.values))
            return 0
        raise CommandError(f"helm {command}: not supported by the cluster harness")

    async def _helm_raw(self, args: list[str], cwd: Path) -> Result:
        process = await asyncio.create_subprocess_exec(
            str(self.helm_binary),
            *args,
            cwd=cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "HELM_CACHE_HOME": str(self.cluster.work / "helm-cache"),
                "HELM_CONFIG_HOME": str(self.cluster.work / "helm-config"),
                "HELM_DATA_HOME": str(self.cluster.work / "helm-data"),
            },
        )
        stdout, stderr = await process.communicate()
        assert process.returncode is not None
        return Result(process.returncode, stdout.decode(), stderr.decode())

    def _release(self, namespace: str, name: str) -> Release:
        release = self.cluster.releases.get((namespace, name))
        if release is None:
            raise CommandError("Error: release: not found")
        return release

    async def _render(
        self, name: str, chart: str, namespace: str, values_args: list[str], cwd: Path
    ) -> tuple[list[Obj], list[Obj]]:
        result = await self._helm_raw(
            ["template", name, chart, "--namespace", namespace, *values_args], cwd
        )
        if result.code:
            raise CommandError(result.stderr.strip() or "helm template failed", 1)
        documents = objects_in(yaml.safe_load_all(result.stdout))
        hooks = [d for d in documents if "helm.sh/hook" in annotations_of(d)]
        objects = [d for d in documents if "helm.sh/hook" not in annotations_of(d)]
        for obj in documents:
            if obj.get("apiVersion") not in self.cluster.api_versions:
                raise CommandError(
                    f"Error: INSTALLATION FAILED: unable to build kubernetes objects from release "
                    f'manifest: resource mapping not found for name: "{name_of(obj)}" namespace: '
                    f'"{namespace}" from "": no matches for kind "{obj.get("kind")}" in version '
                    f'"{obj.get("apiVersion")}"\nensure CRDs are installed first'
                )
        return objects, hooks

    async def _helm_install(self, command: str, args: list[str], cwd: Path, out: list[str]) -> int:
        parser = _Parser(prog=f"helm {command}")
        parser.add_argument("name")
        parser.add_argument("chart")
        parser.add_argument("-n", "--namespace", default="default")
        parser.add_argument("--create-namespace", action="store_true")
        parser.add_argument("--install", action="store_true")
        parser.add_argument("--reuse-values", action="store_true")
        parser.add_argument("--reset-values", action="store_true")
        parser.add_argument("--wait", action="store_true")
        parser.add_argument("--timeout", default="5m0s")
        parser.add_argument("-f", "--values", action="append", default=[])
        parser.add_argument("--set", action="append", default=[])
        parser.add_argument("--set-string", action="append", default=[])
        opts = parser.parse_args(args)
        ns, name = opts.namespace, opts.name
        existing = self.cluster.releases.get((ns, name))
        if command == "install" and existing is not None:
            raise CommandError(
                "Error: INSTALLATION FAILED: cannot re-use a name that is still in use"
            )
        if command == "upgrade" and existing is None and not opts.install:
            raise CommandError(f'Error: UPGRADE FAILED: "{name}" has no deployed releases')
        if ns not in self.cluster.namespaces:
            if not opts.create_namespace:
                raise CommandError(
                    f"Error: INSTALLATION FAILED: create: failed to create: namespaces "
                    f'"{ns}" not found'
                )
            await self.cluster.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            )
        release_dir = self.cluster.work / "releases" / f"{ns}_{name}"
        release_dir.mkdir(parents=True, exist_ok=True)
        values_args: list[str] = []
        if existing is not None and opts.reuse_values and not opts.reset_values:
            values_args += existing.values.get("_args", [])
        for index, path in enumerate(opts.values):
            copy_path = release_dir / f"values-{time.monotonic_ns()}-{index}.yaml"
            try:
                copy_path.write_text((cwd / path).read_text())
            except OSError as err:
                raise CommandError(f"Error: open {path}: {err.strerror}") from None
            values_args += ["-f", str(copy_path)]
        for item in opts.set:
            values_args += ["--set", item]
        for item in opts.set_string:
            values_args += ["--set-string", item]
        objects, hooks = await self._render(name, opts.chart, ns, values_args, cwd)
        again, _ = await self._render(name, opts.chart, ns, values_args, cwd)
        generated = {
            name_of(a)
            for a, b in zip(objects, again, strict=True)
            if a.get("kind") == "Secret" and a.get("data") != b.get("data")
        }
        for obj in objects:
            if obj.get("kind") == "Secret" and name_of(obj) in generated:
                stored = self.cluster.get("Secret", ns, name_of(obj))
                if stored is not None:
                    obj["data"] = copy.deepcopy(stored.get("data"))
        order = {kind: i for i, kind in enumerate(INSTALL_ORDER)}
        for obj in sorted(objects, key=lambda o: order.get(o.get("kind", ""), len(order))):
            await self.cluster.apply(obj, ns)
        if existing is not None:
            keep = {(o["kind"], name_of(o)) for o in objects}
            for old in existing.objects:
                if (old["kind"], name_of(old)) not in keep:
                    await self.cluster.delete(
                        old["kind"], old["metadata"].get("namespace") or ns, name_of(old)
                    )
        revision = existing.revision + 1 if existing else 1
        self.cluster.releases[(ns, name)] = Release(
            name, ns, opts.chart, revision, {"_args": values_args}, objects, hooks
        )
        if opts.wait:
            for obj in objects:
                if obj["kind"] == "Deployment":
                    await self.cluster.wait_rollout(ns, name_of(obj), _duration(opts.timeout))
        out.append(
            f"NAME: {name}\nLAST DEPLOYED: {time.strftime('%a %b %d %H:%M:%S %Y')}\n"
            f"NAMESPACE: {ns}\nSTATUS: deployed\nREVISION: {revision}\n"
        )
        return 0

    async def _helm_test(self, args: list[str], out: list[str]) -> int:
        parser = _Parser(prog="helm test")
        parser.add_argument("name")
        parser.add_argument("-n", "--namespace", default="default")
        parser.add_argument("--logs", action="store_true")
        parser.add_argument("--timeout", default="5m0s")
        opts = parser.parse_args(args)
        release = self._release(opts.namespace, opts.name)
        tests = [h for h in release.hooks if "test" in annotations_of(h)["helm.sh/hook"].split(",")]
        out.append(
            f"NAME: {release.name}\nLAST DEPLOYED: {release.deployed_at}\n"
            f"NAMESPACE: {release.namespace}\nSTATUS: deployed\nREVISION: {release.revision}\n"
        )
        failed = []
        for hook in tests:
            ns = hook["metadata"].get("namespace") or release.namespace
            policy = annotations_of(hook).get("helm.sh/hook-delete-policy", "before-hook-creation")
            if "before-hook-creation" in policy:
                await self.cluster.delete("Pod", ns, name_of(hook))
            started = time.strftime("%a %b %d %H:%M:%S %Y")
            await self.cluster.apply(hook, ns)
            pod = self.cluster.find_pod(ns, name_of(hook))
            assert pod is not None
            await self.cluster.wait_for(
                f"helm test pod {name_of(hook)}", _finished(pod), _duration(opts.timeout)
            )
            out.append(
                f"TEST SUITE:     {name_of(hook)}\nLast Started:   {started}\n"
                f"Last Completed: {time.strftime('%a %b %d %H:%M:%S %Y')}\n"
                f"Phase:          {pod.phase}\n"
            )
            if opts.logs or pod.phase != "Succeeded":
                for c in pod.containers:
                    out.append(f"POD LOGS: {name_of(hook)} ({c.name})\n{c.all_logs()}\n")
            if pod.phase != "Succeeded":
                failed.append(name_of(hook))
            elif "hook-succeeded" in policy:
                await self.cluster.delete("Pod", ns, name_of(hook))
        if failed:
            raise CommandError(
                "Error: 1 error occurred:\n\t* pod " + ", ".join(failed) + " failed", 1
            )
        return 0

    async def _helm_uninstall(self, args: list[str], out: list[str]) -> int:
        parser = _Parser(prog="helm uninstall")
        parser.add_argument("name")
        parser.add_argument("-n", "--namespace", default="default")
        opts = parser.parse_args(args)
        release = self._release(opts.namespace, opts.name)
        for obj in reversed(release.objects):
            await self.cluster.delete(
                obj["kind"], obj["metadata"].get("namespace") or release.namespace, name_of(obj)
            )
        del self.cluster.releases[(opts.namespace, opts.name)]
        out.append(f'release "{opts.name}" uninstalled\n')
        return 0

    # --------------------------------------------------------------- kubectl

    async def kubectl(self, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        namespace = "default"
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest += args[i:]
                break
            if arg in ("-n", "--namespace"):
                namespace = args[i + 1]
                i += 2
                continue
            if arg.startswith("--namespace="):
                namespace = arg.split("=", 1)[1]
            elif arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--"):
                namespace = arg[2:]
            else:
                rest.append(arg)
            i += 1
        if not rest:
            raise CommandError("kubectl: a command is required")
        command, rest = rest[0], rest[1:]
        handlers = {
            "apply": self._apply,
            "create": self._create,
            "patch": self._patch,
            "get": self._get,
            "delete": self._delete,
            "exec": self._exec,
            "logs": self._logs,
            "rollout": self._rollout,
        }
        if command not in handlers:
            raise CommandError(f"kubectl {command}: not supported by the cluster harness")
        return await handlers[command](namespace, rest, cwd, stdin, out)

    def _read_documents(self, path: str, cwd: Path, stdin: str) -> list[Obj]:
        text = stdin if path == "-" else (cwd / path).read_text()
        return objects_in(yaml.safe_load_all(text))

    async def _apply(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        parser = _Parser(prog="kubectl apply")
        parser.add_argument("-f", "--filename", action="append", required=True)
        opts = parser.parse_args(args)
        for path in opts.filename:
            for obj in self._read_documents(path, cwd, stdin):
                verb = await self.cluster.apply(obj, ns)
                out.append(f"{_resource(obj)}/{name_of(obj)} {verb}\n")
        return 0

    async def _create(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        if args[:1] in (["namespace"], ["ns"]):
            name = args[1]
            if name in self.cluster.namespaces:
                raise CommandError(
                    f'Error from server (AlreadyExists): namespaces "{name}" already exists'
                )
            await self.cluster.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
            out.append(f"namespace/{name} created\n")
            return 0
        if args[:2] == ["secret", "generic"]:
            parser = _Parser(prog="kubectl create secret generic")
            parser.add_argument("name")
            parser.add_argument("--from-literal", action="append", default=[])
            parser.add_argument("--from-file", action="append", default=[])
            parser.add_argument("--dry-run", default=None)
            parser.add_argument("-o", "--output", default=None)
            opts = parser.parse_args(args[2:])
            data: dict[str, str] = {}
            for item in opts.from_literal:
                key, _, value = item.partition("=")
                data[key] = base64.b64encode(value.encode()).decode()
            for item in opts.from_file:
                key, sep, path = item.partition("=")
                if not sep:
                    key, path = Path(item).name, item
                data[key] = base64.b64encode((cwd / path).read_bytes()).decode()
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": opts.name, "namespace": ns},
                "data": data,
            }
            if opts.dry_run == "client":
                out.append(yaml.safe_dump(secret) if opts.output == "yaml" else json.dumps(secret))
                return 0
            if self.cluster.get("Secret", ns, opts.name) is not None:
                raise CommandError(
                    f'Error from server (AlreadyExists): secrets "{opts.name}" already exists'
                )
            await self.cluster.apply(secret, ns)
            out.append(f"secret/{opts.name} created\n")
            return 0
        raise CommandError(
            f"kubectl create {' '.join(args[:2])}: not supported by the cluster harness"
        )

    async def _patch(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        parser = _Parser(prog="kubectl patch")
        parser.add_argument("target", nargs="+")
        parser.add_argument("--patch-file", default=None)
        parser.add_argument("-p", "--patch", default=None)
        parser.add_argument("--type", default="strategic")
        opts = parser.parse_args(args)
        kind, name = _kind_and_name(opts.target)
        obj = self.cluster.get(kind, ns, name)
        if obj is None:
            raise CommandError(f'Error from server (NotFound): {_plural(kind)} "{name}" not found')
        text = (cwd / opts.patch_file).read_text() if opts.patch_file else opts.patch
        if text is None:
            raise CommandError(
                "error: must specify --patch or --patch-file containing the contents of the patch"
            )
        patch = yaml.safe_load(text)
        if opts.type != "strategic":
            raise CommandError(
                f"kubectl patch --type {opts.type}: not supported by the cluster harness"
            )
        patched = strategic_merge(obj, patch)
        verb = await self.cluster.apply(patched, ns)
        outcome = "patched" if verb != "unchanged" else "patched (no change)"
        out.append(f"{_resource(obj)}/{name} {outcome}\n")
        return 0

    async def _get(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        parser = _Parser(prog="kubectl get")
        parser.add_argument("target", nargs="+")
        parser.add_argument("-o", "--output", default=None)
        opts = parser.parse_args(args)
        kind, name = _kind_and_name(opts.target)
        obj = self.cluster.get(kind, ns, name)
        if obj is None:
            raise CommandError(f'Error from server (NotFound): {_plural(kind)} "{name}" not found')
        output = opts.output or ""
        if output.startswith("jsonpath="):
            out.append(_jsonpath(obj, output[len("jsonpath=") :]))
        elif output == "yaml":
            out.append(yaml.safe_dump(obj))
        elif output == "json":
            out.append(json.dumps(obj, indent=2) + "\n")
        else:
            out.append(f"NAME\n{name}\n")
        return 0

    async def _delete(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        parser = _Parser(prog="kubectl delete")
        parser.add_argument("target", nargs="*")
        parser.add_argument("-f", "--filename", action="append", default=[])
        parser.add_argument("--wait", default="true")
        opts = parser.parse_args(args)
        targets = []
        if opts.target:
            targets.append(_kind_and_name(opts.target))
        for path in opts.filename:
            targets += [(o["kind"], name_of(o)) for o in self._read_documents(path, cwd, stdin)]
        for kind, name in targets:
            if not await self.cluster.delete(kind, ns, name, wait=opts.wait != "false"):
                raise CommandError(
                    f'Error from server (NotFound): {_plural(kind)} "{name}" not found'
                )
            out.append(f'{_resource({"kind": kind})} "{name}" deleted\n')
        return 0

    async def _exec(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        if "--" not in args:
            raise CommandError("error: exec needs -- before the command in this harness")
        split = args.index("--")
        head, command = args[:split], args[split + 1 :]
        parser = _Parser(prog="kubectl exec")
        parser.add_argument("target")
        parser.add_argument("-c", "--container", default=None)
        parser.add_argument("-i", "--stdin", action="store_true")
        parser.add_argument("-t", "--tty", action="store_true")
        opts = parser.parse_args(head)
        pod = self.cluster.pick_pod(ns, opts.target)
        container = pod.container(opts.container)
        code, output = await container.exec(
            command, limit=120, stdin=stdin.encode() if opts.stdin else None
        )
        out.append(output)
        if code:
            raise CommandError(f"command terminated with exit code {code}", code)
        return 0

    async def _logs(self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        parser = _Parser(prog="kubectl logs")
        parser.add_argument("target")
        parser.add_argument("-c", "--container", default=None)
        parser.add_argument("-p", "--previous", action="store_true")
        opts = parser.parse_args(args)
        pod = self.cluster.pick_pod(ns, opts.target)
        out.append(pod.container(opts.container).logs(previous=opts.previous))
        return 0

    async def _rollout(
        self, ns: str, args: list[str], cwd: Path, stdin: str, out: list[str]
    ) -> int:
        if not args:
            raise CommandError("kubectl rollout: a subcommand is required")
        parser = _Parser(prog=f"kubectl rollout {args[0]}")
        parser.add_argument("target", nargs="+")
        parser.add_argument("--timeout", default="5m")
        opts = parser.parse_args(args[1:])
        kind, name = _kind_and_name(opts.target)
        if kind != "Deployment":
            raise CommandError(f"kubectl rollout: {kind} is not supported by the cluster harness")
        if args[0] == "status":
            try:
                await self.cluster.wait_rollout(ns, name, _duration(opts.timeout))
            except AssertionError as err:
                raise CommandError(f"error: timed out waiting for the condition\n{err}") from None
            out.append(f'deployment "{name}" successfully rolled out\n')
            return 0
        if args[0] == "restart":
            obj = self.cluster.get("Deployment", ns, name)
            if obj is None:
                raise CommandError(
                    f'Error from server (NotFound): deployments.apps "{name}" not found'
                )
            patched = copy.deepcopy(obj)
            template_meta = patched["spec"]["template"].setdefault("metadata", {})
            annotations = template_meta.setdefault("annotations", {})
            annotations["kubectl.kubernetes.io/restartedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ")
            await self.cluster.apply(patched, ns)
            out.append(f"deployment.apps/{name} restarted\n")
            return 0
        raise CommandError(f"kubectl rollout {args[0]}: not supported by the cluster harness")

    # ---------------------------------------------------------------- docker

    async def docker(self, args: list[str], cwd: Path, stdin: str, out: list[str]) -> int:
        if not args:
            raise CommandError("docker: a command is required")
        command, rest = args[0], args[1:]
        if command == "build":
            parser = _Parser(prog="docker build")
            parser.add_argument("context")
            parser.add_argument("-t", "--tag", action="append", default=[])
            parser.add_argument("-f", "--file", default=None)
            opts = parser.parse_args(rest)
            context = (cwd / opts.context).resolve()
            dockerfile = context / (opts.file or "Dockerfile")
            if not dockerfile.is_file():
                raise CommandError(
                    f"ERROR: failed to solve: failed to read dockerfile: open {dockerfile}: "
                    "no such file or directory"
                )
            image = image_from_dockerfile(dockerfile)
            for tag in opts.tag:
                self.built[tag] = BuiltImage(image, str(context))
                out.append(f"naming to {tag} done\n")
            return 0
        if command == "tag":
            source, target = rest
            if source not in self.built:
                raise CommandError(f"Error response from daemon: No such image: {source}")
            self.built[target] = self.built[source]
            return 0
        if command == "push":
            (ref,) = rest
            if ref not in self.built:
                raise CommandError(f"An image does not exist locally with the tag: {ref}")
            self.cluster.registry.push(ref, self.built[ref].image)
            out.append(f"{ref}: digest: sha256:{os.urandom(32).hex()} size: 1234\n")
            return 0
        raise CommandError(f"docker {command}: not supported by the cluster harness")


# ---------------------------------------------------------------------------
# helpers

_KINDS = {
    "deployment": "Deployment",
    "deployments": "Deployment",
    "deploy": "Deployment",
    "deployment.apps": "Deployment",
    "pod": "Pod",
    "pods": "Pod",
    "po": "Pod",
    "secret": "Secret",
    "secrets": "Secret",
    "configmap": "ConfigMap",
    "configmaps": "ConfigMap",
    "cm": "ConfigMap",
    "service": "Service",
    "services": "Service",
    "svc": "Service",
    "namespace": "Namespace",
    "namespaces": "Namespace",
    "ns": "Namespace",
}


def _finished(pod: Pod) -> Callable[[], bool]:
    return lambda: pod.phase in ("Succeeded", "Failed")


def _kind_and_name(target: list[str]) -> tuple[str, str]:
    if len(target) == 1 and "/" in target[0]:
        kind, _, name = target[0].partition("/")
    elif len(target) == 2:
        kind, name = target
    else:
        raise CommandError(f"error: expected TYPE NAME or TYPE/NAME, got {' '.join(target)}")
    if kind.lower() not in _KINDS:
        raise CommandError(f'error: the server doesn\'t have a resource type "{kind}"')
    return _KINDS[kind.lower()], name


def _resource(obj: Obj) -> str:
    kind = str(obj["kind"])
    group = {
        "Deployment": "deployment.apps",
        "Role": "role.rbac.authorization.k8s.io",
        "RoleBinding": "rolebinding.rbac.authorization.k8s.io",
    }
    return group.get(kind, kind.lower())


def _plural(kind: str) -> str:
    return {"Deployment": "deployments.apps"}.get(kind, kind.lower() + "s")


def _duration(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(h|m|s|ms)?", str(text)):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "": 1}[unit]
    return total or 300.0


def _jsonpath(obj: Obj, expression: str) -> str:
    match = re.fullmatch(r"\{((?:\.[\w.-]+|\['[^']+'\])+)\}", expression.strip())
    if not match:
        raise CommandError(
            f"kubectl jsonpath {expression!r}: only {{.a.b}} paths are supported here"
        )
    value: Any = obj
    for part in re.findall(r"\.([\w-]+)|\['([^']+)'\]", match.group(1)):
        key = part[0] or part[1]
        value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return ""
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------
# the control socket the shims talk to


class ControlServer:
    def __init__(self, commands: Commands, path: Path) -> None:
        self.commands = commands
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            result = await self.commands.run(request["argv"], request["cwd"], request["stdin"])
        except Exception as err:
            result = Result(1, "", f"cluster harness error: {err!r}\n")
        writer.write(json.dumps(result.__dict__).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


def install_shims(directory: Path) -> None:
    """`kubectl`, `helm` and `docker` executables that forward to the harness."""
    import sys

    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("kubectl", "helm", "docker"):
        path = directory / tool
        path.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S {SHIM} {tool} "$@"\n')
        path.chmod(0o755)
