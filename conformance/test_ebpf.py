"""eBPF capture (issue 6): pods in network namespaces and cgroups, sidecars, and
`eastguard node-agent --capture`, with unmodified clients (curl to a pod IP).

Root only. In CI (root on a real kernel) a missing prerequisite fails the test; elsewhere the
module skips with a loud message.

Topology (`netpods.Cluster`, created here and removed after): a bridge in its own namespace, and
pods A, B (with sidecars, captured) and C (no sidecar), each with a veth on the bridge, IPv4 and
IPv6. Each captured pod has a cgroup with `app` and `sidecar` children. Pins go to a private
bpffs mount.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLIENT_ID, binary, http_get, wait_for
from netpods import APP_PORT, TAG, Cluster, cgroup2_root, ip4, ip6, sh


def _prerequisites():
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "bpftool", "tcpdump", "curl", "iptables"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if cgroup2_root() is None:
        missing.append("a cgroup v2 mount")
    if missing:
        msg = f"eBPF capture tests need {', '.join(missing)} (scripts/test.sh installs the tools; run as root)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(f"!!! SKIPPING eBPF capture tests: {msg}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _prerequisites()
    c = Cluster(tmp_path_factory.mktemp("ebpf"))
    try:
        c.prepare()
        c.start_pods()
        # Before capture: the sidecar is not ready, and says why.
        c.ready_before = c.admin("a", "/healthz/ready")
        c.write_registry(["a", "b"])
        c.start_agent()
        c.wait_attached(["a", "b"])
        yield c
    finally:
        c.close()


def _stat(cluster, pod, reporter):
    code, text = cluster.admin(pod, "/stats/prometheus")
    assert code == 200
    total = 0
    for line in text.splitlines():
        if line.startswith("istio_requests_total{") and f'reporter="{reporter}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_sidecar_readiness_follows_capture(cluster):
    code, body = cluster.ready_before
    assert code == 503 and "CAPTURE_NOT_ATTACHED" in body, (code, body)
    deadline = time.time() + 10
    while cluster.admin("a", "/healthz/ready")[0] != 200 and time.time() < deadline:
        time.sleep(0.1)
    assert cluster.admin("a", "/healthz/ready")[0] == 200
    assert (cluster.tmp / "a.capture").read_text() == "attached\n"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_curl_to_pod_ip_goes_through_both_sidecars_over_mtls(cluster, family):
    target = ip4("b") if family == "ipv4" else f"[{ip6('b')}]"
    path = f"/orders/{family}"
    before = {("a", "source"): _stat(cluster, "a", "source"), ("b", "destination"): _stat(cluster, "b", "destination")}
    pcap = cluster.tmp / f"{family}.pcap"
    dump = subprocess.Popen(
        ["ip", "netns", "exec", cluster.host, "tcpdump", "-i", "vb", "--immediate-mode", "-U", "-s", "0", "-w", str(pcap), "tcp", "port", str(APP_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # tcpdump says "listening on" once the capture is open.
        deadline = time.time() + 10
        line = b""
        while b"listening on" not in line and time.time() < deadline:
            line = dump.stderr.readline()
        rc, out = cluster.curl("a", f"http://{target}:{APP_PORT}{path}")
        # Written packet by packet (-U): wait until the handshake and application data are in.
        wait_for("tcpdump wrote the TLS exchange", lambda: pcap.exists() and b"\x16\x03" in pcap.read_bytes() and b"\x17\x03\x03" in pcap.read_bytes())
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    assert rc == 0, out
    seen = json.loads(out)
    assert seen["path"] == path
    # B's app got it from B's sidecar (loopback), with A's identity from the mTLS handshake.
    assert seen["xfcc"] and f"URI={CLIENT_ID}" in seen["xfcc"], seen
    assert seen["peer"] in ("127.0.0.1", "::ffff:127.0.0.1"), seen
    assert _stat(cluster, "a", "source") > before[("a", "source")]
    assert _stat(cluster, "b", "destination") > before[("b", "destination")]
    wire = pcap.read_bytes()
    assert len(wire) > 200, "tcpdump captured nothing"
    assert b"\x16\x03" in wire, "no TLS handshake record on the wire"
    assert path.encode() not in wire and b"HTTP/1.1" not in wire, "plaintext HTTP on the wire"
    status = cluster.capture_status()
    assert status[f"{TAG}-a"]["counters"]["outbound_redirected"] >= 1
    assert status[f"{TAG}-a"]["counters"]["original_dst_found"] >= 1
    assert status[f"{TAG}-b"]["counters"]["inbound_steered"] >= 1


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_client_without_sidecar_is_steered_and_refused(cluster, family):
    target = ip4("b") if family == "ipv4" else f"[{ip6('b')}]"
    path = f"/direct/{family}"
    steered = cluster.capture_status()[f"{TAG}-b"]["counters"]["inbound_steered"]
    rc, out = cluster.curl("c", f"http://{target}:{APP_PORT}{path}", part=None, max_time=5)
    assert rc != 0, f"plaintext reached something: {out}"
    assert not any(r["path"] == path for r in cluster.app_seen("b")), "B's app saw a connection that bypassed its sidecar"
    # It was B's sidecar that refused it (STRICT: no plaintext chain), not a missing route.
    # (The agent refreshes counters every poll.)
    deadline = time.time() + 3
    while cluster.capture_status()[f"{TAG}-b"]["counters"]["inbound_steered"] <= steered and time.time() < deadline:
        time.sleep(0.05)
    assert cluster.capture_status()[f"{TAG}-b"]["counters"]["inbound_steered"] > steered, out


def test_destinations_without_a_listener_are_refused(cluster):
    """A's IPv4 outbound is Istio-shaped: `virtualOutbound` hands connections to the listener at
    their original destination. Pod C has none, so the call meets the black hole: refused, and C's
    app never sees it (REGISTRY_ONLY, not Istio's default passthrough)."""
    rc, out = cluster.curl("a", f"http://{ip4('c')}:9090/nowhere")
    assert rc != 0, out
    assert not any(x["path"] == "/nowhere" for x in cluster.app_seen("c"))
    code, listeners = cluster.admin("a", "/listeners")
    assert code == 200 and f"outbound_{ip4('b')}:{APP_PORT}" in listeners, listeners


def test_original_destinations_are_forgotten_when_connections_close(cluster):
    """Each redirected connection's original destination lives only as long as the app socket:
    a later socket reusing the local port cannot inherit it, and the table does not fill up."""
    pin = cluster.bpffs / "eastguard" / f"{TAG}-a" / "eg_orig_tuple"
    for i in range(20):
        rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/forget/{i}")
        assert rc == 0, out
    deadline = time.time() + 5
    entries = None
    while time.time() < deadline:
        entries = json.loads(sh("bpftool", "-j", "map", "dump", "pinned", pin).stdout or "[]")
        if not entries:
            break
        time.sleep(0.1)
    assert entries == [], f"{len(entries)} original destinations outlived their connections"


def test_ipv4_mapped_destination_on_a_dual_stack_socket_is_captured(cluster):
    """An IPv6 socket connecting to ::ffff:<B's IPv4>: the kernel sends IPv4; capture must still
    send it through A's sidecar (the original destination is kept as IPv4)."""
    code = (
        "import socket; s = socket.socket(socket.AF_INET6); s.settimeout(5)\n"
        f"s.connect(('::ffff:{ip4('b')}', {APP_PORT}))\n"
        "s.sendall(b'GET /mapped HTTP/1.1\\r\\nHost: b\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "import sys; data = b''\n"
        "while True:\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "sys.stdout.write(data.decode())"
    )
    r = cluster.exec("a", "app", ["python3", "-c", code])
    assert r.returncode == 0, r.stderr
    assert f"URI={CLIENT_ID}" in r.stdout, r.stdout
    assert any(x["path"] == "/mapped" and f"URI={CLIENT_ID}" in (x["xfcc"] or "") for x in cluster.app_seen("b"))


def test_a_pod_whose_redirect_cannot_attach_stays_closed(cluster):
    """Pod E is registered but its network namespace is missing, so its redirect cannot be
    completed: the guard and the not-ready deny keep its app from reaching anything. An app in
    E's cgroup runs in pod C's namespace (nothing else captures there)."""
    for part in ("app", "sidecar"):
        cluster.cgroup("e", part).mkdir(parents=True, exist_ok=True)
    procs = cluster.cgroup("e", "app") / "cgroup.procs"
    target = f"http://{ip4('c')}:9090"

    def curl(path):
        script = f'echo $$ > {procs} && exec ip netns exec {cluster.ns["c"]} curl -sS --max-time 3 {target}{path}'
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=20)

    # Control: unregistered, the same client reaches C's app (so the check below can fail).
    assert curl("/open").returncode == 0
    pod_e = {
        "name": f"{TAG}-e",
        "cgroup": str(cluster.cgroup("e")),
        "sidecar_cgroup": str(cluster.cgroup("e", "sidecar")),
        "netns": f"/run/netns/{TAG}-no-such-netns",
    }
    cluster.write_registry(["a", "b"], extra=[pod_e])
    deadline = time.time() + 10
    st = {}
    while time.time() < deadline:
        st = cluster.capture_status().get(f"{TAG}-e", {})
        if st.get("state") == "error" and st.get("links", {}).get("eg_guard"):
            break
        time.sleep(0.05)
    assert st.get("state") == "error" and "netns" in st.get("error", ""), st
    assert st["links"].get("eg_guard") and not st["links"].get("eg_sk_lookup"), st
    r = curl("/closed")
    assert r.returncode != 0, r.stdout
    assert not any(x["path"] == "/closed" for x in cluster.app_seen("c"))
    # Unregistered again: everything detached, the client reaches C once more.
    cluster.write_registry(["a", "b"])
    deadline = time.time() + 10
    while f"{TAG}-e" in cluster.capture_status() and time.time() < deadline:
        time.sleep(0.05)
    assert curl("/reopened").returncode == 0
    for part in ("app", "sidecar", None):
        cluster.cgroup("e", part).rmdir()


