"""A counting test backend as its own process, for faults that need a real
process to kill or freeze: `python -m tests.support.backend_process --port P
--name N`. It answers `/lbtest.Echo/Call` with its name (so clients count
calls per backend) and prints `ready` once it listens."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.support.backends import CountingBackend


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    backend = CountingBackend(args.name).start(args.port)
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    backend.stop(2.0)  # let calls in flight finish, as a real backend would
    return 0


if __name__ == "__main__":
    sys.exit(main())
