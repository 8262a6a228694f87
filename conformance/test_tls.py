"""The inbound port against `openssl s_client`: only a valid X509-SVID from a trusted domain gets in."""

import datetime
import subprocess

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