def test_a_broken_registry_keeps_the_last_good_one(cluster):
    """A registry that does not parse, names a pod unsafely or is empty (truncated) detaches
    nothing: the error is reported and pods stay captured; a good file is taken again."""
    good = cluster.registry.read_text()
    for bad in ("pods: [\n  - name: [unterminated\n", "pods:\n- name: ../escape\n  cgroup: /x\n  sidecar_cgroup: /x/s\n  netns: /n\n", "", "\n"):
        if bad.strip():
            tmp = cluster.registry.with_suffix(".tmp")
            tmp.write_text(bad)
            tmp.rename(cluster.registry)
        else:
            # Truncated in place, as an editor or `> capture.yaml` does: not "no pods".
            cluster.registry.write_text(bad)
        deadline = time.time() + 5
        body = {}
        while time.time() < deadline:
            code, text = http_get(f"http://127.0.0.1:{cluster.agent_admin}/capture", timeout=2)
            body = json.loads(text)
            if body.get("registry_error"):
                break
            time.sleep(0.05)
        assert body.get("registry_error"), body
        assert {p["name"]: p["state"] for p in body["pods"]} == {f"{TAG}-a": "attached", f"{TAG}-b": "attached"}
        rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/still-captured")
        assert rc == 0 and f"URI={CLIENT_ID}" in json.loads(out)["xfcc"], out
    tmp = cluster.registry.with_suffix(".tmp")
    tmp.write_text(good)
    tmp.rename(cluster.registry)
    deadline = time.time() + 5
    while time.time() < deadline:
        code, text = http_get(f"http://127.0.0.1:{cluster.agent_admin}/capture", timeout=2)
        if not json.loads(text).get("registry_error"):
            break
        time.sleep(0.05)
    assert not json.loads(text).get("registry_error")
    code, metrics = http_get(f"http://127.0.0.1:{cluster.agent_admin}/stats/prometheus", timeout=2)
    assert code == 200 and f'eastguard_capture_attached{{pod="{TAG}-a"}} 1' in metrics, metrics


