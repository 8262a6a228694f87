"""Audit events (issue 15, item 5): every denial the server sidecar makes — an HTTP call RBAC
denied, a caller no ALLOW policy names, an mTLS handshake that does not verify — and every
detection (sensitive data newly seen in an operation) as one OCSF event per line; validated with
py-ocsf-models (Detection Finding, and the base event of every class) and against OCSF 1.3's
required attributes of API Activity (6003) and Network Activity (4001). CEF on request."""

import json
import socket
import ssl

import pytest
from py_ocsf_models.events.base_event import BaseEvent
from py_ocsf_models.events.findings.detection_finding import DetectionFinding

from conftest import CLIENT_ID, TD, Mesh, read_response, wait_for
from pki import CA
from test_rbac_bypass import HTTP_FILTERS


def audited_mesh(tmp_path, upstream, fmt):
    audit = tmp_path / f"audit.{fmt}"
    extra = {"audit": {"path": str(audit), "format": fmt}, "inventory": {"sensitive": {"sample_rate": 1.0}}}
    m = Mesh(tmp_path, upstream.port, server_extra=extra)
    m.server.config["listeners"][0]["filter_chains"][-1]["http_connection_manager"]["http_filters"] = HTTP_FILTERS
    m.server.rewrite()
    m.audit = audit
    return m.start()


def direct(m, cert, key, path, bundle=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(bundle or m.bundle))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", m.inbound_port), timeout=10)
    with ctx.wrap_socket(raw) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n".encode())
        return read_response(s)[:2]


