"""Hostile HTTP/2 from the app side (h2c on the outbound port), with Python h2: the sidecar refuses
what breaks its limits, keeps serving everyone else, and never crashes."""

import json
import socket
import time
import urllib.request

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from conftest import CLIENT_ID, stat


def h2_client(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def pump(sock, conn, until, limit=10.0):
    """Reads frames until `until(events)` is true, the peer closes, or `limit` passes."""
    seen = []
    deadline = time.time() + limit
    sock.settimeout(0.5)
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            if until(seen):
                break
            continue
        except ConnectionResetError:
            seen.append("reset")
            break
        if not data:
            seen.append("closed")
            break
        try:
            seen.extend(conn.receive_data(data))
        except h2.exceptions.ProtocolError as e:
            seen.append(e)
            break
        out = conn.data_to_send()
        if out:
            try:
                sock.sendall(out)
            except OSError:
                seen.append("closed")
                break
        if until(seen):
            break
    return seen


def headers(path="/", extra=()):
    return [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "server"), *extra]


def still_serving(mesh):
    req = urllib.request.Request(mesh.url("/after"), headers={"host": "server"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        assert f"URI={CLIENT_ID}" in json.loads(r.read())["headers"]["x-forwarded-client-cert"]
    assert mesh.client.proc.poll() is None and mesh.server.proc.poll() is None


def test_settings_advertise_design_limits(mesh):
    sock, conn = h2_client(mesh.outbound_port)
    events = pump(sock, conn, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
    changed = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)][0].changed_settings
    assert changed[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 100
    assert changed[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE].new_value == 65536
    assert changed[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 60 * 1024
    sock.close()


def test_rapid_reset_gets_goaway_and_others_are_served(mesh):
    sock, conn = h2_client(mesh.outbound_port)
    pump(sock, conn, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev), limit=2)
    goaway = False
    try:
        for i in range(2000):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers(f"/rr/{i}"), end_stream=True)
            conn.reset_stream(sid)
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        goaway = True  # the server closed the connection mid-flood
    events = pump(sock, conn, lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev), limit=5)
    ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    # Ended by the reset rule (GOAWAY ENHANCE_YOUR_CALM), not by some other failure.
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, (goaway, events[-5:])
    sock.close()
    still_serving(mesh)


def test_stream_flood_beyond_max_concurrent_is_refused(mesh):
    sock, conn = h2_client(mesh.outbound_port)
    pump(sock, conn, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev), limit=2)
    # Ignore our own copy of the peer's limit to open more streams than allowed, each left open.
    conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
    conn.remote_settings.acknowledge()
    opened = []
    for i in range(150):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":path", f"/flood/{i}"), (":scheme", "http"), (":authority", "server")])
        opened.append(sid)
    sock.sendall(conn.data_to_send())
    events = pump(sock, conn, lambda ev: sum(isinstance(e, h2.events.StreamReset) for e in ev) >= 50, limit=5)
    refused = [e for e in events if isinstance(e, h2.events.StreamReset)]
    # Exactly the streams past the first 100 are refused, each with REFUSED_STREAM.
    assert len(refused) == 50, events[:10]
    assert all(e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM and e.stream_id > 2 * 100 for e in refused), refused[:5]
    sock.close()
    still_serving(mesh)


def test_oversized_headers_are_refused(mesh):
    sock, conn = h2_client(mesh.outbound_port)
    pump(sock, conn, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev), limit=2)
    conn.max_outbound_frame_size = 16384
    sid = conn.get_next_available_stream_id()
    big = [(f"x-big-{i}", "v" * 1000) for i in range(80)]  # ~80 KiB > 60 KiB
    conn.send_headers(sid, headers("/big", big), end_stream=True)
    sock.sendall(conn.data_to_send())
    events = pump(
        sock,
        conn,
        lambda ev: any(isinstance(e, (h2.events.StreamReset, h2.events.ResponseReceived, h2.events.ConnectionTerminated)) for e in ev),
    )
    responses = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert responses and dict(responses[0].headers)[":status"] == "431", events
    sock.close()
    still_serving(mesh)


def test_garbage_after_preface_ends_only_that_connection(mesh):
    sock, conn = h2_client(mesh.outbound_port)
    sock.sendall(b"\x00\x00\x04\x09\xff\xff\xff\xff" + b"\xde\xad\xbe\xef" * 64)  # a CONTINUATION out of place
    events = pump(sock, conn, lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev))
    ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, events[-5:]
    sock.close()
    still_serving(mesh)


def test_many_headers_count_over_limit_on_http1(mesh):
    s = socket.create_connection(("127.0.0.1", mesh.outbound_port), timeout=10)
    hdrs = "".join(f"x-h{i}: v\r\n" for i in range(150))
    s.sendall(f"GET /many HTTP/1.1\r\nHost: server\r\n{hdrs}\r\n".encode())
    data = s.recv(65536)
    s.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    still_serving(mesh)


def test_paced_resets_end_the_connection(mesh):
    """Resets that each come after the stream was taken up (the slower rapid-reset variant, which
    h2's pending-accept limit does not see) end the connection by Envoy's premature-reset rule:
    within the first 500 streams, at 250 resets."""
    sock, conn = h2_client(mesh.outbound_port)
    pump(sock, conn, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev), limit=2)
    ended_at = None
    sock.settimeout(0.002)
    deadline = time.time() + 30
    for i in range(1000):
        if time.time() > deadline:
            break
        try:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers(f"/slow/{i}?delay=5"), end_stream=True)
            sock.sendall(conn.data_to_send())
            time.sleep(0.003)  # the proxy has taken the stream up (it is waiting on the upstream)
            conn.reset_stream(sid)
            sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(65536)
                if not data:
                    ended_at = i
                    break
                events = conn.receive_data(data)
                if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    ended_at = i
                    break
            except socket.timeout:
                pass
        except (OSError, h2.exceptions.ProtocolError):
            ended_at = i
            break
    sock.close()
    assert ended_at is not None, "1000 paced resets did not end the connection"
    assert ended_at <= 300, f"ended only after {ended_at} streams"
    assert stat(mesh.client, "downstream_rq_too_many_premature_resets") == 1
    still_serving(mesh)