def _link_id(cluster, pod, prog):
    pin = cluster.bpffs / "eastguard" / f"{TAG}-{pod}" / f"link_{prog}"
    r = sh("bpftool", "-j", "link", "show", "pinned", pin)
    return json.loads(r.stdout)["id"]


def test_killing_the_agent_or_detaching_the_redirect_does_not_bypass(cluster):
    # Kill -9: the pinned links keep capturing.
    cluster.agent.kill()
    cluster.agent.wait()
    rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/after-kill")
    assert rc == 0, out
    assert f"URI={CLIENT_ID}" in json.loads(out)["xfcc"]
    # Detach A's redirect by hand: the guard keeps A from reaching around its sidecar, to a
    # captured pod (B) and to one without capture (C).
    for prog in ("eg_connect4", "eg_connect6"):
        sh("bpftool", "link", "detach", "id", _link_id(cluster, "a", prog))
    for url in (f"http://{ip4('b')}:{APP_PORT}/detached", f"http://{ip4('c')}:9090/detached", f"http://[{ip6('c')}]:9090/detached6"):
        rc, out = cluster.curl("a", url, max_time=3)
        assert rc != 0, f"{url} reached: {out}"
    assert not any(r["path"].startswith("/detached") for r in cluster.app_seen("b") + cluster.app_seen("c"))
    # A restarted agent re-adopts the pins and re-attaches what was detached.
    cluster.start_agent()
    status = cluster.wait_attached(["a", "b"])
    assert status[f"{TAG}-a"]["repairs"] >= 2, status
    rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/repaired")
    assert rc == 0, out
    assert f"URI={CLIENT_ID}" in json.loads(out)["xfcc"]


