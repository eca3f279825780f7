"""Server reflection under `grpc.reflection.v1` as well as `v1alpha`: tools that speak only v1
(newer grpcurl, Postman, evans) get UNIMPLEMENTED from a server that serves only v1alpha.

grpcio-reflection ships only the v1alpha servicer; the two protocols are the same messages under
another package name, so the same servicer answers both.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as messages

SERVICE_NAME_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1alpha and v1 for `service_names` (both reflection services are added)."""
    names = (*service_names, reflection.SERVICE_NAME, SERVICE_NAME_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=messages.ServerReflectionRequest.FromString,
            response_serializer=messages.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME_V1, handlers),)
    )
