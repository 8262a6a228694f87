"""Path-template inference on traffic nobody here wrote (issue 14): httpbin — the app Istio's own
samples use — behind a sidecar, driven through the mesh by schemathesis from httpbin's own spec.

Ground truth comes from the spec and the server sidecar's access log: each request that reached
httpbin is matched to the spec operation whose path pattern it fits. Precision is the share of
inferred (method, template) pairs that are exactly a spec operation (parameters in the same
places, names ignored); recall is the share of exercised spec operations inferred exactly. Both
must be at least 0.95; the figures are printed (the README records them)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Mesh, free_port, http_get, listening, wait_for

# Operations that take seconds per call by design (delays, drips, streams) are left out of the
# run, so the test stays bounded; everything else in httpbin's spec is exercised.
SLOW = r"^/(delay|drip|stream|stream-bytes|range)(/|$)"
GOAL = 0.95


@pytest.fixture
def httpbin(tmp_path):
    port = free_port()
    code = (
        "import sys, logging; from werkzeug.serving import run_simple; from httpbin import app;"
        "logging.getLogger('werkzeug').setLevel(logging.ERROR);"
        f"run_simple('127.0.0.1', {port}, app, threaded=True)"
    )
    log = open(tmp_path / "httpbin.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
    try:
        wait_for("httpbin listening", lambda: proc.poll() is None and listening(port), limit=30)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def norm(path):
    return re.sub(r"\{[^}/]*\}", "{}", path.rstrip("/") or "/")


def pattern(path):
    return re.compile("^" + re.sub(r"\\\{[^}/]*\\\}", "[^/]+", re.escape(path.rstrip("/") or "/")) + "/?$")


def test_httpbin_operations_are_inferred_from_schemathesis_traffic(tmp_path, httpbin):
    schemathesis = str(Path(sys.executable).with_name("schemathesis"))
    code, spec_text = http_get(f"http://127.0.0.1:{httpbin}/spec.json", timeout=10)
    assert code == 200, spec_text
    spec = json.loads(spec_text)
    spec_path = tmp_path / "httpbin.json"
    spec_path.write_text(spec_text)
    ops = [
        (m.upper(), p)
        for p, item in spec["paths"].items()
        for m in item
        if m in ("get", "put", "post", "delete", "patch", "head", "options") and not re.match(SLOW, p)
    ]
    mesh = Mesh(tmp_path, httpbin, server_extra={"inventory": {"max_templates": 512}}).start()
    try:
        run = subprocess.run(
            [schemathesis, "run", str(spec_path), "--url", mesh.url("").rstrip("/"),
             "-H", "Host: server", "--exclude-path-regex", SLOW, "--mode", "positive",
             "-n", "25", "--seed", "14", "--max-time", "120", "--request-timeout", "10",
             "--max-redirects", "0", "-w", "1", "--no-color", "--warnings", "off",
             "--phases", "examples,coverage,fuzzing", "--generation-database", "none"],
            capture_output=True, text=True, timeout=300,
            # Its caches (replayed failures, examples) go to the test's own directory: every run,
            # here or on a fresh machine, starts from the same nothing.
            cwd=tmp_path,
        )
        # The run's verdict on httpbin is not this test's concern; that it sent traffic is.
        assert "operations" in run.stdout.lower() or "test cases" in run.stdout.lower(), run.stdout + run.stderr
        code, body = http_get(mesh.server.admin("/apis"), timeout=10)
        assert code == 200, body
        inventory = json.loads(body)
        records = mesh.server.log_records()
    finally:
        mesh.stop()

    # Ground truth: the spec operation each request that reached httpbin was.
    patterns = [(m, p, pattern(p)) for m, p in ops]
    exercised = set()
    for r in records:
        if r.get("upstream_cluster") in (None, "-") or not r.get("path"):
            continue
        path = r["path"].split("?")[0]
        method = r.get("method")
        # The most literal matching operation (fewest parameters), as routing would pick.
        fits = [(norm(p).count("{}"), p) for m, p, rx in patterns if m == method and rx.match(path)]
        if fits:
            exercised.add((method, norm(min(fits)[1])))
    # Inferred operations, of the calls the spec describes: a template some spec path with that
    # method fits (schemathesis also sends methods a path does not have, to check for 405s).
    def described(method, template):
        concrete = re.sub(r"\{[^}/]*\}", "p", template)
        return any(m == method and rx.match(concrete) for m, _, rx in patterns)

    inferred = {
        (row["method"], norm(row["template"]))
        for row in inventory["rows"]
        if row["template"] != "{overflow}" and described(row["method"], row["template"])
    }
    hit = inferred & exercised
    precision = len(hit) / max(len(inferred), 1)
    recall = len(hit) / max(len(exercised), 1)
    print(f"\nhttpbin through the mesh: {len(records)} requests, {len(exercised)} of {len(ops)} spec operations "
          f"exercised, {len(inferred)} (method, template) inferred for them; precision {precision:.3f}, recall {recall:.3f}")
    print("inferred, not in the spec:", sorted(inferred - exercised))
    print("exercised, not inferred:", sorted(exercised - inferred))
    assert len(exercised) >= 0.8 * len(ops), (len(exercised), len(ops))
    assert precision >= GOAL and recall >= GOAL, (precision, recall, sorted(inferred - exercised), sorted(exercised - inferred))
