"""Registering a service with gRPC so that its answers may be ready-made wire bytes.

What the generated ``add_<Service>Servicer_to_server`` does, with ``serialize`` as every method's
serializer: a message is serialised as usual, ``bytes`` (``server.wire``'s answers, built on a
thread) are sent as they are, so gRPC's own copy is all that is left on the event loop.
"""

from __future__ import annotations

import grpc

_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def serialize(answer) -> bytes:
    """What gRPC sends for an answer: a message's serialisation, or bytes already in wire format."""
    return answer if type(answer) is bytes else answer.SerializeToString()


def add_service(servicer, server, module, name: str) -> None:
    """What the generated ``add_<name>Servicer_to_server`` does for service ``name`` of the ``_pb2``
    ``module``, with ``serialize`` as every method's serializer."""
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {method.name: _HANDLERS[method.client_streaming, method.server_streaming](
        getattr(servicer, method.name), request_deserializer=getattr(module, method.input_type.name).FromString,
        response_serializer=serialize) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
