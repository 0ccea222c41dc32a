"""lbserver.v1.Admin: the balancer's state for operators and `lbserver status`.

GetState answers one page at a time. A page holds at most `page_size`
backends (a service without backends counts as one) and ends before it grows
past MAX_PAGE_BYTES, so a reply stays far under gRPC's default 4 MB receive
limit however many backends there are; a service whose backends do not fit
goes on in the next page, as an entry with `continued` set. A page is built
from the services it shows only (at most page_size backend messages), so
building it stays cheap with any number of backends.

The page token names where the next page starts: a service, and for a
service split across pages the last backend already sent (by its address
and instance id, the order Membership.backends keeps), so backends that
come or go between pages make none of the others repeat or go missing.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from lbserver import __version__
from lbserver.balancer import Balancer, ServiceView
from lbserver.domain.model import Backend, BackendState, LoadReport
from lbserver.errors import InvalidArgumentError
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.security import Authorizer, require

_STATE = {
    BackendState.SERVING: pb.BACKEND_STATE_SERVING,
    BackendState.DRAINING: pb.BACKEND_STATE_DRAINING,
}

# Backends per page when the request does not say, and the most it may ask.
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 5000
# A page ends before its services' encoded size passes this (it always holds
# at least one backend or service, whatever their size).
MAX_PAGE_BYTES = 1 << 20
# Page tokens are short; longer ones are refused before they are decoded.
MAX_PAGE_TOKEN_LENGTH = 4096
_TOKEN_VERSION = 1
# Room for a repeated field's tag and length prefix, per element.
_FIELD_OVERHEAD = 6

BackendKey = tuple[str, str]


def backend_key(backend: Backend) -> BackendKey:
    """The order of Membership.backends: (address, instance id)."""
    return (backend.registration.address, backend.instance_id)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page starts: `service` from its first backend, or, with
    `after`, its backends after that one (the service's entry is then a
    continuation)."""

    service: str
    after: BackendKey | None = None


