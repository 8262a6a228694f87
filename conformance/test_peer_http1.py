"""Keep-alive HTTP/1.1 between the sidecars: a peer cluster whose protocol is DOWNSTREAM (what the
control plane configures for an HTTP port, as istiod does without an h2 upgrade) carries an
HTTP/1.1 request as HTTP/1.1 on a pooled mTLS connection, one per request in flight, and an
HTTP/2 request as HTTP/2."""

import os
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import Mesh, stat
from test_xds import XdsMesh

CLUSTER = "outbound|80||server"


def cx_total(sidecar, cluster=CLUSTER):
    return stat(sidecar, f"cluster.{cluster}.upstream_cx_total")


def get(mesh, path="/pool"):
    req = urllib.request.Request(mesh.url(path), headers={"host": "server"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def get_h2c(mesh, path="/pool"):
    """One request as HTTP/2 with prior knowledge (h2c) to the client sidecar."""
    out = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "-H", "host: server", "-o", "/dev/null",
         "-w", "%{http_code} %{http_version}", mesh.url(path)],
        capture_output=True, text=True, timeout=15,
    )
    return out.stdout


@pytest.fixture
def http1_mesh(tmp_path, upstream):
    # One worker: one pool, so connection counts are exact.
    m = Mesh(tmp_path, upstream.port, peer_protocol="DOWNSTREAM", client_extra={})
    m.client.args = ["--concurrency", "1"]
    m.start()
    yield m
    m.stop()


def test_sequential_requests_reuse_one_connection(http1_mesh):
    for _ in range(5):
        status, body = get(http1_mesh)
        assert status == 200 and b"canary" in body
    assert cx_total(http1_mesh.client) == 1


def test_a_connection_per_request_in_flight_then_reused(http1_mesh, upstream):
    results = []

    def slow():
        try:
            results.append(get(http1_mesh, "/slow?delay=1")[0])
        except Exception as e:  # noqa: BLE001 - recorded, asserted below
            results.append(repr(e))

    threads = [threading.Thread(target=slow) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == [200] * 6
    # HTTP/1.1 has one request at a time per connection: six in flight took six connections.
    assert cx_total(http1_mesh.client) == 6
    for _ in range(6):
        assert get(http1_mesh)[0] == 200
    assert cx_total(http1_mesh.client) == 6, "idle pooled connections are reused"


def test_http2_requests_stay_http2(http1_mesh):
    assert get(http1_mesh)[0] == 200
    assert cx_total(http1_mesh.client) == 1
    # An HTTP/2 request goes on the multiplexed HTTP/2 connection, a second one.
    for _ in range(3):
        assert get_h2c(http1_mesh) == "200 2"
    assert cx_total(http1_mesh.client) == 2
    assert get(http1_mesh)[0] == 200
    assert cx_total(http1_mesh.client) == 2


def test_peer_closing_idle_connections_loses_no_request(tmp_path, upstream):
    # The server sidecar closes connections idle for 1 s; the client's pooled ones are then dead.
    m = Mesh(tmp_path, upstream.port, peer_protocol="DOWNSTREAM",
             server_extra={"limits": {"connection_idle_timeout": "1s"}})
    m.client.args = ["--concurrency", "1"]
    m.start()
    try:
        for i in range(4):
            assert get(m)[0] == 200
            time.sleep(1.5)  # the scenario: longer than the peer's idle timeout
        # Each request after an idle gap went on a new connection, none failed.
        assert cx_total(m.client) == 4
    finally:
        m.stop()


@pytest.mark.parametrize("policy", ["UPGRADE", "DO_NOT_UPGRADE"])
def test_control_plane_h2_upgrade_policy(tmp_path, policy):
    extra = () if policy == "UPGRADE" else ("--h2-upgrade-policy", policy)
    m = XdsMesh(tmp_path, cp_extra=extra)
    workers = len(os.sched_getaffinity(0))  # the sidecars' default: one worker per CPU
    try:
        client = m.sidecars["client"]
        cluster = "outbound|80||server.test.svc.cluster.local"
        assert m.get("/orders")[0] == 200
        results = []
        threads = [threading.Thread(target=lambda: results.append(m.get("/slow?delay=1")[0])) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert results == [200] * 8
        if policy == "UPGRADE":
            # The default: requests multiplexed on one HTTP/2 connection per worker.
            assert cx_total(client, cluster) <= workers
        else:
            # Istio's default: the registry's port is HTTP, so HTTP/1.1 rides HTTP/1.1 between the
            # sidecars, a connection per request in flight.
            assert cx_total(client, cluster) >= 8
    finally:
        m.stop()
