"""Pods on one machine for capture tests and benchmarks: network namespaces on a bridge (IPv4
and IPv6), a cgroup per pod with `app` and `sidecar` children, sidecars configured for captured
traffic, and `eastguard node-agent --capture` (eBPF) or iptables REDIRECT rules.

Everything is created by `Cluster` and removed by `Cluster.close()`. Root only.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from conftest import CLIENT_ID, SERVER_ID, TD, binary, free_port, http_get
from pki import CA

HERE = Path(__file__).resolve().parent
TAG = f"eg{os.getpid() % 100000}"
MISSING_TOOLS = ("ip", "bpftool", "tcpdump", "curl")
SUBNET4, SUBNET6 = "10.77.0", "fd77::"
PODS = {"a": 2, "b": 3, "c": 4}  # last address byte / group
APP_PORT = 8080


def cgroup2_root():
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == "cgroup2":
            return Path(f[1])
    return None


def sh(*args, check=True, timeout=30, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def handoff_target(listener, address):
    """An outbound listener made a hand-off target: bound nowhere, named like Istio's."""
    listener = dict(listener, name=f"outbound_{address}", address=address, bind_to_port=False)
    listener.pop("original_dst", None)
    return listener


def ip4(pod):
    return f"{SUBNET4}.{PODS[pod]}"


def ip6(pod):
    return f"{SUBNET6}{PODS[pod]}"


