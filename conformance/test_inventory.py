"""API inventory (issue 14, first part): the server sidecar turns the inbound calls it serves into
path templates and rows per (service, method, template, verified caller, status class), shown on
its admin port at /apis; credentials are classified by scheme, never kept; everything is bounded."""

import json
import random
import string
import subprocess
import urllib.request

import pytest

from conftest import CLIENT_ID, Mesh, free_port, http_get, require_tool

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2VjcmV0LXNpZ25hdHVyZQ"
API_KEY = "k3y-do-not-store-7c1f"


def send(mesh, method, path, headers=None, body=None):
    req = urllib.request.Request(mesh.url(path), method=method, data=body, headers={"host": "server", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        r.read()


def apis(sidecar):
    code, body = http_get(sidecar.admin("/apis"))
    assert code == 200, body
    return json.loads(body)


@pytest.fixture
def inv_mesh(tmp_path, upstream):
    inventory = {"inventory": {"literal_fanout": 8, "max_templates": 40}}
    m = Mesh(tmp_path, upstream.port, server_extra=inventory).start()
    yield m
    m.stop()


def test_templates_rows_and_auth_schemes(inv_mesh):
    mesh = inv_mesh
    for i in range(1, 13):
        send(mesh, "GET", f"/orders/{i}")
    send(mesh, "GET", "/sessions/3f2b8c1e-9a4d-4e7b-8c2a-1f0e9d8c7b6a")
    send(mesh, "POST", "/orders", {"authorization": f"Bearer {JWT}", "content-type": "application/json"}, b'{"item": 1}')
    send(mesh, "GET", "/api/v1/status", {"x-api-key": API_KEY})
    for name in ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]:
        send(mesh, "GET", f"/users/{name}/profile")
    inv = apis(mesh.server)
    text = json.dumps(inv)
    templates = {t["template"] for t in inv["templates"]}
    assert {"/orders/{id}", "/sessions/{uuid}", "/orders", "/api/v1/status", "/users/{param}/profile"} <= templates, templates
    assert not any(t.startswith("/users/alice") for t in templates), "cardinality made the names one parameter"
    rows = {(r["method"], r["template"]): r for r in inv["rows"]}
    get_orders = rows[("GET", "/orders/{id}")]
    assert get_orders["calls"] == 12 and get_orders["caller"] == CLIENT_ID and get_orders["status_class"] == "2xx"
    assert get_orders["response_content_types"] == ["application/json"]
    post = rows[("POST", "/orders")]
    assert post["auth_schemes"] == ["bearer-jwt"] and post["request_content_types"] == ["application/json"]
    assert post["request_bytes"] == len(b'{"item": 1}')
    assert rows[("GET", "/api/v1/status")]["auth_schemes"] == ["api-key"]
    assert rows[("GET", "/users/{param}/profile")]["calls"] == 10
    # The scheme only: no credential reaches the inventory.
    assert JWT not in text and API_KEY not in text and "eyJ" not in text
    # The inventory is of calls served (inbound); the client sidecar records none.
    assert apis(mesh.client)["rows"] == []


def test_sprayed_paths_stay_bounded_and_overflow_is_counted(inv_mesh):
    mesh = inv_mesh
    rng = random.Random(7)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))  # noqa: E731
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", mesh.outbound_port, timeout=10)
    for _ in range(3000):
        depth = rng.randint(1, 8)
        conn.request("GET", "/" + "/".join(word() for _ in range(depth)), headers={"host": "server"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200
    conn.close()
    inv = apis(mesh.server)
    assert len(inv["templates"]) <= 40, len(inv["templates"])
    assert sum(r["calls"] for r in inv["rows"]) == 3000, "every call is counted, in a row or as overflow"
    assert all(len(e) <= 128 for t in inv["templates"] for e in t["examples"])
    assert all(len(t["examples"]) <= 3 for t in inv["templates"])
    print(f"3000 sprayed paths: {len(inv['templates'])} templates, {inv['overflow_calls']} overflow calls")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


# The README's worst case for the default bounds (`apisec::inventory` states the arithmetic).
DOCUMENTED_BOUND_MIB = 49


def test_a_hundred_thousand_sprayed_paths_stay_within_the_bound(tmp_path):
    """100,000 random word-like paths through the mesh (h2load, 4 connections): the server
    sidecar's inventory stays capped, the rest is counted as overflow, and its memory grows by less
    than the documented worst case. Nothing listens behind the server sidecar: every call is a
    quick 503, observed like any other."""
    h2load = require_tool("h2load")
    mesh = Mesh(tmp_path, free_port()).start()
    try:
        rng = random.Random(7)
        word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        uris = tmp_path / "uris.txt"
        uris.write_text("".join(
            f"http://127.0.0.1:{mesh.outbound_port}/{'/'.join(word() for _ in range(rng.randint(1, 4)))}\n"
            for _ in range(100_000)
        ))
        rss_before, _ = rss_kib(mesh.server.proc.pid)
        run = subprocess.run(
            [h2load, "--h1", "-i", str(uris), "-n", "100000", "-c", "4", "-H", ":authority: server", "-T", "30"],
            capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        done = [l for l in run.stdout.splitlines() if l.startswith("requests:")][0]
        assert "100000 total" in done and "100000 done" in done, run.stdout
        inv = apis(mesh.server)
        rss_after, peak = rss_kib(mesh.server.proc.pid)
    finally:
        mesh.stop()
    rows_calls = sum(r["calls"] for r in inv["rows"])
    templates = [t for t in inv["templates"] if t["template"] != "{overflow}"]
    growth_mib = (rss_after - rss_before) / 1024
    print(f"\n100,000 sprayed paths: {len(templates)} templates, {len(inv['rows'])} rows, "
          f"{inv['overflow_calls']} overflow calls; server sidecar RSS {rss_before // 1024} → "
          f"{rss_after // 1024} MiB (peak {peak // 1024} MiB), growth {growth_mib:.1f} MiB")
    assert rows_calls == 100_000, rows_calls  # every call is counted, in a row or the overflow row
    assert len(templates) <= 512 and len(inv["rows"]) <= 4096
    assert growth_mib < DOCUMENTED_BOUND_MIB, growth_mib
