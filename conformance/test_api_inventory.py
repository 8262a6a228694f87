"""API inventory across the mesh (issue 14, second part): sidecars export their inventory deltas as
OTLP metrics to the control plane over the xDS mTLS; the control plane keeps them in SQLite across
restarts, compares them with OpenAPI specs from its config directory and serves the result to
`eastguard apis list | diff | export`.

Independent peers: Python grpcio with the `opentelemetry-proto` package as an OTLP exporter (a
hostile one) and as an OTLP receiver (a user's own collector); `openapi-spec-validator` for the
exported document."""

import json
import subprocess
import textwrap
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
import yaml
from openapi_spec_validator import validate
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2

from conftest import CLIENT_ID, TD, Mesh, binary, free_port, http_get, listening, require_tool, stat, wait_for, wait_stat
from test_xds import ISTIOD_ID, REGISTRY, XdsMesh

SERVICE = "server.test.svc.cluster.local"

# The server's ServiceEntry with an owner and its spec named by annotation.
OWNED = REGISTRY.replace(
    "metadata: {{name: server, namespace: test}}",
    "metadata: {{name: server, namespace: test, labels: {{team: payments}}, annotations: {{eastguard.io/openapi: server-v2.yaml}}}}",
)

SPEC = textwrap.dedent("""\
    openapi: 3.0.3
    info: {title: server, version: "2"}
    paths:
      /orders/{orderId}:
        get:
          responses:
            "200": {content: {application/json: {}}}
        delete:
          deprecated: true
          responses: {"204": {}}
      /reports/export:
        get:
          responses:
            "200": {content: {text/csv: {}}}
      /health:
        get:
          responses: {"200": {}}
    """)


def apis(http_port, *args):
    return subprocess.run(
        [binary(), "apis", *args, "--control-plane", f"127.0.0.1:{http_port}"],
        capture_output=True, text=True, timeout=30,
    )


