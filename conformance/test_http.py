"""HTTP/1.1 (curl) and HTTP/2 (nghttp) through client sidecar → mTLS → server sidecar → upstream."""

import json
import os
import subprocess
import time

import pytest

from conftest import CLIENT_ID, SERVER_ID, Mesh, read_response, require_tool, sidecar_binary, stat, wait_for


def curl(*args):
    out = subprocess.run(
        [require_tool("curl"), "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20
    )
    return out


def logged(mesh, what, pred):
    """Waits until a record of the client sidecar's access log satisfies `pred`."""
    return wait_for(what, lambda: any(pred(r) for r in mesh.client.log_records()))


def settle(mesh):
    """Sends a marker request after everything a test did and waits until both sidecars have
    logged it: records of the earlier requests, if any were made, are written by then."""
    marker = f"/settle-{time.time_ns()}"
    assert curl("-o", "/dev/null", "-H", "host: server", mesh.url(marker)).returncode == 0
    for sidecar in (mesh.client, mesh.server):
        wait_for(f"{sidecar.name} logs {marker}", lambda s=sidecar: any(r["path"] == marker for r in s.log_records()))


def test_curl_http1_reaches_upstream_with_caller_identity(mesh):
    out = curl("-H", "host: server", mesh.url("/hello?x=1"))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["path"] == "/hello?x=1"
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    assert f"URI={CLIENT_ID}" in xfcc and f"By={SERVER_ID}" in xfcc
    assert len(seen["headers"]["x-request-id"]) == 36
    # The hop between the sidecars was HTTP/2 over mTLS, logged by both ends.
    wait_for("both sidecars log the request", lambda: len(mesh.server.log_records()) >= 1 and len(mesh.client.log_records()) >= 1)
    srv = mesh.server.log_records()[-1]
    assert srv["protocol"] == "HTTP/2" and srv["downstream_peer_uri_san"] == CLIENT_ID
    cli = mesh.client.log_records()[-1]
    assert cli["protocol"] == "HTTP/1.1" and cli["upstream_peer_uri_san"] == SERVER_ID
    assert cli["response_code"] == 200 and cli["response_flags"] == "-"


def test_the_sidecar_only_program_runs_the_same_pair(tmp_path, upstream):
    """`eastguard-sidecar` (the sidecar alone, `eastguard proxy`'s flags) serves a pair as
    `eastguard proxy` does, refuses a bad config with the same message, and drains on SIGTERM."""
    m = Mesh(tmp_path, upstream.port)
    m.server.sidecar_only = m.client.sidecar_only = True
    m.start()
    try:
        for sc in (m.server, m.client):
            assert os.path.basename(os.readlink(f"/proc/{sc.proc.pid}/exe")) == "eastguard-sidecar"
        out = curl("-H", "host: server", m.url("/only"))
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["path"] == "/only"
        assert f"URI={CLIENT_ID}" in seen["headers"]["x-forwarded-client-cert"]
    finally:
        m.stop()
    for sc in (m.server, m.client):
        assert sc.proc.returncode == 0, sc.proc.returncode
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: 7\n")
    out = subprocess.run([sidecar_binary(), "--config", str(bad), "--check"], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "refusing to start with config" in out.stderr, out.stderr


def test_nghttp_http2_reaches_upstream(mesh):
    nghttp = require_tool("nghttp")
    out = subprocess.run(
        [nghttp, "-H", ":authority: server", mesh.url("/h2")], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    # nghttp exits 0 with nothing on stdout when the connection closed before an answer.
    assert out.stdout, (out.stderr, stat(mesh.client, "no_filter_chain_match"))
    seen = json.loads(out.stdout)
    assert f"URI={CLIENT_ID}" in seen["headers"]["x-forwarded-client-cert"]
    logged(mesh, "r['protocol'] == 'HTTP/2' and r['path'] == '/h2'", lambda r: r["protocol"] == "HTTP/2" and r["path"] == "/h2")


def test_a_client_slow_to_send_its_first_bytes_is_still_served(mesh):
    """Protocol detection gives up after 100 ms only where opaque TCP could go; this outbound
    listener has HTTP chains alone, so a client that connects and waits is still served."""
    import socket

    for delay in (0.0, 0.5):
        with socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=10) as s:
            time.sleep(delay)  # the scenario: a client slow to write after connecting
            s.sendall(b"GET /slow-start HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
            status, body, _ = read_response(s)
        assert (status, b"canary" in body) == (200, True), delay
    assert stat(mesh.client, "no_filter_chain_match") == 0


def test_forged_identity_headers_never_reach_upstream(mesh):
    out = curl(
        "-H", "host: server",
        "-H", "x-forwarded-client-cert: By=spiffe://evil/x;URI=spiffe://cluster.local/ns/test/sa/admin",
        "-H", "x-envoy-original-path: /admin",
        "-H", "x-eastguard-source-workload: admin",
        "-H", "x-request-id: keep-me",
        mesh.url("/forged"),
    )
    seen = json.loads(out.stdout)
    xfccs = [v for k, v in seen["header_list"] if k == "x-forwarded-client-cert"]
    assert xfccs == [xfccs[0]] and "sa/admin" not in xfccs[0] and f"URI={CLIENT_ID}" in xfccs[0]
    assert not any(k.startswith("x-envoy-") or k.startswith("x-eastguard-") for k, _ in seen["header_list"])
    assert seen["headers"]["x-request-id"] == "keep-me"


def test_unexpected_peer_identity_is_refused_with_503_uf(mesh):
    out = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "host: wrong-id", mesh.url("/x"))
    assert out.stdout == "503"
    logged(mesh, "r['authority'] == 'wrong-id'", lambda r: r["authority"] == "wrong-id")
    rec = [r for r in mesh.client.log_records() if r["authority"] == "wrong-id"][-1]
    assert rec["response_flags"] == "UF"
    assert "UnexpectedId" in rec["upstream_transport_failure_reason"]
    assert SERVER_ID in rec["upstream_transport_failure_reason"]
    # And nothing reached the server's app.
    assert not any(r.get("path") == "/x" for r in mesh.server.log_records())


def test_underscore_header_names_are_refused(mesh):
    out = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "host: server", "-H", "x_user: admin", mesh.url("/u"))
    assert out.stdout == "400"
    logged(mesh, "r['response_flags'] == 'DPE'", lambda r: r["response_flags"] == "DPE")
    assert not any(r.get("path") == "/u" for r in mesh.server.log_records())


def test_content_length_with_transfer_encoding_cannot_smuggle(mesh):
    """CL.TE: Transfer-Encoding wins, Content-Length is dropped and the connection is closed after
    the response (RFC 9112 6.3), so the request hidden behind it is never forwarded."""
    import socket

    s = socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=5)
    s.sendall(
        b"POST /first HTTP/1.1\r\nHost: server\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: server\r\n\r\n"
    )
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.count(b"HTTP/1.1 ") == 1, data[:500]
    settle(mesh)
    paths = [r.get("path") for r in mesh.server.log_records()]
    assert "/smuggled" not in paths


