"""Authorization bypass regression suite: path, host and header tricks against a DENY rule, sent
over HTTP/1.1 and HTTP/2 straight to the enforcing sidecar's mTLS port (and through the client
sidecar). The canary upstream is as lenient as the sloppiest real backend; its secret must never
come back."""

import posixpath
import socket
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import CLIENT_ID, TD, Mesh, free_port, mtls_socket, stats

SECRET = b"CANARY-SECRET-7f3a"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"

HTTP_FILTERS = [
    {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": RBAC,
            "rules": {
                "action": "DENY",
                "policies": {
                    "deny-admin": {
                        "permissions": [
                            {
                                "or_rules": {
                                    "rules": [
                                        {"url_path": {"path": {"exact": "/admin"}}},
                                        {"url_path": {"path": {"prefix": "/admin/"}}},
                                        {"header": {"name": "x-user", "string_match": {"exact": "admin"}}},
                                        {"header": {"name": ":authority", "string_match": {"exact": "admin.internal", "ignore_case": True}}},
                                    ]
                                }
                            }
                        ],
                        "principals": [{"any": True}],
                    }
                },
            },
        },
    },
    {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": RBAC,
            "rules": {
                "policies": {
                    "allow-client": {
                        "permissions": [{"any": True}],
                        "principals": [{"authenticated": {"principal_name": {"exact": CLIENT_ID}}}],
                    }
                }
            },
        },
    },
    {"name": "envoy.filters.http.router"},
]


def lenient_path(target: str) -> str:
    """How the sloppiest backends read a request path: escapes decoded until nothing changes
    (so a `?`, `#` or `;` that decoding reveals counts), backslashes as slashes, `;params` dropped,
    trailing dots and spaces dropped from each segment (Windows), dot segments resolved, and
    letter case ignored."""
    path = target
    for _ in range(8):
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.split("#")[0].split("?")[0].replace("\\", "/")
    segments = [seg.split(";")[0] for seg in path.split("/")]
    segments = [seg if seg in (".", "..") else seg.rstrip(". ") for seg in segments]
    return posixpath.normpath("/" + "/".join(segments).lstrip("/")).lower()


class Canary(BaseHTTPRequestHandler):
    """Leaks the secret to anything that a lenient backend would read as admin."""

    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without NODELAY, Nagle and the peer's delayed ACK
    # add 40 ms to every response.
    disable_nagle_algorithm = True

    def do_GET(self):
        path = lenient_path(self.path)
        users = [u.strip() for v in self.headers.get_all("x-user") or [] for u in v.split(",")]
        host = (self.headers.get("host") or "").lower().split(":")[0].rstrip(".")
        admin = path == "/admin" or path.startswith("/admin/") or "admin" in users or host == "admin.internal"
        body = SECRET if admin else b"public"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rbac")
    canary = ThreadingHTTPServer(("127.0.0.1", free_port()), Canary)
    canary.daemon_threads = True
    threading.Thread(target=canary.serve_forever, daemon=True).start()
    m = Mesh(tmp, canary.server_address[1])
    m.server.config["listeners"][0]["filter_chains"][-1]["http_connection_manager"]["http_filters"] = HTTP_FILTERS
    m.server.rewrite()
    # The client sidecar routes `admin.internal` to the server as well.
    m.client.config["listeners"][0]["filter_chains"][0]["http_connection_manager"]["route_config"]["virtual_hosts"][0]["domains"] += ["admin.internal", "ADMIN.internal."]
    m.client.rewrite()
    m.stranger_cert, m.stranger_key = m.ca.write_svid(tmp, "stranger", f"spiffe://{TD}/ns/test/sa/stranger")
    m.start()
    yield m
    m.stop()
    canary.shutdown()


def tls(mesh, alpn, cert=None, key=None):
    return mtls_socket(mesh, alpn, cert, key)


def h1_raw(sock, target: bytes, headers: list) -> bytes:
    head = b"GET " + target + b" HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    sock.sendall(head + b"connection: close\r\n\r\n")
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError, socket.timeout):
        pass
    sock.close()
    return data


