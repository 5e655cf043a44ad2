"""An HTTPS client (requests) on one keep-alive connection, opened and used before the agent
starts: one request, "ready", then on a line from stdin the test's requests on the same
connection, "done", and it waits for a last line before closing.

    tls_client.py URL

The second request carries trace context (as an instrumented caller would), the third a
planted secret in headers the agent must never store.
"""
import sys

import requests
import urllib3

urllib3.disable_warnings()
url = sys.argv[1].rstrip("/")
s = requests.Session()
# Per request: a session-wide verify=False loses to REQUESTS_CA_BUNDLE in the environment.
get = lambda u, **kw: s.get(u, verify=False, **kw)
assert get(f"{url}/warmup").status_code in (200, 404)
print("ready", flush=True)
sys.stdin.readline()
r = [
    get(f"{url}/users/1"),
    get(
        f"{url}/users/2",
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    ),
    get(
        f"{url}/users/3",
        headers={"Authorization": "Bearer PLANTED-SECRET-7f3a", "Cookie": "session=PLANTED-SECRET-7f3a"},
    ),
]
assert all(x.status_code == 200 for x in r), [x.status_code for x in r]
print("done", flush=True)
sys.stdin.readline()
