"""The interop test protocol, shared by every peer (docs/interop.md).

One service, `interop.Echo`, with raw-bytes messages (no protos) and one
method per call type, and a control service the tests call on a backend
directly (never through the proxy):

| method                        | type          | reply                                      |
|-------------------------------|---------------|--------------------------------------------|
| `/interop.Echo/Unary`         | unary         | the request                                |
| `/interop.Echo/ServerStream`  | server stream | `x-count` (default 3) copies of the request,|
|                               |               | `x-interval-ms` apart                      |
| `/interop.Echo/ClientStream`  | client stream | after the half-close, a JSON summary:      |
|                               |               | `{"backend", "count", "bytes", "sha256"}`  |
|                               |               | (`sha256`: one hex digest per message)     |
| `/interop.Echo/Bidi`          | bidi          | each message echoed as it arrives; ends    |
|                               |               | after the client half-closes               |
| `/interop.Control/Report`     | unary         | JSON: `{"name", "impl", "pid", "total",    |
|                               |               | "active", "calls": {id: {"method", "state",|
|                               |               | "received", "reason", "lb_token"}}}`       |

Request metadata steers a call (all optional):

- `x-call-id`: the backend records the call under this id (`Report`); its
  `state` is `active`, then `ok`, `failed` (ended with the `x-fail` status) or
  `cancelled` (the call ended under it: client cancel, deadline, connection).
- `x-sleep-ms`: sleep first, before reading or answering (cancellable).
- `x-fail: CODE` (a number), `x-fail-details: TEXT`: end with that status;
  the details are TEXT + `DETAILS_SUFFIX` (non-ASCII and `%`, so grpc-message
  is percent-encoded); trailing metadata `x-fail-why: TEXT` and
  `x-fail-blob-bin` = `FAIL_BLOB`. The response headers are sent before the
  status (after the messages: the server stream sends its `x-count` messages,
  the bidi stream echoes until the half-close), unless
- `x-trailers-only: 1`: fail at once after the sleep, reading and sending
  nothing: a trailers-only response; with `x-read-first: 1` a client or bidi
  stream is read to its end first (grpc.aio clients that are still writing
  when the status arrives report a local INTERNAL instead of it).
- `x-md-NAME` (any number, any values, `-bin` too): echoed in the response
  headers under the same key and in the trailers as `x-trailer-NAME`.

Every response: headers carry `x-backend: <backend name>` (sent with the first
message, never before: a backend has not *accepted* a client stream until it
answers), trailers carry `x-served-by: <backend name>`.

Clients (`peers.py client`, `go/`, `node/client.js`) run a *plan*, JSON made
by the tests (`calls(...)`, `call(...)` below), and print one JSON line:
messages are reported as `{"len", "sha256", "text"?}`, metadata as
`{key: [values]}` with `-bin` values in hex, status codes as numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Final

SERVICE: Final = "interop.Echo"
UNARY: Final = f"/{SERVICE}/Unary"
SERVER_STREAM: Final = f"/{SERVICE}/ServerStream"
CLIENT_STREAM: Final = f"/{SERVICE}/ClientStream"
BIDI: Final = f"/{SERVICE}/Bidi"
REPORT: Final = "/interop.Control/Report"
ECHO_METHODS: Final = (UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI)

DETAILS_SUFFIX: Final = " \u2717 100%"
FAIL_BLOB: Final = bytes(range(256))
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MAX_TEXT_BYTES: Final = 64 * 1024
MIB: Final = 1024 * 1024

Json = dict[str, Any]
Pairs = Sequence[tuple[str, str | bytes]]


def pattern(size: int, seed: int) -> bytes:
    """A deterministic payload: byte i is (i + seed) mod 256 (as every peer makes it)."""
    start = seed % 256
    block = bytes(range(256))
    return (block * (size // 256 + 2))[start : start + size]


def describe(message: bytes) -> Json:
    info: Json = {"len": len(message), "sha256": hashlib.sha256(message).hexdigest()}
    if len(message) <= MAX_TEXT_BYTES:
        with contextlib.suppress(UnicodeDecodeError):
            info["text"] = message.decode()
    return info


def md_json(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, list[str]]:
    """Metadata as {key: [values]}, `-bin` values in hex."""
    out: dict[str, list[str]] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            text = value.hex()
        else:
            text = value.encode("latin-1").hex() if key.endswith("-bin") else value
        out.setdefault(key, []).append(text)
    return out


def wire_metadata(pairs: Iterable[Sequence[str]]) -> list[tuple[str, str | bytes]]:
    """A plan's metadata pairs as grpcio metadata (`-bin` values from hex)."""
    return [(k, bytes.fromhex(v) if k.endswith("-bin") else v) for k, v in pairs]


