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

from conftest import CLIENT_ID, binary
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
        c.net()
        c.cgroups()
        c.bpffs.mkdir()
        sh("mount", "-t", "bpf", "bpf", c.bpffs)
        c.pki()
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
        time.sleep(1)
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
    counts = {}
    for kind in ("prog", "map", "link"):
        r = sh("bpftool", "-j", kind, "show")
        items = json.loads(r.stdout or "[]")
        counts[kind] = sum(1 for i in items if str(i.get("name", "")).startswith("eg_") or kind == "link")
    return counts


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
    for i in range(100):
        cluster.write_registry(["a", "b"], extra=[extra])
        deadline = time.time() + 10
        while time.time() < deadline:
            st = cluster.capture_status().get(f"{TAG}-d")
            if st and st["links"] and all(st["links"].values()):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"cycle {i}: pod d not attached: {st}")
        cluster.write_registry(["a", "b"])
        deadline = time.time() + 10
        while (pin_dir.exists() or f"{TAG}-d" in cluster.capture_status()) and time.time() < deadline:
            time.sleep(0.01)
        assert not pin_dir.exists(), f"cycle {i}: pins left behind"
    # The kernel frees programs and maps asynchronously (RCU): allow it a moment.
    deadline = time.time() + 10
    after = _bpf_objects()
    while after != baseline and time.time() < deadline:
        time.sleep(0.2)
        after = _bpf_objects()
    assert after == baseline, f"bpf objects before {baseline}, after 100 cycles {after}"
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
    assert "all 4 expectations held" in r.stdout, r.stdout
    assert "egdemo" not in sh("ip", "netns", "list").stdout, "demo left network namespaces behind"
    assert str(tmp_path) not in Path("/proc/mounts").read_text(), "demo left its bpffs mounted"
    assert not list(cgroup2_root().glob("eastguard-egdemo*")), "demo left cgroups behind"
