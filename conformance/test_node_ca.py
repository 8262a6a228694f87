"""The node CA: `control-plane --ca-address` gives each node agent an intermediate that may sign
only the identities of pods scheduled on its node, and verifiers hold that rule.

The rule: an intermediate issued to node N may sign `spiffe://TD/ns/NS/sa/SA` only if a pod of
namespace NS with service account SA is scheduled on N (not Succeeded or Failed) when it is
issued; it lists those IDs in its permitted-IDs extension, and a sidecar refuses any leaf under
it that is not listed. Who the caller is (its node) comes from a TokenReview of its projected
service-account token and the pod that token is bound to, never from the request.

The API server is the HTTP-level stand-in (kube_standin.py, TokenReview included); no cluster
runs here. CSRs and forged leaves are made with Python's `cryptography`, independent of the
Rust code; a real sidecar, with its SVID from a real node agent in CA mode, is the verifier."""

import datetime
import json
import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import TD, NodeAgent, Sidecar, Upstream, binary, free_port, inbound_listener, listening, wait_for
from kube_standin import KubeStandIn
from pki import CA

PERMITTED_IDS_OID = "1.2.840.113556.1.8000.2554.39537.11886.64328.18257.48373.10986937.9572679"
AGENT_SA = "system:serviceaccount:eastguard-system:eastguard-node-agent"
PODS = "/api/v1/pods"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
LEDGER = f"spiffe://{TD}/ns/bank/sa/ledger"
BATCH = f"spiffe://{TD}/ns/shop/sa/batch"
DEFAULT_SA = f"spiffe://{TD}/ns/shop/sa/default"


def pod(ns, name, node, sa=None, phase="Running", uid=None):
    spec = {"nodeName": node, "containers": [{"name": "c", "image": "c"}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}"}, "spec": spec,
            "status": {"phase": phase}}


def agent_token(pod_name, uid, node=None, username=AGENT_SA, audiences=("eastguard-ca",)):
    extra = {"authentication.kubernetes.io/pod-name": [pod_name], "authentication.kubernetes.io/pod-uid": [uid]}
    if node:
        extra["authentication.kubernetes.io/node-name"] = [node]
    return {"user": {"username": username, "uid": "u", "groups": [], "extra": extra}, "audiences": list(audiences)}


@pytest.fixture
def api():
    a = KubeStandIn()
    for p in (
        pod("eastguard-system", "agent-a", "node-a", "eastguard-node-agent", uid="ua"),
        pod("eastguard-system", "agent-b", "node-b", "eastguard-node-agent", uid="ub"),
        pod("shop", "web-1", "node-a", "web"),
        pod("shop", "plain-1", "node-a"),  # no serviceAccountName: "default"
        pod("shop", "batch-1", "node-a", "batch", phase="Succeeded"),
        pod("bank", "ledger-1", "node-b", "ledger"),
    ):
        a.put(PODS, p)
    a.tokens = {
        "tok-a": agent_token("agent-a", "ua", node="node-a"),
        "tok-b": agent_token("agent-b", "ub"),
        "tok-other-audience": agent_token("agent-a", "ua", audiences=("https://kubernetes.default.svc",)),
        "tok-app": agent_token("web-1", "uid-web-1", username="system:serviceaccount:shop:web"),
        "tok-unbound": {"user": {"username": AGENT_SA, "uid": "u", "groups": [], "extra": {}}, "audiences": ["eastguard-ca"]},
        "tok-old-pod": agent_token("agent-a", "a-deleted-pod-uid"),
        "tok-lying-node": agent_token("agent-a", "ua", node="node-b"),
        "tok-unknown-pod": agent_token("agent-z", "uz"),
    }
    yield a
    a.stop()


