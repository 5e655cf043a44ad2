"""An OpenTelemetry-SDK-instrumented client: it makes one CLIENT span around one request, with
its context injected (W3C traceparent), and prints the span's ids and times as JSON so the test
can compare them with the agent's spans. Like the SDK's own http.client/urllib3
instrumentations, the span opens right before the request is written and closes once the
response is read."""
import http.client
import json
import os
import sys
import urllib.parse

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("sdk-client")
url = urllib.parse.urlsplit(sys.argv[1])

conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
# Warm the keep-alive connection outside the span.
conn.request("GET", url.path)
conn.getresponse().read()

with tracer.start_as_current_span("GET", kind=trace.SpanKind.CLIENT) as span:
    headers = {}
    propagate.inject(headers)
    conn.request("GET", url.path, headers=headers)
    resp = conn.getresponse()
    resp.read()
ctx = span.get_span_context()
print(json.dumps({
    "trace_id": format(ctx.trace_id, "032x"),
    "span_id": format(ctx.span_id, "016x"),
    "start_unix_ns": span.start_time,
    "end_unix_ns": span.end_time,
    "status": resp.status,
    "pid": os.getpid(),
}))