def operations(http_port, *args):
    out = apis(http_port, "list", "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return {(o["method"], o["template"]): o for o in json.loads(out.stdout)}


@pytest.fixture
def inv_mesh(tmp_path):
    http_port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    m = XdsMesh(
        tmp_path, tls=True, registry=OWNED,
        cp_extra=["--http-address", f"127.0.0.1:{http_port}", "--data-dir", str(data),
                  "--audit-log", str(tmp_path / "cp-audit.jsonl")],
        sidecar_extra={"inventory": {"export": {"interval": "200ms"}, "sensitive": {"sample_rate": 1.0}}},
    )
    try:
        (m.config_dir / "openapi").mkdir()
        (m.config_dir / "openapi" / "server-v2.yaml").write_text(SPEC)
        m.http_port, m.data = http_port, data
        wait_for("inventory HTTP API", lambda: listening(http_port))
        wait_for("the spec is read", lambda: "spec_errors" in view(m) and any(
            o["status"] == "unused" for o in view(m)["operations"]))
    except Exception:
        m.stop()
        raise
    yield m
    m.stop()


def view(m):
    with urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/apis", timeout=10) as r:
        return json.load(r)


def call(mesh, method, path, headers=None):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", mesh.outbound, timeout=5)
    try:
        c.request(method, path, headers={"host": SERVICE, **(headers or {})})
        r = c.getresponse()
        r.read()
        assert r.status == 200, (method, path, r.status)
    finally:
        c.close()


def test_sidecars_report_and_operations_are_classified_against_the_spec(inv_mesh):
    m = inv_mesh
    for i in range(1, 5):
        call(m, "GET", f"/orders/{i}")
    # The echo app returns the request's headers in its JSON body: an email both ways.
    call(m, "GET", "/orders/5", {"x-contact": "jane.doe@example.com"})
    call(m, "DELETE", "/orders/9")
    call(m, "GET", "/reports/export")
    call(m, "GET", "/admin/users")

    def seen():
        ops = operations(m.http_port)
        return ops if ("GET", "/admin/users") in ops and ops.get(("GET", "/orders/{id}"), {}).get("calls") == 5 else None

    wait_for("the control plane has the sidecar's report", seen)
    ops = seen()
    get = ops[("GET", "/orders/{id}")]
    assert get["status"] == "documented" and get["spec_path"] == "/orders/{orderId}" and get["spec_file"] == "server-v2.yaml"
    assert get["callers"] == [{"id": CLIENT_ID, "calls": 5, "denied": 0}]
    assert get["workloads"] == ["test/server"] and get["owner"] == "payments" and get["orphan"] is False
    assert get["service"] == SERVICE
    assert ops[("DELETE", "/orders/{id}")]["status"] == "zombie"
    # Sensitive data, exported by the sidecar with the inventory: types and places, no values.
    wait_for("sensitive findings reported", lambda: operations(m.http_port)[("GET", "/orders/{id}")]["sensitive"])
    found = {(f["data_type"], f["direction"], f["location"]): f["count"]
             for f in operations(m.http_port)[("GET", "/orders/{id}")]["sensitive"]}
    assert found == {("email", "request", "header:x-contact"): 1,
                     ("email", "response", "body:/headers/x-contact"): 1,
                     ("email", "response", "body:/header_list/*/*"): 1}, found
    assert "jane.doe" not in json.dumps(view(m))
    export = ops[("GET", "/reports/export")]
    assert export["status"] == "drift" and export["drift"] == ["content type application/json"], export
    assert ops[("GET", "/admin/users")]["status"] == "shadow"
    unused = ops[("GET", "/health")]
    assert unused["status"] == "unused" and "calls" not in unused
    assert stat(m.sidecars["server"], "inventory.export_ok") >= 1
    # The client sidecar served no inbound calls: it reported nothing.
    assert all(o.get("workloads", ["test/server"]) == ["test/server"] for o in ops.values())

    # Filters, and diff: everything but the documented operation, exit 3.
    assert set(operations(m.http_port, "--status", "shadow")) == {("GET", "/admin/users")}
    assert ("GET", "/orders/{id}") in operations(m.http_port, "--caller", CLIENT_ID)
    assert operations(m.http_port, "--caller", f"spiffe://{TD}/ns/test/sa/nobody") == {}
    diff = apis(m.http_port, "diff")
    assert diff.returncode == 3, diff.stdout + diff.stderr
    assert "/admin/users" in diff.stdout and "shadow" in diff.stdout and "/orders/{id}" in diff.stdout
    assert "documented" not in diff.stdout
    table = apis(m.http_port, "list")
    assert table.returncode == 0 and "payments" in table.stdout and CLIENT_ID in table.stdout

    # Export: a valid OpenAPI 3.1 document of what was observed, with the verified callers.
    out = m.dir / "observed.yaml"
    r = apis(m.http_port, "export", "--service", SERVICE, "-f", str(out))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["paths"]["/orders/{id}"]["get"]["x-eastguard-callers"] == [CLIENT_ID]
    assert set(doc["paths"]) == {"/orders/{id}", "/reports/export", "/admin/users"}
    r = apis(m.http_port, "export", "--service", "nothing.test")
    assert r.returncode == 1 and "no operations observed for nothing.test" in r.stderr

    # A bad spec is refused with file and line; the last good one stays in force.
    (m.config_dir / "openapi" / "server-v2.yaml").write_text(SPEC.replace("deprecated: true", "deprecated: sometimes"))
    wait_for("bad spec refused", lambda: "server-v2.yaml" in view(m)["spec_errors"])
    assert view(m)["spec_errors"]["server-v2.yaml"] == "line 9: paths./orders/{orderId}.delete.deprecated: not a boolean"
    assert operations(m.http_port)[("DELETE", "/orders/{id}")]["status"] == "zombie"

    # A restart loses nothing: the store is in --data-dir (no traffic since, so nothing new came).
    m.cp.stop()
    m.cp.start()
    wait_for("inventory HTTP API after restart", lambda: listening(m.http_port))
    again = operations(m.http_port)
    assert again[("GET", "/orders/{id}")]["calls"] == 5 and again[("GET", "/admin/users")]["status"] == "shadow"


def otlp_request(node_id, service, route="/x"):
    def s(k, v):
        return common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v))

    point = metrics_pb2.NumberDataPoint(
        attributes=[s("server.address", service), s("http.request.method", "GET"), s("http.route", route),
                    s("eastguard.status_class", "2xx")],
        start_time_unix_nano=time.time_ns() - 10**9, time_unix_nano=time.time_ns(), as_int=1,
    )
    metric = metrics_pb2.Metric(
        name="eastguard.api.calls",
        sum=metrics_pb2.Sum(data_points=[point], aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA, is_monotonic=True),
    )
    resource_attrs = [s("eastguard.node.id", node_id)] if node_id else []
    return ms.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        resource=resource_pb2.Resource(attributes=resource_attrs),
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])],
    )])


