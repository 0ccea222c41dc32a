"""`kubectl`, `helm` or `docker` in a documentation command: sends its argv,
working directory and standard input to the cluster harness
(LBCLUSTER_SOCKET) and prints what the harness answers. Standard library
only; run as `python -I -S shim.py TOOL ARGS...`."""

from __future__ import annotations

import json
import os
import socket
import sys


def main() -> int:
    path = os.environ.get("LBCLUSTER_SOCKET")
    if not path:
        print(
            f"{sys.argv[1]}: LBCLUSTER_SOCKET is not set (not inside the cluster harness)",
            file=sys.stderr,
        )
        return 1
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    request = {"argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": stdin}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    reply = json.loads(b"".join(chunks))
    sys.stdout.write(reply["stdout"])
    sys.stderr.write(reply["stderr"])
    return int(reply["code"])


if __name__ == "__main__":
    sys.exit(main())
