"""Client traffic for fault and restart tests: callers in threads, every
call's outcome recorded with its start time and the backend that answered."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

THREADS = 4


@dataclass
class Outcome:
    started: float
    ended: float
    backend: str | None  # the name in the reply; None when the call failed
    code: grpc.StatusCode | None = None


@dataclass
class Traffic:
    """THREADS callers in a loop, recording every call's outcome."""

    stub: grpc.UnaryUnaryMultiCallable[bytes, bytes]
    deadline: float = 2.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reply = self.stub(b"x", timeout=self.deadline)
                outcome = Outcome(started, time.monotonic(), reply.decode())
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                outcome = Outcome(started, time.monotonic(), None, code)
            with self._lock:
                self.outcomes.append(outcome)
            time.sleep(0.002)

    def calls_to(self, backend: str, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.backend == backend and o.started > after)

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.backend is None]

    def total(self) -> int:
        with self._lock:
            return len(self.outcomes)

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, stub: grpc.UnaryUnaryMultiCallable[bytes, bytes], threads: int = THREADS
    ) -> Iterator[Traffic]:
        traffic = cls(stub)
        workers = [threading.Thread(target=traffic._run, daemon=True) for _ in range(threads)]
        for worker in workers:
            worker.start()
        try:
            yield traffic
        finally:
            traffic._stop.set()
            for worker in workers:
                worker.join(10)


def report(name: str, traffic: Traffic) -> None:
    """Prints what was lost; the target is zero."""
    failures = traffic.failures()
    codes = Counter(o.code.name if o.code else "?" for o in failures)
    print(f"\n[{name}] calls {traffic.total()}, lost {len(failures)} {dict(codes)}")
