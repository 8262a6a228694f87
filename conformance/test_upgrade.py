"""HTTP/1.1 upgrades cannot carry requests past RBAC (issue 12, items 1 and 13).

Only the connection manager's upgrade types are tunnelled (WebSocket by default, as Istio
configures); `h2c` is never tunnelled and other types are refused with 403; an app that answers 101
unasked gets no tunnel. A tunnel keeps its connection's place in the listener's limit, obeys the
connection idle timeout, and is closed when a policy change no longer admits the request that
opened it.

The upstream is a deliberately unsafe app: it answers 101 to any `Upgrade` (and to `?switch=1`),
then reads whatever comes next on the socket as raw requests and leaks a secret for `/admin`.
"""

import signal
import socket
import ssl
import threading
import time

import pytest

from conftest import CLIENT_ID, Mesh, mtls_socket, read_head, read_response, stat
from test_rbac_bypass import HTTP_FILTERS, SECRET

WS_HEADERS = b"connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


class Switcher:
    """Switches protocols whenever asked (or told to), then serves raw lines on the socket."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.heads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.heads.append(head)
                lower = head.lower()
                upgrade = [line.split(b":", 1)[1].strip() for line in lower.split(b"\r\n") if line.startswith(b"upgrade:")]
                if upgrade or b"switch=1" in head.split(b"\r\n")[0]:
                    proto = upgrade[0] if upgrade else b"websocket"
                    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: " + proto + b"\r\n\r\n")
                    self._tunnel(c, buf)
                    return
                body = b"public"
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            c.close()

    def _tunnel(self, c, buf):
        while True:
            if buf:
                c.sendall(SECRET if b"/admin" in buf else b"echo:" + buf)
            buf = c.recv(65536)
            if not buf:
                return

    def close(self):
        self.sock.close()


@pytest.fixture
def switch_mesh(tmp_path):
    app = Switcher()
    m = Mesh(tmp_path, app.port)
    chain = m.server.config["listeners"][0]["filter_chains"][-1]
    chain["http_connection_manager"]["http_filters"] = HTTP_FILTERS
    m.server.config["listeners"][0]["max_connections"] = 3
    m.server.config["limits"] = {"connection_idle_timeout": "2s"}
    m.server.rewrite()
    m.start()
    m.app = app
    yield m
    m.stop()
    app.close()


def outbound(mesh):
    return socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=10)


def inbound_tls(mesh):
    return mtls_socket(mesh)


def websocket_tunnel(s, host=b"server", path=b"/ws"):
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nhost: " + host + b"\r\n" + WS_HEADERS + b"\r\n")
    head = read_head(s)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(b"ping")
    assert s.recv(100) == b"echo:ping"
    return s


def test_h2c_upgrade_is_not_tunnelled_and_later_requests_meet_rbac(switch_mesh):
    s = outbound(switch_mesh)
    s.sendall(b"GET /public HTTP/1.1\r\nhost: server\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n")
    status, body, raw = read_response(s)
    assert status == 200 and body == b"public", raw
    seen = switch_mesh.app.heads[-1].lower()
    assert b"upgrade" not in seen and b"http2-settings" not in seen, seen
    # The same connection is still HTTP, so the next request is authorized like any other.
    s.sendall(b"GET /admin/keys HTTP/1.1\r\nhost: server\r\n\r\n")
    status, body, raw = read_response(s)
    assert status == 403 and body == b"RBAC: access denied", raw
    assert SECRET not in raw
    s.close()


def test_unlisted_upgrade_types_are_refused(switch_mesh):
    before = len(switch_mesh.app.heads)
    for proto in [b"foo", b"websocket, foo", b"TLS/1.2"]:
        s = outbound(switch_mesh)
        s.sendall(b"GET /public HTTP/1.1\r\nhost: server\r\nconnection: upgrade\r\nupgrade: " + proto + b"\r\n\r\n")
        status, body, raw = read_response(s)
        assert status == 403 and body == b"upgrade failed", (proto, raw)
        s.close()
    assert len(switch_mesh.app.heads) == before, "a refused upgrade reached the app"
    # Control: WebSocket is listed, and tunnels.
    websocket_tunnel(outbound(switch_mesh)).close()


def test_app_switching_unasked_gets_no_tunnel(switch_mesh):
    s = outbound(switch_mesh)
    s.sendall(b"GET /public?switch=1 HTTP/1.1\r\nhost: server\r\n\r\n")
    status, body, raw = read_response(s)
    assert status == 503 and body == b"upgrade failed", raw
    # The connection is still HTTP, and the next request meets RBAC.
    s.sendall(b"GET /admin/keys HTTP/1.1\r\nhost: server\r\n\r\n")
    status, body, raw = read_response(s, limit=5)
    assert (status, body) == (403, b"RBAC: access denied") and SECRET not in raw, raw


def overflows(mesh):
    return stat(mesh.server, "downstream_cx_overflow")


def test_tunnels_hold_their_connection_slot_and_idle_out(switch_mesh):
    tunnels = [websocket_tunnel(inbound_tls(switch_mesh)) for _ in range(3)]
    before = overflows(switch_mesh)
    # The listener's limit is 3: a fourth connection is closed at accept (counted as overflow).
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        extra = inbound_tls(switch_mesh)
        extra.sendall(b"GET /public HTTP/1.1\r\nhost: server\r\n\r\n")
        if not extra.recv(100):
            raise ConnectionResetError("closed at accept")
    assert overflows(switch_mesh) == before + 1
    # Idle tunnels are closed by the connection idle timeout (2 s), freeing their slots.
    for t in tunnels:
        t.settimeout(15)
        assert t.recv(100) == b"", "an idle tunnel stayed open"
    deadline = time.time() + 10
    while True:
        try:
            websocket_tunnel(inbound_tls(switch_mesh)).close()
            break
        except (ssl.SSLError, ConnectionResetError, OSError, AssertionError):
            assert time.time() < deadline, "slots were not freed after the tunnels closed"
            time.sleep(0.1)


def test_tunnels_close_when_listeners_stop(switch_mesh):
    t = websocket_tunnel(outbound(switch_mesh))
    # The server sidecar drains (5 s window by default); the tunnel closes when its listeners stop.
    switch_mesh.server.proc.send_signal(signal.SIGTERM)
    t.settimeout(20)
    data = b""
    while chunk := t.recv(100):
        data += chunk
    assert data == b"", data
    assert switch_mesh.server.proc.wait(timeout=20) == 0


def test_live_tunnel_is_closed_when_policy_revokes_it(tmp_path):
    from test_xds import DENY_ADMIN, XdsMesh

    app = Switcher()
    m = XdsMesh(tmp_path)
    try:
        registry = m.config_dir / "registry.yaml"
        registry.write_text(registry.read_text().replace(f"http: {m.upstream.port}", f"http: {app.port}"))
        host = b"server.test.svc.cluster.local"
        deadline = time.time() + 10
        while True:
            try:
                t = websocket_tunnel(socket.create_connection(("127.0.0.1", m.outbound), timeout=10), host=host)
                break
            except AssertionError:
                assert time.time() < deadline, "the app change never arrived"
                time.sleep(0.1)
        # A policy change that still admits the tunnel leaves it open.
        policy = m.config_dir / "authz.yaml"
        policy.write_text(DENY_ADMIN)
        before = m.stats("server").get("listener_manager.lds.update_success")
        deadline = time.time() + 10
        while m.stats("server").get("listener_manager.lds.update_success") == before:
            assert time.time() < deadline, "the DENY /admin policy never reached the server"
            time.sleep(0.05)
        t.sendall(b"still")
        assert t.recv(100) == b"echo:still"
        # One that denies the request that opened it closes it.
        policy.write_text(DENY_ADMIN.replace('"/admin*"', '"/ws*"'))
        t.settimeout(10)
        started = time.time()
        assert t.recv(100) == b"", "the tunnel outlived the policy that revoked it"
        print(f"tunnel closed {time.time() - started:.2f} s after the edit")
        # And a new upgrade for it is refused by RBAC.
        s = socket.create_connection(("127.0.0.1", m.outbound), timeout=10)
        s.sendall(b"GET /ws HTTP/1.1\r\nhost: " + host + b"\r\n" + WS_HEADERS + b"\r\n")
        status, body, raw = read_response(s)
        assert status == 403 and body == b"RBAC: access denied", raw
        assert f"URI={CLIENT_ID}".encode() not in raw
    finally:
        m.stop()
        app.close()
