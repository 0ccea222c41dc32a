"""Options and helpers shared by the commands that call Registry or Admin:
the registration token and TLS client credentials."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc


def add_credential_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the balancers' registration token, sent as "
        "'authorization: Bearer <token>' (default: the LBSERVER_TOKEN environment "
        "variable, if set)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect to the balancers with TLS, trusting this CA bundle (PEM)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="client certificate (PEM) for balancers that require mTLS; needs --tls-key",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for --tls-cert")


def read_token(path: str | None) -> str | None:
    """The token from --token-file, else LBSERVER_TOKEN; ValueError if unusable."""
    if path is None:
        return os.environ.get("LBSERVER_TOKEN") or None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise ValueError(f"--token-file: cannot read {path}: {err.strerror}") from None
    if not token:
        raise ValueError(f"--token-file: {path} is empty")
    return token


def channel_credentials(
    ca: str | None, cert: str | None, key: str | None
) -> grpc.ChannelCredentials | None:
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if ca is None and cert is None:
        return None

    def read(option: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise ValueError(f"{option}: cannot read {path}: {err.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read("--tls-ca", ca),
        private_key=read("--tls-key", key),
        certificate_chain=read("--tls-cert", cert),
    )
