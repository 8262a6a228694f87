"""The inbound port against `openssl s_client`: only a valid X509-SVID from a trusted domain gets in."""

import datetime
import socket
import ssl
import subprocess

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import TD, require_tool
from pki import CA, NOW

REQUEST = b"GET /tls HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"


def s_client(mesh, *args, cert=None, key=None):
    openssl = require_tool("openssl")
    cmd = [openssl, "s_client", "-connect", f"127.0.0.1:{mesh.inbound_port}", "-alpn", "http/1.1", "-ign_eof"]
    if cert:
        cmd += ["-cert", str(cert), "-key", str(key)]
    cmd += list(args)
    out = subprocess.run(cmd, input=REQUEST, capture_output=True, timeout=20)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def served(output: str) -> bool:
    return "HTTP/1.1 200" in output and '"canary": "ok"' in output


def test_valid_svid_is_served(mesh):
    assert served(s_client(mesh, cert=mesh.client_cert, key=mesh.client_key))


def test_tls12_with_valid_svid_is_served(mesh):
    assert served(s_client(mesh, "-tls1_2", cert=mesh.client_cert, key=mesh.client_key))


def test_no_client_certificate_fails(mesh):
    assert not served(s_client(mesh))


def bad(mesh, name, issuer=None, **kw):
    ids = kw.pop("ids", f"spiffe://{TD}/ns/test/sa/{name}")
    return (issuer or mesh.ca).write_svid(mesh.dir, name, ids, **kw)


# The TLS alert each refusal must end with (the reason, not just "some error").
ALERTS = {
    "other-trust-domain": "alert unknown ca",
    "same-name-other-ca": "alert certificate unknown",
    "expired": "alert certificate expired",
    "not-yet-valid": "alert certificate expired",
    "ca-as-leaf": "alert certificate unknown",
    "two-uri-sans": "alert certificate unknown",
    "no-spiffe-id": "alert certificate unknown",
}


@pytest.mark.parametrize("case", list(ALERTS))
def test_invalid_client_svid_fails(mesh, case):
    if case == "other-trust-domain":
        other = CA("evil.example")
        cert, key = bad(mesh, case, issuer=other, ids="spiffe://evil.example/ns/test/sa/client")
    elif case == "same-name-other-ca":
        # A CA claiming our trust domain that is not in our bundle.
        cert, key = bad(mesh, case, issuer=CA(TD))
    elif case == "expired":
        cert, key = bad(mesh, case, not_before=NOW - datetime.timedelta(days=2), not_after=NOW - datetime.timedelta(days=1))
    elif case == "not-yet-valid":
        cert, key = bad(mesh, case, not_before=NOW + datetime.timedelta(days=1), not_after=NOW + datetime.timedelta(days=2))
    elif case == "ca-as-leaf":
        cert, key = bad(mesh, case, ca=True)
    elif case == "two-uri-sans":
        cert, key = bad(mesh, case, ids=[f"spiffe://{TD}/ns/test/sa/a", f"spiffe://{TD}/ns/test/sa/b"])
    else:
        cert, key = bad(mesh, case, ids="https://example.org/not-spiffe")
    out = s_client(mesh, cert=cert, key=key)
    assert not served(out), out[-1500:]
    assert ALERTS[case] in out, out[-1500:]


def test_tls11_is_refused(mesh):
    out = s_client(mesh, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", cert=mesh.client_cert, key=mesh.client_key)
    assert not served(out)
    # The handshake never completes: no cipher is negotiated and the server answers with an alert.
    assert "Cipher    : 0000" in out or "Cipher is (NONE)" in out, out[-1500:]
    assert "alert" in out.lower(), out[-1500:]


def test_alpn_h2_and_istio_names_are_offered(mesh):
    openssl = require_tool("openssl")
    for proto in ["h2", "istio-h2", "istio-http/1.1", "http/1.1"]:
        out = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{mesh.inbound_port}", "-alpn", proto,
             "-cert", str(mesh.client_cert), "-key", str(mesh.client_key)],
            input=b"", capture_output=True, timeout=20,
        ).stdout.decode(errors="replace")
        assert f"ALPN protocol: {proto}" in out, out[-800:]


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_sessions_are_never_resumed(mesh, version):
    """Every connection verifies the client SVID in full: a resumed session would skip it."""
    sess = mesh.dir / f"session{version}.pem"
    first = s_client(mesh, version, "-sess_out", str(sess), cert=mesh.client_cert, key=mesh.client_key)
    assert served(first)
    if not sess.exists():
        # Nothing to resume with: the server issued no ticket (TLS 1.3) and no session ID (1.2).
        assert "New Session Ticket" not in first and "TLS session ticket:" not in first, first[-1500:]
        ids = [line.split(":", 1)[1].strip() for line in first.splitlines() if line.strip().startswith("Session-ID:")]
        assert all(not i for i in ids), ids
        return
    second = s_client(mesh, version, "-sess_in", str(sess), cert=mesh.client_cert, key=mesh.client_key)
    assert "Reused," not in second and "New," in second, second[-1500:]


def tls_to_inbound(mesh, alpn):
    """A client-authenticated TLS connection to the inbound port, offering `alpn` (None: no ALPN)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's SVID names a SPIFFE ID, not a host
    ctx.load_cert_chain(str(mesh.client_cert), str(mesh.client_key))
    if alpn:
        ctx.set_alpn_protocols([alpn])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", mesh.inbound_port), timeout=10))
    assert sock.selected_alpn_protocol() == alpn
    return sock


def http1_over(sock):
    sock.sendall(REQUEST)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break  # closed without close_notify
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def h2_over(sock):
    """One GET over HTTP/2 (prior knowledge): the status and body, or what ended the connection."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/tls"), (":scheme", "https"), (":authority", "server")],
                      end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body = None, b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return status, "reset"
        if not data:
            return status, "closed"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[":status"]
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                return status, body.decode(errors="replace")
        sock.sendall(conn.data_to_send())


@pytest.mark.parametrize("alpn", ["http/1.1", "istio-http/1.1", None])
def test_http1_is_served_by_alpn_or_without_it(mesh, alpn):
    """ALPN settles HTTP/1.1 (served as such, without detection); without ALPN the first bytes do."""
    assert served(http1_over(tls_to_inbound(mesh, alpn)))


@pytest.mark.parametrize("alpn", ["h2", "istio-h2", None])
def test_http2_is_served_by_alpn_or_without_it(mesh, alpn):
    """ALPN settles HTTP/2; without ALPN the HTTP/2 preface does."""
    status, body = h2_over(tls_to_inbound(mesh, alpn))
    assert status == "200" and '"canary": "ok"' in body, (status, body[-300:])


def test_http1_after_alpn_h2_is_not_served(mesh):
    """As in Envoy, the protocol ALPN settled is the one spoken: HTTP/1.1 bytes on an `h2`
    connection are a protocol error, and nothing reaches the app."""
    assert "HTTP/1.1 200" not in http1_over(tls_to_inbound(mesh, "h2"))
