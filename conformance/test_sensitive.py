"""Sensitive-data classification in the sidecar (issue 15, item 1): a sampled copy of each call
(here every call: sample_rate 1) is classified off the request path; the server sidecar's /apis
lists the type, direction, place and count per operation — never a value. Bad bodies (compressed,
not UTF-8, too deep, huge) are counted as unclassified and the calls pass unaltered."""

import gzip
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Mesh, free_port, http_get, stat, wait_for

CARD = "4111 1111 1111 1111"
NOT_A_CARD = "4111 1111 1111 1112"  # Luhn-invalid
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
DEEP = b"[" * 5000 + b"]" * 5000


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, body, ctype="application/json", extra=()):
        self.send_response(200)
        self.send_header("content-type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/cards/"):
            self._send(json.dumps({"holder": {"card": CARD}, "session": JWT, "note": NOT_A_CARD}).encode())
        elif path == "/export.gz":
            self._send(gzip.compress(json.dumps({"card": CARD}).encode()), extra=[("content-encoding", "gzip")])
        elif path == "/binary":
            self._send(bytes(range(256)) * 8, "application/json")
        elif path == "/deep":
            self._send(DEEP)
        elif path == "/huge":
            self._send(json.dumps({"rows": [{"email": f"u{i}@shop.example"} for i in range(100_000)]}).encode())
        else:
            self._send(b'{"ok": true}')

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        self._send(b'{"ok": true}')

    def log_message(self, *args):
        pass


@pytest.fixture
def app():
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), App)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()
    server.server_close()


def get(mesh, path, method="GET", body=None, headers=None):
    req = urllib.request.Request(mesh.url(path), method=method, data=body,
                                 headers={"host": "server", **(headers or {})})
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status, r.read()


def test_findings_name_type_and_place_never_the_value(tmp_path, app):
    sensitive = {"sample_rate": 1.0, "body_bytes": 65536,
                 "custom": [{"name": "employee_id", "key": "^employee_id$"}]}
    mesh = Mesh(tmp_path, app, server_extra={"inventory": {"sensitive": sensitive}}).start()
    try:
        assert get(mesh, "/cards/7")[0] == 200
        body = json.dumps({"email": "jane.doe@example.com", "ssn": "123-45-6789", "token": JWT,
                           "employee_id": "E-1042", "card": NOT_A_CARD}).encode()
        assert get(mesh, "/orders", "POST", body, {"content-type": "application/json"})[0] == 200
        assert get(mesh, "/search?ssn=123-45-6789&q=shoes")[0] == 200
        # Bad bodies: the calls pass unaltered, the copies count as unclassified.
        status, gz = get(mesh, "/export.gz")
        assert status == 200 and json.loads(gzip.decompress(gz)) == {"card": CARD}
        assert get(mesh, "/binary")[1] == bytes(range(256)) * 8
        assert get(mesh, "/deep")[1] == DEEP
        status, huge = get(mesh, "/huge")
        assert status == 200 and len(json.loads(huge)["rows"]) == 100_000
        wait_for("all copies classified", lambda: stat(mesh.server, "inventory.sensitive_classified") == 7)
        code, text = http_get(mesh.server.admin("/apis"))
        assert code == 200
        found = {(f["template"], f["method"], f["data_type"], f["direction"], f["location"]): f["count"]
                 for f in json.loads(text)["sensitive"]}
        unclassified = stat(mesh.server, "inventory.sensitive_unclassified")
        dropped = stat(mesh.server, "inventory.sensitive_dropped")
    finally:
        mesh.stop()
    want = {
        ("/cards/{id}", "GET", "payment_card", "response", "body:/holder/card"): 1,
        ("/cards/{id}", "GET", "jwt", "response", "body:/session"): 1,
        ("/orders", "POST", "email", "request", "body:/email"): 1,
        ("/orders", "POST", "us_ssn", "request", "body:/ssn"): 1,
        ("/orders", "POST", "employee_id", "request", "body:/employee_id"): 1,
        ("/search", "GET", "us_ssn", "request", "query:ssn"): 1,
    }
    huge_emails = {k: v for k, v in found.items() if k[0] == "/huge"}
    assert list(huge_emails) == [("/huge", "GET", "email", "response", "body")], huge_emails
    assert {k: v for k, v in found.items() if k[0] != "/huge"} == want, found
    # Not a finding: the Luhn-invalid number, the request's own JWT, the gzip body, binary, deep.
    assert unclassified >= 3 and dropped == 0, (unclassified, dropped)
    for value in ["4111", "123-45-6789", "jane.doe", JWT, "E-1042"]:
        assert value not in text, value
