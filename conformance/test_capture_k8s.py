"""eBPF capture on Kubernetes: `eastguard node-agent --capture-pods` captures the pods the kubelet
lists that the injection webhook set up for capture, with no registry file, and with only the
capabilities the DaemonSet in deploy/ grants.

Pods are network namespaces and real cgroups laid out as a kubelet lays them out (systemd
driver, containerd); the kubelet's pod list comes from a stand-in HTTP server (a recorded-shape
PodList; no kubelet runs on these machines). Root only: in CI it runs and fails if it cannot;
elsewhere it skips loudly.

What must hold: an annotated pod whose sidecar runs is captured (an unmodified curl goes through
both sidecars over mTLS) and its sidecar becomes ready only then; a pod without the annotation is
not; a sidecar that restarts does not detach its pod's capture (no window around it); capture is
decided at a pod's first sighting and kept for its life (removing or widening the annotation later
changes nothing, across an agent restart too); a pod gone from the list is detached and its status file removed; and the agent does
all of it holding only the DaemonSet's capabilities."""

import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import CLIENT_ID, ROOT, binary, wait_for
from netpods import APP_PORT, TAG, Cluster, ip4
from test_ebpf import _prerequisites

SETTINGS = {"enabled": True, "includeInboundPorts": None, "excludeInboundPorts": [15020, 15021, 15090],
            "includeOutboundCidrs": None, "excludeOutboundCidrs": [], "includeOutboundPorts": None,
            "excludeOutboundPorts": [], "excludeInterfaces": []}


def daemonset_caps():
    """The capabilities deploy/'s node agent container adds (all others dropped)."""
    for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "eastguard.yaml").read_text()):
        if d and d["kind"] == "DaemonSet":
            caps = d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
            assert caps["drop"] == ["ALL"]
            return [c.lower() for c in caps["add"]]
    raise AssertionError("no DaemonSet")


class KubeletPods(BaseHTTPRequestHandler):
    items = []

    def do_GET(self):
        body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": list(type(self).items)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class KubeCluster(Cluster):
    """netpods' pods, with kubelet-shaped cgroups and the pod list a kubelet would serve."""

    def __init__(self, tmp):
        super().__init__(tmp, tag=f"{TAG}k")
        self.uid = {p: str(uuid.uuid4()) for p in ("a", "b")}
        self.ids = {}
        self.cid = {(p, part): uuid.uuid4().hex + uuid.uuid4().hex for p in ("a", "b") for part in ("app", "sidecar")}
        self.annotated = {"a": True, "b": True}
        self.sidecar_running = {"a": True, "b": True}
        self.listed = {"a": True, "b": True}
        self.settings = {"a": SETTINGS, "b": SETTINGS}

    def status_file(self, pod):
        return self.tmp / f"{self.uid[pod]}.capture"

    def cgroup(self, pod, part=None):
        u = self.uid[pod].replace("-", "_")
        p = self.cg_root / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{u}.slice"
        return p / f"cri-containerd-{self.cid[(pod, part)]}.scope" if part else p

    def pod_list(self):
        items = []
        for p in ("a", "b"):
            if not self.listed[p]:
                continue
            state = {"running": {"startedAt": "2026-12-07T07:00:00Z"}} if self.sidecar_running[p] else {"waiting": {"reason": "CrashLoopBackOff"}}
            notes = {"sidecar.eastguard.io/status": json.dumps({"initContainers": ["eastguard-proxy"]})}
            if self.annotated[p]:
                notes["sidecar.eastguard.io/capture-settings"] = json.dumps(self.settings[p])
            items.append({
                "metadata": {"name": f"pod-{p}", "namespace": "test", "uid": self.uid[p], "annotations": notes},
                "spec": {"serviceAccountName": p, "nodeName": "node-a", "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": ip4(p),
                           "initContainerStatuses": [{"name": "eastguard-proxy", "containerID": f"containerd://{self.cid[(p, 'sidecar')]}", "state": state}],
                           "containerStatuses": [{"name": "app", "containerID": f"containerd://{self.cid[(p, 'app')]}", "state": {"running": {}}}]},
            })
        KubeletPods.items = items

    def start_kubelet(self):
        self.pod_list()
        self.kubelet = ThreadingHTTPServer(("127.0.0.1", 0), KubeletPods)
        self.kubelet.daemon_threads = True
        threading.Thread(target=self.kubelet.serve_forever, daemon=True).start()

    def start_agent(self, poll_ms=50):
        entries = self.tmp / "entries.yaml"
        entries.write_text("trust_domain: cluster.local\nentries: []\n")
        caps = daemonset_caps()
        self.caps = caps
        # Root, as the DaemonSet runs it, holding only the DaemonSet's capabilities.
        keep = ",".join(["-all"] + [f"+{c}" for c in caps])
        log = open(self.tmp / "agent.log", "ab")
        self.agent = subprocess.Popen(
            ["setpriv", f"--bounding-set={keep}", f"--inh-caps={keep}", "--",
             binary(), "node-agent", "--workload-api-socket", self.tmp / "agent.sock", "--entries", entries,
             "--kubelet-url", f"http://127.0.0.1:{self.kubelet.server_port}/pods", "--kubelet-poll-ms", "200",
             "--cgroup-root", self.cg_root, "--capture-pods", "--capture-status-dir", self.tmp,
             "--bpffs", self.bpffs, "--capture-admin", f"127.0.0.1:{self.agent_admin}", "--capture-poll-ms", str(poll_ms)],
            stdout=subprocess.DEVNULL, stderr=log,
        )

    def names(self):
        return {p: f"k8s-{self.uid[p]}" for p in ("a", "b")}

    def close(self):
        if getattr(self, "kubelet", None):
            self.kubelet.shutdown()
            self.kubelet.server_close()
        super().close()


