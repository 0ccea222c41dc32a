"""`python -m bench.scale.noop --listen HOST:PORT`: a grpc.aio server whose
Registry.Heartbeat and HeartbeatStream do nothing but answer (on the stream
only the heartbeats that ask, as lbserver does when there is no news), for
the floor that grpc.aio itself puts under lbserver's heartbeat cost (same
server options as lbserver, same generator)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

from lbserver.proto.v1 import lbserver_pb2 as pb
from lbserver.proto.v1 import lbserver_pb2_grpc as pb_grpc
from lbserver.server import SERVER_OPTIONS


class NoopRegistry(pb_grpc.RegistryServicer):
    async def Heartbeat(
        self,
        request: pb.HeartbeatRequest,
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatResponse],
    ) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse()

    async def HeartbeatStream(
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: grpc.aio.ServicerContext[pb.HeartbeatRequest, pb.HeartbeatStreamResponse],
    ) -> AsyncIterator[pb.HeartbeatStreamResponse]:
        async for request in request_iterator:
            if request.reply_token:
                yield pb.HeartbeatStreamResponse(
                    accepted=pb.HeartbeatResponse(), reply_token=request.reply_token
                )

    async def Deregister(
        self,
        request: pb.DeregisterRequest,
        context: grpc.aio.ServicerContext[pb.DeregisterRequest, pb.DeregisterResponse],
    ) -> pb.DeregisterResponse:
        return pb.DeregisterResponse()


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_RegistryServicer_to_server(NoopRegistry(), server)
    server.add_insecure_port(listen)
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
