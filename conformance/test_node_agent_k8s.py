"""Kubernetes attestation in `eastguard node-agent --kubelet-url`: real processes in real cgroups
laid out as a kubelet lays them out (systemd driver, containerd), a py-spiffe client in each, and
the kubelet's `/pods` from a stand-in HTTPS server (a recorded-shape PodList; no kubelet runs on
these machines). Needs root for the cgroups: in CI it runs and fails if it cannot; elsewhere it
skips loudly.

What must hold: the sidecar container of an injected pod gets `spiffe://TD/ns/NS/sa/SA` with no
entry written for it; `k8s:` selectors in the entries file work; the app container of the same
pod, a process outside any pod, a process in a look-alike cgroup of its own, and a pod the
kubelet does not list (another node's) get nothing; a container younger than the kubelet's last
list is attested once the kubelet lists it."""

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import NodeAgent
from netpods import cgroup2_root

TD = "cluster.local"
CLIENT = """
import sys, spiffe
try:
    svid = spiffe.WorkloadApiClient(socket_path=sys.argv[1]).fetch_x509_svid()
    print("ID", svid.spiffe_id)
except Exception as e:
    print("ERR", type(e).__name__, e)
"""


def need_root():
    if os.geteuid() != 0 or cgroup2_root() is None:
        why = "root and a cgroup2 mount are needed for pod cgroups"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(f"!!! SKIPPING: {why}")


def cid():
    return uuid.uuid4().hex + uuid.uuid4().hex


class Pod:
    def __init__(self, name, ns, sa, labels=None, injected=False, node="node-a"):
        self.uid = str(uuid.uuid4())
        self.name, self.ns, self.sa, self.labels, self.injected, self.node = name, ns, sa, labels or {}, injected, node
        self.containers = {}  # name -> (id, init?)

    def container(self, name, init=False):
        self.containers[name] = (cid(), init)
        return self.containers[name][0]

    def status(self):
        """A PodList item in the shape the kubelet writes (fields the agent reads, and the usual rest)."""
        statuses = lambda init: [
            {"name": n, "image": f"registry.example/{n}:1", "imageID": f"registry.example/{n}@sha256:{'0' * 64}",
             "containerID": f"containerd://{c}", "ready": True, "restartCount": 0, "started": True,
             "state": {"running": {"startedAt": "2026-12-07T07:00:00Z"}}}
            for n, (c, i) in self.containers.items() if i == init
        ]
        notes = {"sidecar.eastguard.io/status": json.dumps({"initContainers": ["eastguard-proxy"]})} if self.injected else {}
        return {
            "metadata": {"name": self.name, "namespace": self.ns, "uid": self.uid, "labels": self.labels,
                         "annotations": notes, "creationTimestamp": "2026-12-07T07:00:00Z"},
            "spec": {"serviceAccountName": self.sa, "nodeName": self.node,
                     "containers": [{"name": n, "image": f"registry.example/{n}:1"} for n, (_, i) in self.containers.items() if not i]},
            "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "10.8.0.7",
                       "containerStatuses": statuses(False), "initContainerStatuses": statuses(True)},
        }


