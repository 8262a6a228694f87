"""`eastguard policy translate` and `policy check` as a user runs them: every non-CUSTOM istiod golden
case through the CLI, compared with the expected filters as parsed YAML trees (Python's parser)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, binary

SHARED = Path(os.environ.get("EASTGUARD_SHARED", ROOT.parent / "shared")) / "conformance" / "istio-authz"


def cases():
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            raise RuntimeError(f"istio-authz corpus missing at {SHARED}")
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason=f"!!! SKIPPING: istio-authz corpus missing at {SHARED}"))]
    table = json.loads((SHARED / "cases.json").read_text())
    out = []
    for kind in ("http", "tcp"):
        for c in table[kind]:
            out.append(pytest.param(kind, c, table, id=f"{kind}/{c['name']}"))
    return out


@pytest.mark.parametrize("kind,case,table", cases())
def test_translate_matches_istiod(kind, case, table):
    labels = ",".join(f"{k}={v}" for k, v in table["proxy"]["labels"].items())
    cmd = [binary(), "policy", "translate", "--namespace", table["proxy"]["namespace"], "--workload-labels", labels,
           "--trust-domain", case["trust_domain"], "--root-namespace", table["root_namespace"]]
    for a in case["trust_domain_aliases"]:
        cmd += ["--trust-domain-alias", a]
    if kind == "tcp":
        cmd.append("--tcp")
    cmd.append(str(SHARED / kind / case["input"]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if "extension_provider" in case:
        assert out.returncode != 0 and "CUSTOM" in out.stderr, out.stderr
        return
    assert out.returncode == 0, out.stderr
    got = yaml.safe_load(out.stdout) or []
    want = [yaml.safe_load((SHARED / kind / w).read_text()) for w in case["want"]]
    assert got == want


def test_check_exit_codes(tmp_path):
    (tmp_path / "p.yaml").write_text(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-deny-admin, namespace: demo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-allow-orders, namespace: demo}
spec:
  selector: {matchLabels: {app: ledger}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/orders"]}}]}]
"""
    )
    base = [binary(), "policy", "check", "--policies", str(tmp_path), "--namespace", "demo", "--workload-labels", "app=ledger"]
    orders = ["--principal", "spiffe://cluster.local/ns/demo/sa/orders"]
    run = lambda *a: subprocess.run(base + list(a), capture_output=True, text=True, timeout=30)
    r = run(*orders, "--path", "/entries")
    assert r.returncode == 0 and r.stdout.startswith("ALLOW") and "ledger-allow-orders" in r.stdout
    r = run(*orders, "--path", "/public/../admin")
    assert r.returncode == 3 and "ledger-deny-admin" in r.stdout
    r = run("--principal", "spiffe://cluster.local/ns/demo/sa/frontend", "--path", "/entries")
    assert r.returncode == 3 and "no ALLOW policy matched" in r.stdout
    r = run(*orders, "--path", "no-slash")
    assert r.returncode == 1 and "--path" in r.stderr
