#!/usr/bin/env python3
"""Side by side: the same load, in one run, sent directly, through an nginx mTLS pair and through
the eastguard pair, as a user comparing proxies would (issue 17's recipe).

Two network namespaces joined by a veth pair: `client` (10.88.0.2) runs the load generator and the
client-side proxy; `server` (10.88.0.3) runs the upstream (1 KB responses), the server-side proxy
and, for eastguard, its control plane.
- nginx: Debian's nginx (installed if missing), TLS 1.3 both ways with client certificates,
  keep-alive pools to the peer and to the upstream, 2 workers per side.
- eastguard: configured by `eastguard control-plane` from Istio files (a ServiceEntry, two
  WorkloadEntries, one ALLOW AuthorizationPolicy for the client's SPIFFE ID), SVIDs from PEM files,
  metrics on, access log off, `eastguard-sidecar` built to ship (the `sidecar` profile: fat LTO,
  code linked in the order of src/bin/eastguard-sidecar.order; the bench prints how much of that
  file the build matched) with its default workers (one per CPU). Between
  the sidecars, the control plane's default (`--h2-upgrade-policy UPGRADE`): one multiplexed
  HTTP/2 connection per peer and worker.
- eastguard-h1: the same with `--h2-upgrade-policy DO_NOT_UPGRADE` (Istio's default): HTTP/1.1
  between the sidecars on keep-alive connections, one per request in flight, as the nginx pair.
- Load: `oha` (installed with `cargo install oha --locked` if missing), in three modes:
  fixed rate (`-q RATE -c CONNS`, with latency correction: fortio's method), saturation (no rate),
  and connection churn (no keep-alive). Every measured run follows a warm-up; the three setups
  alternate, ROUNDS times; medians are printed.
- Per proxy: CPU ms per 1000 requests (utime + stime from /proc, every process of the proxy),
  peak RSS (VmHWM, summed over its processes). Added latency is the proxied percentile minus the
  direct one of the same round.

Needs root (namespaces). Usage, from the repo root:
    sudo .venv/bin/python benches/compare.py [--rate 1000] [--connections 16] [--duration 30]
        [--warmup 5] [--burst 10] [--rounds 3] [--setups direct,nginx,eastguard,eastguard-h1]
        [--concurrency N] [--policies N] [--idle N] [--perf DIR]
Scale checks: `--connections 10000` (the client-side proxy holds them), `--policies 1000` (the
server sidecar decides among them), `--idle N` (RSS per idle connection).
The symbol ordering file, after a dependency or compiler update (its names carry their hashes):
    sudo .venv/bin/python benches/compare.py --setups eastguard,eastguard-h1 --rounds 1 --rate 100 \
        --duration 10 --burst 5 --warmup 3 --concurrency 1 --symbol-order src/bin/eastguard-sidecar.order
then build again (`cargo build --profile sidecar --bin eastguard-sidecar`).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conformance"))

CLK_TCK = os.sysconf("SC_CLK_TCK")
TAG = f"egcmp{os.getpid() % 100000}"
CLIENT_NS, SERVER_NS = f"{TAG}-client", f"{TAG}-server"
CLIENT_IP, SERVER_IP = "10.88.0.2", "10.88.0.3"
UPSTREAM, NGINX_SERVER, NGINX_CLIENT, EG_INBOUND, EG_OUTBOUND, XDS = 8080, 8443, 8081, 15006, 15001, 15010
HOST = "server.test.svc.cluster.local"
TD = "cluster.local"


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


def in_ns(ns, *cmd):
    return ["ip", "netns", "exec", ns, *map(str, cmd)]


def processes(root_pid):
    """The process and its descendants (nginx's master and workers)."""
    pids, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return pids


def cpu_ms(root_pid, kernel_only=False):
    """CPU time (user + system, or system alone) of the proxy's processes, in ms."""
    total = 0
    for p in processes(root_pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[12]) + (0 if kernel_only else int(f[11]))
        except OSError:
            pass
    return total * 1000 / CLK_TCK


def status_kib(root_pid, field):
    """A /proc/PID/status memory field (`VmHWM:`, `VmRSS:`) summed over the proxy's processes."""
    total = 0
    for p in processes(root_pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def hwm_mib(root_pid):
    return status_kib(root_pid, "VmHWM:") / 1024


def rss_kib(root_pid):
    return status_kib(root_pid, "VmRSS:")


# Opens N keep-alive connections, one request each (so each is fully set up in the proxy), holds
# them until stdin closes. Prints "ready" then.
IDLE_HOLDER = r"""
import socket, sys
host, port, n, vhost = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {vhost}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += s.recv(65536)
    conns.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def idle_cost(url, host, proxy, n):
    """KiB of the proxy's RSS per idle keep-alive connection from the client (N of them)."""
    addr = url.split("//", 1)[1].rstrip("/")
    ip, port = addr.rsplit(":", 1)
    before = rss_kib(proxy.pid)
    holder = subprocess.Popen(in_ns(CLIENT_NS, sys.executable, "-c", IDLE_HOLDER, ip, port, str(n), host),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"idle connections not opened: {line!r}")
        time.sleep(1)
        after = rss_kib(proxy.pid)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    return (after - before) / n


def wait_port(ns, ip, port, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        if sh(*in_ns(ns, "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}"), check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {ip}:{port} in {ns}")


class Net:
    def __init__(self):
        for ns in (CLIENT_NS, SERVER_NS):
            sh("ip", "netns", "add", ns)
            sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        sh("ip", "link", "add", f"{TAG}c", "netns", CLIENT_NS, "type", "veth", "peer", "name", f"{TAG}s", "netns", SERVER_NS)
        for ns, dev, ip in ((CLIENT_NS, f"{TAG}c", CLIENT_IP), (SERVER_NS, f"{TAG}s", SERVER_IP)):
            sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev))
            sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
        self.procs = []

    def start(self, ns, cmd, log):
        p = subprocess.Popen(in_ns(ns, *cmd), stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def close(self):
        for p in self.procs:
            try:
                self.stop(p)
            except ProcessLookupError:
                pass
        for ns in (CLIENT_NS, SERVER_NS):
            sh("ip", "netns", "del", ns, check=False)


def child_pid(wrapper):
    """`ip netns exec` execs the command, so the wrapper's PID is the program's."""
    return wrapper.pid


def nginx_conf(work, side, ca_files):
    cert, key, bundle = ca_files
    common = f"""worker_processes 2;
pid {work}/nginx-{side}.pid;
error_log {work}/nginx-{side}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-{side}-body;
  proxy_temp_path {work}/nginx-{side}-proxy;
  fastcgi_temp_path {work}/nginx-{side}-fastcgi;
  uwsgi_temp_path {work}/nginx-{side}-uwsgi;
  scgi_temp_path {work}/nginx-{side}-scgi;
  keepalive_requests 100000;
"""
    if side == "server":
        return common + f"""
  upstream app {{ server 127.0.0.1:{UPSTREAM}; keepalive 32; }}
  server {{
    listen {SERVER_IP}:{NGINX_SERVER} ssl;
    ssl_protocols TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {bundle};
    ssl_verify_client on;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""
    return common + f"""
  upstream peer {{ server {SERVER_IP}:{NGINX_SERVER}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{NGINX_CLIENT};
    location / {{
      proxy_pass https://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_certificate {cert};
      proxy_ssl_certificate_key {key};
      proxy_ssl_trusted_certificate {bundle};
      proxy_ssl_verify on;
      proxy_ssl_name server;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
"""


ISTIO = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: test}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: server}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: server
  namespace: test
  annotations: {{sidecar.eastguard.io/inbound-port: "{EG_INBOUND}"}}
spec: {{address: {SERVER_IP}, ports: {{http: {UPSTREAM}}}, labels: {{app: server}}, serviceAccount: server}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: client
  namespace: test
  annotations: {{sidecar.eastguard.io/outbound-port: "{EG_OUTBOUND}"}}
spec: {{address: {CLIENT_IP}, labels: {{app: client}}, serviceAccount: client}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server, namespace: test}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["{TD}/ns/test/sa/client"]}}}}]}}]
"""


def extra_policies(n):
    """N more ALLOW policies on the server, each for another principal (none is the client's)."""
    return "".join(f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: other-{i}, namespace: test}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["{TD}/ns/test/sa/other-{i}"]}}}}], to: [{{operation: {{paths: ["/api/{i}/*"]}}}}]}}]
