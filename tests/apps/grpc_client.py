"""A gRPC client (grpcio) over one multiplexed channel, opened and used before the agent
starts: it pings, says "ready", waits for a line on stdin, then makes the calls of the test.
With --fresh it opens a second channel after the line instead (a connection seen from its start).

    grpc_client.py ADDR [--fresh]
"""
import sys

import grpc

addr = sys.argv[1]
fresh = "--fresh" in sys.argv
channel = grpc.insecure_channel(addr)
ping = channel.unary_unary("/shop.v1.Orders/Ping")
assert ping(b"x", timeout=10) == b"pong"
print("ready", flush=True)
sys.stdin.readline()
if fresh:
    # Its own subchannel pool: C-core would otherwise reuse the connection the first opened.
    channel = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
get = channel.unary_unary("/shop.v1.Orders/Get")
watch = channel.unary_stream("/shop.v1.Orders/Watch")
# Trace context in metadata, as an instrumented caller upstream would have sent it.
parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
assert get(b"42", timeout=10, metadata=(("traceparent", parent),)).startswith(b"order 42")
assert len(list(watch(b"42", timeout=10))) == 3
try:
    get(b"missing", timeout=10)
    sys.exit("missing did not fail")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
print("done", flush=True)
sys.stdin.readline()