# ---- plans ---------------------------------------------------------------------------------------


def text(value: str) -> Json:
    return {"text": value}


def payload(size: int, seed: int) -> Json:
    return {"size": size, "seed": seed}


def message_bytes(spec: Json) -> bytes:
    if "text" in spec:
        return str(spec["text"]).encode()
    return pattern(int(spec["size"]), int(spec["seed"]))


def call(
    name: str,
    method: str,
    messages: Sequence[Json],
    *,
    metadata: Sequence[tuple[str, str | bytes]] = (),
    timeout_ms: int = 10_000,
    interval_ms: int = 0,
    pingpong: bool = False,
    half_close: bool = True,
    cancel_after: int = -1,
) -> Json:
    """One call of a plan.

    Every client sends `messages` (`interval_ms` apart), with `pingpong`
    reading one reply after each; then cancels if `cancel_after` >= 0 replies
    arrived, else half-closes (unless not `half_close`), and reads the rest
    until the status; with `cancel_after` it cancels as soon as that many
    replies arrived. `bytes` metadata values travel as hex.
    """
    return {
        "name": name,
        "method": method,
        "metadata": [[k, v.hex() if isinstance(v, bytes) else v] for k, v in metadata],
        "messages": list(messages),
        "timeout_ms": timeout_ms,
        "interval_ms": interval_ms,
        "pingpong": pingpong,
        "half_close": half_close,
        "cancel_after": cancel_after,
    }


def pause(ms: int) -> Json:
    """A pause between the calls of a sequential plan."""
    return {"name": "pause", "method": "", "sleep_ms": ms}


def calls_plan(
    calls: Sequence[Json],
    *,
    parallel: bool = False,
    watch_state: bool = False,
    keepalive_ms: int = 0,
    keepalive_timeout_ms: int = 0,
) -> Json:
    """Run `calls` one after the other (or all at once) on one channel.
    `watch_state` records the channel's connectivity states from the end of
    the first call on (`states`, `final_state` in the result)."""
    return {
        "mode": "calls",
        "calls": list(calls),
        "parallel": parallel,
        "watch_state": watch_state,
        "channel": {"keepalive_ms": keepalive_ms, "keepalive_timeout_ms": keepalive_timeout_ms},
    }


def streams_plan(streams: int, id_prefix: str, *, timeout_ms: int = 60_000) -> Json:
    """`streams` bidi streams on one channel, all open at once: each sends a
    message and waits for its echo; only when every stream has its first echo
    does each send a second message, read its echo and half-close."""
    return {"mode": "streams", "streams": streams, "id_prefix": id_prefix, "timeout_ms": timeout_ms}


def loop_plan(
    id_prefix: str,
    *,
    concurrency: int = 4,
    sleep_ms: int = 50,
    max_seconds: int = 60,
    max_calls: int = 20_000,
) -> Json:
    """Unary and client-streaming calls in turn (each with `x-sleep-ms`) from
    `concurrency` workers until the client's stdin closes (or the limits)."""
    return {
        "mode": "loop",
        "id_prefix": id_prefix,
        "concurrency": concurrency,
        "sleep_ms": sleep_ms,
        "max_seconds": max_seconds,
        "max_calls": max_calls,
    }
