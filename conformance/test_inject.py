"""The injection webhook: Istio's own injection corpus (`../shared/conformance/istio-inject/`, read in
place) through `eastguard control-plane --webhook-address`, over HTTPS, as AdmissionReview v1
requests the way the API server sends them. Each patch is applied with an independent JSON Patch
library (`jsonpatch`), the result is validated against the real Kubernetes schemas
(`kubernetes-validate`, Kubernetes 1.29 and the newest it has), re-injecting it must be a no-op,
and the documented rules are checked per case (README: "What the webhook does with Istio's
injection corpus").

No Kubernetes cluster runs on these machines: the API server's part is played by this test."""

import base64
import copy
import json
import os
import http.client
import re
import ssl
import subprocess
import time
from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, binary, free_port, require_tool, wait_for, listening

CORPUS = Path(os.environ.get("EASTGUARD_SHARED", ROOT.parent / "shared")) / "conformance" / "istio-inject"
K8S_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
SIDECAR = "eastguard-proxy"
PROBE_KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
TEMPLATE_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "ReplicationController", "DeploymentConfig", "Job"}


def corpus_inputs():
    d = CORPUS / "inputs"
    if not d.is_dir():
        pytest.fail(f"{d} is missing: put shared/ beside the repository or set EASTGUARD_SHARED")
    return sorted(p.name for p in d.iterdir() if p.suffix == ".yaml")


def pods_of(doc):
    """The pods a workload makes, as the API server shows them to the webhook."""
    if not isinstance(doc, dict):
        return []
    kind = doc.get("kind")
    if kind == "List":
        return [p for item in doc.get("items", []) for p in pods_of(item)]
    if kind == "Pod":
        return [copy.deepcopy(doc)]
    if kind == "CronJob":
        template = doc["spec"]["jobTemplate"]["spec"]["template"]
    elif kind in TEMPLATE_KINDS:
        template = doc["spec"]["template"]
    else:
        return []
    meta = copy.deepcopy(template.get("metadata") or {})
    meta.pop("creationTimestamp", None)
    meta.setdefault("generateName", f"{doc['metadata']['name']}-")
    if "namespace" in doc.get("metadata", {}):
        meta.setdefault("namespace", doc["metadata"]["namespace"])
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])}]


def corpus_pods(name):
    docs = [d for d in yaml.safe_load_all((CORPUS / "inputs" / name).read_text()) if d]
    return [p for d in docs for p in pods_of(d)]


def istio_output(name):
    p = CORPUS / "istio-output" / f"{name}.injected"
    if not p.exists():
        return None
    docs = [d for d in yaml.safe_load_all(p.read_text()) if d]
    return [p for d in docs for p in pods_of(d)]


def review(pod, uid="uid-1", operation="CREATE", namespace="default", dry_run=False, **extra):
    request = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod,
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if namespace is not None:
        request["namespace"] = namespace
    request.update(extra)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


class Webhook:
    """`eastguard control-plane` with the webhook on, and a client that trusts its certificate."""

    def __init__(self, tmp: Path, template=None, extra=()):
        openssl = require_tool("openssl")
        self.cert, self.key = tmp / "webhook.pem", tmp / "webhook-key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=eastguard-webhook.eastguard-system.svc", "-keyout", str(self.key), "-out", str(self.cert),
             "-addext", "subjectAltName=DNS:eastguard-webhook.eastguard-system.svc,IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        cfg = tmp / "istio"
        cfg.mkdir(exist_ok=True)
        self.port = free_port()
        args = [binary(), "control-plane", "--config-dir", str(cfg), "--xds-address", f"127.0.0.1:{free_port()}",
                "--webhook-address", f"127.0.0.1:{self.port}", "--webhook-cert", str(self.cert), "--webhook-key", str(self.key)]
        if template is not None:
            (tmp / "template.yaml").write_text(template)
            args += ["--injection-template", str(tmp / "template.yaml")]
        args += list(extra)
        self.log = tmp / "control-plane.log"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        wait_for("the webhook listening", lambda: self.proc.poll() is None and listening(self.port))
        self.ctx = ssl.create_default_context(cafile=str(self.cert))

    def post(self, body, path="/inject"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def answer(self, body):
        status, raw = self.post(body)
        assert status == 200, (status, raw[:300])
        out = json.loads(raw)
        assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview", out
        return out["response"]

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(15) == 0, self.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    w = Webhook(tmp_path_factory.mktemp("webhook"))
    yield w
    w.stop()


def patched(pod, response):
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops)