def h2_raw(sock, path: bytes, authority: bytes, extra: list) -> tuple:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False)
    )
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"), (b":authority", authority), *extra], end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body = None, b""
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            break
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                deadline = 0
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    sock.close()
    return status, body


# (name, path, headers, host)
ATTACKS = [
    ("dotdot", b"/public/../admin", [], b"server"),
    ("dot", b"/admin/./x", [], b"server"),
    ("double-slash", b"//admin", [], b"server"),
    ("encoded-letter", b"/%61dmin", [], b"server"),
    ("encoded-slash", b"/admin%2Fx", [], b"server"),
    ("encoded-backslash", b"/admin%5Cx", [], b"server"),
    ("encoded-dots", b"/%2e%2e/admin", [], b"server"),
    ("fragment", b"/admin#x", [], b"server"),
    ("path-params", b"/admin;x=y", [], b"server"),
    ("params-dotdot", b"/public;x/../admin", [], b"server"),
    ("query", b"/admin?x", [], b"server"),
    ("host-case-dot", b"/public", [], b"ADMIN.internal."),
    ("host-port", b"/public", [], b"Admin.Internal.:8080"),
    ("dup-header", b"/public", [(b"x-user", b"guest"), (b"x-user", b"admin")], b"server"),
    ("comma-header", b"/public", [(b"x-user", b"guest, admin")], b"server"),
    ("nul-header", b"/public", [(b"x-user", b"admin\x00")], b"server"),
    ("obs-text-header", b"/public", [(b"x-user", b"admin\xff")], b"server"),
    ("nul-path", b"/admin%00", [], b"server"),
    ("case", b"/Admin", [], b"server"),
    # What lenient backends read as /admin beyond the normalized path (issue 12, item 4).
    ("upper", b"/ADMIN/keys", [], b"server"),
    ("upper-encoded", b"/%41DMIN", [], b"server"),
    ("double-encoded", b"/%2561dmin", [], b"server"),
    ("triple-encoded", b"/%25252561dmin/keys", [], b"server"),
    ("double-encoded-dots", b"/x/%252e%252e/admin", [], b"server"),
    ("double-encoded-slash", b"/x%252F..%252Fadmin", [], b"server"),
    ("trailing-dot", b"/admin.", [], b"server"),
    ("trailing-dot-segment", b"/admin./keys", [], b"server"),
    ("trailing-space", b"/admin%20", [], b"server"),
    ("trailing-dot-space", b"/admin.%20./keys", [], b"server"),
    ("encoded-query", b"/admin%3Fx=1", [], b"server"),
    ("encoded-fragment", b"/admin%23x", [], b"server"),
    ("encoded-semicolon", b"/admin%3Bjsessionid=1", [], b"server"),
    ("double-encoded-query", b"/admin%253Fx", [], b"server"),
]


DENIED = (403, b"RBAC: access denied")
# What each attack must get, when it is not the RBAC denial: (HTTP/1.1, HTTP/2) outcomes, an
# outcome being (status, body) or None for a stream the codec resets.
OTHER_OUTCOMES = {
    # NUL in a header value: refused by the codec before policy (HTTP/2: the stream is reset).
    "nul-header": ((400, b""), None),
    # obs-text is not `admin` (exact): the request is allowed, and the canary answers `public`.
    "obs-text-header": ((200, b"public"), (200, b"public")),
    "nul-path": ((400, b"Bad Request: path cannot be normalized"),) * 2,
}


def h1_outcome(data: bytes):
    """(status, body) of a raw HTTP/1.1 response; None for a connection closed without one."""
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def expected(name, version):
    return OTHER_OUTCOMES[name][version] if name in OTHER_OUTCOMES else DENIED