class Cluster:
    """`capture`: `ebpf` (the node-agent attaches; sidecars wait for it to be ready) or
    `iptables` (REDIRECT rules in the pods' namespaces, as istio-init writes them)."""

    def __init__(self, tmp: Path, capture="ebpf", tag=TAG):
        assert capture in ("ebpf", "iptables")
        self.capture = capture
        self.tag = tag
        self.control_plane = None
        self.short_circuit = True
        self.tmp = tmp
        self.procs = []
        self.host = f"{tag}h"
        self.ns = {p: f"{tag}{p}" for p in PODS}
        self.cg_root = cgroup2_root() / f"eastguard-test-{tag}"
        self.bpffs = tmp / "bpffs"
        self.agent = None
        self.agent_admin = free_port()
        self.registry = tmp / "capture.yaml"

    # --- setup ---

    def net(self):
        sh("ip", "netns", "add", self.host)
        sh("ip", "-n", self.host, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.host, "link", "set", "br0", "up")
        # The "node": where a control plane runs, reachable from every pod.
        sh("ip", "-n", self.host, "addr", "add", f"{SUBNET4}.1/24", "dev", "br0")
        for pod, n in PODS.items():
            ns = self.ns[pod]
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"v{pod}", "netns", self.host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.host, "link", "set", f"v{pod}", "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip4(pod)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{ip6(pod)}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def prepare(self, bpffs=True):
        """Namespaces and bridge, cgroups, the test PKI, and (for eBPF) a private bpffs; first,
        whatever an earlier run with the same tag left behind."""
        left = self.remove_leftovers()
        if left:
            raise RuntimeError("leftovers of an earlier run could not be removed: " + "; ".join(left))
        self.net()
        self.cgroups()
        self.pki()
        if bpffs:
            self.bpffs.mkdir(exist_ok=True)
            # The mount's source names the cluster, so a later run finds it wherever it is.
            sh("mount", "-t", "bpf", f"eastguard-test-{self.tag}", self.bpffs)

    def status_file(self, pod):
        """Where the node agent writes the pod's capture state for its sidecar."""
        return self.tmp / f"{pod}.capture"

    def cgroup(self, pod, part=None):
        p = self.cg_root / pod
        return p / part if part else p

    def cgroups(self):
        for pod in ("a", "b"):
            for part in ("app", "sidecar"):
                self.cgroup(pod, part).mkdir(parents=True, exist_ok=True)

    def run_in(self, pod, part, args, **kw):
        """Starts a process in the pod's netns and (for a captured pod) cgroup."""
        if part is None:
            wrapped = ["ip", "netns", "exec", self.ns[pod], *map(str, args)]
        else:
            # Join the cgroup first: `ip netns exec` remounts /sys, hiding the cgroup tree.
            procs = self.cgroup(pod, part) / "cgroup.procs"
            script = f'echo $$ > {procs} && exec "$@"'
            wrapped = ["sh", "-c", script, "sh", "ip", "netns", "exec", self.ns[pod], *map(str, args)]
        return wrapped

    def spawn(self, pod, part, args, log):
        p = subprocess.Popen(self.run_in(pod, part, args), stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
        self.procs.append(p)
        return p

    def exec(self, pod, part, args, timeout=20):
        return subprocess.run(self.run_in(pod, part, args), capture_output=True, text=True, timeout=timeout)

    def curl(self, pod, url, part="app", max_time=5):
        """An unmodified curl in the pod's app container: (exit code, body)."""
        r = self.exec(pod, part, ["curl", "-sS", "-g", "--max-time", max_time, url])
        return r.returncode, r.stdout + r.stderr

    def admin(self, pod, path):
        """GET on a sidecar's admin API (loopback inside the pod)."""
        r = self.exec(pod, None, ["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", f"http://127.0.0.1:15000{path}"])
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    # --- pods ---

    def pki(self):
        self.ca = CA(TD)
        self.bundle = self.tmp / "bundle.pem"
        self.bundle.write_bytes(self.ca.pem())
        self.ids = {"a": CLIENT_ID, "b": SERVER_ID}
        self.svid = {p: self.ca.write_svid(self.tmp, p, self.ids[p]) for p in ("a", "b")}

    @staticmethod
    def handoff_outbound():
        return {
            "name": "virtualOutbound",
            "address": "127.0.0.1:15001",
            "direction": "OUTBOUND",
            "use_original_dst": True,
            # Istio's BlackHoleCluster for REGISTRY_ONLY: a destination with no listener is refused.
            "filter_chains": [{"name": "BlackHole", "refuse": "no listener for this destination"}],
        }

    def sidecar_config(self, pod):
        cert, key = self.svid[pod]
        peer = "b" if pod == "a" else "a"

        def outbound(addr, family_ip):
            return {
                "name": f"virtualOutbound{'6' if addr.startswith('[') else ''}",
                "address": addr,
                "direction": "OUTBOUND",
                "original_dst": True,
                "filter_chains": [
                    {
                        "name": f"to-{peer}",
                        "filter_chain_match": {"destination_port": APP_PORT, "prefix_ranges": [family_ip]},
                        "http_connection_manager": {
                            "stat_prefix": "outbound_http",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": peer,
                                        "domains": ["*"],
                                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"outbound|{APP_PORT}||{peer}{'6' if addr.startswith('[') else ''}"}}],
                                    }
                                ]
                            },
                        },
                    }
                ],
            }

        def inbound(addr):
            return {
                "name": f"virtualInbound{'6' if addr.startswith('[') else ''}",
                "address": addr,
                "direction": "INBOUND",
                # Behind iptables REDIRECT the port comes from SO_ORIGINAL_DST; behind sk_lookup
                # the local address already is the original destination (the lookup misses).
                "original_dst": True,
                "filter_chains": [
                    {
                        "name": f"inbound|{APP_PORT}",
                        "filter_chain_match": {"destination_port": APP_PORT},
                        "http_connection_manager": {
                            "stat_prefix": "inbound_http",
                            "route_config": {
                                "virtual_hosts": [
                                    {"name": "inbound", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"inbound|{APP_PORT}||"}}]}
                                ]
                            },
                        },
                    }
                ],
            }

        def peer_cluster(name, endpoint):
            return {
                "name": name,
                "endpoints": [endpoint],
                "transport_socket": {"sni": f"outbound_.{APP_PORT}_._.{peer}.test.svc.cluster.local", "match_spiffe_ids": [self.ids[peer]]},
                "metadata": {"service": f"{peer}.test.svc.cluster.local", "workload": peer, "namespace": "test"},
            }

        return {
            "node": {"id": f"pod-{pod}", "workload": f"pod-{pod}", "namespace": "test"},
            "admin": {"address": "127.0.0.1:15000"},
            "identity": {"files": {"cert": str(cert), "key": str(key), "bundle": str(self.bundle), "poll_interval": "200ms"}},
            "access_log": {"path": str(self.tmp / f"{pod}-access.log"), "format": "JSON"},
            # IPv4 is shaped like Istio's: `virtualOutbound` hands each connection to the listener
            # at its original destination (`bind_to_port: false`), and refuses what has none.
            # IPv6 uses one listener with a chain per destination (`prefix_ranges`).
            "listeners": [
                self.handoff_outbound(),
                handoff_target(outbound("127.0.0.1:15001", f"{ip4(peer)}/32"), f"{ip4(peer)}:{APP_PORT}"),
                outbound("[::1]:15001", f"{ip6(peer)}/128"),
                inbound("0.0.0.0:15006"),
                inbound("[::]:15006"),
            ],
            "clusters": [
                peer_cluster(f"outbound|{APP_PORT}||{peer}", f"{ip4(peer)}:{APP_PORT}"),
                peer_cluster(f"outbound|{APP_PORT}||{peer}6", f"[{ip6(peer)}]:{APP_PORT}"),
                {"name": f"inbound|{APP_PORT}||", "endpoints": [f"127.0.0.1:{APP_PORT}"]},
            ],
        }

    def iptables(self):
        """istio-init's rules, per captured pod: app TCP out → 15001 (the sidecar's own and
        loopback excluded), TCP in to the app port → 15006."""
        root = cgroup2_root()
        for pod in ("a", "b"):
            ns = self.ns[pod]
            sidecar = "/" + str(self.cgroup(pod, "sidecar").relative_to(root))
            for tool, lo in (("iptables", "127.0.0.0/8"), ("ip6tables", "::1/128")):
                nat = ["ip", "netns", "exec", ns, tool, "-w", "-t", "nat"]
                sh(*nat, "-A", "OUTPUT", "-p", "tcp", "-m", "cgroup", "--path", sidecar, "-j", "RETURN")
                sh(*nat, "-A", "OUTPUT", "-p", "tcp", "-d", lo, "-j", "RETURN")
                sh(*nat, "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")
                sh(*nat, "-A", "PREROUTING", "-p", "tcp", "--dport", str(APP_PORT), "-j", "REDIRECT", "--to-ports", "15006")

    def start_pods(self, b_app=None, xds=False):
        for pod in ("a", "b"):
            cfg = self.tmp / f"{pod}-sidecar.yaml"
            config = self.xds_sidecar_config(pod) if xds else self.sidecar_config(pod)
            if self.capture == "ebpf":
                config["capture"] = {"status_file": str(self.status_file(pod))}
            cfg.write_text(yaml.safe_dump(config))
            self.spawn(pod, "sidecar", [binary(), "proxy", "--config", cfg], self.tmp / f"{pod}-sidecar.log")
        self.app_log = {p: self.tmp / f"{p}-app.jsonl" for p in PODS}
        self.b_app_proc = self.spawn("b", "app", b_app or ["python3", HERE / "ns_app.py", APP_PORT, self.app_log["b"]], self.tmp / "b-app.log")
        # Pod C has no sidecar: its app is reachable directly (what a bypass would reach).
        self.spawn("c", None, ["python3", HERE / "ns_app.py", 9090, self.app_log["c"]], self.tmp / "c-app.log")
        deadline = time.time() + 30
        while time.time() < deadline:
            if all(self.admin(p, "/server_info")[0] == 200 for p in ("a", "b")):
                return
            time.sleep(0.2)
        raise RuntimeError("sidecars did not start:\n" + "\n".join((self.tmp / f"{p}-sidecar.log").read_text()[-1500:] for p in ("a", "b")))

    # --- control plane (xDS) instead of static sidecar configs ---

    def start_control_plane(self, istio_yaml):
        """`eastguard control-plane` on the node (the bridge namespace), from Istio resources."""
        cfg = self.tmp / "istio"
        cfg.mkdir(exist_ok=True)
        (cfg / "mesh.yaml").write_text(istio_yaml)
        log = open(self.tmp / "control-plane.log", "ab")
        self.control_plane = subprocess.Popen(
            ["ip", "netns", "exec", self.host, binary(), "control-plane", "--config-dir", str(cfg), "--xds-address", f"{SUBNET4}.1:15010"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        self.procs.append(self.control_plane)

    def xds_sidecar_config(self, pod):
        """A bootstrap with no listeners or clusters: everything comes from the control plane."""
        cert, key = self.svid[pod]
        return {
            "node": {"id": f"sidecar~{ip4(pod)}~{pod}.test~test.svc.cluster.local", "workload": pod, "namespace": "test"},
            "admin": {"address": "127.0.0.1:15000"},
            "identity": {"files": {"cert": str(cert), "key": str(key), "bundle": str(self.bundle), "poll_interval": "200ms"}},
            "access_log": {"path": str(self.tmp / f"{pod}-access.log"), "format": "JSON"},
            "capture": {"status_file": str(self.status_file(pod))},
            "xds": {"address": f"{SUBNET4}.1:15010"},
        }

    def registry_entry(self, pod):
        return {
            "name": f"{self.tag}-{pod}",
            "cgroup": str(self.cgroup(pod)),
            "sidecar_cgroup": str(self.cgroup(pod, "sidecar")),
            "netns": f"/run/netns/{self.ns[pod]}",
            "status_file": str(self.status_file(pod)),
            "short_circuit": self.short_circuit,
        }

    def write_registry(self, pods, extra=()):
        entries = [self.registry_entry(p) for p in pods] + list(extra)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"pods": entries}))
        tmp.rename(self.registry)

    def start_agent(self, poll_ms=50):
        log = open(self.tmp / "agent.log", "ab")
        self.agent = subprocess.Popen(
            [binary(), "node-agent", "--capture", self.registry, "--bpffs", self.bpffs, "--capture-admin", f"127.0.0.1:{self.agent_admin}", "--capture-poll-ms", str(poll_ms)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    def capture_status(self):
        code, body = http_get(f"http://127.0.0.1:{self.agent_admin}/capture", timeout=2)
        assert code == 200, body
        return {p["name"]: p for p in json.loads(body)["pods"]}

    def wait_attached(self, pods, limit=20):
        deadline = time.time() + limit
        last = None
        while time.time() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"node-agent exited: {(self.tmp / 'agent.log').read_text()[-3000:]}")
            try:
                last = self.capture_status()
                if all(last.get(f"{self.tag}-{p}", {}).get("state") == "attached" for p in pods):
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"not attached: {json.dumps(last, indent=1)}\n{(self.tmp / 'agent.log').read_text()[-3000:]}")

    def app_seen(self, pod):
        path = self.app_log[pod]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # --- teardown ---

    def close(self):
        """Removes everything, every step tried even if one fails (a failed test must not leak
        namespaces, veths, cgroups or mounts into the next); errors are raised at the end."""
        errors = []

        def step(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - collected and raised below
                errors.append(f"{what}: {e!r}")

        def stop_agent():
            if self.agent and self.agent.poll() is None:
                self.agent.kill()
                self.agent.wait(timeout=10)

        def stop_procs():
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in self.procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

        step("agent", stop_agent)
        step("processes", stop_procs)
        self.remove_leftovers(errors)
        if errors:
            raise RuntimeError("cleanup: " + "; ".join(errors))

    def remove_leftovers(self, errors=None):
        """What this cluster's tag names on the machine — from this run or an earlier one that
        failed half-way: the bpffs mount, processes in the cgroup tree, the cgroups (EBUSY while
        processes exit is retried for a bounded time), and the namespaces with their veths."""
        errors = [] if errors is None else errors
        for line in Path("/proc/mounts").read_text().splitlines():
            source, target, fstype = line.split()[:3]
            if fstype == "bpf" and source == f"eastguard-test-{self.tag}":
                r = sh("umount", target.replace("\\040", " "), check=False)
                if r.returncode != 0:
                    errors.append(f"umount {target}: {r.stderr.strip()}")
        deadline = time.time() + 5
        while self.cg_root.exists():
            dirs = sorted((d for d in self.cg_root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
            dirs.append(self.cg_root)
            for d in dirs:
                try:
                    pids = (d / "cgroup.procs").read_text().split()
                except OSError:
                    pids = []
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            busy = []
            for d in dirs:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    busy.append(f"{d}: {e.strerror}")
            if not busy:
                break
            if time.time() > deadline:
                errors.append("cgroups: " + ", ".join(busy))
                break
            time.sleep(0.1)
        present = sh("ip", "netns", "list").stdout
        for ns in list(self.ns.values()) + [f"{self.tag}d", self.host]:
            if any(line.split()[0] == ns for line in present.splitlines() if line.strip()):
                r = sh("ip", "netns", "del", ns, check=False)
                if r.returncode != 0:
                    errors.append(f"netns {ns}: {r.stderr.strip()}")
        return errors