def schema_errors(pod):
    errors = []
    for v in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(pod, v, strict=True)
        except kubernetes_validate.utils.ValidationError as e:
            errors.append(f"{v}: {e.message} at {list(e.path)}")
    return errors


def sidecar_of(pod):
    found = [(where, c) for where in ("initContainers", "containers") for c in pod["spec"].get(where) or [] if c["name"] == SIDECAR]
    assert len(found) == 1, f"the sidecar {len(found)} times"
    return found[0]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def expected(name, pod):
    """What the documented rules say happens to this pod: (outcome, reason)."""
    notes = pod["metadata"].get("annotations") or {}
    labels = pod["metadata"].get("labels") or {}
    names = [c["name"] for c in pod["spec"].get("containers", []) + (pod["spec"].get("initContainers") or [])]
    inject = labels.get("sidecar.istio.io/inject", notes.get("sidecar.istio.io/inject"))
    if pod["spec"].get("hostNetwork"):
        return "skipped", "host network"
    if inject is not None and inject.lower() not in ("y", "yes", "true", "on"):
        return "skipped", "sidecar.istio.io/inject: false"
    if "istio-proxy" in names:
        return "skipped, warned", "Istio's sidecar already in the pod"
    templates = [t.strip() for t in notes.get("inject.istio.io/templates", "sidecar").split(",")]
    if any(t not in ("sidecar", "spire") for t in templates):
        return "skipped, warned", f"template {','.join(templates)}: not a sidecar"
    if istio_output(name) is None:
        return "refused", "malformed annotation (Istio refuses it too)"
    return "injected", ""


def resolved_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p["containerPort"]
    return None


