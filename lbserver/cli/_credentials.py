"""Options and helpers shared by the commands that call Registry or Admin:
the registration tokens and TLS client credentials.

A token file (``--token-file``) holds one or more tokens, one per line; blank
lines and whitespace around a token are ignored. The first token is the
current one, sent first; the others are accepted too, for a rotation in
progress, and are tried in order when a balancer refuses a token
(UNAUTHENTICATED or PERMISSION_DENIED). A token is printable ASCII without
spaces (it travels as ``authorization: Bearer <token>``). `TokenFile` reads
such a file and re-reads it when it changes, so a rotated Kubernetes Secret
(a mounted file whose ``..data`` symlink kubelet swaps atomically) is picked
up without a restart.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from lbserver.logs import get_logger

__all__ = [
    "TOKEN_FILE_CHECK_SECONDS",
    "TokenFile",
    "add_credential_options",
    "channel_credentials",
    "parse_tokens",
    "token_source",
]

_log = get_logger("lbserver.cli.credentials")

# How often a TokenFile looks at its file again, at most.
TOKEN_FILE_CHECK_SECONDS = 1.0

TOKEN_FILE_HELP = (
    "file of registration tokens, one per line (blank lines and surrounding whitespace "
    "ignored), each sent as 'authorization: Bearer <token>'. The first token is the current "
    "one and is sent first; the others are accepted too while a rotation is in progress: "
    "a balancer that answers UNAUTHENTICATED or PERMISSION_DENIED is asked again at once "
    "with the next token. The file is re-read when it changes (checked at most once a "
    "second, symlinks followed), so a rotated Kubernetes Secret mounted as a file is "
    "picked up without a restart; if it later becomes unreadable or empty, the last good "
    "tokens are kept and a warning is logged. Unreadable or empty at start: exit 2. "
    "Default: the LBSERVER_TOKEN environment variable (one token), if set"
)


def add_credential_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", metavar="FILE", help=TOKEN_FILE_HELP)
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


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens of a token file's text, in order, without duplicates.
    ValueError (naming the line, never the token) when there is none or a
    line is not a token."""
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token:
            continue
        for index, char in enumerate(token, start=1):
            if not "!" <= char <= "~":
                raise ValueError(
                    f"line {number}: character {index} (U+{ord(char):04X}) cannot be in a "
                    "token: a token is printable ASCII without spaces"
                )
        if token not in tokens:
            tokens.append(token)
    if not tokens:
        raise ValueError("holds no token (it is empty or only whitespace)")
    return tuple(tokens)


class TokenFile:
    """The tokens of a token file (format in the module docstring), re-read
    when the file changes.

    The constructor reads the file and raises ValueError, naming the file,
    if it is unreadable or holds no token. Calling the object returns the
    tokens, first re-reading the file if `check_every` seconds (by `clock`)
    have passed since it last looked; the path is opened anew each time, so
    symlinks are followed and an atomic swap of Kubernetes' ``..data`` link
    is seen. If the file has become unreadable, empty or malformed, the last
    good tokens are kept and one warning is logged until it is good again.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_every: float = TOKEN_FILE_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._check_every = check_every
        self._clock = clock
        self._text = self._read()
        try:
            self._tokens = parse_tokens(self._text)
        except ValueError as err:
            raise ValueError(f"{self._path} {err}") from None
        self._checked = clock()
        self._failing = False

    @property
    def path(self) -> str:
        return str(self._path)

    @property
    def tokens(self) -> tuple[str, ...]:
        """The last good tokens, without looking at the file."""
        return self._tokens

    def __call__(self) -> tuple[str, ...]:
        now = self._clock()
        if now - self._checked >= self._check_every:
            self._checked = now
            self.reload()
        return self._tokens

    def reload(self) -> bool:
        """Reads the file now; True if its tokens changed."""
        try:
            text = self._read()
            tokens = self._tokens if text == self._text else parse_tokens(text)
        except ValueError as err:
            if not self._failing:
                self._failing = True
                _log.warning(
                    "token file unusable; keeping the last good tokens",
                    path=str(self._path),
                    error=str(err),
                )
            return False
        if self._failing:
            self._failing = False
            _log.info("token file usable again", path=str(self._path))
        self._text = text
        if tokens == self._tokens:
            return False
        self._tokens = tokens
        # The number of tokens, never the tokens.
        _log.info("token file changed", path=str(self._path), tokens=len(tokens))
        return True

    def _read(self) -> str:
        try:
            return self._path.read_bytes().decode("utf-8", errors="replace")
        except OSError as err:
            raise ValueError(f"cannot read {self._path}: {err.strerror}") from None


def token_source(path: str | None) -> TokenFile | str | None:
    """What --token-file asks for: a TokenFile, else the LBSERVER_TOKEN
    environment variable as one token, else None. ValueError (naming the
    option and the file) if the file is unusable now."""
    if path is None:
        return os.environ.get("LBSERVER_TOKEN") or None
    try:
        return TokenFile(path)
    except ValueError as err:
        raise ValueError(f"--token-file: {err}") from None


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
