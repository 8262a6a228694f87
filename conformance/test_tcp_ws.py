"""Opaque TCP and WebSocket (HTTP/1.1 Upgrade) through the sidecar pair."""

import socket
import threading
import time

import pytest

from conftest import CLIENT_ID, TCP_SNI, Mesh, free_port, mtls_socket, require_tool, wait_for



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
    wait_for("the server logs the TCP connection", lambda: any(r["protocol"] == "tcp" for r in tcp_mesh.server.log_records()))
    rec = [r for r in tcp_mesh.server.log_records() if r["protocol"] == "tcp"][-1]
    assert rec["downstream_peer_uri_san"] == CLIENT_ID
    assert rec["requested_server_name"] == TCP_SNI
    assert rec["bytes_received"] == len(payload) and rec["bytes_sent"] == len(payload)


def test_server_first_tcp_is_not_mistaken_for_http(tcp_mesh):
    # A client that sends nothing first (like a server-first protocol) still gets a TCP tunnel:
    # the sniff gives up after 100 ms and the bytes sent later, HTTP-like or not, are echoed.
    with socket.create_connection(("127.0.0.1", tcp_mesh.tcp_port), timeout=10) as s:
        time.sleep(0.3)  # the scenario, not a synchronization: longer than the sniff timeout
        s.sendall(b"GET looks-like-http-but-this-is-raw\r\n")
        assert s.recv(100) == b"GET looks-like-http-but-this-is-raw\r\n"


def test_sniffing_sends_http_to_the_http_chain(tcp_mesh):
    """On the port with both chains, HTTP/1.1 and h2c (prior knowledge) go to the HTTP chain and
    are routed to the app (its JSON answer, with the caller identity), not echoed by the TCP
    chain's upstream."""
    import json

    curl = require_tool("curl")
    import subprocess

    for flags in ([], ["--http2-prior-knowledge"]):
        out = subprocess.run(
            [curl, "-sS", "--max-time", "10", *flags, "-H", "host: server", f"http://127.0.0.1:{tcp_mesh.tcp_port}/sniffed"],
            capture_output=True, text=True, timeout=20,
        )
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["path"] == "/sniffed" and seen["canary"] == "ok", out.stdout
        assert f"URI={CLIENT_ID}" in seen["headers"]["x-forwarded-client-cert"]
    protocols = {r["protocol"] for r in tcp_mesh.client.log_records() if r.get("path") == "/sniffed"}
    assert protocols == {"HTTP/1.1", "HTTP/2"}, protocols


def test_istio_tcp_alpn_is_negotiated_inbound(tcp_mesh):
    """A peer offering only Istio's TCP ALPN (`istio`) gets it, and the TCP chain for its SNI."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(tcp_mesh.bundle))
    ctx.load_cert_chain(str(tcp_mesh.client_cert), str(tcp_mesh.client_key))
    ctx.set_alpn_protocols(["istio"])
    raw = socket.create_connection(("127.0.0.1", tcp_mesh.inbound_port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=TCP_SNI) as s:
        assert s.selected_alpn_protocol() == "istio"
        s.sendall(b"\x00\x01opaque")
        assert s.recv(100) == b"\x00\x01opaque"
    # Positive control on the same listener: `http/1.1` without the TCP SNI reaches the app.
    with mtls_socket(tcp_mesh, "http/1.1") as s:
        s.sendall(b"GET /alpn HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")


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