@pytest.mark.parametrize("name,path,headers,host", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_http1_attacks_never_reach_the_secret(guarded, name, path, headers, host):
    data = h1_raw(tls(guarded, "http/1.1"), path, [(b"host", host), *headers])
    assert SECRET not in data, data[:300]
    assert h1_outcome(data) == expected(name, 0), data[:300]


@pytest.mark.parametrize("name,path,headers,host", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_http2_attacks_never_reach_the_secret(guarded, name, path, headers, host):
    status, body = h2_raw(tls(guarded, "h2"), path, host, headers)
    assert SECRET not in body, (status, body[:300])
    outcome = None if status is None else (int(status), body)
    assert outcome == expected(name, 1), (status, body[:300])


@pytest.mark.parametrize("name,path,headers,host", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_through_the_client_sidecar(guarded, name, path, headers, host):
    s = socket.create_connection(("127.0.0.1", guarded.outbound_port), timeout=10)
    data = h1_raw(s, path, [(b"host", host), *headers])
    assert SECRET not in data, data[:300]
    assert h1_outcome(data) == expected(name, 0), data[:300]


def test_denials_are_403_rbac_and_allowed_calls_pass(guarded):
    data = h1_raw(tls(guarded, "http/1.1"), b"/admin", [(b"host", b"server")])
    assert data.startswith(b"HTTP/1.1 403") and data.endswith(b"RBAC: access denied"), data
    data = h1_raw(tls(guarded, "http/1.1"), b"/public", [(b"host", b"server")])
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"public"), data
    status, body = h2_raw(tls(guarded, "h2"), b"/public", b"server", [])
    assert status == b"200" and body == b"public"
    # A caller with a valid SVID but not the allowed identity.
    data = h1_raw(tls(guarded, "http/1.1", guarded.stranger_cert, guarded.stranger_key), b"/public", [(b"host", b"server")])
    assert data.startswith(b"HTTP/1.1 403"), data[:200]
    recs = [r for r in guarded.server.log_records() if r.get("rbac_decision")]
    assert any(r["rbac_decision"] == "denied" and r["rbac_policy"] == "deny-admin" and r["response_flags"] == "RBAC" for r in recs)
    counters = stats(guarded.server)
    assert counters["http.inbound_http.rbac.denied"] > 0 and "http.inbound_http.rbac.allowed" in counters


def test_the_lenient_reading_is_what_the_canary_leaks_for():
    """Positive control for the attacks above: the canary really reads each as admin."""
    for name, path, _, _ in ATTACKS:
        if name.startswith(("host", "dup", "comma", "nul", "obs")):
            continue
        assert lenient_path(path.decode()) in ("/admin", "/admin/keys", "/admin/x", "/admin/admin") or lenient_path(path.decode()).startswith("/admin"), name


@pytest.fixture(scope="module")
def strict_paths(tmp_path_factory):
    """The guarded server with `reject_ambiguous_paths` (Envoy's REJECT_REQUEST)."""
    tmp = tmp_path_factory.mktemp("strict-paths")
    canary = ThreadingHTTPServer(("127.0.0.1", free_port()), Canary)
    canary.daemon_threads = True
    threading.Thread(target=canary.serve_forever, daemon=True).start()
    m = Mesh(tmp, canary.server_address[1])
    hcm = m.server.config["listeners"][0]["filter_chains"][-1]["http_connection_manager"]
    hcm["http_filters"] = HTTP_FILTERS
    hcm["reject_ambiguous_paths"] = True
    m.server.rewrite()
    m.start()
    yield m
    m.stop()
    canary.shutdown()


def test_ambiguous_paths_can_be_refused_outright(strict_paths):
    for path in [b"/public;x=1", b"/public%2Fx", b"/%2570ublic", b"/public.", b"/public%20"]:
        data = h1_raw(tls(strict_paths, "http/1.1"), path, [(b"host", b"server")])
        assert data.startswith(b"HTTP/1.1 400"), (path, data[:200])
        assert b"read more than one way" in data, data
    # Plain paths, letter case included, pass (control).
    for path in [b"/public", b"/PUBLIC", b"/public/index.html"]:
        data = h1_raw(tls(strict_paths, "http/1.1"), path, [(b"host", b"server")])
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"public"), (path, data[:200])
