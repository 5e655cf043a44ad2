"""A thread-per-request HTTP service for the causality scenario (uninstrumented).

    [BIND=ADDR] chain_service.py PORT [--spawn] [DOWNSTREAM_BASE_URL=PREFIX ...]

GET /<anything>/<id> calls, one after the other, DOWNSTREAM/PREFIX/<id> for each downstream,
then answers. With no downstream it is a leaf. With --spawn each call runs in a thread the
handler creates for it (work handed to a new thread).
"""
import http.server
import os
import sys
import threading
import urllib.request

port = int(sys.argv[1])
spawn = "--spawn" in sys.argv[2:]
downstreams = [arg.split("=", 1) for arg in sys.argv[2:] if arg != "--spawn"]


def fetch(url, out):
    with urllib.request.urlopen(url, timeout=10) as resp:
        out.append(resp.read().decode())


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so proxies can reuse connections
    # Head and body go out in two writes: without this, Nagle holds the body until the client's
    # delayed ACK (40 ms per request on keep-alive connections).
    disable_nagle_algorithm = True

    def do_GET(self):
        request_id = self.path.rstrip("/").rsplit("/", 1)[-1]
        parts = []
        for base, prefix in downstreams:
            url = f"{base}/{prefix}/{request_id}"
            if spawn:
                worker = threading.Thread(target=fetch, args=(url, parts))
                worker.start()
                worker.join()
            else:
                fetch(url, parts)
        body = (" ".join(parts) or f"leaf {request_id}").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer.daemon_threads = True
bind = os.environ.get("BIND", "127.0.0.1")
http.server.ThreadingHTTPServer((bind, port), Handler).serve_forever()
