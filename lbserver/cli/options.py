"""argparse value types shared by the commands (lbserver and agent-shim)."""

from __future__ import annotations

import argparse
import math

from lbserver.addresses import DEFAULT_BALANCER_PORT, join_host_port, parse_host_port


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not {value}")
    return number


def non_negative_seconds(value: str) -> float:
    """A finite number of seconds >= 0."""
    number = _seconds(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {value}")
    return number


def positive_seconds(value: str) -> float:
    """A finite number of seconds > 0."""
    number = _seconds(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {value}")
    return number


def balancer_address(value: str) -> str:
    """A balancer as HOST:PORT, [IPV6]:PORT, or HOST / [IPV6] alone meaning
    port 11810 (DEFAULT_BALANCER_PORT); returned as HOST:PORT."""
    try:
        return join_host_port(*parse_host_port(value, default_port=DEFAULT_BALANCER_PORT))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
