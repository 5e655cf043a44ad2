"""An uninstrumented gRPC service (grpcio, thread pool; no generated stubs: messages are raw
bytes) for the HTTP/2 end-to-end test.

    grpc_service.py PORT LEAF_URL

shop.v1.Orders/Get     unary: calls LEAF_URL/stock/<request> over HTTP/1 from the handler's
                       pool thread, then answers; the request b"missing" fails with NOT_FOUND.
shop.v1.Orders/Watch   server streaming: three messages.
shop.v1.Orders/Ping    unary: answers b"pong".
"""
import sys
import urllib.request
from concurrent import futures

import grpc

port, leaf = sys.argv[1], sys.argv[2]


def get(request, context):
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "order not found")
    with urllib.request.urlopen(f"{leaf}/stock/{request.decode()}", timeout=10) as r:
        return b"order " + request + b": " + r.read()


def watch(request, context):
    for i in range(3):
        yield b"update %d" % i


handler = grpc.method_handlers_generic_handler(
    "shop.v1.Orders",
    {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
        "Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"pong"),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
server.wait_for_termination()
