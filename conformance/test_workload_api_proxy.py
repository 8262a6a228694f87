"""Sidecars that take their identity from `eastguard node-agent` over the SPIFFE Workload API:
fail closed until the first SVID, ready within 1 s of the agent appearing, told apart by
executable path (a property the kernel reports, not one the workload claims), and rotating
under load without a failed request."""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    TD,
    Load,
    NodeAgent,
    Sidecar,
    Upstream,
    binary,
    dumped_secret,
    dumped_svid,
    free_port,
    http_get,
    inbound_listener,
    outbound_listener,
    peer_cluster,
    route,
    stat,
    wait_for,
)

SERVER = f"spiffe://{TD}/ns/test/sa/server"
CLIENT = f"spiffe://{TD}/ns/test/sa/client"


def own_binary(work, name):
    """A copy of eastguard at its own path, so the agent can tell this sidecar apart."""
    path = work / f"{name}-eastguard"
    shutil.copy(binary(), path)
    return os.path.realpath(path)


def entries(server_exe, client_exe, ttl="1h"):
    uid = os.getuid()
    return (
        f"trust_domain: {TD}\nentries:\n"
        f"  - spiffe_id: {SERVER}\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{server_exe}\"]\n    x509_svid_ttl: {ttl}\n"
        f"  - spiffe_id: {CLIENT}\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{client_exe}\"]\n    x509_svid_ttl: {ttl}\n"
    )


def sidecar(work, name, exe, agent, listeners, clusters):
    s = Sidecar(work, name, "-", "-", "-", listeners, clusters)
    s.config["identity"] = {"workload_api": {"socket": f"unix://{agent.sock}"}}
    s.rewrite()
    s.exe = exe
    return s


def start(s, wait=True):
    # Like Sidecar.start, but from the sidecar's own binary copy.
    s.stderr = open(s.stderr_path, "ab")
    s.proc = subprocess.Popen([s.exe, "--log-level", "info", "proxy", "--config", str(s.config_path)], stdout=subprocess.DEVNULL, stderr=s.stderr)
    if wait:
        s.wait_ready()
    return s


@pytest.fixture
def pair(tmp_path):
    upstream = Upstream()
    server_exe, client_exe = own_binary(tmp_path, "server"), own_binary(tmp_path, "client")
    agent = NodeAgent(tmp_path, entries(server_exe, client_exe, ttl="10s"))
    inbound, outbound = free_port(), free_port()
    server = sidecar(tmp_path, "server", server_exe, agent, [inbound_listener(inbound)], [{"name": "inbound|app||", "endpoints": [f"127.0.0.1:{upstream.port}"]}])
    vhosts = [{"name": "server", "domains": ["server"], "routes": [route("outbound|80||server")]}]
    client = sidecar(tmp_path, "client", client_exe, agent, [outbound_listener(outbound, vhosts)], [peer_cluster("outbound|80||server", inbound, [SERVER])])
    yield agent, server, client, inbound, outbound
    for s in (client, server):
        s.stop()
    agent.stop()
    upstream.close()


