"""Admin.GetState in pages against a real grpc.aio server on 127.0.0.1 with
10,000 backends, and the page builder on its own."""

from __future__ import annotations

import grpc
import pytest

from lbserver.balancer import Balancer
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.services.admin import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_BYTES,
    MAX_PAGE_SIZE,
    build_page,
    encode_cursor,
)
from tests.service.conftest import Harness
from tests.service.test_admin_status_fleet import (
    BIG,
    LABELS,
    expected_ids,
    fleet_balancer,
    plain_balancer,
    register,
    registration,
)


@pytest.fixture
def fleet() -> Balancer:
    return fleet_balancer()


async def all_pages(
    admin: pb_grpc.AdminAsyncStub, service: str = "", page_size: int = 0
) -> list[pb.GetStateResponse]:
    pages = [await admin.GetState(pb.GetStateRequest(service=service, page_size=page_size))]
    while pages[-1].next_page_token:
        pages.append(
            await admin.GetState(
                pb.GetStateRequest(
                    service=service, page_size=page_size, page_token=pages[-1].next_page_token
                )
            )
        )
    return pages


async def test_pages_are_small_and_hold_every_backend_once(
    harness: Harness, fleet: Balancer
) -> None:
    running = await harness.start(balancer=fleet)
    pages = await all_pages(pb_grpc.AdminStub(harness.channel(running)))
    assert len(pages) == BIG // DEFAULT_PAGE_SIZE + 1
    for page in pages:
        assert page.ByteSize() < MAX_PAGE_BYTES + 4096
        assert sum(len(s.backends) for s in page.services) <= DEFAULT_PAGE_SIZE
    entries = [s for page in pages for s in page.services]
    # The big service starts once and is continued on every later page.
    assert [(s.name, s.continued) for s in entries] == [
        ("big", False),
        *[("big", True)] * (len(pages) - 2),
        ("small", False),
    ]
    big = [b.instance_id for s in entries if s.name == "big" for b in s.backends]
    assert big == expected_ids(fleet, "big")
    first = entries[0]
    assert (first.list_length, first.backends[0].list_entries) == (BIG, 1)
    assert dict(first.backends[0].labels) == LABELS
    assert not entries[1].HasField("client_stats") and entries[1].list_length == 0


async def test_page_size_is_honoured_and_capped(harness: Harness, fleet: Balancer) -> None:
    running = await harness.start(balancer=fleet)
    admin = pb_grpc.AdminStub(harness.channel(running))
    pages = await all_pages(admin, service="small", page_size=2)
    assert [[b.instance_id for b in s.backends] for p in pages for s in p.services] == [
        ["small-0", "small-1"],
        ["small-2"],
    ]
    assert [s.continued for p in pages for s in p.services] == [False, True]
    huge = await admin.GetState(pb.GetStateRequest(page_size=1_000_000))
    # Capped by count or by bytes, whichever comes first.
    assert 0 < len(huge.services[0].backends) <= MAX_PAGE_SIZE
    assert huge.ByteSize() < MAX_PAGE_BYTES + 4096


async def test_a_malformed_page_token_is_an_invalid_argument(harness: Harness) -> None:
    running = await harness.start()
    admin = pb_grpc.AdminStub(harness.channel(running))
    for token in ("not a token!", "bm9wZQ", "W10", "x" * 5000):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await admin.GetState(pb.GetStateRequest(page_token=token))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.value.details() or "").startswith("page_token:")


def test_backends_that_come_and_go_between_pages_move_no_others() -> None:
    balancer = plain_balancer()
    register(balancer, [registration("s", n) for n in range(1, 11)])
    services, cursor = build_page(balancer, "", 4, None)
    seen = [b.instance_id for s in services for b in s.backends]
    # Between pages: one already sent leaves, one not yet sent leaves, one
    # joins before the cursor and one after it.
    balancer.deregister("s", seen[0])
    balancer.deregister("s", "s-9")
    balancer.heartbeat(registration("s", 0))  # sorts first: already passed
    balancer.heartbeat(registration("s", 99))  # sorts last: still to come
    while cursor is not None:
        services, cursor = build_page(balancer, "", 4, cursor)
        seen += [b.instance_id for s in services for b in s.backends]
    assert len(seen) == len(set(seen))
    assert set(expected_ids(balancer, "s")) - {"s-0"} <= set(seen)
    assert "s-99" in seen and "s-0" not in seen and "s-9" not in seen


def test_a_page_always_holds_something_however_large() -> None:
    balancer = plain_balancer()
    register(balancer, [registration("s", n, LABELS) for n in range(5)])
    cursor = None
    pages = []
    while True:
        services, cursor = build_page(balancer, "", 0, cursor, max_bytes=10)
        pages.append([(s.name, len(s.backends)) for s in services])
        if cursor is None:
            break
    assert pages == [[("s", 1)]] * 5


def test_page_tokens_are_opaque_but_stable() -> None:
    from lbserver.services.admin import Cursor, decode_cursor

    for cursor in (Cursor("oap"), Cursor("o", ("10.0.0.1:80", "pod-1")), Cursor("ü", ("", ""))):
        assert decode_cursor(encode_cursor(cursor)) == cursor
    assert decode_cursor("") is None
