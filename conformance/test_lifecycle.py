"""Certificate rotation from files and graceful drain, both under steady load."""

import json
import os
import threading
import time
import urllib.request

import pytest

from conftest import CLIENT_ID, SERVER_ID, Load, Mesh, dumped_svid, mtls_socket, stat, wait_for


def serial(sidecar):
    return dumped_svid(sidecar)[0]


def replace_svid(mesh, name, spiffe_id):
    """Writes a fresh SVID the way a rotating agent does, key first then cert (each an atomic
    rename), so the proxy briefly sees a key that does not match the cert and must keep the old
    pair. Returns the new leaf certificate (DER)."""
    cert, key = mesh.ca.mint(spiffe_id)
    for path, data in [(mesh.dir / f"{name}.key.pem", key), (mesh.dir / f"{name}.cert.pem", cert)]:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        time.sleep(0.3)  # the scenario: the mismatched pair is on disk for several polls
    return leaf_der(cert)


def leaf_der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificates(pem)[0].public_bytes(Encoding.DER)


def presented_server_cert(mesh) -> bytes:
    """The leaf the server sidecar presents in a new handshake (DER)."""
    with mtls_socket(mesh) as s:
        return s.getpeercert(binary_form=True)


def xfcc_hash(mesh, path) -> str:
    """The `Hash=` the server sidecar puts in XFCC for a request from the client sidecar."""
    req = urllib.request.Request(mesh.url(path), headers={"host": "server"})
    with urllib.request.urlopen(req, timeout=5) as r:
        xfcc = json.loads(r.read())["headers"]["x-forwarded-client-cert"]
    return dict(kv.split("=", 1) for kv in xfcc.split(";"))["Hash"]


def test_file_rotation_under_load_drops_nothing(mesh):
    serials = {"client": {serial(mesh.client)}, "server": {serial(mesh.server)}}
    load = Load(mesh.outbound_port, workers=4, limit=60).start()
    started = time.time()
    while time.time() - started < 30:
        time.sleep(4)  # the load runs on the current SVIDs for a while
        server_der = replace_svid(mesh, "server", SERVER_ID)
        replace_svid(mesh, "client", CLIENT_ID)
        # A new handshake is made with the rotated server SVID.
        wait_for("the server presents its new SVID", lambda: presented_server_cert(mesh) == server_der)
        serials["client"].add(serial(mesh.client))
        serials["server"].add(serial(mesh.server))
        # A new connection sees the new server certificate (established ones keep theirs).
        req = urllib.request.Request(mesh.url("/new-conn"), headers={"host": "server", "connection": "close"})
        assert urllib.request.urlopen(req, timeout=5).status == 200
    load.stop()
    print(f"rotation: {load.ok} requests ok, {len(load.failures)} failed, serials {len(serials['client'])}/{len(serials['server'])}")
    assert load.failures == []
    assert load.ok > 500
    assert len(serials["client"]) >= 6 and len(serials["server"]) >= 6


def test_rotated_svids_are_used_in_new_handshakes(mesh):
    """Both sides: the server presents its rotated SVID to a new client, and the client sidecar
    authenticates with its rotated SVID on the next connection it opens (seen by the server in
    XFCC `Hash=`, the SHA-256 of the client's leaf)."""
    import hashlib

    client_before = leaf_der(mesh.client_cert.read_bytes())
    assert xfcc_hash(mesh, "/before") == hashlib.sha256(client_before).hexdigest()
    server_der = replace_svid(mesh, "server", SERVER_ID)
    client_der = replace_svid(mesh, "client", CLIENT_ID)
    wait_for("the server presents its new SVID", lambda: presented_server_cert(mesh) == server_der)
    wait_for("the client sidecar shows its new SVID", lambda: dumped_svid(mesh.client)[0] == x509_serial(client_der))
    # The pooled connection keeps the old client certificate; a restarted server forces a new one.
    mesh.server.stop()
    mesh.server.start()
    assert xfcc_hash(mesh, "/after") == hashlib.sha256(client_der).hexdigest()


