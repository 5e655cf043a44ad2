"""A master process that forks HTTP workers, as gunicorn, nginx or php-fpm do: one before it is
told to go on (stdin line), one after. Each worker serves on its own port."""
import http.server
import os
import sys


def fork_worker(port):
    if os.fork() == 0:
        server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
        server.serve_forever()


fork_worker(int(sys.argv[1]))
print("first worker", flush=True)
sys.stdin.readline()
fork_worker(int(sys.argv[2]))
print("second worker", flush=True)
sys.stdin.readline()
