"""A container that reports what it was given, for the harness's own tests:

    python -m tests.cluster.images.inspect [--read PATH ...] [--write PATH ...]
        [--resolve NAME ...] [--ignore-sigterm] [--exit N]

prints one line `REPORT {json}` with its uid, gid, groups, hostname,
environment, each --read path (a file's text, a directory's entries, or the
error) and each --write path (ok or the error), each --resolve name's
addresses (or the error), then waits for SIGTERM (printing `SIGTERM` when it
arrives; with --ignore-sigterm it keeps running until SIGKILL) unless --exit
is given.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any


def _read(path: str) -> dict[str, Any]:
    try:
        if os.path.isdir(path):
            return {"dir": sorted(os.listdir(path))}
        with open(path) as f:
            return {"text": f.read()}
    except OSError as err:
        return {"error": err.strerror}


def _write(path: str) -> str:
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as err:
        return str(err.strerror)


def _resolve(name: str) -> Any:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)})
    except OSError as err:
        return {"error": str(err)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--read", action="append", default=[])
    parser.add_argument("--write", action="append", default=[])
    parser.add_argument("--resolve", action="append", default=[])
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--exit", type=int, default=None)
    args = parser.parse_args(argv)
    report = {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "argv": sys.argv[1:],
        "env": dict(os.environ),
        "read": {p: _read(p) for p in args.read},
        "write": {p: _write(p) for p in args.write},
        "resolve": {n: _resolve(n) for n in args.resolve},
    }
    print("REPORT " + json.dumps(report), flush=True)
    if args.exit is not None:
        return int(args.exit)
    stop = threading.Event()

    def on_term(*_: Any) -> None:
        print("SIGTERM", flush=True)
        if not args.ignore_sigterm:
            stop.set()

    signal.signal(signal.SIGTERM, on_term)
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
