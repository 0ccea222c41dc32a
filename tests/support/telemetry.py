"""A pod's Prometheus telemetry for scrape tests, on a thread of its own (so
sync tests and other processes can scrape it): counters growing at fixed
rates — `process_cpu_seconds_total` at `cpu` cores, `requests_total` at `rps`
— or HTTP 500 while `broken`, as an OAP whose telemetry fails.

    with TelemetryServer("127.0.0.12", port, cpu=0.9) as telemetry:
        telemetry.broken = True
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.support.started import Started


def counters_page(cpu_seconds: float, requests: float) -> bytes:
    """Prometheus text of the two counters the scrape settings name."""
    return (
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu_seconds}\n"
        "# TYPE requests_total counter\n"
        f"requests_total {requests}\n"
    ).encode()


class TelemetryServer(Started):
    def __init__(self, host: str, port: int, *, cpu: float, rps: float = 100.0) -> None:
        self.host, self.port, self.cpu, self.rps = host, port, cpu, rps
        self.broken = False
        self.scrapes = 0
        self._started = time.monotonic()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def page(self) -> bytes:
        elapsed = time.monotonic() - self._started
        return counters_page(self.cpu * elapsed, self.rps * elapsed)

    def start(self) -> Self:
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                target.scrapes += 1
                if target.broken:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = target.page()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"telemetry-{self.host}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
