"""PeerAuthentication on the inbound listener: STRICT refuses plaintext; PERMISSIVE (a raw_buffer
filter chain) serves it without an identity, while mTLS callers keep theirs; an ALLOW policy on
principals still refuses the anonymous caller."""

import json
import socket
import subprocess

import pytest

from conftest import CLIENT_ID, Mesh, binary, http_get, wait_for

PLAIN_CHAIN = {
    "name": "plaintext",
    "filter_chain_match": {"transport_protocol": "raw_buffer"},
    "http_connection_manager": {
        "stat_prefix": "inbound_plaintext",
        "route_config": {"virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|app||"}}]}]},
    },
}


def plaintext_get(port, path="/plain"):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: server\r\nConnection: close\r\nX-Forwarded-Client-Cert: URI=spiffe://forged\r\n\r\n".encode())
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    s.close()
    return data


def test_strict_refuses_plaintext(mesh):
    assert plaintext_get(mesh.inbound_port) == b""


@pytest.fixture
def permissive(tmp_path, upstream):
    m = Mesh(tmp_path, upstream.port, server_chains=[PLAIN_CHAIN])
    yield m.start()
    m.stop()


def test_plaintext_caller_cannot_name_its_workload_in_metrics(permissive):
    s = socket.create_connection(("127.0.0.1", permissive.inbound_port), timeout=10)
    s.sendall(b"GET /m HTTP/1.1\r\nHost: server\r\nConnection: close\r\nX-Eastguard-Source-Workload: payments\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    def requests_total():
        return [l for l in http_get(permissive.server.admin("/stats/prometheus"))[1].splitlines() if l.startswith("istio_requests_total{")]

    wait_for("the call is counted", requests_total)
    text = http_get(permissive.server.admin("/stats/prometheus"))[1]
    line = requests_total()[0]
    assert 'source_workload="unknown"' in line and "payments" not in text, line


def test_permissive_serves_plaintext_without_identity(permissive):
    data = plaintext_get(permissive.inbound_port)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    seen = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert "x-forwarded-client-cert" not in seen["headers"], "a plaintext caller has no identity, forged or otherwise"
    # mTLS callers on the same listener keep theirs.
    import urllib.request

    req = urllib.request.Request(permissive.url("/mtls"), headers={"host": "server"})
    seen = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert f"URI={CLIENT_ID}" in seen["headers"]["x-forwarded-client-cert"]


def test_allow_policy_refuses_the_anonymous_plaintext_caller(tmp_path, upstream):
    chain = json.loads(json.dumps(PLAIN_CHAIN))
    chain["http_connection_manager"]["http_filters"] = [
        {
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"policies": {"only-client": {"permissions": [{"any": True}], "principals": [{"authenticated": {"principal_name": {"exact": CLIENT_ID}}}]}}},
            },
        }
    ]
    m = Mesh(tmp_path, upstream.port, server_chains=[chain]).start()
    try:
        data = plaintext_get(m.inbound_port)
        assert data.startswith(b"HTTP/1.1 403") and data.endswith(b"RBAC: access denied"), data[:200]
    finally:
        m.stop()


def test_policy_mtls_cli_applies_istio_precedence(tmp_path):
    f = tmp_path / "pa.yaml"
    f.write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: httpbin, namespace: foo}\n"
        "spec: {selector: {matchLabels: {app: httpbin}}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}\n"
    )
    out = subprocess.run([binary(), "policy", "mtls", "--namespace", "foo", "--workload-labels", "app=httpbin", str(f)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    import yaml

    assert yaml.safe_load(out.stdout) == {"mode": "STRICT", "ports": {"8080": "PERMISSIVE"}}
