"""How many CPUs a backend has: what its CPU seconds are divided by to give
a utilization."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lbserver.errors import InvalidValueError


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def container_cpu_limit(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> float | None:
    """The CPU limit of the cgroup mounted at *root*, in CPUs, or None if there
    is none (or it cannot be read). cgroup v2: ``cpu.max`` holds "QUOTA PERIOD"
    or "max PERIOD"; cgroup v1: ``cpu.cfs_quota_us`` (-1 for none) and
    ``cpu.cfs_period_us``, under ``cpu/``, ``cpu,cpuacct/`` or *root* itself."""
    base = Path(root)
    v2 = _read(base / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    for directory in (base / "cpu", base / "cpu,cpuacct", base):
        quota = _read(directory / "cpu.cfs_quota_us")
        period = _read(directory / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _ratio(quota_text: str, period_text: str) -> float | None:
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    if quota <= 0 or period <= 0:  # -1: no limit (v1)
        return None
    return quota / period


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def default_cpus(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> float:
    """The container's CPU limit, capped at the CPUs the process may use (a
    quota above the core count cannot be used); without a limit, those CPUs.

    This is the limit of the container *this* process runs in: a registrar in a
    sidecar container must be told the backend container's limit (``cpus=``)."""
    limit = container_cpu_limit(root)
    cores = float(available_cpus())
    return cores if limit is None else min(limit, cores)


def parse_cpus(text: str) -> float:
    """A CPU count: ``2``, ``0.5`` or Kubernetes millicores ``500m``; raises ValueError."""
    value = text.strip()
    try:
        number = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    except ValueError:
        raise InvalidValueError(f"{text!r} is not a number of CPUs (like 2, 0.5 or 500m)") from None
    if not math.isfinite(number) or number <= 0:
        raise InvalidValueError(f"must be a number of CPUs > 0, not {text!r}")
    return number
