"""A thread-per-request HTTP service for the causality scenario (uninstrumented).

    chain_service.py PORT [DOWNSTREAM_BASE_URL=PREFIX ...]

GET /<anything>/<id> calls, one after the other, DOWNSTREAM/PREFIX/<id> for each downstream,
then answers. With no downstream it is a leaf.
"""
import http.server
import sys
import urllib.request

port = int(sys.argv[1])
downstreams = [arg.split("=", 1) for arg in sys.argv[2:]]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so proxies can reuse connections

    def do_GET(self):
        request_id = self.path.rstrip("/").rsplit("/", 1)[-1]
        parts = []
        for base, prefix in downstreams:
            with urllib.request.urlopen(f"{base}/{prefix}/{request_id}", timeout=10) as resp:
                parts.append(resp.read().decode())
        body = (" ".join(parts) or f"leaf {request_id}").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
