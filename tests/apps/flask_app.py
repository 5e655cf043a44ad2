"""A small uninstrumented Flask service for the end-to-end tests (run under gunicorn)."""
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
