"""The Envoy-compatible admin API, Istio metrics, config errors, and the demo."""

import json
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import CLIENT_ID, SERVER_ID, binary, http_get, wait_for


def post(url):
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_prometheus_parses_and_carries_istio_labels(mesh):
    for _ in range(3):
        req = urllib.request.Request(mesh.url("/m"), headers={"host": "server"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and b"canary" in r.read()
    families = {}

    def counted_all():
        # Each request is counted when its response ends, which can be just after the client read it.
        for side, sidecar in [("client", mesh.client), ("server", mesh.server)]:
            status, text = http_get(sidecar.admin("/stats/prometheus"))
            assert status == 200
            families[side] = {f.name: f for f in text_string_to_metric_families(text)}
        for side in ("client", "server"):
            family = families[side].get("istio_requests")
            if family is None or sum(s.value for s in family.samples if s.labels["response_code"] == "200") < 3:
                return False
        return True

    wait_for("3 requests counted on both sides", counted_all)
    out = families["client"]["istio_requests"].samples
    inbound = families["server"]["istio_requests"].samples
    assert [s.labels["response_code"] for s in out] == ["200"], out
    o = out[0]
    assert o.labels["reporter"] == "source" and o.value == 3
    assert o.labels["source_principal"] == CLIENT_ID and o.labels["destination_principal"] == SERVER_ID
    assert o.labels["destination_workload"] == "server" and o.labels["source_workload"] == "client"
    i = [s for s in inbound if s.labels["response_code"] == "200"][0]
    assert i.labels["reporter"] == "destination" and i.value == 3
    assert i.labels["connection_security_policy"] == "mutual_tls"
    assert i.labels["source_principal"] == CLIENT_ID and i.labels["source_workload"] == "client"
    for name in ["istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"]:
        assert name in families["server"], name
    for label in ["response_flags", "grpc_response_status", "destination_service", "source_workload_namespace"]:
        assert label in i.labels


def test_config_dump_is_json_without_keys(mesh):
    status, text = http_get(mesh.client.admin("/config_dump"))
    assert status == 200
    dump = json.loads(text)
    types = [c["@type"] for c in dump["configs"]]
    assert "type.googleapis.com/envoy.admin.v3.ListenersConfigDump" in types
    assert "type.googleapis.com/envoy.admin.v3.ClustersConfigDump" in types
    assert "PRIVATE KEY" not in text and mesh.client_key.read_text().splitlines()[1] not in text
    # Static listeners and clusters are Envoy messages written by the descriptor codec.
    listeners = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
    l = listeners["static_listeners"][0]["listener"]
    assert l["@type"] == "type.googleapis.com/envoy.config.listener.v3.Listener" and l["traffic_direction"] == "OUTBOUND"
    hcm = l["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["@type"].endswith("HttpConnectionManager") and hcm["route_config"]["virtual_hosts"]
    clusters = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
    tls = clusters["static_clusters"][0]["cluster"]["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert "error" not in json.dumps([c for c in dump["configs"] if not c["@type"].endswith("SecretsConfigDump")])


def test_listeners_clusters_server_info_ready(mesh):
    status, text = http_get(mesh.client.admin("/listeners?format=json"))
    ls = json.loads(text)["listener_statuses"]
    assert ls[0]["name"] == "virtualOutbound"
    assert ls[0]["local_address"]["socket_address"]["port_value"] == mesh.outbound_port
    status, text = http_get(mesh.client.admin("/listeners"))
    assert f"virtualOutbound::127.0.0.1:{mesh.outbound_port}" in text
    status, text = http_get(mesh.client.admin("/clusters"))
    assert f"outbound|80||server::127.0.0.1:{mesh.inbound_port}::health_flags::healthy" in text
    info = json.loads(http_get(mesh.client.admin("/server_info"))[1])
    assert info["state"] == "LIVE"
    assert info["version"].startswith("eastguard/") and info["node"]["id"] == "client"
    memory = json.loads(http_get(mesh.client.admin("/memory"))[1])
    rss = int(open(f"/proc/{mesh.client.proc.pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
    assert 0 < int(memory["allocated"]) <= int(memory["total_physical_bytes"])
    assert abs(int(memory["total_physical_bytes"]) - rss) < rss // 2  # the same process, read moments apart
    assert http_get(mesh.client.admin("/ready")) == (200, "LIVE\n")
    stats = http_get(mesh.client.admin("/stats"))[1]
    assert "cluster.outbound|80||server.upstream_rq_total:" in stats


def test_mutations_are_post_only(mesh):
    for path in ["/quitquitquit", "/healthcheck/fail", "/healthcheck/ok", "/logging"]:
        assert http_get(mesh.client.admin(path))[0] == 405, path
    assert post(mesh.client.admin("/healthcheck/fail"))[0] == 200
    assert http_get(mesh.client.admin("/ready"))[0] == 503
    assert post(mesh.client.admin("/healthcheck/ok"))[0] == 200
    assert http_get(mesh.client.admin("/ready"))[0] == 200
    assert post(mesh.client.admin("/logging?level=debug"))[0] == 200
    assert post(mesh.client.admin("/logging?level=loud"))[0] == 400
    # Envoy's drain_listeners keeps the process; ours would exit, so it is refused, not faked.
    assert post(mesh.client.admin("/drain_listeners"))[0] == 501
    assert http_get(mesh.client.admin("/ready"))[0] == 200
    assert post(mesh.client.admin("/quitquitquit"))[0] == 200
    assert mesh.client.proc.wait(timeout=15) == 0


def test_bad_config_names_field_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "node: {id: a, workload: a, namespace: n}\n"
        "admin: {address: '127.0.0.1:1'}\n"
        "identity: {files: {cert: c, key: k, bundle: b}}\n"
        "listeners:\n"
        "  - name: l\n"
        "    address: '127.0.0.1:2'\n"
        "    direction: SIDEWAYS\n"
        "    filter_chains: []\n"
    )
    out = subprocess.run([binary(), "proxy", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "listeners[0].direction" in out.stderr and "line 7" in out.stderr, out.stderr
    out = subprocess.run([binary(), "proxy", "--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "missing.yaml" in out.stderr


def test_demo_once_exits_zero_with_every_hop_mtls(tmp_path):
    out = subprocess.run([binary(), "demo", "--once", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 10 expectations held" in out.stdout
    # The sidecars' API inventory: the orders operation as a template, with its verified caller.
    assert "API inventory (each sidecar" in out.stdout
    assert any("/orders/{id}" in l and "sa/frontend" in l and "2xx" in l for l in out.stdout.partition("API inventory (each sidecar")[2].splitlines()), out.stdout
    assert out.stdout.count("admin: http://127.0.0.1:") == 3
    # The control plane's inventory, against the orders spec: one line per status.
    cp = out.stdout.partition("API inventory at the control plane")[2].splitlines()
    def line(status, method, template):
        return [l for l in cp if l.split()[:1] == [status] and f" {method} " in l and f" {template} " in l]
    assert line("documented", "GET", "/orders/{id}") and "owner checkout" in line("documented", "GET", "/orders/{id}")[0], cp
    assert line("shadow", "GET", "/internal/debug/vars"), cp
    assert line("zombie", "GET", "/orders/{id}/receipt"), cp
    assert line("unused", "POST", "/orders") and "(not called)" in line("unused", "POST", "/orders")[0], cp
    ledger = [l for l in cp if "ledger.demo.svc.cluster.local" in l]
    assert ledger and all("(orphan)" in l for l in ledger), cp
    # Detections: the frontend's walk through order IDs, the card in the receipt (never its
    # value), and audit events (ledger's denials among them).
    detections = out.stdout.partition("Detections (")[2]
    assert "enumeration (sequential_walk) of GET /orders/{id} by spiffe://cluster.local/ns/demo/sa/frontend" in detections, detections
    assert "sensitive data: payment_card in the response of GET /orders/{id}/receipt at body:/payment/card" in detections, detections
    assert "4111" not in detections
    ledger_audit = [l for l in detections.splitlines() if "ledger" in l and "OCSF audit events" in l]
    assert ledger_audit and int(ledger_audit[0].split()[1]) >= 4, detections
    table = out.stdout.partition("API inventory (each sidecar")[0]
    rows = [line for line in table.splitlines() if "spiffe://" in line]
    assert len(rows) == 10 and all(line.rstrip().endswith("ok") for line in rows)
    denied = [r for r in rows if " 403 " in r]
    assert len(denied) == 4 and sum("ledger-deny-admin" in r for r in denied) == 3


def test_concurrency_sets_the_worker_threads(tmp_path, upstream):
    """`eastguard proxy --concurrency N` (Envoy's flag; Istio runs sidecars with 2) runs N
    data-plane worker threads beside one control thread, and traffic flows; an out-of-range value
    is refused by the CLI."""
    import subprocess
    from pathlib import Path

    from conftest import Mesh, binary

    def threads(pid, name):
        return sum(1 for t in Path(f"/proc/{pid}/task").iterdir() if (t / "comm").read_text().strip().startswith(name))

    for n in (1, 3):
        (tmp_path / str(n)).mkdir()
        m = Mesh(tmp_path / str(n), upstream.port)
        m.client.args = ["--concurrency", str(n)]
        m.start()
        try:
            assert threads(m.client.proc.pid, "eg-worker-") == n
            assert threads(m.client.proc.pid, "eastguard-contr") == 1  # comm keeps 15 bytes
            req = urllib.request.Request(m.url(f"/workers/{n}"), headers={"host": "server"})
            assert urllib.request.urlopen(req, timeout=10).status == 200
        finally:
            m.stop()
    r = subprocess.run([binary(), "proxy", "--config", "x.yaml", "--concurrency", "0"], capture_output=True, text=True)
    assert r.returncode != 0 and "--concurrency" in r.stderr