def test_reports_are_taken_only_from_the_workload_they_are_about(inv_mesh):
    m = inv_mesh
    # gRPC checks a host name: the control plane's SVID gets a DNS name too (it re-reads its files).
    m.ca.write_svid(m.dir, "istiod", ISTIOD_ID, dns=["istiod"])
    # An OTLP exporter of our own (grpcio), with the client workload's SVID over mTLS.
    cert, key = m.ca.write_svid(m.dir, "reporter", CLIENT_ID)
    creds = grpc.ssl_channel_credentials(
        root_certificates=m.bundle.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    # The control plane's SVID has a SPIFFE URI SAN only: verify the chain, name no host.
    opts = (("grpc.ssl_target_name_override", "istiod"),)
    client_node = "sidecar~127.0.0.1~client.test~test.svc.cluster.local"
    server_node = "sidecar~127.0.0.1~server.test~test.svc.cluster.local"
    with grpc.secure_channel(f"127.0.0.1:{m.tls_port}", creds, options=opts) as ch:
        stub = ms_grpc.MetricsServiceStub(ch)

        def taken():
            try:
                # Control: as itself, for a host no ServiceEntry names (a shadow service).
                stub.Export(otlp_request(client_node, "shadow.test", "/ghost"), timeout=10)
                return True
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # until the new SVID is served
                return False

        wait_for("the control plane serves its SVID with a DNS name", taken)
        # Claiming the server's node with the client's SVID.
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(otlp_request(server_node, "shadow.test"), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and f"the caller is {CLIENT_ID}" in e.value.details()
        # As itself, but for the server's service.
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(otlp_request(client_node, SERVICE), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == f"test/client reported calls for {SERVICE}, a service of other workloads"
        # No node at all.
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(otlp_request("", "shadow.test"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "eastguard.node.id" in e.value.details()
        # Audit events (OTLP logs) are held to the same rule.
        logs = logs_grpc.LogsServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            logs.Export(otlp_event(server_node), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and f"the caller is {CLIENT_ID}" in e.value.details()
        logs.Export(otlp_event(client_node), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            logs.Export(otlp_event(client_node, body="not an OCSF event"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    ops = operations(m.http_port, "--service", "shadow.test")
    assert ops[("GET", "/ghost")]["workloads"] == ["test/client"] and ops[("GET", "/ghost")]["status"] == "shadow"
    assert not any(o["template"] == "/x" for o in operations(m.http_port).values())


def otlp_event(node_id, body=None):
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2

    body = body or json.dumps({"class_uid": 2004, "class_name": "Detection Finding", "time": int(time.time() * 1000),
                               "severity_id": 3, "message": "from a test exporter"})
    record = logs_pb2.LogRecord(body=common_pb2.AnyValue(string_value=body))
    resource = resource_pb2.Resource(attributes=[common_pb2.KeyValue(key="eastguard.node.id", value=common_pb2.AnyValue(string_value=node_id))])
    return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource=resource, scope_logs=[logs_pb2.ScopeLogs(log_records=[record])])])


class Receiver(ms_grpc.MetricsServiceServicer):
    """A user's own OTLP receiver: records every data point of eastguard.api.calls."""

    def __init__(self):
        self.points, self.lock = [], threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == "eastguard.api.calls":
                            for p in metric.sum.data_points:
                                attrs = {a.key: a.value.string_value for a in p.attributes}
                                self.points.append((attrs["http.route"], p.as_int, attrs.get("source.principal")))
        return ms.ExportMetricsServiceResponse()


def test_a_down_receiver_keeps_a_bounded_backlog_and_fails_no_request(tmp_path, upstream):
    port = free_port()
    extra = {"inventory": {"export": {"address": f"127.0.0.1:{port}", "interval": "100ms", "max_backlog": 3}}}
    mesh = Mesh(tmp_path, upstream.port, server_extra=extra).start()
    try:
        import urllib.request

        for path in ["/a", "/b", "/c", "/d", "/e", "/a"]:
            req = urllib.request.Request(mesh.url(path), headers={"host": "server"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
        wait_stat(mesh.server, "inventory.export_dropped_rows", 2)
        wait_for("failed exports", lambda: stat(mesh.server, "inventory.export_failed") >= 2)
        assert stat(mesh.server, "inventory.export_backlog_rows") == 3
        assert stat(mesh.server, "inventory.export_ok") == 0
        # The receiver comes up: the backlog goes to it, then only new deltas.
        receiver = Receiver()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ms_grpc.add_MetricsServiceServicer_to_server(receiver, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        try:
            wait_for("backlog delivered", lambda: stat(mesh.server, "inventory.export_backlog_rows") == 0, limit=20)
            with receiver.lock:
                routes = sorted(p[0] for p in receiver.points)
            assert len(routes) == 3 and set(routes) <= {"/a", "/b", "/c", "/d", "/e"}, routes
            assert all(p[2] == CLIENT_ID for p in receiver.points)
            with urllib.request.urlopen(urllib.request.Request(mesh.url("/f"), headers={"host": "server"}), timeout=10) as r:
                assert r.status == 200
            wait_for("new delta delivered", lambda: any(p[0] == "/f" and p[1] == 1 for p in receiver.points))
        finally:
            server.stop(0)
    finally:
        mesh.stop()


def test_web_ui_in_a_real_browser(inv_mesh, tmp_path):
    """The control plane's UI in headless Chromium (Debian's, driven by selenium): its contents
    are checked against the HTTP API; filters, operation detail and the graph's edges work; the
    page loads nothing from elsewhere and shows hostile strings as text."""
    chromium, chromedriver = require_tool("chromium"), require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    m = inv_mesh
    for i in range(1, 4):
        call(m, "GET", f"/orders/{i}", {"x-contact": "jane.doe@example.com"})
    call(m, "GET", "/admin/users")
    # A hostile path: if the UI wrote it as HTML, the script would set window.__xss.
    call(m, "GET", "/x/%3Cimg%20src=x%20onerror=window.__xss=1%3E")
    wait_for("reports", lambda: ("GET", "/admin/users") in operations(m.http_port)
             and any("/x/" in t for _, t in operations(m.http_port))
             and operations(m.http_port)[("GET", "/orders/{id}")].get("sensitive")
             and json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/apis/events?class=2004", timeout=10)))
    api = view(m)

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"http://127.0.0.1:{m.http_port}/")
        wait_for("UI loaded", lambda: driver.execute_script("return document.body.dataset.loaded") == "true", limit=20)
        driver.save_screenshot(str(tmp_path / "ui-all.png"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#operations tbody tr")
        assert len(rows) == len(api["operations"]), (len(rows), len(api["operations"]))
        shown = {tuple(td.text for td in r.find_elements(By.TAG_NAME, "td")[:4]) for r in rows}
        want = {(o["service"], o["method"], o["template"], o["status"]) for o in api["operations"]}
        assert shown == want, shown ^ want
        summary = driver.find_element(By.ID, "summary").text
        for status, n in api["summary"].items():
            assert f"{n} {status}" in summary, summary

        # Filter: shadow only.
        Select(driver.find_element(By.ID, "f-status")).select_by_value("shadow")
        rows = driver.find_elements(By.CSS_SELECTOR, "#operations tbody tr")
        assert rows and len(rows) == sum(o["status"] == "shadow" for o in api["operations"])
        assert all(r.find_elements(By.TAG_NAME, "td")[3].text == "shadow" for r in rows)
        Select(driver.find_element(By.ID, "f-status")).select_by_value("")
        Select(driver.find_element(By.ID, "f-caller")).select_by_value(CLIENT_ID)
        rows = driver.find_elements(By.CSS_SELECTOR, "#operations tbody tr")
        assert len(rows) == sum(any(c["id"] == CLIENT_ID for c in o.get("callers", [])) for o in api["operations"])
        Select(driver.find_element(By.ID, "f-caller")).select_by_value("")
        # Sensitive data: the column and the filter follow the API's findings.
        with_email = [o for o in api["operations"] if any(f["data_type"] == "email" for f in o.get("sensitive", []))]
        Select(driver.find_element(By.ID, "f-sensitive")).select_by_value("email")
        rows = driver.find_elements(By.CSS_SELECTOR, "#operations tbody tr")
        assert with_email and len(rows) == len(with_email)
        assert all("email" in r.find_element(By.CSS_SELECTOR, "td.sensitive").text for r in rows)
        Select(driver.find_element(By.ID, "f-sensitive")).select_by_value("")

        # Detail of the documented GET /orders/{id}.
        row = driver.find_element(By.CSS_SELECTOR, f'#operations tbody tr[data-key="{SERVICE} GET /orders/{{id}}"]')
        row.click()
        detail = driver.find_element(By.ID, "detail")
        assert detail.is_displayed()
        get = next(o for o in api["operations"] if o["method"] == "GET" and o["template"] == "/orders/{id}")
        assert driver.find_element(By.CSS_SELECTOR, '#detail-fields dd[data-field="spec"]').text == "server-v2.yaml /orders/{orderId}"
        callers = [[td.text for td in r.find_elements(By.TAG_NAME, "td")]
                   for r in driver.find_elements(By.CSS_SELECTOR, "#detail-callers tbody tr")]
        assert callers == [[c["id"], "yes", str(c["calls"]), str(c["calls"] - c["denied"]), str(c["denied"])] for c in get["callers"]]
        driver.save_screenshot(str(tmp_path / "ui-detail.png"))

        # Graph: one edge per (caller, service), with the API's counts and mTLS.
        edges = {(e.get_attribute("data-caller"), e.get_attribute("data-service")):
                 (int(e.get_attribute("data-calls")), e.get_attribute("data-mtls"))
                 for e in driver.find_elements(By.CSS_SELECTOR, "#graph path.edge")}
        calls = sum(c["calls"] for o in api["operations"] if o["service"] == SERVICE for c in o.get("callers", []) if c["id"] == CLIENT_ID)
        assert edges[(CLIENT_ID, SERVICE)] == (calls, "yes"), edges

        # The sidecars' audit events reached the control plane (OTLP logs): the sensitive-data
        # findings are listed, as the API has them.
        events = json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/apis/events?class=2004", timeout=10))
        assert events and all(e["workload"] == "test/server" and e["class_name"] == "Detection Finding" for e in events)
        Select(driver.find_element(By.ID, "f-event")).select_by_value("2004")
        wait_for("events filtered", lambda: driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")
                 and all(r.get_attribute("data-class") == "2004" for r in driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")))
        shown = [r.find_elements(By.TAG_NAME, "td")[4].text for r in driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
        assert len(shown) == len(events) and shown[0] == events[0]["message"], (shown, events[0]["message"])
        # Hostile strings stayed text; nothing came from elsewhere; no script errors.
        assert driver.execute_script("return window.__xss") is None
        urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(f"http://127.0.0.1:{m.http_port}/") for u in urls), urls
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
    for shot in ("ui-all.png", "ui-detail.png"):
        data = (tmp_path / shot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, shot
    print(f"\nscreenshots: {tmp_path / 'ui-all.png'}, {tmp_path / 'ui-detail.png'}")
    headers = subprocess.run(["curl", "-s", "-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{m.http_port}/ui/"], capture_output=True, text=True).stdout.lower()
    assert "content-security-policy: default-src 'none'; script-src 'self'" in headers, headers


BROAD = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: broad, namespace: test}
    spec:
      selector: {matchLabels: {app: server}}
      action: ALLOW
      rules:
      - from: [{source: {principals: [cluster.local/ns/test/sa/client]}}]
      - from: [{source: {principals: [cluster.local/ns/test/sa/legacy]}}]
    """)


def direct(m, cert, key, method, path):
    """A call to the server sidecar's inbound port with another SVID (as another workload would)."""
    import socket
    import ssl

    from conftest import read_response

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(m.bundle))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", m.inbound), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=f"outbound_.80_._.{SERVICE}") as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n".encode())
        status, body, _ = read_response(s)
        return status, body


def status_of(m, method, path):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", m.outbound, timeout=5)
    try:
        c.request(method, path, headers={"host": SERVICE})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_suggested_policies_allow_exactly_the_observed_calls(inv_mesh):
    m = inv_mesh
    (m.config_dir / "broad.yaml").write_text(BROAD)
    other_cert, other_key = m.ca.write_svid(m.dir, "other", f"spiffe://{TD}/ns/test/sa/other")
    # The broad policy is in force (in the server sidecar's configuration; no traffic before it).
    wait_for("broad policy applied", lambda: "ns[test]-policy[broad]-rule[1]" in http_get(m.sidecars["server"].admin("/config_dump"))[1])
    observed = [("GET", "/orders/1"), ("GET", "/orders/2"), ("DELETE", "/orders/9"), ("GET", "/reports/export")]
    for method, path in observed:
        call(m, method, path)
    wait_for("reports", lambda: operations(m.http_port)[("GET", "/reports/export")].get("calls") == 1
             and operations(m.http_port)[("DELETE", "/orders/{id}")].get("calls") == 1)
    # Over-permissive: the rule for sa/legacy admitted nothing.
    unused = subprocess.run([binary(), "policy", "unused", "--control-plane", f"127.0.0.1:{m.http_port}"],
                            capture_output=True, text=True, timeout=30)
    assert unused.returncode == 3, unused.stdout + unused.stderr
    assert unused.stdout.split("\n")[0].split() == ["test/server", "ns[test]-policy[broad]-rule[1]", "admitted", "no", "observed", "call"], unused.stdout
    assert "rule[0]" not in unused.stdout

    out = m.dir / "suggested.yaml"
    r = subprocess.run([binary(), "policy", "suggest", "--control-plane", f"127.0.0.1:{m.http_port}",
                        "--window-hours", "1", "-f", str(out)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert len(docs) == 1, docs
    spec = docs[0]["spec"]
    assert spec["selector"] == {"matchLabels": {"app": "server"}} and spec["action"] == "ALLOW"
    assert spec["rules"] == [{
        "from": [{"source": {"principals": [f"{TD}/ns/test/sa/client"]}}],
        "to": [{"operation": {"methods": ["DELETE"], "paths": ["/orders/{*}"]}},
               {"operation": {"methods": ["GET"], "paths": ["/orders/{*}", "/reports/export"]}}],
    }], spec["rules"]

    # Round trip: the suggestion replaces the broad policy. Before, the client may call anything.
    assert status_of(m, "GET", "/admin/users")[0] == 200
    (m.config_dir / "broad.yaml").unlink()
    (m.config_dir / "least-privilege.yaml").write_text(out.read_text())
    wait_for("the suggestion is in force", lambda: status_of(m, "GET", "/admin/users") == (403, b"RBAC: access denied"))
    for method, path in observed + [("GET", "/orders/77")]:
        assert status_of(m, method, path)[0] == 200, (method, path)
    assert status_of(m, "POST", "/orders/1") == (403, b"RBAC: access denied")
    assert direct(m, other_cert, other_key, "GET", "/orders/1") == (403, b"RBAC: access denied")
    # Each policy change is an OCSF Entity Management event: in --audit-log and at /apis/events.
    log = m.dir / "cp-audit.jsonl"
    want = [("Create", "test/broad"), ("Create", "test/eastguard-least-privilege-server"), ("Delete", "test/broad")]

    def changes():
        lines = log.read_text().splitlines() if log.exists() else []
        return sorted((e["activity_name"], e["entity"]["name"]) for e in map(json.loads, lines))

    wait_for("policy changes audited", lambda: changes() == want)
    for e in map(json.loads, log.read_text().splitlines()):
        assert e["class_uid"] == 3004 and e["type_uid"] == 300400 + e["activity_id"] and e["entity"]["type"] == "AuthorizationPolicy"
    listed = json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/apis/events?class=3004", timeout=10))
    assert sorted((e["ocsf"]["activity_name"], e["ocsf"]["entity"]["name"]) for e in listed) == want
    assert all(e["workload"] == "control-plane" for e in listed)


def test_the_inventory_api_listens_on_loopback_only(tmp_path):
    (tmp_path / "istio").mkdir()
    out = subprocess.run([binary(), "control-plane", "--config-dir", str(tmp_path / "istio"),
                          "--xds-address", f"127.0.0.1:{free_port()}", "--http-address", f"0.0.0.0:{free_port()}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "must listen on a loopback address" in out.stderr, out.stderr


def test_evidence_report_in_a_browser_and_as_pdf(inv_mesh, tmp_path):
    chromium, chromedriver = require_tool("chromium"), require_tool("chromedriver")
    import base64

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    m = inv_mesh
    for i in range(1, 4):
        call(m, "GET", f"/orders/{i}", {"x-contact": "jane.doe@example.com"})
    wait_for("reports", lambda: operations(m.http_port).get(("GET", "/orders/{id}"), {}).get("calls") == 3
             and json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/apis/events", timeout=10)))
    # Both sidecars report their SVIDs (the client with its first delta: make it serve one call).
    wait_for("both SVIDs reported", lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{m.http_port}/report", timeout=10).read().decode().count("not reported") == 0, limit=20)
    out = tmp_path / "report.html"
    r = subprocess.run([binary(), "report", "--control-plane", f"127.0.0.1:{m.http_port}", "-f", str(out)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert "<script" not in html and "PCI DSS 4.2.1" in html and "SOC 2 CC7.2" in html
    api = view(m)
    denied = sum(o.get("denied", 0) for o in api["operations"])
    events = json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/apis/events", timeout=10))

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{m.http_port}/report")
        assert driver.find_element(By.ID, "mtls-share").text == "100.0 %"
        assert driver.find_element(By.ID, "denied-calls").text == str(denied)
        assert driver.find_element(By.ID, "unused-rules").text == "0"
        # No ALLOW policy selects either workload: the report says so, as a gap.
        gap = driver.find_element(By.CSS_SELECTOR, "#pci-1 .gap").text
        assert "test/server" in gap and "test/client" in gap, gap
        shown = {c.get_attribute("data-class"): int(c.text) for c in driver.find_elements(By.CSS_SELECTOR, "td.events")}
        want = {}
        for e in events:
            want[e["class_name"]] = want.get(e["class_name"], 0) + 1
        assert shown == want and shown.get("Detection Finding"), (shown, want)
        # Every link goes to the API the figure came from, on this control plane.
        links = [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")]
        assert links and all(l.startswith(f"http://127.0.0.1:{m.http_port}/apis") for l in links), links
        for l in links:
            with urllib.request.urlopen(l, timeout=10) as resp:
                assert resp.status == 200, l
        # The certificate inventory: the serial each sidecar reported is its SVID's.
        from cryptography import x509

        for name in ("server", "client"):
            cert = x509.load_pem_x509_certificate((m.dir / f"{name}.cert.pem").read_bytes())
            row = driver.find_element(By.CSS_SELECTOR, f'#certs tr[data-workload="test/{name}"]')
            serial = row.find_element(By.CSS_SELECTOR, "td.serial").text
            assert int(serial.replace(":", ""), 16) == cert.serial_number, (name, serial)
            assert "expired" not in row.text and f"spiffe://{TD}/ns/test/sa/{name}" in row.text
        driver.save_screenshot(str(tmp_path / "report.png"))
        pdf = base64.b64decode(driver.print_page())
    finally:
        driver.quit()
    assert pdf.startswith(b"%PDF") and len(pdf) > 5_000
    (tmp_path / "report.pdf").write_bytes(pdf)
