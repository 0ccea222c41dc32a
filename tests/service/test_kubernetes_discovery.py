"""KubernetesEndpointSource: the real `kubernetes` client against a loopback fake
API server (tests/support/fake_kube.py) speaking EndpointSlice list/watch.

Waits are bounded polls; nothing asserts on timing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from functools import partial
from typing import Any

import pytest
import structlog

from lbserver.discovery import Endpoint, WatchedService
from lbserver.discovery.kubernetes import KubernetesEndpointSource
from tests.support.eventually import eventually
from tests.support.fake_kube import (
    FakeKubeApiServer,
    JsonObject,
    describe_requests,
    endpoint,
    endpoint_slice,
)

NS = "skywalking"
OAP = WatchedService(service="oap", namespace=NS, kubernetes_service="oap", port_name="grpc")
WAIT = 15.0

Report = frozenset[Endpoint] | None


class Recorder:
    """The callback: records every call and the thread it ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Report]] = []
        self.threads: set[int] = set()

    def __call__(self, service: str, endpoints: Report) -> None:
        self.calls.append((service, endpoints))
        self.threads.add(threading.get_ident())

    def of(self, service: str = "oap") -> list[Report]:
        return [e for s, e in self.calls if s == service]

    def latest(self, service: str = "oap") -> Report:
        reports = self.of(service)
        assert reports, f"no report for {service}"
        return reports[-1]


def ips(endpoints: Report) -> set[str]:
    assert endpoints is not None
    return {e.ip for e in endpoints}


def by_ip(endpoints: Report, ip: str) -> Endpoint:
    assert endpoints is not None
    (found,) = [e for e in endpoints if e.ip == ip]
    return found


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log entry, debug included, whatever the suite configured before."""
    old = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**old)


@pytest.fixture
def kube() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        yield server


@contextlib.asynccontextmanager
async def running(
    kube: FakeKubeApiServer,
    services: Sequence[WatchedService] = (OAP,),
    **options: Any,
) -> AsyncIterator[tuple[KubernetesEndpointSource, Recorder]]:
    recorder = Recorder()
    settings: dict[str, Any] = {
        "watch_timeout": 60,
        "read_slack": 10.0,
        "connect_timeout": 2.0,
        "list_timeout": 5.0,
        "backoff_initial": 0.02,
        "backoff_max": 0.2,
        "rng": random.Random(7),
    }
    settings.update(options)
    source = KubernetesEndpointSource(services, recorder, api_client=kube.api_client(), **settings)
    task = asyncio.create_task(source.run())
    try:
        yield source, recorder
        assert not task.done(), "run() ended on its own"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
    assert recorder.threads <= {threading.get_ident()}, "callback ran off the loop thread"


def slice_a(*endpoints: JsonObject) -> JsonObject:
    return endpoint_slice("oap-a", "oap", list(endpoints) or [endpoint("10.0.0.1")])


async def until(kube: FakeKubeApiServer, check: Callable[[], object], what: str) -> None:
    """`eventually`, showing the fake API server's requests if it times out."""
    await eventually(check, what, within=WAIT, detail=partial(describe_requests, kube))


async def relisted_and_watching(kube: FakeKubeApiServer) -> None:
    """Wait for a second list and for the watch opened after it."""
    await until(kube, lambda: len(kube.list_requests()) == 2, "a relist")
    await until(kube, lambda: kube.open_watches == 1, "watching again")


async def synced(kube: FakeKubeApiServer, recorder: Recorder, n: int = 1) -> None:
    """Wait for the first report and for the watch to be open."""
    await until(kube, lambda: len(recorder.of()) >= n, "the first report")
    await until(kube, lambda: kube.open_watches >= 1, "an open watch")


# ---------------------------------------------------------------------------
# what the endpoints look like