def _attached(c, pods):
    def check():
        if c.agent.poll() is not None:
            raise RuntimeError(f"node-agent exited: {(c.tmp / 'agent.log').read_text()[-3000:]}")
        try:
            status = c.capture_status()
        except OSError:
            return False
        return all(status.get(c.names()[p], {}).get("state") == "attached" for p in pods)
    return check


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _prerequisites()
    c = KubeCluster(tmp_path_factory.mktemp("capture-k8s"))
    try:
        c.prepare()
        c.start_pods()
        c.ready_before = c.admin("a", "/healthz/ready")
        c.start_kubelet()
        c.start_agent()
        wait_for("both pods attached", _attached(c, ["a", "b"]), limit=30)
        yield c
    finally:
        c.close()


def test_the_agent_runs_with_the_daemonsets_capabilities_only(cluster):
    status = Path(f"/proc/{cluster.agent.pid}/status").read_text()
    eff = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    # Bits from linux/capability.h.
    numbers = {"chown": 0, "dac_override": 1, "kill": 5, "net_admin": 12, "sys_ptrace": 19, "sys_admin": 21,
               "sys_resource": 24, "perfmon": 38, "bpf": 39}
    granted = {name for name, bit in numbers.items() if eff & (1 << bit)}
    assert granted == set(cluster.caps), (granted, cluster.caps)
    assert "sys_admin" not in granted


def test_annotated_pods_are_captured_and_their_sidecars_wait_for_it(cluster):
    code, body = cluster.ready_before
    assert code == 503 and "CAPTURE_NOT_ATTACHED" in body, (code, body)
    wait_for("sidecar a ready", lambda: cluster.admin("a", "/healthz/ready")[0] == 200)
    assert cluster.status_file("a").read_text() == "attached\n"
    rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/k8s")
    assert rc == 0, out
    seen = json.loads(out)
    # Through both sidecars: B's app got it over loopback, with A's verified identity.
    assert seen["path"] == "/k8s" and f"URI={CLIENT_ID}" in (seen["xfcc"] or ""), seen
    # The counters are read at each reconcile (every 50 ms here).
    names = cluster.names()
    wait_for("the programs counted it", lambda: (
        (s := cluster.capture_status())[names["a"]]["counters"]["outbound_redirected"] >= 1
        and s[names["b"]]["counters"]["inbound_steered"] >= 1), limit=5)


def test_a_restarting_sidecar_keeps_its_pods_capture(cluster):
    cluster.sidecar_running["a"] = False
    cluster.pod_list()
    try:
        time.sleep(1.5)  # several kubelet polls and reconciles
        status = cluster.capture_status()
        assert status[cluster.names()["a"]]["state"] == "attached", status
        assert "not placed" in (cluster.tmp / "agent.log").read_text()
    finally:
        cluster.sidecar_running["a"] = True
        cluster.pod_list()


def test_a_pod_is_captured_from_its_first_sighting_for_its_life(cluster):
    name = cluster.names()["b"]
    # Gone from the list: detached, its status file removed.
    cluster.listed["b"] = False
    cluster.pod_list()
    wait_for("b detached", lambda: name not in cluster.capture_status())
    wait_for("b's status file removed", lambda: not cluster.status_file("b").exists())
    # Listed again without the capture annotation: not captured.
    cluster.annotated["b"] = False
    cluster.listed["b"] = True
    cluster.pod_list()
    time.sleep(1.5)  # several kubelet polls and reconciles
    assert name not in cluster.capture_status()
    # With it: captured.
    cluster.annotated["b"] = True
    cluster.pod_list()
    wait_for("b attached again", _attached(cluster, ["b"]), limit=20)
    # The annotation removed while it runs: it keeps its capture (decided once, as istio-init).
    cluster.annotated["b"] = False
    cluster.pod_list()
    try:
        wait_for("the agent says so", lambda: "after it started" in (cluster.tmp / "agent.log").read_text(), limit=10)
        assert cluster.capture_status()[name]["state"] == "attached"
        rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/again")
        assert rc == 0 and json.loads(out)["path"] == "/again", out
    finally:
        cluster.annotated["b"] = True
        cluster.pod_list()


def test_the_decision_outlives_an_agent_restart(cluster):
    """Removing b's annotation and widening a's exclusions to everything, then restarting the
    agent: both pods are adopted from their pins with what they were captured with, and a's
    traffic still goes through both sidecars."""
    wide = dict(SETTINGS, excludeOutboundCidrs=["0.0.0.0/0", "::/0"], excludeOutboundPorts=[APP_PORT])
    cluster.annotated["b"] = False
    cluster.settings["a"] = wide
    cluster.pod_list()
    log = cluster.tmp / "agent.log"
    try:
        cluster.agent.kill()
        cluster.agent.wait()
        before = len(log.read_text())
        cluster.start_agent()
        wait_for("both pods adopted and attached", _attached(cluster, ["a", "b"]), limit=30)
        told = log.read_text()[before:]
        for p in ("a", "b"):
            line = next((l for l in told.splitlines() if "adopting" in l and cluster.uid[p] in l), None)
            assert line and "inbound_ports: [15020, 15021, 15090]" in line and "outbound_cidrs: []" in line, told[-3000:]
        time.sleep(1.5)  # several kubelet polls and reconciles with the edited annotations
        status = cluster.capture_status()
        assert all(status[n]["state"] == "attached" for n in cluster.names().values()), status
        rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/after-restart")
        assert rc == 0, out
        seen = json.loads(out)
        assert seen["path"] == "/after-restart" and f"URI={CLIENT_ID}" in (seen["xfcc"] or ""), seen
    finally:
        cluster.annotated["b"] = True
        cluster.settings["a"] = SETTINGS
        cluster.pod_list()
