"""GETs each path given on stdin (one per line) over one keep-alive session."""
import sys

import requests

base = sys.argv[1]
s = requests.Session()
for line in sys.stdin:
    r = s.get(base + line.strip(), timeout=10)
    r.raise_for_status()
