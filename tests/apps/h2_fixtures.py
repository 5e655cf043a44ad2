"""Writes HTTP/2 fixtures for agent/src/protocol/http2/session/tests.rs with Python's `h2`
(an implementation independent of Loupe): one cleartext connection carrying gRPC calls (unary,
server streaming, a trailers-only error, a cancelled call) interleaved with a plain HTTP/2 GET,
as the client and the server each wrote it.

    tests/.venv/bin/python tests/apps/h2_fixtures.py agent/src/protocol/http2/testdata

grpc.bin: every write in the order it happened, in the format of `cargo xtask record`
(agent/src/protocol/fixture.rs): a direction byte (C client to server, S back), a 4-byte
little-endian length, the bytes. The protocol conformance suite replays it too.
"""
import os
import struct
import sys

import h2.config
import h2.connection
import h2.errors

out_dir = sys.argv[1]
client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
writes = []


def pump():
    data = client.data_to_send()
    if data:
        writes.append((0, data))
        server.receive_data(data)
    data = server.data_to_send()
    if data:
        writes.append((1, data))
        client.receive_data(data)


def message(payload):
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def grpc_request(stream, method, trace):
    client.send_headers(stream, [
        (":method", "POST"), (":scheme", "http"), (":path", f"/shop.v1.Orders/{method}"),
        (":authority", "orders:50051"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("user-agent", "grpc-python/1.68.0"), ("traceparent", trace),
        ("authorization", "Bearer never-exported"),
    ])
    client.send_data(stream, message(b"order-42"), end_stream=True)


client.initiate_connection()
server.initiate_connection()
pump()
pump()

# Two unary calls in flight at once, answered out of order.
grpc_request(1, "Get", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
grpc_request(3, "Watch", "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01")
pump()
# Stream 3: server streaming, three messages, then trailers.
server.send_headers(3, [(":status", "200"), ("content-type", "application/grpc")])
for i in range(3):
    server.send_data(3, message(b"update %d" % i))
    pump()
# Stream 1: unary answer.
server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
server.send_data(1, message(b"order 42: shipped"))
server.send_headers(1, [("grpc-status", "0")], end_stream=True)
pump()
server.send_headers(3, [("grpc-status", "0")], end_stream=True)
pump()
# Stream 5: trailers-only error.
grpc_request(5, "Get", "00-2af7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01")
pump()
server.send_headers(5, [(":status", "200"), ("content-type", "application/grpc"),
                        ("grpc-status", "5"), ("grpc-message", "order not found")], end_stream=True)
pump()
# Stream 7: plain HTTP/2.
client.send_headers(7, [(":method", "GET"), (":scheme", "http"), (":path", "/static/app.js?v=3"),
                        (":authority", "orders:50051"), ("user-agent", "curl/8.5.0")], end_stream=True)
pump()
server.send_headers(7, [(":status", "404"), ("content-length", "9")])
server.send_data(7, b"not found", end_stream=True)
pump()
# Stream 9: cancelled by the client before any answer.
client.send_headers(9, [(":method", "POST"), (":scheme", "http"), (":path", "/shop.v1.Orders/Slow"),
                        (":authority", "orders:50051"), ("content-type", "application/grpc")])
pump()
client.reset_stream(9, h2.errors.ErrorCodes.CANCEL)
pump()


with open(os.path.join(out_dir, "grpc.bin"), "wb") as f:
    for d, data in writes:
        f.write(b"C" if d == 0 else b"S")
        f.write(struct.pack("<I", len(data)))
        f.write(data)
print(f"{len(writes)} writes, {sum(len(d) for _, d in writes)} bytes")
