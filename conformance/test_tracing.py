"""Distributed tracing across two sidecars, read by an independent OTLP/gRPC receiver (grpcio with
the `opentelemetry-proto` package's TraceService): the client sidecar's CLIENT span is the parent
of the server sidecar's SERVER span, the app sees the server span as its parent, spans carry the
verified SPIFFE IDs and the RBAC decision; the caller's sampled flag (W3C or B3) is honoured; a
collector that hangs or is gone costs spans, never requests."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from conftest import CLIENT_ID, SERVER_ID, Mesh, binary, free_port, stat, wait_for
from test_rbac_bypass import HTTP_FILTERS

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


class Collector(ts_grpc.TraceServiceServicer):
    """An OTLP trace receiver; with `hang` set, every export blocks until released."""

    def __init__(self):
        self.spans = []  # (service.name, span)
        self.lock = threading.Lock()
        self.hang = threading.Event()
        self.release = threading.Event()
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ts_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        if self.hang.is_set():
            self.release.wait(timeout=30)
        with self.lock:
            for rs in request.resource_spans:
                service = next(
                    (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), None
                )
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)
        return ts.ExportTraceServiceResponse()

    def of_trace(self, trace_hex):
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_hex]

    def stop(self):
        self.release.set()
        self.server.stop(grace=None)


def attrs(span):
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def traced_mesh(tmp_path, upstream, address, sampling=100.0, max_queue=2048):
    tracing = {"tracing": {"address": address, "sampling": sampling, "max_queue": max_queue}}
    m = Mesh(tmp_path, upstream.port, server_extra=tracing, client_extra=tracing)
    m.server.config["listeners"][0]["filter_chains"][-1]["http_connection_manager"]["http_filters"] = HTTP_FILTERS
    m.server.rewrite()
    return m.start()


def call(m, path, headers=None):
    """(status, the app's view of the request or None)."""
    req = urllib.request.Request(m.url(path), headers={"host": "server", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def traceparent_of(seen):
    version, trace, parent, flags = seen["headers"]["traceparent"].split("-")
    assert version == "00"
    return trace, parent, flags


def test_spans_link_across_two_sidecars_and_carry_the_mesh_identity(tmp_path, upstream, collector):
    m = traced_mesh(tmp_path, upstream, f"127.0.0.1:{collector.port}")
    try:
        status, seen = call(m, "/orders/7?token=secret-in-query")
        assert status == 200
        trace, app_parent, flags = traceparent_of(seen)
        assert flags == "01"
        wait_for("both sidecars' spans", lambda: len(collector.of_trace(trace)) == 2)
        spans = {svc: s for svc, s in collector.of_trace(trace)}
        assert set(spans) == {"client.test", "server.test"}
        client, server = spans["client.test"], spans["server.test"]
        assert client.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert client.parent_span_id == b""  # the trace started at the client sidecar
        assert server.parent_span_id == client.span_id
        assert app_parent == server.span_id.hex()  # the app's work is a child of the server span
        assert client.start_time_unix_nano <= server.start_time_unix_nano
        assert server.end_time_unix_nano <= client.end_time_unix_nano
        c, s = attrs(client), attrs(server)
        assert (s["source.principal"], s["destination.principal"]) == (CLIENT_ID, SERVER_ID)
        assert (c["source.principal"], c["destination.principal"]) == (CLIENT_ID, SERVER_ID)
        for a in (c, s):
            assert a["http.request.method"] == "GET"
            assert a["http.response.status_code"] == 200
            assert a["url.path"] == "/orders/7"  # never the query string
            assert "secret-in-query" not in json.dumps(a)
        assert s["eastguard.rbac.decision"] == "allowed"
        assert s["eastguard.rbac.policy"] == "allow-client"
        assert c["upstream_cluster"] == "outbound|80||server"

        # A denied call is traced too, with the deciding policy and an error status.
        status, _ = call(m, "/admin/keys", {"traceparent": f"00-{TRACE}-{APP_SPAN}-01"})
        assert status == 403
        wait_for("the denied call's spans", lambda: len(collector.of_trace(TRACE)) == 2)
        denied = {svc: s for svc, s in collector.of_trace(TRACE)}
        assert denied["client.test"].parent_span_id.hex() == APP_SPAN  # the app's span is the root
        srv = attrs(denied["server.test"])
        assert (srv["eastguard.rbac.decision"], srv["eastguard.rbac.policy"]) == ("denied", "deny-admin")
        assert srv["http.response.status_code"] == 403
        assert denied["client.test"].status.code == trace_pb2.Status.STATUS_CODE_ERROR
        assert stat(m.client, "tracing.opentelemetry.spans_sent") >= 2
    finally:
        m.stop()


def test_the_callers_sampling_decision_is_honoured_w3c_and_b3(tmp_path, upstream, collector):
    m = traced_mesh(tmp_path, upstream, f"127.0.0.1:{collector.port}", sampling=0.0)
    try:
        # Sampling 0 %: a new trace is not sampled, and the decision travels with the request.
        status, seen = call(m, "/new")
        assert status == 200
        untraced, _, flags = traceparent_of(seen)
        assert flags == "00"
        # The caller said "not sampled": no spans, the decision kept.
        unsampled = "11111111111111111111111111111111"
        status, seen = call(m, "/unsampled", {"traceparent": f"00-{unsampled}-{APP_SPAN}-00"})
        assert traceparent_of(seen)[0] == unsampled and traceparent_of(seen)[2] == "00"
        # The caller said "sampled": both sidecars record, whatever the local rate.
        status, seen = call(m, "/sampled", {"traceparent": f"00-{TRACE}-{APP_SPAN}-01", "tracestate": "vendor=abc"})
        assert status == 200
        assert traceparent_of(seen)[0] == TRACE
        assert seen["headers"]["tracestate"] == "vendor=abc"
        wait_for("the sampled trace's spans", lambda: len(collector.of_trace(TRACE)) == 2)
        # B3 single header, sampled: the trace id is kept (a 64-bit id is the low half) and the app
        # gets B3 back with the server span as parent.
        b3_trace = "a3ce929d0e0e4736"
        status, seen = call(m, "/b3", {"b3": f"{b3_trace}-{APP_SPAN}-1"})
        assert status == 200
        b3_full = "0" * 16 + b3_trace
        wait_for("the B3 trace's spans", lambda: len(collector.of_trace(b3_full)) == 2)
        server = next(s for svc, s in collector.of_trace(b3_full) if svc == "server.test")
        assert seen["headers"]["b3"] == f"{b3_full}-{server.span_id.hex()}-1"
        # B3 multi, sampled.
        multi = "22222222222222222222222222222222"
        status, seen = call(m, "/b3m", {"x-b3-traceid": multi, "x-b3-spanid": APP_SPAN, "x-b3-sampled": "1"})
        assert seen["headers"]["x-b3-traceid"] == multi and seen["headers"]["x-b3-sampled"] == "1"
        wait_for("the B3 multi trace's spans", lambda: len(collector.of_trace(multi)) == 2)
        # Spans of later traces have arrived; the unsampled ones have none.
        assert collector.of_trace(untraced) == [] and collector.of_trace(unsampled) == []
    finally:
        m.stop()


def test_a_hanging_or_missing_collector_costs_spans_not_requests(tmp_path, upstream, collector):
    collector.hang.set()
    m = traced_mesh(tmp_path, upstream, f"127.0.0.1:{collector.port}", max_queue=8)
    try:
        started = time.monotonic()
        statuses = [call(m, f"/flood/{i}")[0] for i in range(300)]
        elapsed = time.monotonic() - started
        assert statuses == [200] * 300
        # The first export hangs; the queue (8) fills; every later span is dropped and counted.
        wait_for("spans dropped at the client", lambda: stat(m.client, "tracing.opentelemetry.spans_dropped") >= 250)
        print(f"300 requests with a hanging collector: {elapsed:.1f}s")
    finally:
        collector.release.set()
        m.stop()
    # Nothing listens at the address: requests pass, exports fail and are counted.
    dead = free_port()
    (tmp_path / "dead").mkdir()
    m = traced_mesh(tmp_path / "dead", upstream, f"127.0.0.1:{dead}")
    try:
        assert [call(m, f"/dead/{i}")[0] for i in range(20)] == [200] * 20
        wait_for("a failed export", lambda: stat(m.client, "tracing.opentelemetry.export_failed") >= 1, limit=20)
        assert stat(m.client, "tracing.opentelemetry.spans_sent") == 0
    finally:
        m.stop()


@pytest.mark.parametrize(
    "tracing, message",
    [
        ({"address": "127.0.0.1:4317", "sampling": 150}, "tracing.sampling"),
        ({"address": "127.0.0.1:4317", "max_queue": 0}, "tracing.max_queue"),
        ({"address": "no port here"}, "tracing.address"),
        ({"address": "127.0.0.1:4317", "sampler": "always"}, "unknown field"),
    ],
)
def test_a_bad_tracing_config_is_refused_with_the_field_named(tmp_path, tracing, message):
    import subprocess

    import yaml

    cfg = {
        "node": {"id": "n", "workload": "w", "namespace": "test"},
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "identity": {"files": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}},
        "tracing": tracing,
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([binary(), "proxy", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_a_connection_managers_own_tracing_exports_to_its_cluster(tmp_path, upstream, collector):
    """Envoy's per-connection-manager `tracing` (what istiod sends over xDS): the server sidecar's
    inbound connection manager traces to a cluster naming the collector, with no bootstrap
    tracing anywhere; the client sidecar, untraced, sends no context, so the server span is a root
    and the app gets it as parent."""
    from conftest import http_get

    otel = {"name": "otel-collector", "endpoints": [f"127.0.0.1:{collector.port}"]}
    m = Mesh(tmp_path, upstream.port, server_clusters=[otel])
    hcm = m.server.config["listeners"][0]["filter_chains"][-1]["http_connection_manager"]
    hcm["tracing"] = {"sampling": 100, "cluster": "otel-collector"}
    m.server.rewrite()
    m.start()
    try:
        status, seen = call(m, "/chain-traced")
        assert status == 200
        trace, parent, flags = traceparent_of(seen)
        assert flags == "01"
        wait_for("the server span", lambda: len(collector.of_trace(trace)) == 1)
        (svc, span), = collector.of_trace(trace)
        assert svc == "server.test" and span.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert span.parent_span_id == b"" and span.span_id.hex() == parent
        assert attrs(span)["source.principal"] == CLIENT_ID
        dump = http_get(m.server.admin("/config_dump"))[1]
        assert "envoy.config.trace.v3.OpenTelemetryConfig" in dump and "otel-collector" in dump
    finally:
        m.stop()