def x509_serial(der: bytes) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_bad_svid_files_keep_the_current_svid(mesh):
    before = presented_server_cert(mesh)
    (mesh.dir / "server.cert.pem").write_text("not a certificate")
    wait_for(
        "the sidecar warns that it keeps the current SVID",
        lambda: "are not valid; keeping current SVID" in mesh.server.stderr_path.read_text(),
    )
    assert presented_server_cert(mesh) == before
    req = urllib.request.Request(mesh.url("/still"), headers={"host": "server"})
    assert urllib.request.urlopen(req, timeout=5).status == 200


# Between the sidecars: multiplexed HTTP/2 (AUTO), or keep-alive HTTP/1.1 for HTTP/1.1 requests
# (DOWNSTREAM, what the control plane configures for an HTTP port).
PEER_PROTOCOLS = [None, "DOWNSTREAM"]


@pytest.fixture(params=PEER_PROTOCOLS, ids=["h2", "http1"])
def drain_mesh(request, tmp_path, upstream):
    drain = {"drain": {"duration": "3s", "grace": "4s"}}
    m = Mesh(tmp_path, upstream.port, server_extra=drain, client_extra=drain, peer_protocol=request.param).start()
    yield m
    m.stop()


@pytest.mark.parametrize("which", ["client", "server"])
def test_sigterm_under_load_finishes_in_flight_requests(drain_mesh, upstream, which):
    mesh = drain_mesh
    sidecar = getattr(mesh, which)
    load = Load(mesh.outbound_port, workers=4, limit=60).start()
    wait_for("the load is flowing", lambda: load.ok >= 20)
    slow_results = []

    def slow():
        req = urllib.request.Request(mesh.url("/slow?delay=2"), headers={"host": "server"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                slow_results.append((r.status, b"canary" in r.read()))
        except Exception as e:  # noqa: BLE001 - recorded, asserted below
            slow_results.append(repr(e))

    slow_threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in slow_threads:
        t.start()
    wait_for("the slow requests reached the app", lambda: upstream.seen.count("/slow?delay=2") == 3)
    ok_before = load.ok
    sigterm_at = time.time()
    sidecar.proc.terminate()
    # Keep the load on inside the drain window (3 s), where every request must still succeed.
    time.sleep(2)  # the scenario: load during the drain
    load.stop()
    for t in slow_threads:
        t.join(timeout=15)
    sidecar.proc.wait(timeout=15)
    exited_after = time.time() - sigterm_at
    print(f"drain ({which}): ok {load.ok} (after SIGTERM {load.ok - ok_before}), failed {len(load.failures)}, exit after {exited_after:.1f}s")
    assert sidecar.proc.returncode == 0
    assert slow_results == [(200, True)] * 3
    assert load.failures == []
    assert load.ok > ok_before
    assert exited_after < 3 + 4 + 1


def upstream_cx_total(sidecar, cluster="outbound|80||server"):
    return stat(sidecar, f"cluster.{cluster}.upstream_cx_total")


@pytest.mark.parametrize("peer_protocol", PEER_PROTOCOLS, ids=["h2", "http1"])
def test_pooled_connection_is_not_used_past_its_certificates_expiry(tmp_path, upstream, peer_protocol):
    import datetime

    mesh = Mesh(tmp_path, upstream.port, peer_protocol=peer_protocol)
    # The server starts with an SVID that expires in 5 s; the files are then replaced by a long one.
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5)
    cert, key = mesh.ca.mint(SERVER_ID, not_after=expires)
    mesh.server_cert.write_bytes(cert)
    mesh.server_key.write_bytes(key)
    # One worker, so one pool: each worker keeps its own pooled connection to the peer.
    mesh.client.args = ["--concurrency", "1"]
    mesh.start()
    try:
        def get():
            req = urllib.request.Request(mesh.url("/pool"), headers={"host": "server"})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200 and b"canary" in r.read()

        for _ in range(3):
            get()
        assert upstream_cx_total(mesh.client) == 1
        replace_svid(mesh, "server", SERVER_ID)
        get()
        assert upstream_cx_total(mesh.client) == 1, "the live connection is kept while its certificates are valid"
        # The scenario: the first certificate's expiry passes.
        time.sleep(max(0.0, (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) + 0.2)
        get()
        get()
        assert upstream_cx_total(mesh.client) == 2, "a new connection, authenticated with the new SVID"
    finally:
        mesh.stop()
