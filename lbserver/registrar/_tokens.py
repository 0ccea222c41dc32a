"""Registration tokens: which ones the registrar offers, and in what order a
balancer gets them.

The source is one token, a sequence of them in order of preference, or a
callable giving the current sequence (asked before every heartbeat, so that
a rotated Kubernetes Secret needs no restart). A balancer is offered the
token it accepted last while the source still holds it, else the first one,
then the others in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lbserver.errors import InvalidArgumentError
from lbserver.logs import Logger

# The registration token(s): one, several in order of preference, or a
# callable giving the current ones.
TokenSource = str | Sequence[str] | Callable[[], Sequence[str]]
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str | None) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _as_callable(token: TokenSource | None) -> Callable[[], Sequence[str]]:
    if token is None or isinstance(token, str):
        fixed: tuple[str, ...] = (token,) if token else ()
        return lambda: fixed
    if callable(token):
        return token
    fixed = tuple(token)
    if not all(isinstance(entry, str) and entry for entry in fixed):
        raise InvalidArgumentError(
            "token", "every token of the sequence must be a non-empty string"
        )
    return lambda: fixed


class Tokens:
    """The registrar's tokens, read from their source at every use."""

    def __init__(self, source: TokenSource | None, log: Logger) -> None:
        """InvalidArgumentError (a ValueError) if `source` is unusable."""
        self._source = _as_callable(source)
        self._log = log
        self._last: tuple[str, ...] = ()
        self._failing = False

    def current(self) -> tuple[str, ...]:
        """The tokens to offer now; the last good ones if the source fails."""
        try:
            tokens = tuple(dict.fromkeys(t for t in self._source() if t))
        except Exception:
            if not self._failing:
                self._failing = True
                self._log.warning("token source failed; keeping the last tokens", exc_info=True)
            return self._last
        if self._failing:
            self._failing = False
            self._log.info("token source works again")
        self._last = tokens
        return tokens


def offered(token: str | None, tokens: tuple[str, ...]) -> bool:
    """A balancer's accepted token (None: none sent) is still one to send."""
    return token in tokens if tokens else token is None


def candidates(accepted: str | None, tokens: tuple[str, ...]) -> list[str | None]:
    """Tokens in the order to try them: the one the balancer accepted last
    while it is still offered, else the first; then the others in their
    order. [None] (no token) when there are none."""
    if not tokens:
        return [None]
    first = accepted if accepted in tokens else tokens[0]
    return [first, *(token for token in tokens if token != first)]
