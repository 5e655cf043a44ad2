"""Client sessions whose bytes `cargo xtask record` keeps as parser fixtures. Each scenario talks
to a recording proxy in front of a real server; see tests/src/bin/record.rs.

usage: record_clients.py SCENARIO PORT
"""

import sys
import threading
import time

scenario, port = sys.argv[1], int(sys.argv[2])


def pg_simple():
    import psycopg2

    # sslmode=prefer against a server without TLS: SSLRequest, 'N', then the StartupMessage.
    c = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="shop", sslmode="prefer")
    c.autocommit = True
    cur = c.cursor()
    cur.execute("SELECT name, qty FROM items WHERE id = %s AND note <> %s", (7, "fixture-secret"))
    cur.fetchall()
    cur.execute("INSERT INTO items (id, name, qty, note) VALUES (%s, %s, 1, 'n')", (1000, "fixture-secret"))
    try:
        cur.execute("SELECT * FROM missing_table")
    except psycopg2.Error:
        pass
    cur.execute("SELECT 1; SELECT 2")
    cur.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
    import io

    out = io.StringIO()
    cur.copy_expert("COPY (SELECT id, name FROM items WHERE id < 50) TO STDOUT", out)
    cur.copy_expert("COPY items (id, name, qty, note) FROM STDIN", io.StringIO("2000\tx\t1\tn\n2001\ty\t2\tn\n"))
    cur.execute("SELECT name FROM items WHERE id > %s", (0,))
    cur.fetchall()
    c.close()


def pg_extended():
    import psycopg

    c = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="shop", autocommit=True)
    c.prepare_threshold = 0  # a named statement from the first use
    for i in (1, 2, 3):
        c.execute("SELECT qty FROM items WHERE id = %s", (i,)).fetchall()
    c.prepare_threshold = None  # unnamed statements
    c.execute("UPDATE items SET qty = qty + 1 WHERE id = %s", (4,))
    try:
        c.execute("SELECT * FROM missing_table WHERE id = %s", (1,))
    except psycopg.Error:
        pass
    # Pipeline mode: several Executes per Sync; an error skips the rest of its pipeline.
    with c.pipeline():
        for i in (5, 6, 7):
            c.execute("SELECT name FROM items WHERE id = %s", (i,))
    try:
        with c.pipeline():
            c.execute("SELECT 1 / %s", (0,))
            c.execute("SELECT name FROM items WHERE id = %s", (8,))
    except psycopg.Error:
        pass
    c.execute("SELECT name FROM items WHERE id = %s", (9,)).fetchall()
    c.close()


def mysql_text():
    import pymysql
    from pymysql.constants import CLIENT

    c = pymysql.connect(host="127.0.0.1", port=port, user="root", database="shop",
                        autocommit=True, client_flag=CLIENT.MULTI_STATEMENTS)
    cur = c.cursor()
    cur.execute("SELECT name, qty FROM items WHERE id = %s AND note <> %s", (1, "fixture-secret"))
    cur.fetchall()
    cur.execute("INSERT INTO items VALUES (%s, %s, 1, 'n')", (1000, "fixture-secret"))
    try:
        cur.execute("SELECT * FROM missing_table")
    except pymysql.Error:
        pass
    cur.execute("SELECT 1; SELECT 2")
    while cur.nextset():
        pass
    cur.execute("SELECT name FROM items WHERE id > 1000000")
    c.ping()
    c.select_db("shop")
    cur.execute("SELECT COUNT(*) FROM items")
    c.close()


def mysql_prepared():
    import mysql.connector

    c = mysql.connector.connect(host="127.0.0.1", port=port, user="root", database="shop",
                                use_pure=True, ssl_disabled=True)
    cur = c.cursor(prepared=True)
    for i in (1, 2):
        cur.execute("SELECT name, qty FROM items WHERE id = %s AND note <> %s", (i, "fixture-secret"))
        cur.fetchall()
    cur.execute("UPDATE items SET qty = qty + 1 WHERE id = %s", (2,))
    cur.close()
    c.close()


def redis_resp2():
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.set("fixture:key", "fixture-secret")
    r.get("fixture:key")
    r.set("fixture:big", b"x" * 100_000)
    r.get("fixture:big")
    p = r.pipeline(transaction=False)
    for i in range(5):
        p.incr("fixture:n")
    p.execute()
    t = r.pipeline(transaction=True)
    t.set("fixture:a", "1")
    t.get("fixture:a")
    t.execute()
    try:
        r.lpush("fixture:key", "v")
    except redis.ResponseError:
        pass
    r.hset("fixture:h", mapping={"f1": "v1", "f2": "v2"})
    r.hgetall("fixture:h")
    r.delete("fixture:missing")
    r.get("fixture:missing")


def redis_pubsub():
    import redis

    sub = redis.Redis(host="127.0.0.1", port=port).pubsub()
    sub.subscribe("fixture-channel", "other-channel")
    pub = redis.Redis(host="127.0.0.1", port=port)
    for m in range(3):
        pub.publish("fixture-channel", f"message-secret-{m}")
    got = 0
    deadline = time.time() + 5
    while got < 5 and time.time() < deadline:
        if sub.get_message(timeout=0.5):
            got += 1
    sub.unsubscribe("fixture-channel")
    sub.get_message(timeout=0.5)
    sub.close()


def redis_resp3():
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, protocol=3)
    other = redis.Redis(host="127.0.0.1", port=port)
    r.execute_command("CLIENT", "TRACKING", "ON")
    r.set("fixture:tracked", "1")
    r.get("fixture:tracked")
    other.set("fixture:tracked", "2")  # an invalidation push to r's connection
    time.sleep(0.2)
    r.hgetall("fixture:h")
    r.get("fixture:tracked")


def http1_keepalive():
    import requests

    s = requests.Session()
    base = f"http://127.0.0.1:{port}"
    for i in range(3):
        s.get(f"{base}/users/{i}?token=fixture-secret")
    s.get(f"{base}/missing")
    s.post(f"{base}/users/9", data=b"x" * 5000)
    s.head(f"{base}/users/1")


{
    "http1-keepalive": http1_keepalive,
    "pg-simple": pg_simple,
    "pg-extended": pg_extended,
    "mysql-text": mysql_text,
    "mysql-prepared": mysql_prepared,
    "redis-resp2": redis_resp2,
    "redis-pubsub": redis_pubsub,
    "redis-resp3": redis_resp3,
}[scenario]()
