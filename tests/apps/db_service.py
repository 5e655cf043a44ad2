"""An uninstrumented Flask service (a thread per request) that calls PostgreSQL twice (psycopg2:
simple protocol; psycopg 3: extended protocol, prepared after a few uses), MySQL/MariaDB
(PyMySQL) and Redis (redis-py, a pipeline included) on every request, through pools opened and
used before the agent starts. Every literal and value it sends carries a planted secret.

usage: db_service.py PORT PG_PORT MYSQL_PORT REDIS_PORT
"""

import queue
import sys

import psycopg
import psycopg2
import psycopg2.pool
import pymysql
import redis
from flask import Flask

port, pg_port, my_port, redis_port = (int(a) for a in sys.argv[1:5])
POOL = 4

pg2 = psycopg2.pool.ThreadedConnectionPool(
    POOL, POOL, host="127.0.0.1", port=pg_port, user="postgres", dbname="shop"
)
pg3 = queue.Queue()
my = queue.Queue()
for _ in range(POOL):
    pg3.put(psycopg.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="shop", autocommit=True))
    my.put(pymysql.connect(host="127.0.0.1", port=my_port, user="root", database="shop", autocommit=True))
cache = redis.Redis(
    connection_pool=redis.ConnectionPool(host="127.0.0.1", port=redis_port, max_connections=POOL)
)


def warm():
    """Every pooled connection opened and used: the agent will join them mid-stream."""
    conns = [pg2.getconn() for _ in range(POOL)]
    for c in conns:
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute("SELECT 1")
    for c in conns:
        pg2.putconn(c)
    for q in (pg3, my):
        held = [q.get() for _ in range(POOL)]
        for c in held:
            c.cursor().execute("SELECT 1")
        for c in held:
            q.put(c)
    clients = [cache.connection_pool.get_connection("PING") for _ in range(POOL)]
    for c in clients:
        c.send_command("PING")
        c.read_response()
    for c in clients:
        cache.connection_pool.release(c)


warm()
app = Flask(__name__)


@app.get("/order/<int:oid>")
def order(oid):
    secret = f"sekrit-{oid}"
    c = pg2.getconn()
    try:
        with c.cursor() as cur:
            # Interpolated by the client: the literal travels in the SQL text.
            cur.execute("SELECT name, qty FROM items WHERE id = %s AND note <> %s", (oid, secret))
            cur.fetchall()
    finally:
        pg2.putconn(c)
    c = pg3.get()
    try:
        c.execute("SELECT qty FROM items WHERE id = %s AND note <> %s", (oid, secret)).fetchall()
    finally:
        pg3.put(c)
    c = my.get()
    try:
        with c.cursor() as cur:
            cur.execute("SELECT name FROM items WHERE id = %s AND note <> %s", (oid, secret))
            cur.fetchall()
    finally:
        my.put(c)
    cache.set(f"session:tok-{oid}", f"redis-secret-{oid}")
    cache.get(f"session:tok-{oid}")
    pipe = cache.pipeline(transaction=False)
    pipe.incr(f"views:tok-{oid}")
    pipe.expire(f"views:tok-{oid}", 60)
    pipe.execute()
    return {"id": oid}


@app.get("/fail/<int:oid>")
def fail(oid):
    c = pg3.get()
    try:
        c.execute("SELECT * FROM missing_table WHERE id = %s", (oid,))
    except psycopg.Error:
        pass
    finally:
        pg3.put(c)
    c = my.get()
    try:
        with c.cursor() as cur:
            cur.execute("SELECT * FROM missing_table WHERE id = %s", (oid,))
    except pymysql.Error:
        pass
    finally:
        my.put(c)
    cache.set(f"list:tok-{oid}", "x")
    try:
        cache.lpush(f"list:tok-{oid}", "redis-secret-value")
    except redis.ResponseError:
        pass
    return {"failed": oid}


app.run(host="127.0.0.1", port=port, threaded=True)
