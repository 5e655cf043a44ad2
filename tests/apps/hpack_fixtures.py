"""Writes HPACK fixtures for agent/src/protocol/http2/hpack/tests.rs with Python's `hpack`
package, an encoder independent of Loupe's decoder: header blocks as a gRPC client would send
them over one long connection (indexing, Huffman, evictions, table size updates, never-indexed
fields), and what each block decodes to.

    tests/.venv/bin/python tests/apps/hpack_fixtures.py agent/src/protocol/http2/testdata

blocks.hpack: per block a 4-byte big-endian length, then the block.
blocks.json: per block the list of [name, value] pairs (latin-1 strings).
"""
import json
import os
import struct
import sys

import hpack

out_dir = sys.argv[1]
enc = hpack.Encoder()
blocks = []
expected = []


def emit(headers, sensitive=()):
    fields = [
        hpack.NeverIndexedHeaderTuple(k, v) if k in sensitive else (k, v)
        for k, v in headers
    ]
    blocks.append(enc.encode(fields, huffman=True))
    expected.append([[k, v] for k, v in headers])


for i in range(120):
    method = ["Get", "List", "Watch"][i % 3]
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", f"/shop.v1.Orders/{method}"),
        (":authority", "orders.shop.svc:50051"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", f"{1000 + i}m"),
        ("user-agent", "grpc-python/1.68.0 grpc-c/44.0.0 (linux; chttp2)"),
        # A fresh trace per call: each one is a new literal that pushes older entries out.
        ("traceparent", f"00-{i:032x}-{i + 7:016x}-01"),
        (f"x-request-{i % 17}", "v" * (i % 50)),
    ]
    emit(headers, sensitive=("authorization",))
    if i == 40:
        # The decoder shrinks its table: the encoder announces it in its next block.
        enc.header_table_size = 512
    if i == 80:
        enc.header_table_size = 4096
    if i % 10 == 0:
        emit([(":status", "200"), ("authorization", f"Bearer secret-{i}")], sensitive=("authorization",))

with open(os.path.join(out_dir, "blocks.hpack"), "wb") as f:
    for b in blocks:
        f.write(struct.pack(">I", len(b)))
        f.write(b)
with open(os.path.join(out_dir, "blocks.json"), "w") as f:
    json.dump(expected, f)
print(f"{len(blocks)} blocks, {sum(map(len, blocks))} bytes")
