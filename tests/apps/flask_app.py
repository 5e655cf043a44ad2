"""A small uninstrumented Flask service for the end-to-end tests (run under gunicorn)."""
import time

from flask import Flask, Response

app = Flask(__name__)


@app.get("/users/<int:user_id>")
def user(user_id):
    return {"id": user_id, "name": f"user-{user_id}"}


@app.post("/items")
def create_item():
    return Response("created", status=201)


@app.get("/fail")
def fail():
    return Response("boom", status=503)


@app.get("/chunked")
def chunked():
    def body():
        for i in range(5):
            yield f"part-{i}\n" * 200
    return Response(body(), mimetype="text/plain")


@app.get("/work/<int:item_id>")
def work(item_id):
    # A few milliseconds of CPU, like a small real handler (for `cargo xtask bench`).
    total = 0
    for i in range(60_000):
        total += i * item_id % 7
    return {"id": item_id, "total": total}


@app.get("/slow/<int:item_id>")
def slow(item_id):
    time.sleep(0.6)
    return {"id": item_id}
