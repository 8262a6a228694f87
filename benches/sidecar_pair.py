#!/usr/bin/env python3
"""Load harness: the same fixed-rate HTTP/1.1 load sent directly to an upstream and through a
client sidecar → mTLS → server sidecar pair. Prints p50/p90/p99 latency for both, the sidecars'
CPU milliseconds per 1000 requests and their RSS.

Usage (from the repo root, after `cargo build --release -p eastguard -p eastguard-benches`, or let
it build): .venv/bin/python benches/sidecar_pair.py [--rate 1000] [--connections 16] [--duration 20]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conformance"))

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * 1000 / CLK_TCK


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loadgen(port, args):
    out = subprocess.run(
        [str(ROOT / "target/release/loadgen"), "run", "--target", f"127.0.0.1:{port}", "--host", "server",
         "--rate", str(args.rate), "--connections", str(args.connections), "--duration", str(args.duration)],
        capture_output=True, text=True, timeout=args.duration + 60, check=True,
    )
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--inventory", choices=["on", "off"], default="on", help="the sidecars' API inventory (inventory.enabled)")
    ap.add_argument("--concurrency", type=int, default=None, help="the sidecars' worker threads (eastguard proxy --concurrency)")
    ap.add_argument("--tracing", type=float, default=None, metavar="PERCENT",
                    help="tracing on both sidecars at this sampling percent, exporting to an OTLP receiver in this script")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "eastguard", "-p", "eastguard-benches"], cwd=ROOT, check=True)
    os.environ["EASTGUARD_BIN"] = str(ROOT / "target/release/eastguard")
    import conftest

    upstream_port = conftest.free_port()
    upstream = subprocess.Popen(
        [str(ROOT / "target/release/loadgen"), "serve", "--listen", f"127.0.0.1:{upstream_port}", "--size", "1024"],
        stdout=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp(prefix="eastguard-bench-"))
    collector = None
    if args.tracing is not None:
        from test_tracing import Collector

        collector = Collector()
    # The access log is off for the benchmark, as in a default Istio install.
    mesh = conftest.Mesh(work, upstream_port)
    for sc in (mesh.client, mesh.server):
        sc.config.pop("access_log")
        sc.config["inventory"] = {"enabled": args.inventory == "on"}
        if collector is not None:
            sc.config["tracing"] = {"address": f"127.0.0.1:{collector.port}", "sampling": args.tracing}
        if args.concurrency is not None:
            sc.args = ["--concurrency", str(args.concurrency)]
        import yaml

        sc.config_path.write_text(yaml.safe_dump(sc.config))
    mesh.start()
    try:
        time.sleep(0.5)
        direct = loadgen(upstream_port, args)
        pids = {"client": mesh.client.proc.pid, "server": mesh.server.proc.pid}
        cpu0 = {k: cpu_ms(p) for k, p in pids.items()}
        via = loadgen(mesh.outbound_port, args)
        cpu1 = {k: cpu_ms(p) for k, p in pids.items()}
        # The loadgen's 2 s warm-up is load too: charge CPU to every request sent.
        sent = via["requests"] + args.rate * 2
        rows = [
            ("direct", direct, "-", "-"),
            ("via sidecar pair", via,
             " / ".join(f"{(cpu1[k] - cpu0[k]) * 1000 / sent:.1f}" for k in ("client", "server")),
             " / ".join(f"{rss_mib(p):.1f}" for p in pids.values())),
        ]
        tracing = "off" if collector is None else f"{args.tracing:g} %"
        workers = "one per CPU" if args.concurrency is None else str(args.concurrency)
        print(f"\nHTTP/1.1, 1 KB responses, {args.rate} req/s fixed rate, {args.connections} connections, {args.duration} s measured, inventory {args.inventory}, tracing {tracing}, workers {workers}")
        print(f"{'path':<18} {'requests':>8} {'errors':>6} {'rps':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}  {'CPU ms/1000 req (client/server)':>32}  {'RSS MiB (client/server)':>24}")
        for name, r, cpu, rss in rows:
            print(f"{name:<18} {r['requests']:>8} {r['errors']:>6} {r['achieved_rps']:>7.0f} {r['p50_ms']:>7.3f} {r['p90_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['max_ms']:>7.3f}  {cpu:>32}  {rss:>24}")
        if collector is not None:
            time.sleep(1.5)  # the last batch
            dropped = sum(conftest.stat(sc, "tracing.opentelemetry.spans_dropped") for sc in (mesh.client, mesh.server))
            print(f"spans received by the OTLP receiver: {len(collector.spans)}, dropped by the sidecars: {dropped}")
    finally:
        mesh.stop()
        upstream.terminate()
        upstream.wait()
        if collector is not None:
            collector.stop()


if __name__ == "__main__":
    main()