def check_injected(name, pod, out, response):
    spec = out["spec"]
    notes = pod["metadata"].get("annotations") or {}
    where, sidecar = sidecar_of(out)
    if notes.get("sidecar.istio.io/nativeSidecar") == "false":
        assert where == "containers" and "restartPolicy" not in sidecar
    else:
        assert where == "initContainers" and spec["initContainers"][0]["name"] == SIDECAR
        assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = env_of(sidecar)
    boot = yaml.safe_load(env["EASTGUARD_BOOTSTRAP"])
    assert "${POD_NAME}" in boot["node"]["id"] and boot["admin"]["status_address"].endswith(":15020")
    assert env["SPIFFE_ENDPOINT_SOCKET"].startswith("unix:///")
    # The Workload API socket is a volume the sidecar mounts read-only.
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "eastguard-workload-socket")
    assert mount["readOnly"] is True
    assert any(v["name"] == "eastguard-workload-socket" for v in spec["volumes"])

    # Probes: every network probe of an app container goes through the status port, and the
    # original (named port resolved) is in ISTIO_KUBE_APP_PROBERS.
    rewrite = notes.get("sidecar.istio.io/rewriteAppHTTPProbers") != "false" and notes.get("status.sidecar.istio.io/port") != "0"
    probers = json.loads(env.get("ISTIO_KUBE_APP_PROBERS") or "{}")
    # App containers and the pod's own native sidecars (init containers with restartPolicy Always).
    probed = lambda p: p["spec"]["containers"] + [c for c in p["spec"].get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    originals = {c["name"]: c for c in probed(pod)}
    for c in probed(out):
        if c["name"] == SIDECAR:
            continue
        for field, kind in PROBE_KINDS.items():
            before = originals[c["name"]].get(field)
            if not before:
                continue
            action = next((k for k in ("httpGet", "tcpSocket", "grpc") if k in before), None)
            port = resolved_port(originals[c["name"]], before[action]["port"]) if action else None
            path = f"/app-health/{c['name']}/{kind}"
            if rewrite and action and port and port != 15020:
                assert c[field]["httpGet"] == {"path": path, "port": 15020, "scheme": "HTTP"}, (name, c[field])
                assert probers[path][action]["port"] == port
                for k in ("periodSeconds", "initialDelaySeconds", "failureThreshold", "successThreshold"):
                    assert c[field].get(k) == before.get(k)
            else:
                assert c[field] == before, (name, field)
                assert path not in probers

    # Istio rewrites the same probes (where Istio injected a sidecar at all).
    istio = istio_output(name)
    if istio:
        istio_probers = set()
        for p in istio:
            for c in p["spec"].get("containers", []) + (p["spec"].get("initContainers") or []):
                if c["name"] == "istio-proxy":
                    istio_probers |= set(json.loads(env_of(c).get("ISTIO_KUBE_APP_PROBERS") or "{}"))
        ours = {k for k in probers if k.startswith("/app-health/")}
        theirs = {k for k in istio_probers if k.startswith("/app-health/")}
        if len(istio) == 1:
            assert ours == theirs, (name, ours, theirs)

    # Capture: Istio's traffic annotations, normalised, and the sidecar's own ports never captured.
    capture = json.loads(out["metadata"]["annotations"]["sidecar.eastguard.io/capture-settings"])
    for p in (15020, 15021, 15090):
        assert p in capture["excludeInboundPorts"]
    assert capture["enabled"] == (notes.get("sidecar.istio.io/interceptionMode") != "NONE")
    ex = notes.get("traffic.sidecar.istio.io/excludeOutboundIPRanges")
    if ex:
        assert capture["excludeOutboundCidrs"] == [c.strip() for c in ex.split(",") if c.strip()]
    inc = notes.get("traffic.sidecar.istio.io/includeInboundPorts")
    if inc is not None:
        want = None if inc.strip() == "*" else [int(p) for p in inc.split(",") if p.strip()]
        assert capture["includeInboundPorts"] == want
    # kubectl logs / exec still land in the app by default.
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == spec["containers"][0]["name"] or where == "containers"
    assert out["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"


def run_case(webhook, name):
    """Every pod of one corpus file through the webhook; returns the README row's outcome."""
    outcomes = set()
    for i, pod in enumerate(corpus_pods(name)):
        ns = pod["metadata"].get("namespace", "default")
        want, why = expected(name, pod)
        r = webhook.answer(review(pod, uid=f"{name}-{i}", namespace=ns))
        assert r["uid"] == f"{name}-{i}"
        if want == "refused":
            assert r["allowed"] is False, (name, r)
            assert re.search(r"annotation \S+sidecar\.istio\.io/\S+", r["status"]["message"]), r
            outcomes.add((want, why))
            continue
        assert r["allowed"] is True, (name, r)
        out = patched(pod, r)
        errors_before = schema_errors(pod)
        errors_after = schema_errors(out)
        assert errors_after == errors_before, (name, errors_after)
        if want.startswith("skipped"):
            assert "patch" not in r, (name, want)
            assert bool(r.get("warnings")) == want.endswith("warned"), (name, r)
        else:
            assert "patch" in r, (name, r)
            check_injected(name, pod, out, r)
            again = webhook.answer(review(out, uid=f"{name}-{i}-again", namespace=ns))
            assert again["allowed"] is True and "patch" not in again, f"{name}: re-injection is not a no-op"
        outcomes.add((want, why))
    return outcomes


def test_every_case_of_istios_injection_corpus(webhook):
    readme = (ROOT / "README.md").read_text()
    seen = {}
    for name in corpus_inputs():
        outcomes = run_case(webhook, name)
        if not outcomes:
            outcomes = {("not a pod", "no pod template")}
        seen[name] = outcomes
    assert len(seen) >= 80
    # Cases Istio leaves alone, eastguard leaves alone too.
    for name in seen:
        istio = istio_output(name)
        if istio is not None and not any(c["name"] == "istio-proxy" for p in istio for c in p["spec"]["containers"] + (p["spec"].get("initContainers") or [])):
            assert not any(o == "injected" for o, _ in seen[name]), name
    # The README's table says what happens per case.
    missing = []
    for name, outcomes in seen.items():
        outcome = " / ".join(sorted({o for o, _ in outcomes}))
        row = f"| `{name}` | {outcome} |"
        if row not in readme:
            missing.append(row)
    assert not missing, "README's injection table is out of date:\n" + "\n".join(missing)


def test_what_the_api_server_may_send_is_answered_and_never_blocks_a_pod(webhook):
    pod = corpus_pods("hello.yaml")[0]
    # A dry run is answered the same (the webhook has no side effects).
    r = webhook.answer(review(pod, dry_run=True))
    assert r["allowed"] is True and "patch" in r
    # An UPDATE or a subresource leaves the pod alone.
    for extra in ({"operation": "UPDATE"}, {"subResource": "status"}):
        r = webhook.answer(review(pod, **extra))
        assert r["allowed"] is True and "patch" not in r
    # No namespace in the request: the sidecar reads it from the pod at start.
    r = webhook.answer(review(pod, namespace=None))
    out = patched(pod, r)
    boot = yaml.safe_load(env_of(sidecar_of(out)[1])["EASTGUARD_BOOTSTRAP"])
    assert boot["node"]["namespace"] == "${POD_NAMESPACE}"
    # Not a pod.
    r = webhook.answer(review({"metadata": {}}, kind={"group": "apps", "version": "v1", "kind": "Deployment"}))
    assert r["allowed"] is True and "patch" not in r
    # A huge pod (the API server's limit is about 3 MiB) is still injected.
    big = copy.deepcopy(pod)
    big["metadata"]["annotations"] = {f"example.com/k{i}": "x" * 1000 for i in range(3000)}
    r = webhook.answer(review(big))
    assert r["allowed"] is True and "patch" in r
    # Garbage of every kind: a clear allowed answer with a warning, never a 500.
    for body in [b"", b"garbage", b"{}", b"[]", b"null", b"{\"request\": 7}", b"[" * 100_000,
                 json.dumps(review(pod, uid="")).encode(), json.dumps(review("not an object")).encode(),
                 json.dumps(review(pod, operation=None)).encode(), b"\xff\xfe" * 1000, b"x" * (9 * 1024 * 1024)]:
        r = webhook.answer(body)
        assert r["allowed"] is True, (body[:40], r)
        assert "not injected" in r["warnings"][0]
    # Pods the webhook cannot take apart are admitted unchanged, with a warning.
    for odd in [{"metadata": {}, "spec": {}}, {"metadata": {}, "spec": {"containers": "nope"}},
                {"metadata": "x", "spec": {"containers": [{"name": "a", "image": "b"}], "volumes": 3}}]:
        r = webhook.answer(review(odd))
        assert r["allowed"] is True, r
    # Other paths and methods.
    assert webhook.post(b"", path="/nothing")[0] == 404
    assert webhook.proc.poll() is None


def test_the_webhook_speaks_http2_as_the_api_server_may(webhook, tmp_path):
    curl = require_tool("curl")
    pod = corpus_pods("hello.yaml")[0]
    body = tmp_path / "review.json"
    body.write_text(json.dumps(review(pod, uid="h2")))
    out = subprocess.run(
        [curl, "-sS", "--http2", "--cacert", str(webhook.cert), "-H", "Content-Type: application/json",
         "--data-binary", f"@{body}", "-w", "\n%{http_version}", f"https://127.0.0.1:{webhook.port}/inject"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    payload, version = out.stdout.rsplit("\n", 1)
    assert version == "2"
    assert json.loads(payload)["response"]["uid"] == "h2"


def test_a_configmap_template_chooses_classic_sidecars_and_a_host_socket(tmp_path):
    template = """apiVersion: v1
kind: ConfigMap
metadata: {name: eastguard-injection, namespace: eastguard-system}
data:
  config: |
    image: registry.example/eastguard:test
    nativeSidecar: false
    workloadSocket:
      hostPath: {path: /run/eastguard/agent}
"""
    w = Webhook(tmp_path, template=template)
    try:
        pod = corpus_pods("hello.yaml")[0]
        out = patched(pod, w.answer(review(pod)))
        where, sidecar = sidecar_of(out)
        assert where == "containers" and out["spec"]["containers"][-1]["name"] == SIDECAR
        assert sidecar["image"] == "registry.example/eastguard:test"
        vol = next(v for v in out["spec"]["volumes"] if v["name"] == "eastguard-workload-socket")
        assert vol["hostPath"] == {"path": "/run/eastguard/agent", "type": "Directory"}
        assert schema_errors(out) == []
    finally:
        w.stop()
    # A template with a mistake is refused at start, naming it.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.yaml").write_text("imagee: x\n")
    (bad / "istio").mkdir()
    r = subprocess.run([binary(), "control-plane", "--config-dir", str(bad / "istio"), "--xds-address", f"127.0.0.1:{free_port()}",
                        "--webhook-address", f"127.0.0.1:{free_port()}", "--webhook-cert", str(w.cert), "--webhook-key", str(w.key),
                        "--injection-template", str(bad / "t.yaml")], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "imagee" in r.stderr, r.stderr


def test_a_changed_template_applies_to_the_next_pods_and_a_broken_one_is_kept_out(tmp_path):
    """The template file (a mounted ConfigMap) is re-read while running, as Istio's is."""
    template = "kind: ConfigMap\ndata:\n  config: |\n    image: registry.example/eastguard:{tag}\n"
    w = Webhook(tmp_path, template=template.format(tag="one"))
    path = tmp_path / "template.yaml"
    pod = corpus_pods("hello.yaml")[0]

    def image():
        return sidecar_of(patched(pod, w.answer(review(pod))))[1]["image"]

    try:
        assert image() == "registry.example/eastguard:one"
        # Replaced the way the kubelet updates a ConfigMap volume: a new file renamed in place.
        tmp = path.with_suffix(".new")
        tmp.write_text(template.format(tag="two"))
        tmp.rename(path)
        wait_for("the new template in force", lambda: image() == "registry.example/eastguard:two", limit=15)
        tmp.write_text("kind: ConfigMap\ndata:\n  config: |\n    imagee: typo\n")
        tmp.rename(path)
        wait_for("the broken template reported", lambda: "injection template not reloaded" in w.log.read_text(), limit=15)
        assert image() == "registry.example/eastguard:two"
    finally:
        w.stop()


def test_the_injected_sidecar_starts_from_its_env_and_runs_the_apps_probes(webhook, tmp_path):
    """The sidecar container the webhook writes, run as kubelet would start it (its env, with the
    downward-API values filled in), and kubelet's probes sent to its status port: each runs the
    app's original probe against a real server (HTTP with headers, HTTPS, TCP, gRPC health)."""
    import socket
    import threading
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import grpc
    from conftest import sidecar_binary

    openssl = require_tool("openssl")
    seen = []

    class App(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("X-Probe")))
            self.send_response(200 if self.path == "/healthz" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    http_app = ThreadingHTTPServer(("127.0.0.1", 0), App)
    https_app = ThreadingHTTPServer(("127.0.0.1", 0), App)
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                    "-subj", "/CN=app", "-keyout", str(tmp_path / "app.key"), "-out", str(tmp_path / "app.pem")], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "app.pem", tmp_path / "app.key")
    https_app.socket = tls.wrap_socket(https_app.socket, server_side=True)
    tcp_app = socket.socket()
    tcp_app.bind(("127.0.0.1", 0))
    tcp_app.listen(16)

    def check(request, context):
        # HealthCheckRequest{service}: "down" is NOT_SERVING (2), anything else SERVING (1).
        return b"\x08\x02" if b"down" in request else b"\x08\x01"

    grpc_app = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_app.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check, lambda b: b, lambda b: b)}),))
    grpc_port = grpc_app.add_insecure_port("127.0.0.1:0")
    grpc_app.start()
    for s in (http_app, https_app):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    sidecar = None
    try:
        pod = {"metadata": {"generateName": "web-", "labels": {"app": "web", "version": "v2"}}, "spec": {"containers": [
            {"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": http_app.server_port}],
             "livenessProbe": {"httpGet": {"port": "http", "path": "/healthz", "httpHeaders": [{"name": "X-Probe", "value": "yes"}]}},
             "readinessProbe": {"tcpSocket": {"port": tcp_app.getsockname()[1]}},
             "startupProbe": {"grpc": {"port": grpc_port}}},
            {"name": "web", "image": "web",
             "readinessProbe": {"httpGet": {"port": https_app.server_port, "path": "/healthz", "scheme": "HTTPS"}},
             "livenessProbe": {"grpc": {"port": grpc_port, "service": "down"}}},
            {"name": "sick", "image": "sick", "readinessProbe": {"httpGet": {"port": http_app.server_port, "path": "/bad"}}},
        ]}}
        out = patched(pod, webhook.answer(review(pod, namespace="shop")))
        env = env_of(sidecar_of(out)[1])
        # The ports the template binds (0.0.0.0:150xx) become loopback ports of this test; the
        # rest of the bootstrap is the webhook's.
        boot = yaml.safe_load(env["EASTGUARD_BOOTSTRAP"])
        admin, status = free_port(), free_port()
        boot["admin"] = {"address": f"127.0.0.1:{admin}", "status_address": f"127.0.0.1:{status}"}
        boot["xds"]["address"] = f"127.0.0.1:{free_port()}"  # no control plane here
        run_env = dict(os.environ, EASTGUARD_BOOTSTRAP=yaml.safe_dump(boot), ISTIO_KUBE_APP_PROBERS=env["ISTIO_KUBE_APP_PROBERS"],
                       POD_NAME="web-x7k2p", POD_NAMESPACE="shop", INSTANCE_IP="10.8.0.7",
                       SPIFFE_ENDPOINT_SOCKET=f"unix://{tmp_path}/no-agent.sock")
        args = sidecar_of(out)[1]["args"]
        log = tmp_path / "sidecar.log"
        sidecar = subprocess.Popen([sidecar_binary(), *args], env=run_env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        wait_for("the status port", lambda: sidecar.poll() is None and listening(status))
        dump = json.loads(urllib_get(f"http://127.0.0.1:{admin}/server_info")[1])
        assert dump["node"]["id"] == "sidecar~10.8.0.7~web-x7k2p.shop~shop.svc.cluster.local", dump["node"]
        probe = lambda path: urllib_get(f"http://127.0.0.1:{status}{path}")[0]
        assert probe("/app-health/app/livez") == 200 and ("/healthz", "yes") in seen
        assert probe("/app-health/app/readyz") == 200
        assert probe("/app-health/app/startupz") == 200
        assert probe("/app-health/web/readyz") == 200
        assert probe("/app-health/web/livez") == 500  # gRPC NOT_SERVING
        assert probe("/app-health/sick/readyz") == 500  # the app answered 503
        assert probe("/app-health/nobody/readyz") == 404
        # Only probes, readiness and metrics on the status port; never the admin API.
        assert probe("/config_dump") == 404 and probe("/quitquitquit") == 404
        # Not ready without an SVID (no Workload API here), and says why.
        code, body = urllib_get(f"http://127.0.0.1:{status}/healthz/ready")
        assert code == 503 and (b"PRE_INITIALIZING" in body or b"WAITING_FOR_XDS" in body), (code, body)
        http_app.shutdown()
        http_app.server_close()
        assert probe("/app-health/app/livez") == 500
        tcp_app.close()
        assert probe("/app-health/app/readyz") == 500
        sidecar.terminate()
        assert sidecar.wait(15) == 0, log.read_text()[-2000:]
        # Probes the sidecar cannot read: it does not start, and says why.
        bad = dict(run_env, ISTIO_KUBE_APP_PROBERS='{"/elsewhere": {"tcpSocket": {"port": 1}}}')
        r = subprocess.run([sidecar_binary(), *args], env=bad, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "ISTIO_KUBE_APP_PROBERS" in r.stderr, r.stderr[-1000:]
        # A variable the bootstrap names but kubelet did not set: refused.
        unset = {k: v for k, v in run_env.items() if k != "INSTANCE_IP"}
        r = subprocess.run([sidecar_binary(), *args], env=unset, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "INSTANCE_IP" in r.stderr, r.stderr[-1000:]
    finally:
        if sidecar and sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
        grpc_app.stop(0)
        https_app.shutdown()
        tcp_app.close()


def urllib_get(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_renewed_webhook_certificate_is_served_without_a_restart(tmp_path):
    """cert-manager rewrites the Secret's files in place: the webhook serves the new pair within
    seconds, and a broken pair keeps the one in use."""
    import hashlib
    import socket

    w = Webhook(tmp_path)
    try:
        def served():
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", w.port), timeout=5) as s, ctx.wrap_socket(s) as t:
                return hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest()

        first = served()
        new = tmp_path / "new"
        new.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                        "-subj", "/CN=renewed", "-keyout", str(new / "k.pem"), "-out", str(new / "c.pem"),
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        os.replace(new / "k.pem", w.key)
        os.replace(new / "c.pem", w.cert)
        wait_for("the renewed certificate served", lambda: served() != first, limit=15)
        renewed = served()
        w.ctx = ssl.create_default_context(cafile=str(w.cert))
        assert w.answer(review(corpus_pods("hello.yaml")[0]))["allowed"] is True
        # A broken pair (a key that is not PEM): the renewed one stays.
        w.key.write_text("not a key\n")
        time.sleep(6)
        assert served() == renewed
        assert "not reloaded" in w.log.read_text()
    finally:
        w.stop()