def traffic(m):
    import urllib.error
    import urllib.request

    def get(path, headers=None):
        req = urllib.request.Request(m.url(path), headers={"host": "server", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert get("/orders/1", {"x-contact": "jane.doe@example.com"}) == 200  # allowed; an email both ways
    assert get("/admin/keys") == 403  # the DENY policy
    stranger = m.ca.write_svid(m.dir, "stranger", f"spiffe://{TD}/ns/test/sa/stranger")
    assert direct(m, *stranger, "/orders/2") == (403, b"RBAC: access denied")  # no ALLOW names it
    # An SVID from another CA: the handshake fails, the connection is refused.
    other = CA(TD)
    cert, key = other.write_svid(m.dir, "forged", CLIENT_ID)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        direct(m, cert, key, "/orders/3")


def events(path, *needles):
    """The audit lines, once each needle is in one of them (events are written asynchronously)."""
    def complete():
        text = path.read_text() if path.exists() else ""
        return all(n in text for n in needles)

    wait_for(f"audit events {needles}", complete)
    return path.read_text().splitlines()


# OCSF 1.3 required attributes (base event plus the class's own).
REQUIRED = {
    6003: {"activity_id", "actor", "api", "category_uid", "class_uid", "metadata", "severity_id", "src_endpoint", "time", "type_uid"},
    4001: {"activity_id", "category_uid", "class_uid", "metadata", "severity_id", "time", "type_uid"},
    2004: {"activity_id", "category_uid", "class_uid", "finding_info", "metadata", "severity_id", "time", "type_uid"},
}


def test_denials_and_detections_are_ocsf_events(tmp_path, upstream):
    m = audited_mesh(tmp_path, upstream, "ocsf")
    try:
        traffic(m)
        lines = events(m.audit, '"class_uid":4001', "/admin/keys", "/orders/2", "body:/headers/x-contact", '"header:x-contact"')
    finally:
        m.stop()
    evs = [json.loads(l) for l in lines]
    for e in evs:
        assert REQUIRED[e["class_uid"]] <= set(e), (e["class_uid"], REQUIRED[e["class_uid"]] - set(e))
        assert e["type_uid"] == e["class_uid"] * 100 + e["activity_id"]
        assert e["category_uid"] == e["class_uid"] // 1000
        assert e["metadata"]["product"]["name"] == "eastguard" and e["metadata"]["version"] == "1.3.0"
        BaseEvent.model_validate(e)
    api = [e for e in evs if e["class_uid"] == 6003]
    by_path = {e["http_request"]["url"]["path"]: e for e in api}
    assert set(by_path) == {"/admin/keys", "/orders/2"}, by_path.keys()
    deny = by_path["/admin/keys"]
    assert deny["actor"]["user"]["uid"] == CLIENT_ID and deny["status_detail"] == "denied by deny-admin"
    assert deny["activity_name"] == "Read" and deny["http_response"]["code"] == 403 and deny["status"] == "Failure"
    assert by_path["/orders/2"]["actor"]["user"]["uid"] == f"spiffe://{TD}/ns/test/sa/stranger"
    assert by_path["/orders/2"]["status_detail"] == "denied: no ALLOW policy matched"
    refused = [e for e in evs if e["class_uid"] == 4001]
    assert len(refused) == 1 and refused[0]["activity_name"] == "Refuse"
    assert refused[0]["status_detail"].startswith("mTLS handshake failed"), refused[0]["status_detail"]
    findings = [e for e in evs if e["class_uid"] == 2004]
    places = sorted(f["unmapped"]["eastguard"]["location"] for f in findings)
    assert "header:x-contact" in places and "body:/headers/x-contact" in places, places
    for f in findings:
        DetectionFinding.model_validate(f)
        assert f["finding_info"]["types"] == ["Sensitive Data Exposure"]
    assert "jane.doe" not in "".join(lines), "no value in any event"
    # Allowed calls are not audited as denials.
    assert "/orders/1" not in json.dumps(api)


def test_cef_on_request(tmp_path, upstream):
    m = audited_mesh(tmp_path, upstream, "cef")
    try:
        traffic(m)
        lines = events(m.audit, "|connection-refused|", "request=/admin/keys", "request=/orders/2")
    finally:
        m.stop()
    for line in lines:
        assert line.startswith("CEF:0|eastguard|eastguard|"), line
        # Seven header fields, then the extension.
        assert len(line.split("|", 7)) == 8, line
    assert any("|api-denied|" in l and "cs1=deny-admin" in l and f"suser={CLIENT_ID}" in l for l in lines), lines
    assert any("|connection-refused|" in l for l in lines), lines


def test_object_enumeration_is_detected_and_paging_is_not(tmp_path, upstream):
    import urllib.request

    from conftest import http_get

    audit = tmp_path / "audit.jsonl"
    extra = {"audit": {"path": str(audit)}, "inventory": {"bola": {"sequential": 10, "distinct_ids": 15}}}
    m = Mesh(tmp_path, upstream.port, server_extra=extra).start()

    def get(path):
        with urllib.request.urlopen(urllib.request.Request(m.url(path), headers={"host": "server"}), timeout=10) as r:
            return r.status

    try:
        # A client paging through its own few orders, again and again.
        for _ in range(10):
            for order in (7, 8, 9):
                assert get(f"/orders/{order}") == 200
        # A compromised client walking account IDs.
        for account in range(1000, 1040):
            assert get(f"/accounts/{account}") == 200
        lines = events(audit, "Broken Object Level Authorization")
        detections = json.loads(http_get(m.server.admin("/apis"))[1])["detections"]
    finally:
        m.stop()
    findings = [json.loads(l) for l in lines if '"class_uid":2004' in l]
    assert len(findings) == 1, findings
    f = findings[0]
    DetectionFinding.model_validate(f)
    assert f["finding_info"]["types"] == ["Broken Object Level Authorization"]
    assert f["actor"]["user"]["uid"] == CLIENT_ID and f["resources"][0]["name"] == "GET /accounts/{id}"
    assert f["unmapped"]["eastguard"]["pattern"] == "sequential_walk" and f["unmapped"]["eastguard"]["sequential_run"] == 10
    assert f["unmapped"]["eastguard"]["examples"] == ["1…0 (4 chars)", "1…1 (4 chars)", "1…2 (4 chars)"]
    assert "1005" not in json.dumps(f), "IDs are redacted"
    assert [(d["template"], d["caller"], d["pattern"]) for d in detections] == [("/accounts/{id}", CLIENT_ID, "sequential_walk")]


def test_authorization_drift_learn_audit_enforce(tmp_path, upstream):
    import urllib.error
    import urllib.request

    from conftest import http_get

    def get(m, path, method="GET"):
        req = urllib.request.Request(m.url(path), method=method, headers={"host": "server"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    # Learn: the client reads orders.
    learn = tmp_path / "learn"
    learn.mkdir()
    m = Mesh(learn, upstream.port, server_extra={"inventory": {"drift": {"mode": "learn"}}}).start()
    try:
        for i in (1, 2, 3):
            assert get(m, f"/orders/{i}")[0] == 200
        wait_for("baseline learned", lambda: json.loads(http_get(m.server.admin("/drift/baseline"))[1]))
        baseline = json.loads(http_get(m.server.admin("/drift/baseline"))[1])
    finally:
        m.stop()
    assert baseline == [{"caller": CLIENT_ID, "service": "server", "method": "GET", "template": "/orders/{id}"}], baseline
    saved = tmp_path / "baseline.json"
    saved.write_text(json.dumps(baseline))

    # Audit: a new edge goes through and is reported once.
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    log = audit_dir / "audit.jsonl"
    m = Mesh(audit_dir, upstream.port, server_extra={
        "audit": {"path": str(log)}, "inventory": {"drift": {"mode": "audit", "baseline": str(saved)}}}).start()
    try:
        assert get(m, "/orders/9")[0] == 200
        assert get(m, "/orders/9", "DELETE")[0] == 200
        assert get(m, "/orders/10", "DELETE")[0] == 200
        lines = events(log, "Authorization Drift")
    finally:
        m.stop()
    drift = [json.loads(l) for l in lines if "Authorization Drift" in l]
    assert len(drift) == 1 and drift[0]["resources"][0]["name"] == "DELETE /orders/{id}", drift
    assert drift[0]["severity"] == "High" and drift[0]["actor"]["user"]["uid"] == CLIENT_ID
    DetectionFinding.model_validate(drift[0])

    # Enforce: only the baseline's edges; the rest is refused with a clear reply, and audited.
    enforce_dir = tmp_path / "enforce"
    enforce_dir.mkdir()
    log = enforce_dir / "audit.jsonl"
    m = Mesh(enforce_dir, upstream.port, server_extra={
        "audit": {"path": str(log)}, "inventory": {"drift": {"mode": "enforce", "baseline": str(saved)}}}).start()
    try:
        assert get(m, "/orders/77")[0] == 200, "a known edge, a new object"
        assert get(m, "/orders/77", "DELETE") == (403, f"authorization drift: {CLIENT_ID} has not called DELETE /orders/77 before".encode())
        assert get(m, "/admin/users")[0] == 403
        stranger = m.ca.write_svid(enforce_dir, "stranger", f"spiffe://{TD}/ns/test/sa/stranger")
        assert direct(m, *stranger, "/orders/1")[0] == 403, "another caller has no edge"
        lines = events(log, "/admin/users", "/orders/1")
    finally:
        m.stop()
    denied = [json.loads(l) for l in lines if '"class_uid":6003' in l]
    assert {e["http_request"]["url"]["path"] for e in denied} == {"/orders/77", "/admin/users", "/orders/1"}
    assert all(e["status_detail"] == "denied by authorization-drift" for e in denied)
