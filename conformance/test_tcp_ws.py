"""Opaque TCP and WebSocket (HTTP/1.1 Upgrade) through the sidecar pair."""

import socket
import socketserver
import threading
import time

import pytest

from conftest import CLIENT_ID, SERVER_ID, Mesh, free_port, peer_cluster

TCP_SNI = "outbound_.9000_._.server.test.svc.cluster.local"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def tcp_mesh(tmp_path, upstream):
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    tcp_chain = {
        "name": "tcp-9000",
        "filter_chain_match": {"server_names": [TCP_SNI]},
        "tcp_proxy": {"stat_prefix": "inbound_9000", "cluster": "inbound|9000||"},
    }
    m = Mesh(
        tmp_path,
        upstream.port,
        server_chains=[tcp_chain],
        server_clusters=[{"name": "inbound|9000||", "endpoints": [f"127.0.0.1:{echo.server_address[1]}"]}],
    )
    m.tcp_port = free_port()
    m.client.config["listeners"].append(
        {
            "name": "outbound_9000",
            "address": f"127.0.0.1:{m.tcp_port}",
            "direction": "OUTBOUND",
            "filter_chains": [{"tcp_proxy": {"stat_prefix": "outbound_9000", "cluster": "outbound|9000||server"}}],
        }
    )
    m.client.config["clusters"].append(peer_cluster("outbound|9000||server", m.inbound_port, [SERVER_ID], sni=TCP_SNI))
    m.client.rewrite()
    m.start()
    yield m
    m.stop()
    echo.shutdown()
    echo.server_close()


def test_opaque_tcp_round_trips_over_mtls(tcp_mesh):
    payload = bytes(range(256)) * 4096  # 1 MiB, binary
    with socket.create_connection(("127.0.0.1", tcp_mesh.tcp_port), timeout=10) as s:
        got = bytearray()

        def reader():
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        s.sendall(payload)
        t.join(timeout=20)
    assert bytes(got) == payload
    deadline = time.time() + 5
    while time.time() < deadline and not any(r["protocol"] == "tcp" for r in tcp_mesh.server.log_records()):
        time.sleep(0.05)
    rec = [r for r in tcp_mesh.server.log_records() if r["protocol"] == "tcp"][-1]
    assert rec["downstream_peer_uri_san"] == CLIENT_ID
    assert rec["requested_server_name"] == TCP_SNI
    assert rec["bytes_received"] == len(payload) and rec["bytes_sent"] == len(payload)


def test_server_first_tcp_is_not_mistaken_for_http(tcp_mesh):
    # A client that sends nothing first (like a server-first protocol) still gets a TCP tunnel.
    with socket.create_connection(("127.0.0.1", tcp_mesh.tcp_port), timeout=10) as s:
        time.sleep(0.3)
        s.sendall(b"GET looks-like-http-but-this-is-raw\r\n")
        assert s.recv(100) == b"GET looks-like-http-but-this-is-raw\r\n"


@pytest.fixture
def ws_mesh(tmp_path):
    from websockets.sync.server import serve

    def handler(ws):
        ws.send("xfcc:" + (ws.request.headers.get("x-forwarded-client-cert") or ""))
        for msg in ws:
            ws.send(msg)

    port = free_port()
    server = serve(handler, "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    m = Mesh(tmp_path, port).start()
    yield m
    m.stop()
    server.shutdown()


def test_websocket_upgrade_through_the_pair(ws_mesh):
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", ws_mesh.outbound_port), timeout=10)
    with connect("ws://server/chat", sock=sock, open_timeout=10) as ws:
        first = ws.recv(timeout=10)
        assert first.startswith("xfcc:") and f"URI={CLIENT_ID}" in first
        for msg in ["hello", "x" * 200_000, b"\x00\x01binary"]:
            ws.send(msg)
            assert ws.recv(timeout=10) == msg