def encode_cursor(cursor: Cursor) -> str:
    fields: list[object] = [_TOKEN_VERSION, cursor.service]
    if cursor.after is not None:
        fields.extend(cursor.after)
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor | None:
    """None for an empty token (the first page); InvalidArgumentError for a
    token this server did not make."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise InvalidArgumentError("page_token", "is too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgumentError("page_token", "is malformed") from exc
    if (
        not isinstance(fields, list)
        or len(fields) not in (2, 4)
        or fields[0] != _TOKEN_VERSION
        or not all(isinstance(f, str) for f in fields[1:])
    ):
        raise InvalidArgumentError("page_token", "is malformed")
    after = (fields[2], fields[3]) if len(fields) == 4 else None
    return Cursor(fields[1], after)


def load_message(load: LoadReport) -> pb.LoadReport:
    message = pb.LoadReport()
    if load.cpu_utilization is not None:
        message.cpu_utilization = load.cpu_utilization
    if load.requests_per_second is not None:
        message.requests_per_second = load.requests_per_second
    if load.errors_per_second is not None:
        message.errors_per_second = load.errors_per_second
    if load.in_flight is not None:
        message.in_flight = load.in_flight
    return message


def list_entries(view: ServiceView) -> Counter[str]:
    """Entries per backend token in the view's list (one pass over the list,
    not one per backend)."""
    return view.servers.entries_per_token()


def _fill_backend(
    message: pb.BackendStatus, backend: Backend, view: ServiceView, entries: Mapping[str, int]
) -> None:
    registration = backend.registration
    count = entries.get(backend.token, 0)
    message.instance_id = registration.instance_id
    message.ip = str(registration.ip)
    message.port = registration.port
    message.zone = registration.zone
    if registration.labels:
        message.labels.update(registration.labels)
    message.state = _STATE[registration.state]
    message.weight = registration.weight
    message.load.CopyFrom(load_message(registration.load))
    message.load_balance_token = backend.token
    message.last_heartbeat.FromNanoseconds(int(backend.last_heartbeat_wall * 1e9))
    if math.isfinite(backend.ttl):
        # A Kubernetes member never expires (its endpoint says when it
        # leaves): no ttl, as no heartbeat asks for one.
        message.ttl.FromNanoseconds(int(backend.ttl * 1e9))
    message.list_entries = count
    length = len(view.servers)
    message.share = count / length if length else 0.0
    message.effective_weight = view.weights.get(backend.token, 0.0)


def client_stats_message(view: ServiceView) -> pb.ClientCallStats:
    stats = view.client_stats
    return pb.ClientCallStats(
        calls_started=stats.calls_started,
        calls_finished=stats.calls_finished,
        calls_finished_with_client_failed_to_send=stats.calls_finished_with_client_failed_to_send,
        calls_finished_known_received=stats.calls_finished_known_received,
        calls_dropped_by_token=stats.calls_dropped_by_token,
        calls_dropped_other_tokens=stats.calls_dropped_other_tokens,
        drop_tokens_ignored=stats.drop_tokens_ignored,
        counters_clamped=stats.counters_clamped,
        reports=stats.reports,
    )


def service_header(view: ServiceView) -> pb.ServiceStatus:
    """Everything about a service but its backends."""
    return pb.ServiceStatus(
        name=view.name,
        clients=view.clients,
        list_length=len(view.servers),
        drop_entries=sum(1 for entry in view.servers.entries if entry.drop),
        client_stats=client_stats_message(view),
    )


def build_page(
    balancer: Balancer,
    service: str,
    page_size: int,
    cursor: Cursor | None,
    max_bytes: int = MAX_PAGE_BYTES,
) -> tuple[list[pb.ServiceStatus], Cursor | None]:
    """One page of GetState from `cursor` (None: the start), and where the
    next one starts (None: this was the last)."""
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    page: list[pb.ServiceStatus] = []
    items = 0
    size = 0
    start = cursor.service if cursor is not None else ""
    for view in balancer.iter_views(service or None, start):
        after = cursor.after if cursor is not None and view.name == cursor.service else None
        backends = view.backends
        first = 0
        if after is not None:
            first = bisect.bisect_right(backends, after, key=backend_key)
            if first >= len(backends):
                continue  # the rest of it left since the last page
            message = pb.ServiceStatus(name=view.name, continued=True)
        else:
            if items >= limit:
                return page, Cursor(view.name)
            message = service_header(view)
            header = message.ByteSize() + _FIELD_OVERHEAD
            if items and size + header > max_bytes:
                return page, Cursor(view.name)
            size += header
            if not backends:
                page.append(message)
                items += 1
                continue
        entries = list_entries(view)
        for index in range(first, len(backends)):
            added = message.backends.add()
            _fill_backend(added, backends[index], view, entries)
            grown = added.ByteSize() + _FIELD_OVERHEAD
            if items >= limit or (items and size + grown > max_bytes):
                del message.backends[-1]
                if index == first and after is None:
                    # Not one of its backends fits: it starts the next page
                    # (this page holds something else, so it is not empty).
                    return page, Cursor(view.name)
                page.append(message)
                return page, Cursor(view.name, backend_key(backends[index - 1]))
            items += 1
            size += grown
        page.append(message)
    return page, None


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, balancer: Balancer, authorizer: Authorizer | None = None) -> None:
        self._balancer = balancer
        self._authorizer = authorizer or Authorizer()

    async def GetState(
        self,
        request: pb.GetStateRequest,
        context: grpc.aio.ServicerContext[pb.GetStateRequest, pb.GetStateResponse],
    ) -> pb.GetStateResponse:
        await require(self._authorizer, context, "admin")
        try:
            cursor = decode_cursor(request.page_token)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        services, following = build_page(self._balancer, request.service, request.page_size, cursor)
        response = pb.GetStateResponse(
            services=services,
            version=__version__,
            next_page_token=encode_cursor(following) if following is not None else "",
        )
        response.now.GetCurrentTime()
        return response