""" for i in range(n))


def oha(oha_bin, url, host, mode, args, seconds):
    cmd = [oha_bin, "--no-tui", "--output-format", "json", "-z", f"{seconds}s", "-c", str(args.connections), "-H", f"Host: {host}"]
    if mode == "fixed":
        cmd += ["-q", str(args.rate), "--latency-correction"]
    elif mode == "churn":
        cmd += ["--disable-keepalive"]
    cmd.append(url)
    out = subprocess.run(in_ns(CLIENT_NS, *cmd), capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout)
    codes = r.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # Requests still in flight when the run's time is up are not failures.
    errors = {k: v for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    pct = r["latencyPercentiles"]
    ms = lambda v: float("nan") if v is None else v * 1000  # no successful request: no percentiles
    if errors:
        print(f"!! oha {mode}: {errors}", file=sys.stderr)
    return {"requests": total, "ok": ok, "rps": r["summary"]["requestsPerSec"],
            "p50": ms(pct["p50"]), "p99": ms(pct["p99"])}


def ensure_tools():
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=True)
    oha_bin = shutil.which("oha") or str(Path.home() / ".cargo/bin/oha")
    if not Path(oha_bin).exists():
        subprocess.run(["cargo", "install", "--locked", "oha"], check=True)
    return oha_bin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=int, default=30, help="seconds of each fixed-rate run")
    ap.add_argument("--burst", type=int, default=10, help="seconds of each saturation and churn run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--concurrency", type=int, default=None, help="eastguard-sidecar --concurrency (default: one worker per CPU)")
    ap.add_argument("--preload", default=None,
                    help="run eastguard-sidecar with LD_PRELOAD=LIB (an allocator: Debian's libjemalloc.so.2, libmimalloc.so.2)")
    ap.add_argument("--sidecar", type=Path, default=None,
                    help="the eastguard-sidecar binary to run (default: target/sidecar/eastguard-sidecar, the shipped build: "
                         "`cargo build --profile sidecar`, fat LTO); "
                         "PATH1,PATH2 alternates two builds as setups eastguard and eastguard2")
    ap.add_argument("--setups", default="direct,nginx,eastguard,eastguard-h1", help="which setups to run, comma-separated")
    ap.add_argument("--policies", type=int, default=1,
                    help="AuthorizationPolicies on the server workload (one admits the client; the others name other principals)")
    ap.add_argument("--modes", default="fixed,saturation,churn", help="which load runs, comma-separated ('' for none)")
    ap.add_argument("--idle", type=int, default=0,
                    help="also measure each client-side proxy's RSS per idle keep-alive connection, with N of them")
    ap.add_argument("--strace", type=Path, default=None,
                    help="also count each proxy's system calls (`strace -c -f`) during the fixed-rate run, into DIR/<round>-<setup>-<side>.txt; "
                         "strace slows the proxy, so that run's CPU and latency figures do not count")
    ap.add_argument("--callgrind", type=Path, default=None,
                    help="run each eastguard sidecar under `valgrind --tool=callgrind`, counts zeroed before each measured run and dumped after it, into "
                         "DIR/<round>-<side><setup>.callgrind.<N> (<setup>: -h1 for eastguard-h1, 2 for eastguard2; N: 1 for the first mode run, ...) (instruction counts, repeatable on a noisy machine; use a low --rate, valgrind is ~50x slower)")
    ap.add_argument("--symbol-order", type=Path, default=None,
                    help="run each eastguard sidecar under callgrind over its whole life (start-up, every mode, shutdown) and write the "
                         "functions of the sidecar binary that ran, most instructions first, to FILE: the linker's symbol ordering file "
                         "(src/bin/eastguard-sidecar.order), which puts the code a sidecar runs on pages of its own")
    ap.add_argument("--massif", type=Path, default=None,
                    help="run each eastguard sidecar under `valgrind --tool=massif` (heap profile over the whole run), into "
                         "DIR/<round>-<side>.massif at exit, and a detailed snapshot after each measured run; read them with ms_print")
    ap.add_argument("--perf", type=Path, default=None,
                    help="also record `perf record -e cpu-clock -g` of each eastguard sidecar during the fixed-rate run, into DIR/<round>-<side>.perf.data")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    # Thousands of connections: every process started from here may use its hard limit.
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    oha_bin = ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "eastguard", "-p", "eastguard-benches"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--profile", "sidecar", "--bin", "eastguard-sidecar"], cwd=ROOT, check=True)
    from pki import CA

    work = Path(tempfile.mkdtemp(prefix="eastguard-compare-"))
    os.chmod(work, 0o755)
    ca = CA(TD)
    (work / "bundle.pem").write_bytes(ca.pem())
    svid = {n: ca.write_svid(work, n, [f"spiffe://{TD}/ns/test/sa/{n}"], dns=["server"] if n == "server" else ())
            for n in ("client", "server")}
    net = Net()
    release = ROOT / "target" / "release"
    try:
        net.start(SERVER_NS, [release / "loadgen", "serve", "--listen", f"0.0.0.0:{UPSTREAM}", "--size", "1024"], work / "upstream.log")
        wait_port(SERVER_NS, "127.0.0.1", UPSTREAM)

        def nginx_pair():
            procs = {}
            for side, ns in (("server", SERVER_NS), ("client", CLIENT_NS)):
                for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                    (work / f"nginx-{side}-{d}").mkdir(exist_ok=True)
                conf = work / f"nginx-{side}.conf"
                cert, key = svid[side]
                conf.write_text(nginx_conf(work, side, (cert, key, work / "bundle.pem")))
                procs[side] = net.start(ns, ["nginx", "-c", conf, "-g", "daemon off;"], work / f"nginx-{side}.log")
            wait_port(SERVER_NS, SERVER_IP, NGINX_SERVER)
            wait_port(CLIENT_NS, "127.0.0.1", NGINX_CLIENT)
            return procs, f"http://127.0.0.1:{NGINX_CLIENT}/"

        sidecars = [Path(p) for p in str(args.sidecar).split(",")] if args.sidecar else [ROOT / "target/sidecar/eastguard-sidecar"]
        for sidecar in sidecars if not args.symbol_order else ():
            print(symbol_order_report(sidecar), flush=True)

        def eastguard_pair(setup):
            """`eastguard`, `eastguard-h1` (HTTP/1.1 between the sidecars) or `eastguard2` (the
            second --sidecar build); profiles are named after it."""
            sidecar = sidecars[setup == "eastguard2"]
            tag = setup.removeprefix("eastguard")
            cfg = work / "istio"
            cfg.mkdir(exist_ok=True)
            (cfg / "mesh.yaml").write_text(ISTIO + extra_policies(args.policies - 1))
            policy = "DO_NOT_UPGRADE" if setup == "eastguard-h1" else "UPGRADE"
            procs = {"control plane": net.start(SERVER_NS, [release / "eastguard", "control-plane", "--config-dir", cfg,
                                                             "--xds-address", f"{SERVER_IP}:{XDS}",
                                                             "--h2-upgrade-policy", policy], work / "cp.log")}
            wait_port(SERVER_NS, SERVER_IP, XDS)
            import yaml

            for side, ns, ip in (("server", SERVER_NS, SERVER_IP), ("client", CLIENT_NS, CLIENT_IP)):
                cert, key = svid[side]
                boot = {
                    "node": {"id": f"sidecar~{ip}~{side}.test~test.svc.cluster.local", "workload": side, "namespace": "test"},
                    "admin": {"address": "127.0.0.1:15000"},
                    "identity": {"files": {"cert": str(cert), "key": str(key), "bundle": str(work / "bundle.pem")}},
                    "xds": {"address": f"{SERVER_IP}:{XDS}"},
                }
                (work / f"{side}.yaml").write_text(yaml.safe_dump(boot))
                workers = ["--concurrency", str(args.concurrency)] if args.concurrency else []
                preload = ["env", f"LD_PRELOAD={args.preload}"] if args.preload else []
                if args.symbol_order:
                    out = work / f"{rnd + 1}-{side}{tag}.order.callgrind"
                    preload += ["valgrind", "--tool=callgrind", "--dump-instr=no", "--demangle=no", f"--callgrind-out-file={out}"]
                elif args.callgrind:
                    args.callgrind.mkdir(parents=True, exist_ok=True)
                    out = args.callgrind.resolve() / f"{rnd + 1}-{side}{tag}.callgrind"
                    preload += ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}"]
                elif args.massif:
                    args.massif.mkdir(parents=True, exist_ok=True)
                    out = args.massif.resolve() / f"{rnd + 1}-{side}{tag}.massif"
                    preload += ["valgrind", "--tool=massif", f"--massif-out-file={out}"]
                procs[side] = net.start(ns, [*preload, sidecar, "--log-level", "warn", "--config", work / f"{side}.yaml", *workers],
                                        work / f"eastguard-{side}.log")
            wait_port(SERVER_NS, SERVER_IP, EG_INBOUND, limit=30)
            wait_port(CLIENT_NS, "127.0.0.1", EG_OUTBOUND, limit=30)
            return procs, f"http://127.0.0.1:{EG_OUTBOUND}/"

        results = {}  # (setup, mode) -> list of per-round dicts
        for rnd in range(args.rounds):
            for setup in setups(args):
                procs, url = {}, f"http://{SERVER_IP}:{UPSTREAM}/"
                if setup == "nginx":
                    procs, url = nginx_pair()
                elif setup.startswith("eastguard"):
                    procs, url = eastguard_pair(setup)
                host = HOST if setup.startswith("eastguard") else "server"
                proxies = {k: p for k, p in procs.items() if k in ("client", "server")}
                try:
                    # A first request must succeed (config in place, mTLS up).
                    deadline = time.time() + 30
                    while sh(*in_ns(CLIENT_NS, "curl", "-sf", "-o", "/dev/null", "-H", f"Host: {host}", url), check=False).returncode != 0:
                        if time.time() > deadline:
                            raise RuntimeError(f"{setup}: no successful request through {url}")
                        time.sleep(0.2)
                    # Before any load, so the heap has no freed memory to reuse (run it with
                    # `--modes ''` to keep the peak RSS figures of load runs clean).
                    if args.idle and "client" in proxies:
                        kib = idle_cost(url, host, proxies["client"], args.idle)
                        results.setdefault((setup, "idle"), []).append({"kib": kib})
                        print(f"round {rnd + 1} {setup:<9} idle       {args.idle} connections: {kib:.1f} KiB each (client-side proxy RSS)", flush=True)
                    modes = [m for m in args.modes.split(",") if m]
                    for mode, secs in [(m, t) for m, t in (("fixed", args.duration), ("saturation", args.burst), ("churn", args.burst)) if m in modes]:
                        oha(oha_bin, url, host, mode, args, args.warmup)
                        cpu0 = {k: cpu_ms(p.pid) for k, p in proxies.items()}
                        sys0 = {k: cpu_ms(p.pid, kernel_only=True) for k, p in proxies.items()}
                        recorders = []
                        if args.perf and setup.startswith("eastguard") and mode == "fixed":
                            args.perf.mkdir(parents=True, exist_ok=True)
                            for k, p in proxies.items():
                                recorders.append(subprocess.Popen(
                                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(child_pid(p)),
                                     "-o", str(args.perf / f"{rnd + 1}-{k}.perf.data"), "--", "sleep", str(secs)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                        if args.strace and setup != "direct" and mode == "fixed":
                            args.strace.mkdir(parents=True, exist_ok=True)
                            for k, p in proxies.items():
                                pids = [str(child_pid(p))] + Path(f"/proc/{child_pid(p)}/task/{child_pid(p)}/children").read_text().split()
                                recorders.append(subprocess.Popen(
                                    ["timeout", "-s", "INT", str(secs), "strace", "-c", "-f", *[a for pid in pids for a in ("-p", pid)],
                                     "-o", str(args.strace / f"{rnd + 1}-{setup}-{k}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                        callgrind = args.callgrind and setup.startswith("eastguard")
                        for p in proxies.values() if callgrind else ():
                            sh("callgrind_control", "--zero", child_pid(p))
                        r = oha(oha_bin, url, host, mode, args, secs)
                        for p in proxies.values() if callgrind else ():
                            sh("callgrind_control", f"--dump={mode} run", child_pid(p))
                        for k, p in proxies.items() if args.massif and setup.startswith("eastguard") else ():
                            sh("vgdb", f"--pid={child_pid(p)}", "detailed_snapshot",
                               args.massif.resolve() / f"{rnd + 1}-{setup}-{k}-after-{mode}.massif")
                        for rec in recorders:
                            rec.wait(timeout=secs + 30)
                        cpu1 = {k: cpu_ms(p.pid) for k, p in proxies.items()}
                        sys1 = {k: cpu_ms(p.pid, kernel_only=True) for k, p in proxies.items()}
                        for k in proxies:
                            r[f"cpu_{k}"] = (cpu1[k] - cpu0[k]) * 1000 / max(r["requests"], 1)
                            r[f"sys_{k}"] = (sys1[k] - sys0[k]) * 1000 / max(r["requests"], 1)
                            r[f"hwm_{k}"] = hwm_mib(proxies[k].pid)
                            r[f"rss_{k}"] = rss_kib(proxies[k].pid) / 1024
                        if r["ok"] != r["requests"]:
                            print(f"!! {setup} {mode} round {rnd + 1}: {r['requests'] - r['ok']} of {r['requests']} requests failed", file=sys.stderr)
                        results.setdefault((setup, mode), []).append(r)
                        print(f"round {rnd + 1} {setup:<9} {mode:<10} rps {r['rps']:8.0f}  p50 {r['p50']:7.3f} ms  p99 {r['p99']:7.3f} ms"
                              + "".join(f"  cpu {k} {r[f'cpu_{k}']:.0f} ms/1k (sys {r[f'sys_{k}']:.0f})  hwm {r[f'hwm_{k}']:.1f} MiB  rss {r[f'rss_{k}']:.1f} MiB" for k in proxies), flush=True)
                finally:
                    for p in proxies.values() if args.symbol_order and setup.startswith("eastguard") else ():
                        sh("callgrind_control", "--dump=until stop", child_pid(p), check=False)
                    for p in procs.values():
                        net.stop(p)
                    time.sleep(0.5)
        report(results, args)
        if args.symbol_order:
            write_symbol_order(sorted(work.glob("*.order.callgrind*")), sidecars, args.symbol_order)
    finally:
        net.close()


def symbol_order_report(binary):
    """How much of the symbol ordering file names functions the binary has. Its names carry
    hashes of each crate's build (dependency versions, features, compiler version), so another
    toolchain or Cargo.lock leaves the code unordered: more resident code, same behaviour."""
    order = ROOT / "src/bin/eastguard-sidecar.order"
    wanted = set(order.read_text().split()) if order.is_file() else set()
    nm = subprocess.run(["nm", binary], capture_output=True, text=True, check=False).stdout
    have = {line.split()[-1] for line in nm.splitlines() if line.strip()}
    share = len(wanted & have) / max(len(wanted), 1)
    note = "" if share >= 0.9 else (" -- fewer than 90 %: what it misses is linked unordered, and more code stays resident; "
                                    "regenerate the file with `--symbol-order src/bin/eastguard-sidecar.order` and rebuild")
    return f"{binary}: {share:.0%} of {order.relative_to(ROOT)}'s {len(wanted)} functions found{note}"


def write_symbol_order(profiles, binaries, out):
    """Sums each function's own instructions over callgrind profiles (`--demangle=no`), keeps the
    functions of the sidecar binaries, and writes their linker names, most instructions first."""
    names = {str(b.resolve()) for b in binaries}
    cost = {}
    for path in profiles:
        ids = {"ob": {}, "fn": {}}
        ours, fn, skip = False, None, False
        for line in path.read_text(errors="replace").splitlines():
            key, _, rest = line.partition("=")
            if key in ("ob", "fn", "cob", "cfn") and rest:
                # Compressed names: "(id) name" the first time, "(id)" after.
                ident, _, name = rest.partition(" ")
                table = ids[key.lstrip("c")]
                name = table.setdefault(ident, name) if name else table.get(ident, ident)
                if key == "ob":
                    ours = name in names
                elif key == "fn":
                    # Recursion levels are "name'2", "name'3" ...: one symbol.
                    fn = name.split("'")[0] if ours else None
                continue
            if key == "calls":
                skip = True  # the next line is the call's inclusive cost, not the caller's own
                continue
            if not line or not (line[0].isdigit() or line[0] in "+-*"):
                continue
            if skip:
                skip = False
                continue
            if fn:
                fields = line.split()
                if len(fields) > 1:
                    cost[fn] = cost.get(fn, 0) + int(fields[1])
    # Code callgrind has no symbol for ("0x...", "(below main)") cannot be ordered.
    ordered = sorted((f for f in cost if re.fullmatch(r"[A-Za-z_.$][\w.$]*", f)), key=lambda f: (-cost[f], f))
    out.write_text("".join(f"{f}\n" for f in ordered))
    print(f"{len(ordered)} functions of the sidecar ran, in {len(profiles)} profiles; written to {out}")


def med(results, setup, mode, key):
    vals = [r[key] for r in results.get((setup, mode), []) if key in r]
    return statistics.median(vals) if vals else float("nan")


def setups(args):
    """The setups asked for, in their fixed order; `eastguard2` is the second `--sidecar` build."""
    asked = args.setups.split(",")
    if args.sidecar and "," in str(args.sidecar) and "eastguard" in asked and "eastguard2" not in asked:
        asked.append("eastguard2")
    return [x for x in ("direct", "nginx", "eastguard", "eastguard-h1", "eastguard2") if x in asked]


def report(results, args):
    workers = args.concurrency or "one per CPU"
    print(f"\neastguard workers: {workers}; allocator: {args.preload or 'glibc'}. Medians of {args.rounds} alternating rounds; {args.rate} req/s over {args.connections} connections for "
          f"{args.duration} s after {args.warmup} s of warm-up; saturation and churn {args.burst} s each; oha {subprocess.run([shutil.which('oha') or str(Path.home() / '.cargo/bin/oha'), '--version'], capture_output=True, text=True).stdout.strip()}")
    print(f"{'setup':<13} {'added p50 / p99 (µs)':>22} {'CPU ms/1000 req client / server':>33} {'VmHWM MiB client / server':>27} {'saturation rps':>15} {'churn rps':>10}")
    d50, d99 = med(results, "direct", "fixed", "p50"), med(results, "direct", "fixed", "p99")
    rows = {}
    for setup in setups(args):
        added = (med(results, setup, "fixed", "p50") - d50) * 1000, (med(results, setup, "fixed", "p99") - d99) * 1000
        cpu = med(results, setup, "fixed", "cpu_client"), med(results, setup, "fixed", "cpu_server")
        hwm = med(results, setup, "churn", "hwm_client"), med(results, setup, "churn", "hwm_server")
        sat, churn = med(results, setup, "saturation", "rps"), med(results, setup, "churn", "rps")
        rows[setup] = (added, cpu, hwm, sat, churn)
        print(f"{setup:<13} {added[0]:>10.0f} / {added[1]:<9.0f} {cpu[0]:>15.1f} / {cpu[1]:<15.1f} {hwm[0]:>12.1f} / {hwm[1]:<12.1f} {sat:>15.0f} {churn:>10.0f}")
    for setup in [x for x in setups(args) if x != "direct"]:
        if (setup, "idle") in results:
            print(f"{setup}: {med(results, setup, 'idle', 'kib'):.1f} KiB of client-side proxy RSS per idle keep-alive connection ({args.idle} held)")
    if args.policies > 1:
        print(f"the server workload had {args.policies} AuthorizationPolicies")
    for setup in [x for x in rows if x.startswith("eastguard")]:
        if "nginx" not in rows:
            break
        (na, nc, _, ns, nch), (ea, ec, eh, es, ech) = rows["nginx"], rows[setup]
        print(f"\n{setup} / nginx (issue 17's goals in brackets):")
        print(f"  CPU per request, client {ec[0] / nc[0]:.2f}, server {ec[1] / nc[1]:.2f}  [≤ 0.7]")
        print(f"  added latency p50 {ea[0] / na[0]:.2f}, p99 {ea[1] / na[1]:.2f}  [≤ 0.8]")
        print(f"  saturation {es / ns:.2f}  [≥ 1.2]; connection churn {ech / nch:.2f}  [≥ 1.0]")
        print(f"  peak RSS client {eh[0]:.1f} MiB, server {eh[1]:.1f} MiB  [≤ 12 MiB each]")

if __name__ == "__main__":
    main()
