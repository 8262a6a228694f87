"""A global connection limit across listeners (Envoy's overload manager
`global_downstream_max_connections`, issue 12 item 15): past it, new connections are closed at
accept and counted; from 90 % of it, HTTP/1.1 responses carry `Connection: close`."""

import socket

import pytest

from conftest import Mesh, read_head, stat, wait_stat

LIMIT = 5


@pytest.fixture
def small(tmp_path, upstream):
    m = Mesh(tmp_path, upstream.port, client_extra={"limits": {"global_max_connections": LIMIT}}).start()
    yield m
    m.stop()


def get_raw(sock):
    sock.sendall(b"GET /o HTTP/1.1\r\nhost: server\r\n\r\n")
    return read_head(sock)


def test_global_connection_limit_sheds_then_refuses(small):
    held = []
    try:
        # Below 90 %: keep-alive as usual.
        s = socket.create_connection(("127.0.0.1", small.outbound_port), timeout=10)
        held.append(s)
        head = get_raw(s)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower(), head
        for _ in range(LIMIT - 2):
            held.append(socket.create_connection(("127.0.0.1", small.outbound_port), timeout=10))
        wait_stat(small.client, "server.total_connections", LIMIT - 1)
        # At 90 % (4.5 of 5, reached with the fifth): responses ask the client to close.
        s5 = socket.create_connection(("127.0.0.1", small.outbound_port), timeout=10)
        held.append(s5)
        wait_stat(small.client, "server.total_connections", LIMIT)
        head = get_raw(s5)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower(), head
        # The proxy closes that one after its response; fill the last place again.
        s5.settimeout(5)
        while s5.recv(65536):  # the rest of the body, then EOF
            pass
        wait_stat(small.client, "server.total_connections", LIMIT - 1)
        held.append(socket.create_connection(("127.0.0.1", small.outbound_port), timeout=10))
        wait_stat(small.client, "server.total_connections", LIMIT)
        # Full: a sixth connection is closed at accept, and counted.
        before = stat(small.client, "downstream_global_cx_overflow")
        extra = socket.create_connection(("127.0.0.1", small.outbound_port), timeout=10)
        extra.sendall(b"GET /o HTTP/1.1\r\nhost: server\r\n\r\n")
        extra.settimeout(5)
        try:
            assert extra.recv(100) == b""
        except ConnectionResetError:
            pass
        extra.close()
        assert stat(small.client, "downstream_global_cx_overflow") == before + 1
    finally:
        for s in held:
            s.close()
    # Room again once connections close.
    wait_stat(small.client, "server.total_connections", 0)
    s = socket.create_connection(("127.0.0.1", small.outbound_port), timeout=10)
    assert get_raw(s).startswith(b"HTTP/1.1 200")
    s.close()
