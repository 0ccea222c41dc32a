"""lbserver.xds.protocol: one ADS stream's state-of-the-world bookkeeping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbserver.xds.protocol import AdsState, version_of
from lbserver.xds.resources import CLUSTER, ENDPOINT, LISTENER

A = {"oap": b"listener-a"}
B = {"oap": b"listener-b"}


def _first(state: AdsState, names: tuple[str, ...] = ("oap",), version: str = "") -> None:
    received = state.receive(LISTENER, version, "", names, nack=False)
    assert received.kind == "first"


def test_the_first_request_is_answered_and_its_ack_asks_for_nothing() -> None:
    state = AdsState()
    _first(state)
    response = state.respond(LISTENER, A)
    assert response is not None
    assert response.resources == (("oap", b"listener-a"),)
    assert response.version == version_of(response.resources)
    received = state.receive(LISTENER, response.version, response.nonce, ["oap"], nack=False)
    assert (received.kind, received.version, received.names_changed) == (
        "ack",
        response.version,
        False,
    )
    assert state.subscriptions[LISTENER].accepted == response.version
    assert state.respond(LISTENER, A) is None


def test_a_first_request_is_answered_even_with_nothing_to_send() -> None:
    # The client learns at once that none of its names exist.
    state = AdsState()
    _first(state, ("nosuch",))
    response = state.respond(LISTENER, {})
    assert response is not None
    assert response.resources == ()


def test_a_change_gets_a_new_version_and_nonce() -> None:
    state = AdsState()
    _first(state)
    first = state.respond(LISTENER, A)
    assert first is not None
    state.receive(LISTENER, first.version, first.nonce, ["oap"], nack=False)
    second = state.respond(LISTENER, B)
    assert second is not None
    assert second.version != first.version
    assert second.nonce != first.nonce


def test_a_nacked_version_is_not_sent_again_but_a_change_is() -> None:
    state = AdsState()
    _first(state)
    good = state.respond(LISTENER, A)
    assert good is not None
    state.receive(LISTENER, good.version, good.nonce, ["oap"], nack=False)
    bad = state.respond(LISTENER, B)
    assert bad is not None
    # The client keeps the version it accepted and says why it refused.
    received = state.receive(LISTENER, good.version, bad.nonce, ["oap"], nack=True)
    assert (received.kind, received.version) == ("nack", bad.version)
    subscription = state.subscriptions[LISTENER]
    assert (subscription.accepted, subscription.rejected) == (good.version, bad.version)
    assert state.respond(LISTENER, B) is None
    # Going back to what the client has is a change from what it refused.
    back = state.respond(LISTENER, A)
    assert back is not None
    assert back.version == good.version


def test_a_stale_nonce_is_ignored_whole() -> None:
    state = AdsState()
    _first(state)
    first = state.respond(LISTENER, A)
    assert first is not None
    second = state.respond(LISTENER, B)  # crossed the client's next request
    assert second is not None
    received = state.receive(LISTENER, first.version, first.nonce, ["other"], nack=True)
    assert received.kind == "stale"
    subscription = state.subscriptions[LISTENER]
    assert subscription.names == frozenset({"oap"})
    assert subscription.rejected == ""
    assert state.respond(LISTENER, B) is None


def test_changed_names_are_answered_even_when_the_content_is_equal() -> None:
    state = AdsState()
    _first(state)
    first = state.respond(LISTENER, A)
    assert first is not None
    received = state.receive(LISTENER, first.version, first.nonce, ["oap", "nosuch"], nack=False)
    assert (received.kind, received.names_changed) == ("ack", True)
    assert state.names() == {"oap", "nosuch"}
    again = state.respond(LISTENER, A)
    assert again is not None
    assert (again.version, again.nonce) == (first.version, str(int(first.nonce) + 1))


def test_removing_a_name_is_answered_without_its_resource() -> None:
    state = AdsState()
    _first(state, ("oap", "zipkin"))
    first = state.respond(LISTENER, {"oap": b"a", "zipkin": b"z"})
    assert first is not None
    state.receive(LISTENER, first.version, first.nonce, ["oap"], nack=False)
    assert state.names() == {"oap"}
    response = state.respond(LISTENER, {"oap": b"a"})
    assert response is not None
    assert response.resources == (("oap", b"a"),)


def test_a_second_request_with_an_answered_nonce_is_no_ack() -> None:
    state = AdsState()
    _first(state)
    first = state.respond(LISTENER, A)
    assert first is not None
    assert state.receive(LISTENER, first.version, first.nonce, ["oap"], nack=False).kind == "ack"
    repeated = state.receive(LISTENER, first.version, first.nonce, ["oap"], nack=False)
    assert repeated.kind == "update"


def test_a_reconnect_is_answered_with_the_same_version_for_the_same_content() -> None:
    # A new stream (a new AdsState) after a balancer restart: the client
    # sends the version it holds and gets the state again, under the same
    # version when nothing changed (versions are content hashes).
    before = AdsState()
    _first(before)
    held = before.respond(LISTENER, A)
    assert held is not None
    after = AdsState()
    _first(after, version=held.version)
    again = after.respond(LISTENER, A)
    assert again is not None
    assert again.version == held.version


def test_types_are_kept_apart() -> None:
    state = AdsState()
    _first(state)
    state.receive(CLUSTER, "", "", ["oap"], nack=False)
    listener = state.respond(LISTENER, A)
    cluster = state.respond(CLUSTER, {"oap": b"cluster"})
    assert listener is not None and cluster is not None
    assert listener.nonce != cluster.nonce
    assert state.respond(ENDPOINT, {"oap": b"x"}) is None  # never asked for
    # A cluster nonce is stale for listeners.
    assert state.receive(LISTENER, "", cluster.nonce, ["oap"], nack=False).kind == "stale"


@given(
    st.dictionaries(st.text(max_size=8), st.binary(max_size=8), max_size=4),
    st.dictionaries(st.text(max_size=8), st.binary(max_size=8), max_size=4),
)
def test_versions_are_equal_exactly_for_equal_content(
    one: dict[str, bytes], other: dict[str, bytes]
) -> None:
    assert (version_of(sorted(one.items())) == version_of(sorted(other.items()))) == (one == other)
