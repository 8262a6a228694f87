#!/usr/bin/env python3
"""Capture benchmark: the same pod-to-pod scenario (pod A's app → A's sidecar → mTLS → B's
sidecar → B's app, in network namespaces) with iptables REDIRECT capture and with eBPF capture.
The app side is unmodified: it connects to B's pod IP and capture sends it through the sidecars.

Figures, per capture mode (loadgen runs inside A's app cgroup and network namespace); a run
fails unless every phase had zero failed requests and both sidecars served every request:
  - connection setup: closed loop of connect, one GET, close (`loadgen connrate`), per second;
  - latency p50 / p99 at a fixed rate on keep-alive connections (`loadgen run`, fortio's method);
  - throughput: 1 MiB responses back to back on keep-alive connections (`loadgen throughput`).

Root only. Usage, from the repo root (builds release binaries unless --no-build):
  sudo .venv/bin/python benches/capture.py [--rate 1000] [--duration 10] [--rounds 2]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conformance"))
LOADGEN = ROOT / "target/release/loadgen"


def loadgen(cluster, args, timeout):
    r = cluster.exec("a", "app", [LOADGEN, *args], timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen {args}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def served_2xx(cluster, pod, prefix):
    """2xx responses a pod's sidecar has served on its `prefix` connection manager."""
    code, body = cluster.admin(pod, "/stats")
    if code != 200:
        raise RuntimeError(f"{pod}'s sidecar admin: {code}")
    name = f"http.{prefix}.downstream_rq_2xx"
    return sum(int(line.rsplit(": ", 1)[1]) for line in body.splitlines() if line.rsplit(": ", 1)[0] == name)


def measured(cluster, mode, phase, args, timeout, count_key):
    """Runs one loadgen phase and checks it is a valid measurement: no failed request, and every
    request went through both sidecars (A's outbound and B's inbound counted at least as many 2xx
    as loadgen saw), so the figure is not that of a bypass."""
    before = served_2xx(cluster, "a", "outbound_http"), served_2xx(cluster, "b", "inbound_http")
    r = loadgen(cluster, args, timeout)
    after = served_2xx(cluster, "a", "outbound_http"), served_2xx(cluster, "b", "inbound_http")
    if r.get("errors", 0) != 0:
        raise RuntimeError(f"{mode} {phase}: {r['errors']} failed requests: {r}")
    n = r[count_key]
    through = after[0] - before[0], after[1] - before[1]
    if n == 0 or min(through) < n:
        raise RuntimeError(f"{mode} {phase}: loadgen saw {n} responses, the sidecars served {through}: traffic bypassed them")
    return r


def one_mode(mode, args, netpods):
    tmp = Path(tempfile.mkdtemp(prefix=f"eastguard-capture-{mode}-"))
    c = netpods.Cluster(tmp, capture=mode)
    c.short_circuit = args.short_circuit == "on"
    try:
        c.prepare(bpffs=mode == "ebpf")
        target = f"{netpods.ip4('b')}:{netpods.APP_PORT}"
        serve = [LOADGEN, "serve", "--listen", f"0.0.0.0:{netpods.APP_PORT}", "--size", "1024"]
        c.start_pods(b_app=serve)
        if mode == "iptables":
            c.iptables()
        else:
            c.write_registry(["a", "b"])
            c.start_agent(poll_ms=args.agent_poll_ms)
            c.wait_attached(["a", "b"])
        rc, out = c.curl("a", f"http://{target}/")
        if rc != 0:
            raise RuntimeError(f"{mode}: pod A cannot reach pod B through the sidecars: {out}")
        d = args.duration
        conn = measured(c, mode, "connrate", ["connrate", "--target", target, "--workers", "4", "--duration", str(d)], d + 30, "connections")
        lat = measured(
            c, mode, "latency", ["run", "--target", target, "--rate", str(args.rate), "--connections", "16", "--duration", str(d)], d + 30, "requests"
        )
        # Throughput: B's app answers 1 MiB.
        app = c.b_app_proc
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=10)
        c.spawn("b", "app", [LOADGEN, "serve", "--listen", f"0.0.0.0:{netpods.APP_PORT}", "--size", str(1 << 20)], tmp / "b-app-big.log")
        deadline = time.time() + 10
        while c.curl("a", f"http://{target}/")[0] != 0:
            if time.time() > deadline:
                raise RuntimeError(f"{mode}: B's 1 MiB app did not come up")
            time.sleep(0.1)
        thr = measured(c, mode, "throughput", ["throughput", "--target", target, "--connections", "4", "--duration", str(d)], d + 30, "requests")
        counters = c.capture_status() if mode == "ebpf" else {}
        return {
            "mode": mode,
            "connections_per_s": conn["connections_per_s"],
            "connect_p50_ms": conn["p50_ms"],
            "connect_p99_ms": conn["p99_ms"],
            "connect_errors": conn["errors"],
            "rate": lat["rate"],
            "achieved_rps": lat["achieved_rps"],
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "latency_errors": lat["errors"],
            "throughput_mb_s": thr["mbytes_per_s"],
            "ebpf_counters": {k: v["counters"] for k, v in counters.items()},
        }
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="iptables, eBPF, iptables, eBPF, …")
    ap.add_argument("--short-circuit", choices=["on", "off"], default="on", help="sockops/sk_msg app<->sidecar short-circuit")
    ap.add_argument("--agent-poll-ms", type=int, default=1000, help="node-agent reconcile interval")
    ap.add_argument("--modes", default="iptables,ebpf")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benches/capture.py needs root (network namespaces, cgroups, eBPF, iptables)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "eastguard", "-p", "eastguard-benches"], cwd=ROOT, check=True)
    os.environ["EASTGUARD_BIN"] = str(ROOT / "target/release/eastguard")
    import netpods

    results = []
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            r = one_mode(mode, args, netpods)
            print(json.dumps(r), flush=True)
            results.append(r)
    keys = [
        ("connections_per_s", "connections/s", max),
        ("connect_p50_ms", "connect+GET p50 ms", min),
        ("connect_p99_ms", "connect+GET p99 ms", min),
        ("p50_ms", f"p50 ms @ {args.rate} rps", min),
        ("p99_ms", f"p99 ms @ {args.rate} rps", min),
        ("throughput_mb_s", "throughput MB/s", max),
    ]
    print()
    print(f"| figure (median of {args.rounds}) | iptables REDIRECT | eBPF |")
    print("|---|---|---|")
    for key, label, _ in keys:
        row = []
        for mode in ("iptables", "ebpf"):
            vals = sorted(r[key] for r in results if r["mode"] == mode) or [float("nan")]
            row.append(vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2)
        print(f"| {label} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
