"""lbserver.v1.Admin: the balancer's state for operators and `lbserver status`."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from lbserver import __version__
from lbserver.balancer import Balancer, ServiceView
from lbserver.domain.model import Backend, BackendState, LoadReport
from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.security import Authorizer, require

_STATE = {
    BackendState.SERVING: pb.BACKEND_STATE_SERVING,
    BackendState.DRAINING: pb.BACKEND_STATE_DRAINING,
}


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


def _backend_message(backend: Backend, view: ServiceView) -> pb.BackendStatus:
    registration = backend.registration
    entries = view.servers.count(backend.token)
    last = timestamp_pb2.Timestamp()
    last.FromNanoseconds(int(backend.last_heartbeat_wall * 1e9))
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(int(backend.ttl * 1e9))
    return pb.BackendStatus(
        instance_id=registration.instance_id,
        ip=str(registration.ip),
        port=registration.port,
        zone=registration.zone,
        labels=dict(registration.labels),
        state=_STATE[registration.state],
        weight=registration.weight,
        load=load_message(registration.load),
        load_balance_token=backend.token,
        last_heartbeat=last,
        ttl=ttl,
        list_entries=entries,
        share=entries / len(view.servers) if len(view.servers) else 0.0,
        effective_weight=view.weights.get(backend.token, 0.0),
    )


def service_message(view: ServiceView) -> pb.ServiceStatus:
    stats = view.client_stats
    return pb.ServiceStatus(
        name=view.name,
        backends=[_backend_message(backend, view) for backend in view.backends],
        clients=view.clients,
        list_length=len(view.servers),
        drop_entries=sum(1 for entry in view.servers.entries if entry.drop),
        client_stats=pb.ClientCallStats(
            calls_started=stats.calls_started,
            calls_finished=stats.calls_finished,
            calls_finished_with_client_failed_to_send=stats.calls_finished_with_client_failed_to_send,
            calls_finished_known_received=stats.calls_finished_known_received,
            calls_dropped_by_token=stats.calls_dropped_by_token,
        ),
    )


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
        response = pb.GetStateResponse(
            services=[service_message(view) for view in self._balancer.view(request.service)],
            version=__version__,
        )
        response.now.GetCurrentTime()
        return response
