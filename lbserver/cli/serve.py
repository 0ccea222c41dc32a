"""Run the balancer: grpclb, Registry, Admin, health and reflection on one gRPC
port, Prometheus metrics on another. Runs with no configuration at all.
Options come from embedded defaults, then --config, then LBSERVER_*
environment variables, then these flags.
"""

# The docstring above is `lbserver serve --help`'s description.

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from lbserver.cli.options import add_command, add_logging_options
from lbserver.config import load_config
from lbserver.errors import ConfigError
from lbserver.logs import configure_logging

HELP = "run the balancer"


def add_parser(commands: Any) -> None:
    parser = add_command(commands, "serve", run, HELP, __doc__)
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="gRPC address (default 0.0.0.0:11810)"
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="metrics address (default 0.0.0.0:11811; 'off' disables)",
    )
    add_logging_options(parser, defaults=False)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            args.config,
            overrides={
                "listen": args.listen,
                "metrics_listen": args.metrics_listen,
                "log_level": args.log_level,
                "log_format": args.log_format,
            },
        )
    except ConfigError as exc:
        print(f"lbserver serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    from lbserver.server import serve

    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"lbserver serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lbserver serve: {exc}", file=sys.stderr)
        return 1
    return 0
