#!/usr/bin/env python3
"""Resident memory of a sidecar configured over xDS with an RBAC filter in force, then after
`/config_dump` (which builds the full Envoy descriptor pool). Usage, from the repo root, after
`cargo build --release --bin eastguard`:

  EASTGUARD_BIN=target/release/eastguard .venv/bin/python benches/rss_probe.py
"""

import sys, time, tempfile, pathlib
sys.path.insert(0, "conformance")
from test_xds import XdsMesh, DENY_ADMIN
from conftest import http_get

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024


def split(pid):
    """RssAnon (heap, stacks) and RssFile (mapped files: mostly the binary's code) in MiB."""
    fields = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
    kib = lambda k: int(fields[k].split()[0])
    return f"anonymous {kib('RssAnon') / 1024:.1f} MiB, file-backed {kib('RssFile') / 1024:.1f} MiB"

tmp = pathlib.Path(tempfile.mkdtemp())
m = XdsMesh(tmp)
try:
    (m.config_dir / "authz.yaml").write_text(DENY_ADMIN)
    deadline = time.time() + 10
    while m.get("/admin/x")[0] != 403 and time.time() < deadline:
        time.sleep(0.1)
    for _ in range(50):
        m.get("/orders")
    srv = m.sidecars["server"].proc.pid
    cp = m.cp.proc.pid
    print(f"RBAC in force: server sidecar RSS {rss(srv)} MiB ({split(srv)}), control plane {rss(cp)} MiB")
    http_get(m.sidecars["server"].admin("/config_dump"))
    print(f"after /config_dump (full descriptor pool built): server sidecar RSS {rss(srv)} MiB")
finally:
    m.stop()
