"""What every benchmark's report shares: the machine it ran on, and writing
its own section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine() -> dict[str, str]:
    """Date, CPU, cores, kernel, Python, grpcio and the load average now."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "CPU": cpu_model(),
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load average at start": f"{os.getloadavg()[0]:.2f}",
    }


def run_lines(command: str, machine: Mapping[str, str], settings: Mapping[str, str]) -> list[str]:
    """The Markdown lines saying how a benchmark ran: its command, the
    machine, its settings."""
    return [
        "```sh",
        command,
        "```",
        "",
        "**Machine.** " + "; ".join(f"{k}: {v}" for k, v in machine.items()) + ".",
        "",
        "**Settings.** " + "; ".join(f"{k}: {v}" for k, v in settings.items()) + ".",
        "",
    ]


def replace_section(path: Path, title: str, section: str) -> None:
    """Replaces (or appends) the section of `path` from the line `title` to
    the next `## ` heading with `section`, leaving every other section as
    it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        after = "".join(lines[end:])
        body = "".join(lines[:start]) + section + ("\n" + after if after else "")
    path.write_text(body)


def publish(
    section: str, log_dir: Path, out: Path | None, write: Callable[[Path, str], None]
) -> None:
    """Prints a benchmark's rendered section, keeps it in `log_dir`, and
    writes it into `out` (docs/benchmarks.md) with `write` when asked."""
    print(section)
    (log_dir / "section.md").write_text(section)
    if out:
        write(out, section)
        print(f"wrote {out}", flush=True)
