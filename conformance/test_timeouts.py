"""Timeouts of DESIGN §5, each shown by behaviour: what the caller gets (status, body, response
flag), the counter that names the reason, and a positive control in the same test."""

import http.client
import socket
import time

import pytest

from conftest import Mesh, stat, wait_for


def get(mesh, path, timeout=20):
    c = http.client.HTTPConnection("127.0.0.1", mesh.outbound_port, timeout=timeout)
    try:
        c.request("GET", path, headers={"host": "server"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def last_record(sidecar, path):
    wait_for(f"{sidecar.name} logs {path}", lambda: any(r["path"] == path for r in sidecar.log_records()))
    return [r for r in sidecar.log_records() if r["path"] == path][-1]


@pytest.fixture
def route_timeout_mesh(tmp_path, upstream):
    m = Mesh(tmp_path, upstream.port)
    vhost = m.client.config["listeners"][0]["filter_chains"][0]["http_connection_manager"]["route_config"]["virtual_hosts"][0]
    vhost["routes"][0]["route"]["timeout"] = "1s"
    m.client.rewrite()
    m.start()
    yield m
    m.stop()


def test_route_timeout_answers_504_ut(route_timeout_mesh):
    mesh = route_timeout_mesh
    assert get(mesh, "/fast?delay=0.1")[0] == 200  # positive control: under the timeout
    before = stat(mesh.client, "upstream_rq_timeout")
    started = time.time()
    status, body = get(mesh, "/slow?delay=4")
    elapsed = time.time() - started
    assert (status, body) == (504, b"upstream request timeout"), (status, body)
    assert 0.9 < elapsed < 3.5, elapsed
    assert stat(mesh.client, "upstream_rq_timeout") == before + 1
    rec = last_record(mesh.client, "/slow?delay=4")
    assert rec["response_code"] == 504 and rec["response_flags"] == "UT", rec


class Blackhole:
    """A listener whose accept queue is full: a connect to it neither succeeds nor is refused
    (the kernel drops the SYN), which is what an unreachable upstream looks like."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        probe = socket.socket()
        probe.settimeout(0.5)
        with pytest.raises(TimeoutError):
            probe.connect(("127.0.0.1", self.port))
        probe.close()

    def close(self):
        self.filler.close()
        self.listener.close()


@pytest.fixture
def connect_timeout_mesh(tmp_path, upstream):
    hole = Blackhole()
    m = Mesh(tmp_path, upstream.port)
    for c in m.client.config["clusters"]:
        c["connect_timeout"] = "1s"
    # The second vhost's cluster points at the blackhole.
    m.client.config["clusters"][1]["endpoints"] = [f"127.0.0.1:{hole.port}"]
    m.client.rewrite()
    m.start()
    yield m
    m.stop()
    hole.close()


def test_connect_timeout_answers_503_uf(connect_timeout_mesh):
    mesh = connect_timeout_mesh
    assert get(mesh, "/reachable")[0] == 200  # positive control: the same sidecar, a reachable peer
    before = stat(mesh.client, "upstream_cx_connect_timeout")
    c = http.client.HTTPConnection("127.0.0.1", mesh.outbound_port, timeout=20)
    started = time.time()
    c.request("GET", "/hole", headers={"host": "wrong-id"})
    r = c.getresponse()
    body = r.read()
    elapsed = time.time() - started
    assert r.status == 503, (r.status, body)
    assert body.startswith(b"upstream connect error") and b"connection timeout" in body, body
    assert 0.9 < elapsed < 3.5, elapsed
    assert stat(mesh.client, "upstream_cx_connect_timeout") == before + 1
    rec = last_record(mesh.client, "/hole")
    assert rec["response_code"] == 503 and rec["response_flags"] == "UF", rec


@pytest.fixture
def header_timeout_mesh(tmp_path, upstream):
    m = Mesh(tmp_path, upstream.port, client_extra={"limits": {"header_read_timeout": "1s"}}).start()
    yield m
    m.stop()


def test_header_read_timeout_closes_a_slow_header_sender(header_timeout_mesh):
    """Slowloris: request headers that never finish hold a connection only until the header read
    timeout, while a complete request on another connection is served."""
    mesh = header_timeout_mesh
    slow = socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=10)
    slow.sendall(b"GET /slowloris HTTP/1.1\r\nhost: server\r\nx-a: 1\r\n")
    started = time.time()
    assert get(mesh, "/meanwhile")[0] == 200  # positive control, while the slow one is open
    for i in range(20):  # trickle more header lines, never the end of the head
        try:
            slow.sendall(f"x-b{i}: 1\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            break
        if time.time() - started > 0.8:
            break
        time.sleep(0.1)
    try:
        rest = slow.recv(65536)
    except ConnectionResetError:
        rest = b""
    elapsed = time.time() - started
    slow.close()
    # The proxy answers 408 or closes without a response; it never forwards the partial request.
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]
    assert 0.9 < elapsed < 5, elapsed
    assert not any(r["path"] == "/slowloris" for r in mesh.server.log_records())
    assert stat(mesh.client, "downstream_rq_header_timeout") == 1