class ControlPlane:
    def __init__(self, tmp_path, api, extra=()):
        self.ca_dir = tmp_path / "ca"
        self.port = free_port()
        config = tmp_path / "config"
        config.mkdir()
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        self.log = open(tmp_path / "cp.log", "ab")
        self.log_path = tmp_path / "cp.log"
        self.proc = subprocess.Popen(
            [binary(), "control-plane", "--config-dir", str(config), "--xds-address", f"127.0.0.1:{free_port()}",
             "--trust-domain", TD, "--kubernetes", "--kubeconfig", str(kubeconfig),
             "--ca-address", f"127.0.0.1:{self.port}", "--ca-dir", str(self.ca_dir), "--ca-dns-name", "localhost",
             "--node-ca-ttl-seconds", "3600", *extra],
            stderr=self.log,
        )
        self.root = self.ca_dir / "root.pem"

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited: {self.log_path.read_text()[-2000:]}")
            return listening(self.port) and self.root.exists()

        wait_for("the CA serves", up)
        self.root_cert = x509.load_pem_x509_certificate(self.root.read_bytes())

    def request(self, token, body, raw=None):
        """POST /v1/node-ca; (status, JSON answer)."""
        ctx = ssl.create_default_context(cafile=str(self.root))
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(f"https://localhost:{self.port}/v1/node-ca", data=data, method="POST")
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def cp(tmp_path, api):
    c = ControlPlane(tmp_path, api)
    # Pods listed: a request before that is 503.
    wait_for("pods listed", lambda: c.request("tok-a", ask([WEB])[1])[0] != 503)
    yield c
    c.stop()


