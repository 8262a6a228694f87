"""The Grafana dashboards in deploy/grafana/ query only what the sidecars export: every metric and
every label a query (or a template variable) uses exists in a running sidecar pair's
`/stats/prometheus` after HTTP and TCP traffic, read with prometheus-client's own parser."""

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for

DASHBOARDS = sorted((Path(__file__).parent.parent / "deploy" / "grafana").glob("*.json"))
METRIC = re.compile(r"\b((?:istio|envoy|eastguard|pilot)_[a-z0-9_]+)\b")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-z0-9_]+)(?:\{[^}]*\})?\s*,\s*([a-zA-Z0-9_]+)\s*\)")
# PromQL functions and keywords that look like metric names are not; `le` is the bucket label.
NOT_LABELS = {"le"}


def queries(dashboard):
    """(where, expression) for every panel target and template variable."""
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            yield f"panel {p['title']!r}", t["expr"]
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable {v['name']}", q


def uses(expr):
    """(metrics, labels) an expression reads."""
    metrics = set(METRIC.findall(expr))
    labels = set(MATCHER.findall(expr))
    for group in GROUPING.findall(expr):
        labels |= {l.strip() for l in group.split(",") if l.strip()}
    for metric, label in LABEL_VALUES.findall(expr):
        metrics.add(metric)
        labels.add(label)
    return metrics, labels - NOT_LABELS


def exported(sidecars, urls=()):
    """Sample name → the label names seen on it, from every sidecar's /stats/prometheus (and
    other scrape URLs)."""
    seen = {}
    urls = [f"http://127.0.0.1:{s.admin_port}/stats/prometheus" for s in sidecars] + list(urls)
    for url in urls:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen.setdefault(sample.name, set()).update(sample.labels)
    return seen


def test_dashboards_exist_and_parse():
    assert {d.name for d in DASHBOARDS} >= {"mesh.json", "workload.json", "control-plane.json"}
    for d in DASHBOARDS:
        dash = json.loads(d.read_text())
        assert dash["uid"] and dash["panels"], d
        assert all(q for _, q in queries(dash)), d


def check(path, seen):
    dash = json.loads(path.read_text())
    checked = 0
    for where, expr in queries(dash):
        metrics, labels = uses(expr)
        for metric in metrics:
            assert metric in seen, f"{path.name} {where}: {metric} is not exported"
            missing = labels - seen[metric]
            assert not missing, f"{path.name} {where}: {metric} has no label(s) {sorted(missing)}"
            checked += 1
    assert checked >= 5, "the dashboard queries nothing this test can check"


SIDECAR_DASHBOARDS = [d for d in DASHBOARDS if d.name != "control-plane.json"]


@pytest.mark.parametrize("path", SIDECAR_DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_and_label_a_dashboard_uses_is_exported(tcp_mesh, path):
    m = tcp_mesh
    # HTTP and opaque TCP through the pair, so every family has samples.
    req = urllib.request.Request(m.url("/dash"), headers={"host": "server"})
    assert urllib.request.urlopen(req, timeout=10).status == 200
    with socket.create_connection(("127.0.0.1", m.tcp_port), timeout=10) as s:
        s.sendall(b"\x00\x01binary")
        assert s.recv(64)
    wait_for(
        "TCP metrics on both sidecars",
        lambda: all("istio_tcp_connections_closed_total" in exported([sc]) for sc in (m.client, m.server)),
    )
    check(path, exported([m.client, m.server]))


def test_the_control_plane_dashboard_reads_the_control_planes_metrics(tmp_path):
    from test_xds import XdsMesh

    from conftest import free_port

    http = free_port()
    m = XdsMesh(tmp_path, cp_extra=["--http-address", f"127.0.0.1:{http}"])
    try:
        wait_for("config from the control plane", lambda: m.get("/hello")[0] == 200)
        url = f"http://127.0.0.1:{http}/metrics"

        def value(name, **labels):
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                        return s.value
            return None

        wait_for("both sidecars connected", lambda: value("pilot_xds") == 2)
        assert value("pilot_xds_pushes", type="cds") >= 2
        assert value("pilot_total_xds_rejects", type="cds") == 0
        check(DASHBOARDS[[d.name for d in DASHBOARDS].index("control-plane.json")], exported([], [url]))
        # A cluster the proxies cannot build: their NACKs are counted.
        (m.config_dir / "bad-host.yaml").write_text(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: test}\n"
            "spec: {hosts: ['bad host!'], ports: [{number: 80, name: http, protocol: HTTP}], workloadSelector: {labels: {app: server}}}\n"
        )
        wait_for("the NACKs counted", lambda: value("pilot_total_xds_rejects", type="cds") >= 2)
    finally:
        m.stop()


def test_a_misspelt_metric_or_label_is_caught():
    # The checker itself: a query naming what no sidecar exports must fail it.
    seen = {"istio_requests_total": {"reporter", "destination_workload"}}
    metrics, labels = uses('sum by (destination_wrkload) (rate(istio_requests_total{reporter="source"}[1m]))')
    assert metrics == {"istio_requests_total"}
    assert labels - seen["istio_requests_total"] == {"destination_wrkload"}
    metrics, _ = uses("rate(istio_request_total[1m])")
    assert not metrics <= set(seen)
    m, l = uses('label_values(istio_requests_total{destination_workload_namespace="$namespace"}, destination_workload)')
    assert m == {"istio_requests_total"} and l == {"destination_workload_namespace", "destination_workload"}
