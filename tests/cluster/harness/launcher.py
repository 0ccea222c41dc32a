"""Starts one container, or a command inside a running one, as a container
runtime would. Runs as root, standard library only; the harness starts it as

    python3 -I -S launcher.py SPEC.json

`run` (a container): joins the pod's network namespace, unshares mount, UTS
and PID namespaces, builds the root filesystem as an overlay of the machine's
own (the "image": the machine with the project installed) on a tmpfs, mounts
the pod's volumes and files at their paths, makes the root read-only when
asked, then forks the container's PID 1, which mounts /proc, chroots, drops to
the container's user and groups and execs the command with the container's
environment (the command is looked up in the container's PATH). The launcher
writes PID 1's host pid to `pid_file` and exits with its status; the harness
signals PID 1 directly, so signal rules of a PID namespace's init apply (a
signal it has no handler for is ignored, SIGKILL is not).

`exec` (`kubectl exec`, exec probes and hooks): enters the namespaces and the
root of the container whose PID 1 is `target_pid` and runs the command there
as the container's user.

The spec is JSON:

    {"mode": "run", "netns": "/run/netns/x", "hostname": "pod", "scratch": DIR,
     "open_paths": [...], "image_binds": [{"source", "target"}],
     "mounts": [{"source", "target", "readonly", "file"}], "read_only_root": bool,
     "uid": 0, "gid": 0, "groups": [], "env": {...}, "argv": [...],
     "workdir": "/", "pid_file": FILE}
    {"mode": "exec", "target_pid": 123, "uid", "gid", "groups", "env", "argv", "workdir"}
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import sys
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def setns(path: str, kind: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(libc.setns(fd, kind), f"setns {path}")
    finally:
        os.close(fd)


def die_with_parent() -> None:
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def _inside(root: str, path: str) -> str:
    """`path` as the container will see it, resolved under `root`: symlinks
    (like Debian's /var/run -> /run) are followed inside the new root, never
    out to the machine's own filesystem."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {path}")
            link = os.readlink(candidate)
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _make_mountpoint(path: str, is_file: bool) -> None:
    if is_file:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path, "w"):
                pass
    else:
        os.makedirs(path, exist_ok=True)


def build_root(spec: dict[str, Any]) -> str:
    scratch = spec["scratch"]
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    upper, work, root = (os.path.join(scratch, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.mkdir(d)
    mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={upper},workdir={work}")
    # What the image would have readable: the interpreter and the project.
    for path in spec.get("open_paths", []):
        current = "/"
        for part in path.strip("/").split("/"):
            current = os.path.join(current, part)
            inside = _inside(root, current)
            if os.path.isdir(inside):
                mode = stat.S_IMODE(os.stat(inside).st_mode)
                os.chmod(inside, mode | 0o055)
    binds = [
        (b["source"], b["target"], True, os.path.isfile(b["source"]))
        for b in spec.get("image_binds", [])
    ]
    binds += [(m["source"], m["target"], m["readonly"], m["file"]) for m in spec["mounts"]]
    for _, target, _, is_file in binds:
        _make_mountpoint(_inside(root, target), is_file)
    for sub in ("proc", "dev", "sys"):
        os.makedirs(_inside(root, sub), exist_ok=True)
    mount("/dev", _inside(root, "dev"), None, MS_BIND | MS_REC)
    mount("/sys", _inside(root, "sys"), None, MS_BIND)
    mount("none", _inside(root, "sys"), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for source, target, readonly, _ in binds:
        where = _inside(root, target)
        mount(source, where, None, MS_BIND | MS_REC)
        if readonly:
            mount("none", where, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    # The "image" is this machine's installation: bind the interpreter and the
    # project over the overlay, read-only, as an image would have them. The
    # overlay alone is not enough: it shows only the root filesystem (a
    # checkout on another mount, as CI's, is an empty directory in it), and a
    # volume can hide them (a checkout under /tmp, an emptyDir at /tmp).
    for path in spec.get("open_paths", []):
        if os.path.exists(path):
            where = _inside(root, path)
            os.makedirs(where, exist_ok=True)
            mount(path, where, None, MS_BIND | MS_REC)
            mount("none", where, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if spec.get("read_only_root"):
        mount("none", root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    return root


def drop_privileges(spec: dict[str, Any]) -> None:
    # runc's fixStdioPermissions: the container user owns its stdio pipes, so
    # it can reopen /dev/stdout (/proc/self/fd/1) like in a real container.
    for fd in (0, 1, 2):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.fchown(fd, int(spec["uid"]), int(spec["gid"]))
        except OSError:
            pass
    os.setgroups(list(spec.get("groups", [])))
    os.setgid(int(spec["gid"]))
    os.setuid(int(spec["uid"]))


def exec_command(spec: dict[str, Any]) -> None:
    """In the child: become the container's user and exec the command."""
    drop_privileges(spec)
    die_with_parent()
    argv = spec["argv"]
    env = dict(spec["env"])
    try:
        os.chdir(spec.get("workdir") or "/")
    except OSError as err:
        print(f"container: chdir {spec.get('workdir')}: {err.strerror}", file=sys.stderr)
        os._exit(128)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as err:
        print(
            f'container: exec: "{argv[0]}": {err.strerror} (PATH={env.get("PATH", "")})',
            file=sys.stderr,
            flush=True,
        )
        os._exit(127 if err.errno == 2 else 126)


def wait_child(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)


def run(spec: dict[str, Any]) -> int:
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    setns(spec["netns"], CLONE_NEWNET)
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    hostname = spec["hostname"].encode()
    _check(libc.sethostname(hostname, len(hostname)), "sethostname")
    root = build_root(spec)
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            mount("proc", _inside(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            os.chroot(root)
            exec_command(spec)
        except BaseException as err:
            print(f"container: cannot start: {err}", file=sys.stderr, flush=True)
            os._exit(128)
    with open(spec["pid_file"] + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(spec["pid_file"] + ".tmp", spec["pid_file"])
    return wait_child(pid)


def exec_in(spec: dict[str, Any]) -> int:
    die_with_parent()
    target = int(spec["target_pid"])
    proc = f"/proc/{target}"
    fds = {
        kind: os.open(f"{proc}/ns/{name}", os.O_RDONLY)
        for name, kind in (
            ("net", CLONE_NEWNET),
            ("uts", CLONE_NEWUTS),
            ("pid", CLONE_NEWPID),
            ("mnt", CLONE_NEWNS),
        )
    }
    root_fd = os.open(f"{proc}/root", os.O_RDONLY)
    for kind, fd in fds.items():
        _check(libc.setns(fd, kind), f"setns {kind:#x} of {target}")
        os.close(fd)
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)
    pid = os.fork()
    if pid == 0:
        try:
            exec_command(spec)
        except BaseException as err:
            print(f"exec: cannot start: {err}", file=sys.stderr, flush=True)
            os._exit(128)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    return wait_child(pid)


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec["mode"] == "run":
        return run(spec)
    return exec_in(spec)


if __name__ == "__main__":
    sys.exit(main())
