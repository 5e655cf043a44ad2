"""Concurrent unary calls over one grpcio channel, opened after the agent: N calls of
shop.v1.Orders/Get with C in flight at a time, each asking for its own order id (the
service's handler then calls the leaf for /stock/<id>). Prints "done" when all succeeded.

    grpc_load.py ADDR PREFIX N C
"""
import sys
from concurrent import futures

import grpc

addr, prefix, n, c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
channel = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
get = channel.unary_unary("/shop.v1.Orders/Get")
with futures.ThreadPoolExecutor(max_workers=c) as pool:
    answers = list(pool.map(lambda i: get(f"{prefix}{i}".encode(), timeout=20), range(n)))
assert all(a.startswith(b"order ") for a in answers), answers
print("done", flush=True)
