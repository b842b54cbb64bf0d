"""gRPC server reflection, ``grpc.reflection.v1`` as well as ``grpc.reflection.v1alpha``.

Current tools (grpcurl, Postman, grpcui) ask v1 first and older ones only v1alpha. grpcio-reflection
(1.85) ships only v1alpha; v1 has the same messages and field numbers under another package, so the
v1 method is served by the same servicer with v1alpha's (wire-identical) message classes. The v1
file descriptor is derived from v1alpha's and added to the pool, so v1 can describe itself too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES = (reflection.SERVICE_NAME, V1_SERVICE_NAME)


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """v1alpha's file with the package renamed: what ``describe grpc.reflection.v1.ServerReflection`` reads."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    old = f".{reflection_pb2.DESCRIPTOR.package}."
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name.startswith(old):
                fld.type_name = f".{V1_PACKAGE}." + fld.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type[len(old):]
            method.output_type = f".{V1_PACKAGE}." + method.output_type[len(old):]
    try:
        pool.Add(proto)
    except TypeError:  # a pool that already has an equal file under another route: describing is optional
        pass


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection v1alpha and v1 on ``server``, listing ``service_names`` and both reflection services."""
    names = (*service_names, *SERVICE_NAMES)
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    reflection.enable_server_reflection(names, server)  # v1alpha
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handlers = {"ServerReflectionInfo": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(V1_SERVICE_NAME, handlers)