def ask(ids, key=None):
    """(key, request body) with a CSR made by `cryptography`."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test node agent")]))
           .sign(key, hashes.SHA256()))
    return key, {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "identities": list(ids)}


def permitted_ids(cert):
    """The permitted-IDs extension, decoded by hand: SEQUENCE OF IA5String."""
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(PERMITTED_IDS_OID))
    assert not ext.critical
    der = ext.value.value

    def tlv(b):
        tag, n = b[0], b[1]
        if n < 0x80:
            return tag, b[2:2 + n], b[2 + n:]
        k = n & 0x7F
        n = int.from_bytes(b[2:2 + k], "big")
        return tag, b[2 + k:2 + k + n], b[2 + k + n:]

    tag, body, rest = tlv(der)
    assert tag == 0x30 and rest == b""
    out = []
    while body:
        tag, value, body = tlv(body)
        assert tag == 0x16
        out.append(value.decode("ascii"))
    return out


def test_a_node_gets_an_intermediate_for_the_identities_of_its_own_pods(cp, api):
    key, body = ask([WEB, DEFAULT_SA])
    status, answer = cp.request("tok-a", body)
    assert status == 200, answer
    assert answer["node"] == "node-a"
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    # A CA for exactly this key, that cannot make CAs below it, signed by the root.
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    cert.verify_directly_issued_by(cp.root_cert)
    assert sorted(permitted_ids(cert)) == sorted([WEB, DEFAULT_SA])
    assert "node-a" in cert.subject.rfc4514_string()
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=50) < lifetime <= datetime.timedelta(hours=1)
    # The other node gets its own pods' identity.
    status, answer = cp.request("tok-b", ask([LEDGER])[1])
    assert status == 200 and answer["node"] == "node-b", answer


def test_a_node_asking_for_a_pod_of_another_node_is_refused(cp, api):
    status, answer = cp.request("tok-a", ask([WEB, LEDGER])[1])
    assert status == 403, answer
    assert answer["refused"] == [LEDGER]
    assert "certificate" not in answer
    # Nor a finished pod's identity, nor one no pod has.
    for ids in ([BATCH], [f"spiffe://{TD}/ns/shop/sa/nobody"], [f"spiffe://{TD}/ns/kube-system/sa/default"]):
        status, answer = cp.request("tok-a", ask(ids)[1])
        assert status == 403 and answer["refused"] == ids, answer
    # A pod scheduled there later is granted once the control plane sees it; moved away, refused.
    api.put(PODS, pod("bank", "ledger-2", "node-a", "ledger"))
    wait_for("ledger on node-a granted", lambda: cp.request("tok-a", ask([LEDGER])[1])[0] == 200)
    api.delete(PODS, "bank", "ledger-2")
    wait_for("ledger on node-a refused again", lambda: cp.request("tok-a", ask([LEDGER])[1])[0] == 403)


@pytest.mark.parametrize("token,status", [
    (None, 401),
    ("not-a-token", 401),
    ("tok-other-audience", 401),  # a token for the API server, replayed
    ("tok-app", 403),  # an application's token: not the node agent
    ("tok-unbound", 403),  # a legacy token bound to no pod (so to no node)
    ("tok-old-pod", 403),  # the pod's UID is not the pod there now
    ("tok-unknown-pod", 403),
    ("tok-lying-node", 403),  # the review names another node than the pod's
])
def test_who_the_caller_is_comes_from_kubernetes(cp, api, token, status):
    got, answer = cp.request(token, ask([WEB])[1])
    assert got == status, answer
    assert "certificate" not in answer and answer.get("error")


def test_bad_requests_are_refused_with_a_reason(cp, api):
    _, good = ask([WEB])
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _, rsa_body = ask([WEB], key=rsa_key)
    tampered = dict(good)
    der = x509.load_pem_x509_csr(good["csr"].encode()).public_bytes(serialization.Encoding.DER)
    der = der[:-1] + bytes([der[-1] ^ 1])
    import base64
    tampered["csr"] = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode()
                       + "-----END CERTIFICATE REQUEST-----\n")
    cases = [
        (None, b"{not json"),
        ({"csr": good["csr"]}, None),  # no identities
        ({**good, "node": "node-b"}, None),  # the node is not the caller's to say
        ({**good, "identities": []}, None),
        ({**good, "identities": ["spiffe://other.test/ns/shop/sa/web"]}, None),
        ({**good, "identities": [f"spiffe://{TD}/shop/web"]}, None),
        ({**good, "identities": [f"spiffe://{TD}/ns/shop/sa/web/extra"]}, None),
        ({**good, "identities": ["not a spiffe id"]}, None),
        ({**good, "identities": [f"spiffe://{TD}/ns/n/sa/s{i}" for i in range(4097)]}, None),
        ({**good, "csr": "garbage"}, None),
        (rsa_body, None),
        (tampered, None),
    ]
    for body, raw in cases:
        status, answer = cp.request("tok-a", body, raw=raw)
        assert status == 400, (body if raw is None else raw, answer)
        assert answer.get("error") and "certificate" not in answer
    status, answer = cp.request("tok-a", None, raw=b"x" * (2 * 1024 * 1024))
    assert status == 413, answer
    # Still serving.
    assert cp.request("tok-a", ask([WEB])[1])[0] == 200


def _tls_get(port, cert_chain, key_pem, tmp_path, name):
    chain_path, key_path = tmp_path / f"{name}.chain.pem", tmp_path / f"{name}.key.pem"
    chain_path.write_bytes(b"".join(cert_chain))
    key_path.write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server side is not what this checks
    ctx.load_cert_chain(str(chain_path), str(key_path))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data
                data += chunk


def test_a_compromised_node_cannot_mint_another_nodes_identity(cp, api, tmp_path):
    """node-a's agent is real (CA mode); its sidecar verifies peers. An attacker holding
    node-a's intermediate key (here: the test, which made the CSR) signs leaves at will."""
    token = tmp_path / "agent-a.token"
    token.write_text("tok-a")
    uid = os.getuid()
    agent = NodeAgent(tmp_path, f"trust_domain: {TD}\nentries:\n"
                                f"  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:{uid}\"]\n")
    agent.start(extra=["--ca-url", f"https://localhost:{cp.port}", "--ca-trust", str(cp.root),
                       "--ca-token", str(token)])
    upstream = Upstream()
    inbound = free_port()
    server = Sidecar(tmp_path, "server", "-", "-", "-", [inbound_listener(inbound)],
                     [{"name": "inbound|app||", "endpoints": [f"127.0.0.1:{upstream.port}"]}])
    server.config["identity"] = {"workload_api": {"socket": f"unix://{agent.sock}"}}
    server.rewrite()
    try:
        wait_for("node-a's agent has its intermediate", lambda: "node CA received" in agent.logs())
        server.start()
        # The sidecar's own SVID: a leaf under node-a's intermediate, the root as the bundle.
        key, body = ask([WEB])
        status, answer = cp.request("tok-a", body)
        assert status == 200, answer
        stolen = CA.__new__(CA)
        stolen.trust_domain, stolen.key = TD, key
        stolen.cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
        inter_pem = answer["certificate"].encode()
        # A leaf for its own pod's identity is accepted ...
        cert, leaf_key = stolen.mint(WEB)
        reply = _tls_get(inbound, [cert, inter_pem], leaf_key, tmp_path, "web")
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        # ... one for a pod of node-b is refused at the handshake, whatever the leaf says.
        cert, leaf_key = stolen.mint(LEDGER)
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            reply = _tls_get(inbound, [cert, inter_pem], leaf_key, tmp_path, "ledger")
            # TLS 1.3 reports a refused client certificate on the first read.
            assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
            raise ssl.SSLError("closed without an answer")
        # Nor can it make a CA below its intermediate (pathLenConstraint 0).
        sub_cert_pem, sub_key_pem = stolen.mint(f"spiffe://{TD}", ca=True)
        sub = CA.__new__(CA)
        sub.trust_domain = TD
        sub.key = serialization.load_pem_private_key(sub_key_pem, None)
        sub.cert = x509.load_pem_x509_certificate(sub_cert_pem)
        cert, leaf_key = sub.mint(WEB)
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            reply = _tls_get(inbound, [cert, sub_cert_pem, inter_pem], leaf_key, tmp_path, "sub")
            assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
            raise ssl.SSLError("closed without an answer")
    finally:
        server.stop()
        agent.stop()
        upstream.close()


