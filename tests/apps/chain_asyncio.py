"""An asyncio service for the runtimes causality scenario (uninstrumented; aiohttp server and
one pooled keep-alive ClientSession).

    chain_asyncio.py PORT DOWNSTREAM_BASE_URL PREFIX

GET /<anything>/<id> calls DOWNSTREAM/PREFIX/<derive(id)>, then answers.
"""
import sys

import aiohttp
from aiohttp import web

port, downstream, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def derive(i):
    return (i * 7919 + 13) % 1000003


async def handle(request):
    i = int(request.path.rstrip("/").rsplit("/", 1)[-1])
    async with request.app["session"].get(f"{downstream}/{prefix}/{derive(i)}") as r:
        body = await r.read()
    return web.Response(body=body)


async def session(app):
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    yield
    await app["session"].close()


app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_get("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
