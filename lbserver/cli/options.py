"""argparse value types and option groups shared by the commands (lbserver
and agent-shim): one implementation each, so both commands take and refuse
the same spellings with the same messages."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from lbserver.addresses import DEFAULT_BALANCER_PORT, join_host_port, parse_host_port
from lbserver.logs import LOG_FORMATS, LOG_LEVELS

__all__ = [
    "add_balancers_option",
    "add_command",
    "add_logging_options",
    "address",
    "address_list",
    "balancer_address",
    "balancer_list",
    "bounded_seconds",
    "command_parser",
    "host_port",
    "listen_address",
    "non_negative_seconds",
    "positive_int",
    "positive_seconds",
    "run_command",
]


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


def bounded_seconds(low: float, high: float) -> Callable[[str], float]:
    """A type taking a number of seconds from `low` to `high`."""

    def seconds(value: str) -> float:
        number = _seconds(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} seconds")
        return number

    return seconds


def positive_int(value: str) -> int:
    """An integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {number}")
    return number


def host_port(value: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT, checked but not resolved."""
    try:
        return parse_host_port(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def address(value: str) -> str:
    """HOST:PORT or [IPV6]:PORT, returned in its canonical spelling."""
    return join_host_port(*host_port(value))


def address_list(value: str) -> list[str]:
    """One or more comma-separated HOST:PORT."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{value!r} names no address")
    return [address(part) for part in parts]


def listen_address(value: str) -> str:
    """HOST:PORT or [IPV6]:PORT to listen on (port 0: any free port)."""
    text = value.strip()
    if text.endswith(":0"):
        host, _ = host_port(text[:-1] + "1")
        return join_host_port(host, 0)
    return address(text)


def balancer_address(value: str) -> str:
    """A balancer as HOST:PORT, [IPV6]:PORT, or HOST / [IPV6] alone meaning
    port 11810 (DEFAULT_BALANCER_PORT); returned as HOST:PORT."""
    try:
        return join_host_port(*parse_host_port(value, default_port=DEFAULT_BALANCER_PORT))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def balancer_list(value: str) -> list[str]:
    """One or more comma-separated HOST[:PORT] (port 11810, the balancer's,
    if omitted), returned as HOST:PORT."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{value!r} names no balancer")
    return [balancer_address(part) for part in parts]


def add_balancers_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--balancer HOST[:PORT][,HOST[:PORT]...], repeatable and required: the
    balancers as one list of lists (flatten with `balancers(args)`)."""
    parser.add_argument(
        "--balancer",
        action="append",
        type=balancer_list,
        required=True,
        metavar="HOST[:PORT][,HOST[:PORT]...]",
        help=help,
    )


def add_logging_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """--log-level and --log-format. Without `defaults` an option not given
    is None, for a command whose configuration supplies the default."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info" if defaults else None,
        help="log level (default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto" if defaults else None,
        help="log format; auto is JSON unless stderr is a terminal (default: auto)",
    )


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parses `argv` and runs the chosen subcommand's `run`; its exit code."""
    args = parser.parse_args(argv)
    exit_code: int = args.run(args)
    return exit_code


def command_parser(
    prog: str, description: str, version: str
) -> tuple[argparse.ArgumentParser, Any]:
    """A command's parser with --version, and the subparsers its
    subcommands are added to (add_command)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, commands


def add_command(
    commands: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    help: str,
    description: str | None,
    **extra: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose `run(args)` run_command calls; add its options to
    the parser returned. `extra` goes to ArgumentParser (epilog, ...).
    Commands pass their module's docstring as the description: None under
    `python -OO`, which then only drops the paragraph from --help."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description, **extra
    )
    parser.set_defaults(run=run)
    return parser