async def test_listed_and_added_endpoints_are_reported(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1", zone="zone-a", pod="oap-0")))
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        assert rec.latest() == frozenset(
            {Endpoint("10.0.0.1", 11800, True, True, False, zone="zone-a", pod="oap-0")}
        )

        def add_endpoint(obj: JsonObject) -> None:
            obj["endpoints"].append(endpoint("10.0.0.2", pod="oap-1"))

        kube.modify_slice(NS, "oap-a", add_endpoint)
        await eventually(
            lambda: ips(rec.latest()) == {"10.0.0.1", "10.0.0.2"}, "the new one", within=WAIT
        )
        assert by_ip(rec.latest(), "10.0.0.2").pod == "oap-1"
    assert [r.watch for r in kube.requests] == [False, True]  # one list, one watch


async def test_empty_service_reports_an_empty_set(kube: FakeKubeApiServer) -> None:
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        assert rec.of() == [frozenset()]


async def test_not_ready_and_terminating_are_reflected(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1"), endpoint("10.0.0.2")))
    async with running(kube) as (_, rec):
        await synced(kube, rec)

        kube.set_conditions(NS, "oap-a", "10.0.0.1", ready=False, serving=False)
        await eventually(
            lambda: not by_ip(rec.latest(), "10.0.0.1").ready, "not ready", within=WAIT
        )
        assert by_ip(rec.latest(), "10.0.0.1").serving is False
        assert by_ip(rec.latest(), "10.0.0.2").ready is True

        # A terminating pod that still serves (graceful shutdown) ...
        kube.set_conditions(NS, "oap-a", "10.0.0.2", ready=False, serving=True, terminating=True)
        await eventually(
            lambda: by_ip(rec.latest(), "10.0.0.2").terminating, "terminating", within=WAIT
        )
        ep = by_ip(rec.latest(), "10.0.0.2")
        assert (ep.ready, ep.serving, ep.terminating) == (False, True, True)

        # ... then stops serving.
        kube.set_conditions(NS, "oap-a", "10.0.0.2", serving=False)
        await eventually(
            lambda: not by_ip(rec.latest(), "10.0.0.2").serving, "not serving", within=WAIT
        )
        ep = by_ip(rec.latest(), "10.0.0.2")
        assert (ep.ready, ep.serving, ep.terminating) == (False, False, True)

        # Conditions left out (nil) read as Kubernetes documents.
        kube.set_conditions(NS, "oap-a", "10.0.0.1", ready=None, serving=None, terminating=None)
        await eventually(
            lambda: by_ip(rec.latest(), "10.0.0.1").ready, "nil conditions", within=WAIT
        )
        ep = by_ip(rec.latest(), "10.0.0.1")
        assert (ep.ready, ep.serving, ep.terminating) == (True, True, False)


async def test_removed_slice_takes_its_endpoints_away(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    kube.add_slice(NS, endpoint_slice("oap-b", "oap", [endpoint("10.0.0.2")]))
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        assert ips(rec.latest()) == {"10.0.0.1", "10.0.0.2"}
        kube.delete_slice(NS, "oap-b")
        await eventually(lambda: ips(rec.latest()) == {"10.0.0.1"}, "oap-b gone", within=WAIT)
        kube.delete_slice(NS, "oap-a")
        await eventually(lambda: rec.latest() == frozenset(), "all gone", within=WAIT)


async def test_slices_of_one_service_are_merged(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    kube.add_slice(NS, endpoint_slice("other", "other-svc", [endpoint("10.9.9.9")]))
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        kube.add_slice(NS, endpoint_slice("oap-b", "oap", [endpoint("10.0.0.2")]))
        await eventually(
            lambda: ips(rec.latest()) == {"10.0.0.1", "10.0.0.2"}, "merged", within=WAIT
        )
        # The same address in two slices (a slice being replaced) is listed
        # once, as ready when either slice says so.
        kube.add_slice(NS, endpoint_slice("oap-c", "oap", [endpoint("10.0.0.1", ready=False)]))
        kube.add_slice(NS, endpoint_slice("oap-d", "oap", [endpoint("10.0.0.3")]))
        await eventually(lambda: "10.0.0.3" in ips(rec.latest()), "oap-d", within=WAIT)
        assert ips(rec.latest()) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
        assert len(rec.latest() or ()) == 3
        assert by_ip(rec.latest(), "10.0.0.1").ready is True
        # Another Service's slice never shows up.
        assert all("10.9.9.9" not in ips(r) for r in rec.of() if r is not None)


async def test_port_is_selected_by_name(kube: FakeKubeApiServer) -> None:
    ports = (("grpc", 11800), ("http-rest", 12800))
    kube.add_slice(NS, endpoint_slice("oap-a", "oap", [endpoint("10.0.0.1")], ports=ports))
    grpc = OAP
    rest = WatchedService("oap-rest", NS, "oap", "http-rest")
    missing = WatchedService("oap-none", NS, "oap", "no-such-port")
    async with running(kube, [grpc, rest, missing]) as (_, rec):
        await synced(kube, rec)
        await eventually(lambda: len(rec.calls) >= 3, "three services", within=WAIT)
        assert {e.port for e in rec.latest("oap") or ()} == {11800}
        assert {e.port for e in rec.latest("oap-rest") or ()} == {12800}
        assert rec.latest("oap-none") == frozenset()
    # One Kubernetes Service, one list and one watch, whatever the ports.
    assert len(kube.list_requests()) == 1
    assert len(kube.watch_requests()) == 1


async def test_unnamed_single_port_matches_empty_port_name(kube: FakeKubeApiServer) -> None:
    kube.add_slice(
        NS, endpoint_slice("plain-a", "plain", [endpoint("10.0.1.1")], ports=[(None, 80)])
    )
    plain = WatchedService("plain", NS, "plain", "")
    named = WatchedService("plain-grpc", NS, "plain", "grpc")
    async with running(kube, [plain, named]) as (_, rec):
        await until(kube, lambda: len(rec.calls) >= 2, "both reports")
        assert rec.latest("plain") == frozenset({Endpoint("10.0.1.1", 80, True, True, False)})
        assert rec.latest("plain-grpc") == frozenset()


async def test_services_in_two_namespaces(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    kube.add_slice("other-ns", endpoint_slice("oap-a", "oap", [endpoint("10.1.0.1")]))
    other = WatchedService("oap-other", "other-ns", "oap", "grpc")
    async with running(kube, [OAP, other]) as (_, rec):
        await until(kube, lambda: len(rec.calls) >= 2, "both reports")
        assert ips(rec.latest("oap")) == {"10.0.0.1"}
        assert ips(rec.latest("oap-other")) == {"10.1.0.1"}
        kube.delete_slice("other-ns", "oap-a")
        await eventually(
            lambda: rec.latest("oap-other") == frozenset(), "other emptied", within=WAIT
        )
        assert ips(rec.latest("oap")) == {"10.0.0.1"}


# ---------------------------------------------------------------------------
# the protocol: resume, relist, bookmarks


async def test_broken_watch_resumes_from_last_resource_version(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        last_seen = kube.set_conditions(NS, "oap-a", "10.0.0.1", ready=False)
        await eventually(
            lambda: not by_ip(rec.latest(), "10.0.0.1").ready, "not ready", within=WAIT
        )

        assert kube.drop_watches() == 1
        # A change while the client is disconnected arrives on the resumed watch.
        kube.add_slice(NS, endpoint_slice("oap-b", "oap", [endpoint("10.0.0.2")]))
        await until(kube, lambda: "10.0.0.2" in ips(rec.latest()), "the missed change")

        watches = kube.watch_requests()
        assert len(watches) == 2
        assert watches[1].resource_version == last_seen
        assert len(kube.list_requests()) == 1, "resumed without a relist"


async def test_watch_ended_by_server_is_reopened(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube, watch_timeout=60) as (_, rec):
        await synced(kube, rec)

        def set_zone(obj: JsonObject) -> None:
            obj["endpoints"][0]["zone"] = "zone-b"

        rv = kube.modify_slice(NS, "oap-a", set_zone)
        await eventually(
            lambda: by_ip(rec.latest(), "10.0.0.1").zone == "zone-b", "the zone", within=WAIT
        )
        assert kube.end_watches() == 1  # as the server's timeoutSeconds does
        await until(kube, lambda: len(kube.watch_requests()) == 2, "a new watch")
        first, second = kube.watch_requests()
        assert second.resource_version == rv
        for request in (first, second):
            assert request.query.get("timeoutSeconds") == "60"
            assert request.query.get("allowWatchBookmarks") == "true"
            assert request.label_selector == "kubernetes.io/service-name=oap"
        assert len(kube.list_requests()) == 1


async def test_410_error_event_relists(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube) as (source, rec):
        await synced(kube, rec)
        listed = source.resource_version(NS, "oap")
        assert listed == kube.resource_version
        kube.set_down(True)  # the client loses the watch and cannot come back yet
        # Meanwhile the state changes and the server forgets the history.
        kube.delete_slice(NS, "oap-a")
        kube.add_slice(NS, endpoint_slice("oap-b", "oap", [endpoint("10.0.0.2")]))
        kube.compact()
        start = len(kube.requests)
        kube.set_down(False)

        await until(kube, lambda: ips(rec.latest()) == {"10.0.0.2"}, "the relisted state")
        after = [(r.watch, r.resource_version) for r in kube.requests[start:]]
        # The watch from the old resourceVersion got ERROR 410, then a list.
        assert after[:2] == [(True, listed), (False, None)], describe_requests(kube)
        assert rec.of() == [
            frozenset({Endpoint("10.0.0.1", 11800, True, True, False)}),
            frozenset({Endpoint("10.0.0.2", 11800, True, True, False)}),
        ]


async def test_410_on_open_watch_relists(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        kube.expire()  # ERROR 410 "Expired" on the open watch
        await relisted_and_watching(kube)
        assert kube.watch_requests()[-1].resource_version == kube.resource_version
        # Still working after the relist; nothing changed, nothing reported.
        assert len(rec.of()) == 1
        kube.set_conditions(NS, "oap-a", "10.0.0.1", ready=False)
        await eventually(
            lambda: not by_ip(rec.latest(), "10.0.0.1").ready, "not ready", within=WAIT
        )


async def test_http_410_on_watch_relists(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube) as (_, rec):
        await synced(kube, rec)
        kube.fail_next(410, watch=True)
        kube.drop_watches()
        await relisted_and_watching(kube)
        kube.delete_slice(NS, "oap-a")
        await eventually(lambda: rec.latest() == frozenset(), "deleted", within=WAIT)


async def test_bookmarks_advance_the_resource_version(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube) as (source, rec):
        await synced(kube, rec)
        listed = source.resource_version(NS, "oap")
        # Other objects change: the resourceVersion moves on, our watch sees nothing.
        kube.add_slice(NS, endpoint_slice("other-a", "other", [endpoint("10.9.0.1")]))
        kube.bump(10)
        bookmark = kube.send_bookmark()
        assert bookmark != listed
        await eventually(
            lambda: source.resource_version(NS, "oap") == bookmark,
            "the bookmark read",
            within=WAIT,
        )
        # History up to the bookmark is forgotten: resuming from the listed
        # resourceVersion would now get 410 and a relist; from the bookmark's, not.
        kube.compact()
        kube.drop_watches()
        await until(kube, lambda: len(kube.watch_requests()) == 2, "the resumed watch")
        await until(kube, lambda: kube.open_watches == 1, "watching")
        assert kube.watch_requests()[1].resource_version == bookmark
        assert len(kube.list_requests()) == 1
        assert kube.watch_requests()[0].query.get("allowWatchBookmarks") == "true"
        assert len(rec.of()) == 1  # bookmarks report nothing


# ---------------------------------------------------------------------------
# failures


async def test_apiserver_unreachable_at_start(logs: list[MutableMapping[str, Any]]) -> None:
    with FakeKubeApiServer(serving=False) as kube:
        kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
        async with running(kube) as (_, rec):
            await eventually(lambda: rec.of() == [None], "an unknown report", within=WAIT)

            def retries() -> int:
                return sum(1 for e in logs if e["event"] == "kubernetes api still failing")

            await eventually(lambda: retries() >= 2, "retries", within=WAIT)
            kube.start_serving()
            await until(kube, lambda: rec.latest() is not None, "endpoints")
            assert ips(rec.latest()) == {"10.0.0.1"}
            assert rec.of()[0] is None
            assert all(r is not None for r in rec.of()[1:])
        warnings = [e for e in logs if e["event"] == "kubernetes api error, retrying with backoff"]
        assert len(warnings) == 1, "one warning per failure streak"
        assert any(e["event"] == "kubernetes api reachable again" for e in logs)
        assert any(e["event"] == "kubernetes list done" and e["slices"] == 1 for e in logs)


async def test_http_errors_back_off_and_recover(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    kube.fail_next(500, count=3, watch=False)
    async with running(kube) as (_, rec):
        await until(kube, lambda: len(rec.of()) == 2, "unknown, then endpoints")
        assert rec.of()[0] is None  # the first list failed: unknown
        assert len(kube.list_requests()) == 4
        await eventually(lambda: kube.open_watches == 1, "watching", within=WAIT)

        # A failing watch is retried from where it was, without a relist.
        rv = kube.resource_version
        kube.fail_next(503, count=2, watch=True)
        kube.drop_watches()
        kube.set_conditions(NS, "oap-a", "10.0.0.1", ready=False)
        await until(kube, lambda: not by_ip(rec.latest(), "10.0.0.1").ready, "not ready")
        watches = kube.watch_requests()
        assert len(watches) == 4
        assert {w.resource_version for w in watches[1:]} == {rv}
        assert len(kube.list_requests()) == 4
        assert None not in rec.of()[1:]


async def test_long_failure_reports_unknown_then_recovers(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube, unknown_after=0.3) as (_, rec):
        await synced(kube, rec)
        kube.set_down(True)
        await eventually(lambda: rec.latest() is None, "unknown", within=WAIT)
        kube.add_slice(NS, endpoint_slice("oap-b", "oap", [endpoint("10.0.0.2")]))
        lists = len(kube.list_requests())
        kube.set_down(False)
        await until(kube, lambda: rec.latest() is not None, "known again")
        assert ips(rec.latest()) == {"10.0.0.1", "10.0.0.2"}
        assert len(kube.list_requests()) > lists  # recovery goes through a list
        assert [r is None for r in rec.of()] == [False, True, False]


async def test_short_failure_keeps_endpoints_known(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    async with running(kube, unknown_after=3600) as (_, rec):
        await synced(kube, rec)
        kube.fail_next(500, count=3, watch=True)
        kube.drop_watches()
        await until(kube, lambda: len(kube.watch_requests()) >= 5, "retries")
        await until(kube, lambda: kube.open_watches == 1, "watching again")
        assert rec.of() == [frozenset({Endpoint("10.0.0.1", 11800, True, True, False)})]


async def test_no_callback_when_nothing_changed(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1", node="node-1")))
    async with running(kube) as (_, rec):
        await synced(kube, rec)

        def relabel(obj: JsonObject) -> None:
            obj["metadata"]["labels"]["extra"] = "yes"
            obj["metadata"]["annotations"] = {"note": "x"}
            obj["endpoints"][0]["nodeName"] = "node-2"

        kube.modify_slice(NS, "oap-a", relabel)  # nothing we report changed
        kube.add_slice(  # a slice without our port contributes nothing
            NS, endpoint_slice("oap-x", "oap", [endpoint("10.0.0.9")], ports=[("other", 1)])
        )
        kube.send_bookmark()
        kube.end_watches()
        await eventually(lambda: kube.open_watches == 1, "watching again", within=WAIT)
        kube.set_conditions(NS, "oap-a", "10.0.0.1", ready=False)  # a real change
        await eventually(lambda: len(rec.calls) >= 2, "the real change", within=WAIT)
        # Reports come in order: a report of any no-op change would come first.
        assert len(rec.calls) == 2
        assert by_ip(rec.latest(), "10.0.0.1").ready is False


async def test_cancel_stops_threads_quickly(kube: FakeKubeApiServer) -> None:
    kube.add_slice(NS, slice_a(endpoint("10.0.0.1")))
    rec = Recorder()
    source = KubernetesEndpointSource(
        [OAP], rec, api_client=kube.api_client(), watch_timeout=600, read_slack=600
    )
    task = asyncio.create_task(source.run())
    await synced(kube, rec)
    assert watcher_threads()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)  # bounded: the watch read is interrupted
    assert not watcher_threads()
    # After run() no callback fires, whatever changes.
    kube.delete_slice(NS, "oap-a")
    # With the watcher threads gone, only a report one of them queued on the
    # loop before it ended could still come; a thread's call queued now is
    # run after it.
    await asyncio.to_thread(lambda: None)
    assert len(rec.calls) == 1


async def test_stop_makes_run_return(kube: FakeKubeApiServer) -> None:
    rec = Recorder()
    source = KubernetesEndpointSource([OAP], rec, api_client=kube.api_client())
    task = asyncio.create_task(source.run())
    await synced(kube, rec)
    source.stop()
    await asyncio.wait_for(task, WAIT)
    assert not watcher_threads()


async def test_stop_while_backing_off() -> None:
    with FakeKubeApiServer(serving=False) as kube:
        rec = Recorder()
        source = KubernetesEndpointSource(
            [OAP], rec, api_client=kube.api_client(), backoff_initial=30, backoff_max=30
        )
        task = asyncio.create_task(source.run())
        await eventually(lambda: rec.of() == [None], "unknown", within=WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert not watcher_threads()


def test_duplicate_service_names_are_rejected(kube: FakeKubeApiServer) -> None:
    twice = [OAP, WatchedService("oap", NS, "oap-2", "grpc")]
    with pytest.raises(ValueError, match="watched twice"):
        KubernetesEndpointSource(twice, Recorder(), api_client=kube.api_client())