def test_fail_closed_until_the_agent_then_ready_within_a_second(pair):
    agent, server, client, inbound, outbound = pair
    start(server, wait=False)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            status, body = http_get(server.admin("/ready"), timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    assert (status, body) == (503, "PRE_INITIALIZING\n")
    time.sleep(1)
    # No SVID: the inbound port accepts and closes; nothing is served.
    import socket

    s = socket.create_connection(("127.0.0.1", inbound), timeout=5)
    try:
        s.sendall(b"\x16\x03\x01\x00\x05hello")
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass  # refused: closed with our bytes unread
    s.close()
    assert stat(server, "downstream_cx_no_svid") == 1, "refused because there is no SVID yet"
    agent.start()
    up = time.time()
    while http_get(server.admin("/ready"), timeout=1)[0] != 200:
        assert time.time() - up < 5, "not ready 5 s after the agent came up"
        time.sleep(0.02)
    took = time.time() - up
    print(f"ready {took:.2f}s after the node-agent came up")
    assert took < 1.0


def serial(sidecar):
    serial_number, spiffe_id = dumped_svid(sidecar)
    return {"serial_number": serial_number, "spiffe_id": spiffe_id}


def test_identity_by_executable_path_and_rotation_under_load(pair):
    agent, server, client, inbound, outbound = pair
    agent.start()
    start(server)
    start(client)
    assert serial(server)["spiffe_id"] == SERVER and serial(client)["spiffe_id"] == CLIENT
    req = urllib.request.Request(f"http://127.0.0.1:{outbound}/who", headers={"host": "server"})
    seen = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert f"URI={CLIENT}" in seen["headers"]["x-forwarded-client-cert"]
    # Istio metrics name the local side by the SVID it holds now (there was none at startup).
    def requests_total():
        return [l for l in http_get(client.admin("/stats/prometheus"))[1].splitlines() if l.startswith("istio_requests_total{")]

    wait_for("the call is counted", requests_total)
    line = requests_total()[0]
    assert f'source_principal="{CLIENT}"' in line and f'destination_principal="{SERVER}"' in line, line
    # 60 s of load with 10 s SVIDs: renewal at half-life, so about 12 rotations per sidecar.
    serials = {"server": set(), "client": set()}
    load = Load(outbound, workers=4, limit=90).start()
    end = time.time() + 60
    while time.time() < end:
        serials["server"].add(serial(server)["serial_number"])
        serials["client"].add(serial(client)["serial_number"])
        time.sleep(1)
    load.stop()
    print(f"workload API rotation: {load.ok} ok, {len(load.failures)} failed, serials server {len(serials['server'])} client {len(serials['client'])}")
    assert load.failures == []
    assert load.ok > 1000
    assert len(serials["server"]) >= 5 and len(serials["client"]) >= 5


def post(agent, path):
    """A CA admin call with the agent's token (the file beside its socket)."""
    token = Path(str(agent.sock) + ".admin-token").read_text()
    req = urllib.request.Request(agent.admin + path, method="POST", data=b"", headers={"authorization": f"Bearer {token}"})
    return urllib.request.urlopen(req, timeout=5).read().decode()


def trusted_cas(sidecar):
    import base64

    root = dumped_secret(sidecar, "ROOTCA")["secret"]
    return base64.b64decode(root["validation_context"]["trusted_ca"]["inline_bytes"]).count(b"-----BEGIN CERTIFICATE-----")


def served_with(cert, key, port):
    """An mTLS request to the server sidecar's inbound port with this client SVID."""
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
            s.sendall(b"GET /stale HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return False


def test_bundle_rotation_under_load(pair):
    agent, server, client, inbound, outbound = pair
    # A uid-only entry last: the sidecars keep their own (first) SVID, the test process gets this one.
    agent.entries.write_text(agent.entries.read_text() + f"  - spiffe_id: spiffe://{TD}/ns/test/sa/stale\n    selectors: [\"unix:uid:{os.getuid()}\"]\n")
    agent.start(admin_port=free_port())
    start(server)
    start(client)
    # A peer that took its SVID under the first CA and then stopped listening to the agent.
    import spiffe
    from cryptography.hazmat.primitives import serialization

    with spiffe.WorkloadApiClient(socket_path=f"unix://{agent.sock}") as c:
        stale = [s for s in c.fetch_x509_svids() if str(s.spiffe_id).endswith("/stale")][0]
    cert, key = agent.work / "stale.pem", agent.work / "stale.key"
    cert.write_bytes(b"".join(x.public_bytes(serialization.Encoding.PEM) for x in stale.cert_chain))
    key.write_bytes(stale.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert served_with(cert, key, inbound)

    load = Load(outbound, workers=4, limit=60).start()
    wait_for("load running", lambda: load.ok > 20)
    # Each step is awaited as the event it causes (the bundle both sidecars trust, the serial the
    # server presents), not as a sleep.
    def traffic_flows(step):
        # Requests keep succeeding after each step (the load counts failures separately).
        ok = load.ok
        wait_for(f"requests succeed after {step}", lambda: load.ok >= ok + 20)

    post(agent, "/ca/prepare")
    wait_for("both sidecars trust two CAs", lambda: trusted_cas(server) == 2 and trusted_cas(client) == 2)
    traffic_flows("prepare")
    before = serial(server)["serial_number"]
    post(agent, "/ca/activate")
    wait_for("new SVIDs come from the new CA", lambda: serial(server)["serial_number"] != before)
    assert served_with(cert, key, inbound), "the old CA is still published"
    traffic_flows("activate")
    post(agent, "/ca/taint")
    wait_for("both sidecars trust one CA", lambda: trusted_cas(server) == 1 and trusted_cas(client) == 1)
    traffic_flows("taint")
    load.stop()
    print(f"bundle rotation: {load.ok} ok, {len(load.failures)} failed")
    assert load.failures == []
    assert not served_with(cert, key, inbound), "a peer with an SVID from the removed CA is refused"


def test_expiry_without_renewal_fails_closed_and_recovers(pair):
    agent, server, client, inbound, outbound = pair
    agent.entries.write_text(agent.entries.read_text().replace("x509_svid_ttl: 10s", "x509_svid_ttl: 3s"))
    agent.start()
    start(server)
    agent.stop()  # the agent goes away; the sidecar keeps its SVID until it expires
    assert http_get(server.admin("/ready"))[0] == 200
    wait_for("the SVID expires (3 s TTL)", lambda: http_get(server.admin("/ready")) == (503, "SVID_EXPIRED\n"))
    import socket

    s = socket.create_connection(("127.0.0.1", inbound), timeout=5)
    try:
        s.sendall(b"\x16\x03\x01\x00\x05hello")
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()
    assert stat(server, "downstream_cx_no_svid") == 1, "refused because there is no valid SVID"
    # The agent comes back: a new SVID, ready again.
    agent.start()
    deadline = time.time() + 10
    while http_get(server.admin("/ready"))[0] != 200:
        assert time.time() < deadline, "not ready again after the agent returned"
        time.sleep(0.1)