def _bpf_objects():
    """IDs of this project's programs, maps and links now alive in the kernel."""
    progs = {p["id"] for p in json.loads(sh("bpftool", "-j", "prog", "show").stdout or "[]") if str(p.get("name", "")).startswith("eg_")}
    maps = {m["id"] for m in json.loads(sh("bpftool", "-j", "map", "show").stdout or "[]") if str(m.get("name", "")).startswith("eg_")}
    links = {lk["id"] for lk in json.loads(sh("bpftool", "-j", "link", "show").stdout or "[]") if lk.get("prog_id") in progs}
    return {"prog": progs, "map": maps, "link": links}


def test_pods_come_and_go_without_leaks(cluster):
    pod = "d"
    ns = f"{TAG}d"
    sh("ip", "netns", "add", ns)
    for part in ("app", "sidecar"):
        cluster.cgroup(pod, part).mkdir(parents=True, exist_ok=True)
    extra = {
        "name": f"{TAG}-d",
        "cgroup": str(cluster.cgroup(pod)),
        "sidecar_cgroup": str(cluster.cgroup(pod, "sidecar")),
        "netns": f"/run/netns/{ns}",
    }
    pin_dir = cluster.bpffs / "eastguard" / f"{TAG}-d"
    baseline = _bpf_objects()
    created = {"prog": set(), "map": set(), "link": set()}
    for i in range(100):
        cluster.write_registry(["a", "b"], extra=[extra])
        deadline = time.time() + 10
        while time.time() < deadline:
            st = cluster.capture_status().get(f"{TAG}-d")
            if st and st["links"] and all(st["links"].values()) and len(st["links"]) == 7:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"cycle {i}: pod d not attached: {st}")
        # What appeared since the baseline is pod D's (each load makes new objects).
        now = _bpf_objects()
        for kind in created:
            created[kind] |= now[kind] - baseline[kind]
        cluster.write_registry(["a", "b"])
        deadline = time.time() + 10
        while (pin_dir.exists() or f"{TAG}-d" in cluster.capture_status()) and time.time() < deadline:
            time.sleep(0.01)
        assert not pin_dir.exists(), f"cycle {i}: pins left behind"
    # 100 loads of 7 programs, 9 maps and 6 links were seen ...
    assert (len(created["prog"]), len(created["map"]), len(created["link"])) == (700, 900, 600), {k: len(v) for k, v in created.items()}
    # ... and none is left. The kernel frees programs and maps asynchronously (RCU): allow it a moment.
    deadline = time.time() + 10
    while time.time() < deadline:
        now = _bpf_objects()
        left = {k: sorted(created[k] & now[k]) for k in created}
        if not any(left.values()):
            break
        time.sleep(0.2)
    assert not any(left.values()), f"still alive after 100 add/remove cycles: {left}"
    assert {k: now[k] & baseline[k] for k in now} == baseline, "pods A and B lost programs"
    # Pods A and B were untouched throughout.
    rc, out = cluster.curl("a", f"http://{ip4('b')}:{APP_PORT}/after-cycles")
    assert rc == 0, out


