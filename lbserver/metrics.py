"""Prometheus metrics. Gauges that describe state are read from the balancer
at scrape time (a collector), so they can never drift from it; counters count
events as they happen. No client addresses as labels: cardinality stays bounded
by the number of services and backends."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lbserver.balancer import Balancer

HEARTBEATS = Counter(
    "lbserver_heartbeats_total",
    "Heartbeats received, by result (accepted, or the reason they were rejected).",
    ["result"],
)
AUTH_FAILURES = Counter(
    "lbserver_auth_failures_total",
    "Registry and Admin calls refused for their credentials, by call and reason.",
    ["call", "reason"],
)
AUTH_PREVIOUS_TOKEN = Counter(
    "lbserver_auth_previous_token_total",
    "Registry and Admin calls accepted with a previous registration token (not the first "
    "of auth_token_file), by call: registrars not yet given the current token.",
    ["call"],
)
DEREGISTRATIONS = Counter(
    "lbserver_deregistrations_total", "Deregister calls that removed a backend."
)
LIST_PUSHES = Counter(
    "lbserver_list_pushes_total",
    "Responses written to BalanceLoad streams, by kind (server_list, fallback).",
    ["kind"],
)
STREAMS_OPENED = Counter("lbserver_balance_streams_opened_total", "BalanceLoad streams opened.")
STREAM_ERRORS = Counter(
    "lbserver_balance_stream_errors_total",
    "BalanceLoad streams ended by an error, by gRPC status code.",
    ["code"],
)
XDS_STREAMS_OPENED = Counter(
    "lbserver_xds_streams_opened_total", "xDS (ADS StreamAggregatedResources) streams opened."
)
XDS_STREAM_ERRORS = Counter(
    "lbserver_xds_stream_errors_total",
    "xDS streams ended by an error, by gRPC status code.",
    ["code"],
)
XDS_RESPONSES = Counter(
    "lbserver_xds_responses_total",
    "DiscoveryResponses written to xDS streams, by resource type (lds, rds, cds, eds).",
    ["type"],
)
XDS_NACKS = Counter(
    "lbserver_xds_nacks_total",
    "xDS responses a client rejected (NACK: it keeps its previous version), by resource type.",
    ["type"],
)
CLIENT_STATS_REPORTS = Counter(
    "lbserver_client_stats_reports_total", "ClientStats reports received from grpclb clients."
)
STREAMS_REFUSED = Counter(
    "lbserver_streams_refused_total",
    "BalanceLoad, StreamAggregatedResources and HeartbeatStream streams ended by a limit, by "
    "rpc and limit (max_streams, max_streams_per_peer, max_pending_streams, "
    "initial_request_timeout, client_stats_rate_per_stream, xds_max_resource_names, "
    "xds_request_rate_per_stream).",
    ["rpc", "limit"],
)
REQUESTS_REFUSED = Counter(
    "lbserver_request_messages_refused_total",
    "Request messages of BalanceLoad, xDS, Registry and Admin refused before a handler saw "
    "them, by method and reason (undecodable, too_large: over max_message_bytes).",
    ["method", "reason"],
)
LOG_EVENTS_SUPPRESSED = Counter(
    "lbserver_log_events_suppressed_total",
    "Log lines left out by the per-event rate limit of client-triggered events, by event.",
    ["event"],
)
REGISTRY_UNAUTHENTICATED = Gauge(
    "lbserver_registry_unauthenticated",
    "1 when Registry and Admin accept calls without a token or client certificate on a "
    "non-loopback address (anyone who reaches the port can register or deregister "
    "backends), else 0.",
)
PUSH_LATENCY = Histogram(
    "lbserver_list_push_latency_seconds",
    "Time from a list change to the write of that list on a stream (BalanceLoad or xDS).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


SCRAPE_SECONDS = Histogram(
    "lbserver_scrape_duration_seconds",
    "Time one load scrape of a Kubernetes member took, by service.",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SCRAPE_FAILURES = Counter(
    "lbserver_scrape_failures_total",
    "Load scrapes of a Kubernetes member that failed (its load is unknown until one works).",
    ["service", "instance"],
)


class BalancerCollector(Collector):
    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer

    def collect(self) -> Iterator[Metric]:
        backend_labels = ["service", "instance"]
        backends = GaugeMetricFamily(
            "lbserver_backends",
            "Registered backends by service and state.",
            labels=["service", "state"],
        )
        entries = GaugeMetricFamily(
            "lbserver_server_list_entries",
            "Entries of each backend in its service's current server list.",
            labels=backend_labels,
        )
        weights = GaugeMetricFamily(
            "lbserver_backend_weight",
            "The weight the balancer computed for each backend (load-aware, clamped, "
            "ramped); 0 while draining.",
            labels=backend_labels,
        )
        shares = GaugeMetricFamily(
            "lbserver_backend_share",
            "Each backend's share of its service's server list, 0..1.",
            labels=backend_labels,
        )
        utilization = GaugeMetricFamily(
            "lbserver_backend_cpu_utilization",
            "CPU utilization each backend last reported (absent when unknown).",
            labels=backend_labels,
        )
        drops = GaugeMetricFamily(
            "lbserver_drop_share",
            "Share of the server list that is drop entries (overload shedding), by service.",
            labels=["service"],
        )
        clients = GaugeMetricFamily(
            "lbserver_connected_clients",
            "Open BalanceLoad streams, and xDS streams per name they watch, by service.",
            labels=["service"],
        )
        calls = CounterMetricFamily(
            "lbserver_client_calls",
            "Calls grpclb clients reported in their ClientStats, by service and outcome "
            "(started, finished, failed_to_send, known_received, dropped).",
            labels=["service", "outcome"],
        )
        for view in self._balancer.view():
            by_state: dict[str, int] = {"serving": 0, "draining": 0}
            total = len(view.servers)
            per_token = view.servers.entries_per_token()
            for backend in view.backends:
                by_state[backend.registration.state.value] += 1
                labels = [view.name, backend.instance_id]
                count = per_token.get(backend.token, 0)
                entries.add_metric(labels, count)
                weights.add_metric(labels, view.weights.get(backend.token, 0.0))
                shares.add_metric(labels, count / total if total else 0.0)
                cpu = backend.registration.load.cpu_utilization
                if cpu is not None:
                    utilization.add_metric(labels, cpu)
            for state, number in by_state.items():
                backends.add_metric([view.name, state], number)
            dropped_entries = sum(1 for entry in view.servers.entries if entry.drop)
            drops.add_metric([view.name], dropped_entries / total if total else 0.0)
            clients.add_metric([view.name], view.clients)
            stats = view.client_stats
            for outcome, value in (
                ("started", stats.calls_started),
                ("finished", stats.calls_finished),
                ("failed_to_send", stats.calls_finished_with_client_failed_to_send),
                ("known_received", stats.calls_finished_known_received),
                ("dropped", sum(stats.calls_dropped_by_token.values())),
            ):
                calls.add_metric([view.name, outcome], value)
        yield from (backends, entries, weights, shares, utilization, drops, clients, calls)


def register_balancer(balancer: Balancer, registry: CollectorRegistry) -> BalancerCollector:
    collector = BalancerCollector(balancer)
    registry.register(collector)
    return collector