class Kubelet(BaseHTTPRequestHandler):
    """Stand-in for the kubelet's `GET /pods` (authenticated with the agent's bearer token)."""
    pods = []
    token = ""
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {},
                           "items": [p.status() for p in self.pods if p.node == "node-a"]}).encode()
        self.send_response(200 if self.path == "/pods" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Cgroups:
    """Pod container cgroups under a root of this test's own (systemd driver layout)."""

    def __init__(self, name):
        self.root = cgroup2_root() / name
        self.made = []

    def container(self, pod, container_id):
        u = pod.uid.replace("-", "_")
        d = (self.root / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{u}.slice"
             / f"cri-containerd-{container_id}.scope")
        d.mkdir(parents=True, exist_ok=True)
        self.made.append(d)
        return d

    def cleanup(self):
        if not self.root.exists():
            return
        dirs = sorted((d for d in self.root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
        for d in dirs + [self.root]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def fetch_in(cgroup, sock):
    """A py-spiffe client started inside `cgroup` (it joins before it runs Python)."""
    cmd = f'echo $$ > "{cgroup}/cgroup.procs" && exec "{sys.executable}" -c "$0" "$1"' if cgroup else f'exec "{sys.executable}" -c "$0" "$1"'
    r = subprocess.run(["sh", "-c", cmd, CLIENT, f"unix://{sock}"], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() or r.stderr.strip()


@pytest.fixture
def k8s_node(tmp_path):
    need_root()
    token = uuid.uuid4().hex
    (tmp_path / "token").write_text(token + "\n")
    Kubelet.pods, Kubelet.token, Kubelet.requests = [], token, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Kubelet)
    # HTTPS with a CA of the test's own, as the API server (or kubelet) serves it.
    import ssl

    from pki import CA

    ca = CA("kubernetes")
    (tmp_path / "kubelet-ca.pem").write_bytes(ca.pem())
    cert, key = ca.write_svid(tmp_path, "kubelet", [], ips=["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real, fake = Cgroups(f"eastguard-k8s-{os.getpid()}"), Cgroups(f"eastguard-k8s-{os.getpid()}-lookalike")
    agent = NodeAgent(tmp_path, f"""trust_domain: {TD}
entries:
  - spiffe_id: spiffe://{TD}/ns/shop/sa/reports
    selectors: ["k8s:ns:shop", "k8s:pod-label:app:reports", "k8s:container-name:reports"]
""")
    agent.start(extra=["--kubelet-url", f"https://127.0.0.1:{server.server_port}/pods", "--kubelet-token", str(tmp_path / "token"),
                       "--kubelet-ca", str(tmp_path / "kubelet-ca.pem"),
                       "--cgroup-root", str(real.root), "--kubelet-poll-ms", "200"])
    try:
        yield agent, real, fake
    finally:
        agent.stop()
        server.shutdown()
        real.cleanup()
        fake.cleanup()


def test_pods_on_this_node_get_their_identity_and_nothing_else_does(k8s_node):
    agent, real, fake = k8s_node
    web = Pod("web-7f9c5d-x2x", "shop", "web", {"app": "web"}, injected=True)
    sidecar, app = web.container("eastguard-proxy", init=True), web.container("web")
    reports = Pod("reports-0", "shop", "reports", {"app": "reports"})
    reports_c = reports.container("reports")
    elsewhere = Pod("web-other-node", "shop", "web", {"app": "web"}, injected=True, node="node-b")
    elsewhere_c = elsewhere.container("eastguard-proxy", init=True)
    Kubelet.pods = [web, reports, elsewhere]
    sock = agent.sock

    # The injected pod's sidecar: Istio's identity, from no entry in the file.
    assert fetch_in(real.container(web, sidecar), sock) == f"ID spiffe://{TD}/ns/shop/sa/web"
    # A pod matched by k8s: selectors in the entries file.
    assert fetch_in(real.container(reports, reports_c), sock) == f"ID spiffe://{TD}/ns/shop/sa/reports"
    # The app container of the injected pod: not the sidecar, nothing.
    assert "PermissionDenied" in fetch_in(real.container(web, app), sock) or "no identity" in fetch_in(real.container(web, app), sock)
    # Outside any pod (this test's own cgroup).
    out = fetch_in(None, sock)
    assert out.startswith("ERR"), out
    # The same cgroup names, made outside the kubelet's tree: not verified, nothing.
    out = fetch_in(fake.container(web, sidecar), sock)
    assert out.startswith("ERR"), out
    # A pod this node's kubelet does not list (scheduled on another node).
    out = fetch_in(real.container(elsewhere, elsewhere_c), sock)
    assert out.startswith("ERR"), out
    assert "not in this node's kubelet pod list" in agent.logs()


def test_a_container_younger_than_the_last_pod_list_is_attested_once_listed(k8s_node):
    agent, real, _ = k8s_node
    late = Pod("late-1", "shop", "late", {"app": "late"}, injected=True)
    c = late.container("eastguard-proxy", init=True)
    cg = real.container(late, c)
    Kubelet.pods = []

    def listed_later():
        time.sleep(0.6)
        Kubelet.pods = [late]

    t = threading.Thread(target=listed_later)
    t.start()
    assert fetch_in(cg, agent.sock) == f"ID spiffe://{TD}/ns/shop/sa/late"
    t.join()


def test_k8s_selectors_without_a_kubelet_are_refused_at_start(tmp_path):
    agent = NodeAgent(tmp_path, f"""trust_domain: {TD}
entries:
  - spiffe_id: spiffe://{TD}/ns/shop/sa/x
    selectors: ["k8s:ns:shop"]
""")
    with pytest.raises(RuntimeError, match="need the kubelet"):
        agent.start()