def test_demo_ebpf_runs_the_scenario_on_pod_networking(tmp_path):
    """`eastguard demo --ebpf --once`: its own namespaces, cgroups, node agent and capture; exits
    0 only if every expectation held, and leaves nothing behind."""
    _prerequisites()
    r = subprocess.run(
        [binary(), "--log-level", "warn", "demo", "--ebpf", "--once", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 5 expectations held" in r.stdout, r.stdout
    raw_row = next(line for line in r.stdout.splitlines() if "AF_PACKET" in line)
    assert "refused" in raw_row and "not permitted" in raw_row.lower() and raw_row.rstrip().endswith("ok"), raw_row
    # Control: the same probe, as root outside the pods, does open one.
    probe = subprocess.run([binary(), "demo-raw-socket"], capture_output=True, text=True, timeout=10)
    assert probe.returncode == 1 and probe.stdout.strip() == "opened", probe
    assert "egdemo" not in sh("ip", "netns", "list").stdout, "demo left network namespaces behind"
    assert str(tmp_path) not in Path("/proc/mounts").read_text(), "demo left its bpffs mounted"
    assert not list(cgroup2_root().glob("eastguard-egdemo*")), "demo left cgroups behind"


ISTIO = f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b, namespace: test}}
spec:
  hosts: [b.test.svc.cluster.local]
  addresses: [10.77.100.3]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {APP_PORT}}}]
  workloadSelector: {{labels: {{app: b}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: a, namespace: test}}
spec:
  hosts: [a.test.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {APP_PORT}}}]
  workloadSelector: {{labels: {{app: a}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: a, namespace: test, annotations: {{sidecar.eastguard.io/capture: ebpf}}}}
spec: {{address: {ip4('a')}, labels: {{app: a}}, serviceAccount: client}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: b, namespace: test, annotations: {{sidecar.eastguard.io/capture: ebpf}}}}
spec: {{address: {ip4('b')}, labels: {{app: b}}, serviceAccount: server}}
"""


def test_control_plane_configures_captured_sidecars(tmp_path):
    """The same pods, configured by `eastguard control-plane` from Istio resources (workloads
    annotated `sidecar.eastguard.io/capture: ebpf`): Istio's capture shape over xDS, so calls to
    the service VIP and to the pod IP both go through both sidecars, and nothing else gets out."""
    _prerequisites()
    c = Cluster(tmp_path, tag=f"{TAG}x")
    try:
        c.prepare()
        c.start_control_plane(ISTIO)
        c.start_pods(xds=True)
        c.write_registry(["a", "b"])
        c.start_agent()
        c.wait_attached(["a", "b"])
        deadline = time.time() + 20
        while time.time() < deadline and not all(c.admin(p, "/ready")[0] == 200 for p in ("a", "b")):
            time.sleep(0.1)
        assert all(c.admin(p, "/ready")[0] == 200 for p in ("a", "b")), [c.admin(p, "/ready") for p in ("a", "b")]
        for url in ("http://10.77.100.3/vip", f"http://{ip4('b')}:{APP_PORT}/pod-ip"):
            rc, out = c.curl("a", url)
            assert rc == 0, f"{url}: {out}\n{(tmp_path / 'a-sidecar.log').read_text()[-2000:]}"
            assert f"URI={CLIENT_ID}" in json.loads(out)["xfcc"], out
        rc, out = c.curl("a", f"http://{ip4('c')}:9090/nowhere")
        assert rc != 0, out
        rc, out = c.curl("c", f"http://{ip4('b')}:{APP_PORT}/direct", part=None)
        assert rc != 0, out
        seen = [x["path"] for x in c.app_seen("b") + c.app_seen("c")]
        assert "/vip" in seen and "/pod-ip" in seen and "/nowhere" not in seen and "/direct" not in seen, seen
    finally:
        c.close()


# === demo --ebpf: stopping and leftovers (issue 11) ===


def _demo_objects(pid):
    """What a `demo --ebpf` with this PID has on the machine: processes in its cgroups or
    namespaces, namespaces, cgroups, bpffs mounts (its capture pins live in them)."""
    tag = f"egdemo{pid}"
    namespaces = [n.split()[0] for n in sh("ip", "netns", "list").stdout.splitlines() if n.startswith(tag + "-")]
    cgroups = list(cgroup2_root().glob(f"eastguard-{tag}"))
    procs = set()
    for cg in cgroups:
        for f in cg.rglob("cgroup.procs"):
            procs |= {int(p) for p in f.read_text().split()}
    for ns in namespaces:
        procs |= {int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()}
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[0] == tag]
    return {"processes": sorted(procs), "namespaces": namespaces, "cgroups": cgroups, "mounts": mounts}


def _start_demo_ebpf(workdir, name):
    out = workdir / f"{name}.out"
    proc = subprocess.Popen(
        [binary(), "--log-level", "warn", "demo", "--ebpf", "--dir", str(workdir / name)],
        stdout=open(out, "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while "running; press Ctrl-C" not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.time() < deadline, out.read_text()
        time.sleep(0.2)
    assert "all 5 expectations held" in out.read_text(), out.read_text()
    return proc, out


def _pins(workdir, name):
    bpffs = workdir / name / "bpffs" / "eastguard"
    return sorted(p.name for p in bpffs.iterdir()) if bpffs.exists() else []


def _nothing_left(pid):
    left = _demo_objects(pid)
    return {k: v for k, v in left.items() if v}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_demo_ebpf_removes_everything_on_signal(tmp_path, sig):
    _prerequisites()
    proc, out = _start_demo_ebpf(tmp_path, "run")
    # Positive control: while it runs, its processes, namespaces, cgroup, mount and pins exist.
    running = _demo_objects(proc.pid)
    assert len(running["processes"]) >= 4 and len(running["namespaces"]) == 4, running
    assert running["cgroups"] and running["mounts"] and len(_pins(tmp_path, "run")) == 2, running
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("demo --ebpf still running 30 s after the signal")
    assert rc == 0, out.read_text()
    assert _nothing_left(proc.pid) == {}, out.read_text()
    assert [p for p in running["processes"] if Path(f"/proc/{p}").exists()] == []
    assert not (tmp_path / "run" / "bpffs" / "eastguard").exists(), "pins left behind"


def test_demo_ebpf_after_a_sigkilled_run_removes_its_leftovers(tmp_path):
    _prerequisites()
    first, _ = _start_demo_ebpf(tmp_path, "first")
    running = _demo_objects(first.pid)
    assert len(running["processes"]) >= 4, running
    first.kill()
    first.wait()
    # Its pod processes die with it (the kernel signals them); its objects stay.
    deadline = time.time() + 8
    while [p for p in running["processes"] if Path(f"/proc/{p}").exists()] and time.time() < deadline:
        time.sleep(0.1)
    assert [p for p in running["processes"] if Path(f"/proc/{p}").exists()] == [], "pod processes outlived the killed demo"
    left = _nothing_left(first.pid)
    assert left.get("namespaces") and left.get("cgroups") and left.get("mounts"), f"nothing left to clean up: {left}"
    # A second run starts over the leftovers, says what it removed, succeeds, and leaves nothing of either.
    second = subprocess.run(
        [binary(), "--log-level", "warn", "demo", "--ebpf", "--once", "--dir", str(tmp_path / "second")],
        capture_output=True, text=True, timeout=180,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "removing what an earlier demo --ebpf left" in second.stdout, second.stdout
    for ns in left["namespaces"]:
        assert ns in second.stdout, f"{ns} not named in: {second.stdout}"
    assert "all 5 expectations held" in second.stdout, second.stdout
    assert _nothing_left(first.pid) == {}
    assert "egdemo" not in sh("ip", "netns", "list").stdout
    assert not list(cgroup2_root().glob("eastguard-egdemo*"))
    assert "egdemo" not in Path("/proc/mounts").read_text()
