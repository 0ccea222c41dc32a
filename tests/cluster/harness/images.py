"""Images: what a container runs when its pod spec gives no command, and
what its filesystem holds.

There is no container engine here, so an image is the machine's own
filesystem (with the project installed) plus what the image's build would
set: entrypoint, command, environment, user, working directory, and paths
bound where the build would have put them. The lbserver image is read from
the repository's Dockerfile (its last stage), so a chart whose command lines
assume another ENTRYPOINT fails here as it would in a cluster. Pulling an
image that was never pushed fails (ErrImagePull), as it does from a real
registry.
"""

from __future__ import annotations

import json
import re
import shlex
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.harness.objects import split_image

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"

# The environment of the Dockerfile's base image (python:3.11-slim).
PYTHON_SLIM_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# Where the Dockerfile installs the project; the machine's installation stands in.
VENV_BIN = "/opt/venv/bin"


def scripts_dir() -> Path:
    return Path(sysconfig.get_path("scripts"))


def interpreter_prefix() -> Path:
    return Path(sysconfig.get_path("data"))


@dataclass(frozen=True)
class Bind:
    """A host path the image holds at `target` (read-only)."""

    source: str
    target: str


@dataclass(frozen=True)
class Image:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # "UID[:GID]" or a name; "" is root.
    user: str = ""
    workdir: str = "/"
    binds: tuple[Bind, ...] = ()

    def uid_gid(self) -> tuple[int | None, int | None]:
        """Numeric user and group, or None where the image names a user."""
        if not self.user:
            return 0, 0
        user, _, group = self.user.partition(":")
        uid = int(user) if user.isdigit() else None
        gid = int(group) if group.isdigit() else (uid if not group else None)
        return uid, gid


class ImagePullError(LookupError):
    pass


class ImageRegistry:
    """Pushed images by reference (`repository:tag` or `repository@digest`)."""

    def __init__(self) -> None:
        self._images: dict[tuple[str, str], Image] = {}

    def push(self, ref: str, image: Image) -> None:
        self._images[split_image(ref)] = image

    def pull(self, ref: str) -> Image:
        key = split_image(ref)
        try:
            return self._images[key]
        except KeyError:
            raise ImagePullError(
                f'failed to pull image "{ref}": {key[0]}:{key[1].lstrip("@")}: not found'
            ) from None

    def __contains__(self, ref: str) -> bool:
        return split_image(ref) in self._images


# ---------------------------------------------------------------------------
# the Dockerfile

_CONTINUATION = re.compile(r"\\\n")


def _instructions(text: str) -> list[tuple[str, str]]:
    lines = _CONTINUATION.sub(" ", text).splitlines()
    result = []
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _exec_form(value: str, instruction: str) -> tuple[str, ...]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        # Shell form: what Docker runs is /bin/sh -c "...".
        return ("/bin/sh", "-c", value)
    if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
        raise ValueError(f"{instruction} {value}: not a JSON array of strings")
    return tuple(parsed)


def _expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def image_from_dockerfile(path: Path = DOCKERFILE) -> Image:
    """The final stage's ENTRYPOINT, CMD, ENV, USER and WORKDIR, with the
    machine's installed project bound at the Dockerfile's /opt/venv/bin."""
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions(path.read_text()):
        if word == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((word, rest))
    if not stages:
        raise ValueError(f"{path}: no FROM")
    env = dict(PYTHON_SLIM_ENV)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user = ""
    workdir = "/"
    for word, rest in stages[-1]:
        if word == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"{path}: ENV {rest!r}: use KEY=VALUE")
                env[key] = _expand(value, env)
        elif word == "ENTRYPOINT":
            entrypoint = _exec_form(rest, word)
            cmd = ()  # ENTRYPOINT resets an inherited CMD
        elif word == "CMD":
            cmd = _exec_form(rest, word)
        elif word == "USER":
            user = rest
        elif word == "WORKDIR":
            workdir = rest
    if VENV_BIN not in env.get("PATH", ""):
        raise ValueError(f"{path}: the final stage's PATH does not include {VENV_BIN}")
    return Image(
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        user=user,
        workdir=workdir,
        binds=(Bind(str(scripts_dir()), VENV_BIN),),
    )


def python_image(module: str, *args: str, env: Mapping[str, str] | None = None) -> Image:
    """A test image running `python -m module args...` from this repository."""
    return Image(
        entrypoint=("python", "-m", module),
        cmd=tuple(args),
        env={
            **PYTHON_SLIM_ENV,
            "PATH": f"{VENV_BIN}:{PYTHON_SLIM_ENV['PATH']}",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {}),
        },
        user="10001:10001",
        binds=(Bind(str(scripts_dir()), VENV_BIN),),
    )
