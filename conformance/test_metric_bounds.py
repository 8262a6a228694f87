"""Metric labels never come from what a caller writes (issue 12, item 12): the `Host` a caller
sends is not `destination_service`, claims a peer's sidecar makes about itself must look like
names, and past a cap the caller-influenced labels read `overflow`, so a caller spraying values
cannot grow `/stats/prometheus` without bound."""

import time

from prometheus_client.parser import text_string_to_metric_families

import pytest

from conftest import CLIENT_ID, Mesh, http_get, mtls_socket, stats

MAX_SERIES = 40


@pytest.fixture
def mesh(tmp_path, upstream):
    m = Mesh(tmp_path, upstream.port, server_extra={"limits": {"max_metric_series": MAX_SERIES}}).start()
    yield m
    m.stop()


def inbound_tls(mesh):
    return mtls_socket(mesh)


def send_all(mesh, requests):
    """Pipelines requests on one mTLS connection to the server sidecar; returns the statuses."""
    s = inbound_tls(mesh)
    s.sendall(b"".join(requests))
    data = b""
    while data.count(b"HTTP/1.1 ") < len(requests):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    s.close()
    return [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]


def inbound_samples(mesh, at_least=0):
    """The server's inbound request counts, once they add up to `at_least` (each is recorded when
    its response ends, which can be just after the client has read it)."""
    deadline = time.time() + 10
    while True:
        text = http_get(mesh.server.admin("/stats/prometheus"))[1]
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = [s for s in families["istio_requests"].samples if s.labels["reporter"] == "destination"]
        if sum(s.value for s in samples) >= at_least or time.time() > deadline:
            return text, samples
        time.sleep(0.05)


def test_host_header_is_not_a_label(mesh):
    statuses = send_all(mesh, [b"GET /h HTTP/1.1\r\nhost: sprayed-%d.example\r\n\r\n" % i for i in range(50)])
    assert statuses == [200] * 50
    text, samples = inbound_samples(mesh, at_least=50)
    assert "sprayed-" not in text
    assert {s.labels["destination_service"] for s in samples} == {"unknown"}
    assert sum(s.value for s in samples) >= 50  # control: they were counted


def test_sprayed_claims_hit_the_series_cap(mesh):
    # Implausible claims are not labels at all.
    assert send_all(mesh, [b"GET / HTTP/1.1\r\nhost: server\r\nx-eastguard-source-workload: Evil Name!\r\n\r\n"]) == [200]
    _, samples = inbound_samples(mesh)
    assert all(s.labels["source_workload"] != "Evil Name!" for s in samples)
    # Plausible ones count until the cap, then read `overflow`.
    n = MAX_SERIES + 60
    reqs = [b"GET / HTTP/1.1\r\nhost: server\r\nx-eastguard-source-workload: w%d\r\n\r\n" % i for i in range(n)]
    assert send_all(mesh, reqs) == [200] * n
    text, samples = inbound_samples(mesh, at_least=n + 1)
    distinct = {tuple(sorted(s.labels.items())) for s in samples}
    # The cap, plus the few overflow sets (one per status and flag combination).
    assert len(distinct) <= MAX_SERIES + 5, len(distinct)
    overflowed = [s for s in samples if s.labels["source_workload"] == "overflow"]
    assert overflowed and sum(s.value for s in overflowed) >= n - MAX_SERIES
    assert all(s.labels["source_principal"] == CLIENT_ID for s in overflowed)
    counted = stats(mesh.server)["eastguard.metric_series_overflow"]
    assert counted >= n - MAX_SERIES