def test_the_agent_asks_again_when_its_entries_change_and_skips_what_is_refused(cp, api, tmp_path):
    token = tmp_path / "agent-a.token"
    token.write_text("tok-a")
    uid = os.getuid()
    entries = lambda ids: f"trust_domain: {TD}\nentries:\n" + "".join(
        f"  - spiffe_id: {i}\n    selectors: [\"unix:uid:{uid}\"]\n" for i in ids)
    agent = NodeAgent(tmp_path, entries([WEB]))
    agent.start(extra=["--ca-url", f"https://localhost:{cp.port}", "--ca-trust", str(cp.root),
                       "--ca-token", str(token)])
    try:
        wait_for("first intermediate", lambda: agent.logs().count("node CA received") == 1)
        # An entry for node-b's identity: refused by the CA, left out; WEB is still signed.
        agent.entries.write_text(entries([WEB, LEDGER]))
        wait_for("refusal logged", lambda: "the CA refused identities" in agent.logs(), limit=15)
        log = agent.logs()
        assert LEDGER in log[log.index("the CA refused identities"):]
        # Its pod arrives on node-a: granted on a retry.
        api.put(PODS, pod("bank", "ledger-3", "node-a", "ledger"))
        wait_for("intermediate with both", lambda: "identities=2" in agent.logs(), limit=20)
    finally:
        agent.stop()


WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def test_the_webhook_certificate_comes_from_the_ca_and_its_ca_bundle_is_kept(tmp_path, api):
    """Without --webhook-cert, the root mints the webhook's certificate and the control plane
    writes the root into the MutatingWebhookConfiguration's caBundle (and again after someone
    blanks it), as istiod does."""
    import base64

    hook = lambda name: {"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
                         "clientConfig": {"service": {"name": "eastguard-control-plane", "namespace": "eastguard-system", "path": "/inject"}}}
    api.put(WEBHOOKS, {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                       "metadata": {"name": "eastguard-sidecar-injector"},
                       "webhooks": [hook("namespace.sidecar-injector.eastguard.io"), hook("revision.sidecar-injector.eastguard.io")]})
    port = free_port()
    cp = ControlPlane(tmp_path, api, extra=["--webhook-address", f"127.0.0.1:{port}", "--webhook-dns-name", "localhost"])
    try:
        want = base64.b64encode(cp.root.read_bytes()).decode()

        def bundles():
            obj = api.collections[WEBHOOKS][("", "eastguard-sidecar-injector")]
            return [h["clientConfig"].get("caBundle") for h in obj["webhooks"]]

        wait_for("caBundle set on both webhooks", lambda: bundles() == [want, want], limit=15)
        path, ctype, body = api.patches[-1]
        assert path == f"{WEBHOOKS}/eastguard-sidecar-injector" and ctype == "application/json-patch+json"
        assert json.loads(body)[0]["op"] == "test"  # never over a concurrent edit
        # The API server's view: a TLS client trusting the caBundle, for the service's name.
        ctx = ssl.create_default_context(cadata=base64.b64decode(want).decode())
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": "u1", "operation": "CREATE", "namespace": "shop",
                              "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
                                         "spec": {"containers": [{"name": "app", "image": "app"}]}}}}
        req = urllib.request.Request(f"https://localhost:{port}/inject", data=json.dumps(review).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            answer = json.loads(r.read())
        assert answer["response"]["uid"] == "u1" and answer["response"]["allowed"] is True
        # Someone re-applies the manifest and blanks it: set again.
        obj = json.loads(json.dumps(api.collections[WEBHOOKS][("", "eastguard-sidecar-injector")]))
        del obj["webhooks"][1]["clientConfig"]["caBundle"]
        api.put(WEBHOOKS, obj)
        wait_for("caBundle set again", lambda: bundles() == [want, want], limit=15)
    finally:
        cp.stop()