def test_no_route_is_404_nr(mesh):
    out = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "host: nowhere", mesh.url("/"))
    assert out.stdout == "404"
    logged(mesh, "r['response_flags'] == 'NR'", lambda r: r["response_flags"] == "NR")


def test_one_access_log_record_per_request(mesh):
    for i in range(5):
        assert curl("-o", "/dev/null", "-H", "host: server", mesh.url(f"/count/{i}")).returncode == 0
    settle(mesh)
    assert sum(1 for r in mesh.client.log_records() if r["path"].startswith("/count/")) == 5
    assert sum(1 for r in mesh.server.log_records() if r["path"].startswith("/count/")) == 5


def test_large_body_both_ways(mesh):
    out = curl("-H", "host: server", mesh.url("/big?size=3000000"), "-o", "-")
    assert len(out.stdout) == 3_000_000
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", mesh.outbound_port, timeout=20)
    conn.request("POST", "/upload", body=b"y" * 2_500_000, headers={"host": "server"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["body_len"] == 2_500_000


@pytest.fixture
def short_timeouts_mesh(tmp_path, upstream):
    limits = {"limits": {"connection_idle_timeout": "1s", "stream_idle_timeout": "1s"}}
    m = Mesh(tmp_path, upstream.port, client_extra=limits, server_extra=limits).start()
    yield m
    m.stop()


def test_idle_connection_is_closed_after_connection_idle_timeout(short_timeouts_mesh):
    import socket

    mesh = short_timeouts_mesh
    s = socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=10)
    s.sendall(b"GET /idle HTTP/1.1\r\nHost: server\r\n\r\n")
    first = b""
    while b'"canary": "ok"}' not in first:
        chunk = s.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200")
    started = time.time()
    rest = s.recv(65536)  # blocks until the proxy closes the idle connection
    assert rest == b"" and 0.8 < time.time() - started < 5


def test_stalled_request_body_is_reset_after_stream_idle_timeout(short_timeouts_mesh):
    import socket

    mesh = short_timeouts_mesh
    s = socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=10)
    s.sendall(b"POST /stall HTTP/1.1\r\nHost: server\r\nContent-Length: 100\r\n\r\n0123456789")
    started = time.time()
    data = s.recv(65536)  # a response or a close, not a hang
    assert time.time() - started < 6
    assert data == b"" or data.startswith(b"HTTP/1.1 5"), data[:200]
