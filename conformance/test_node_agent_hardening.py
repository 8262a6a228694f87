"""The node agent cannot be talked into another workload's identity, and its CA admin API is not
open to every local process (issue 12, item 8).

- A process that connects, hands its socket to a relay (fork) and then execs a registered binary
  does not get that binary's SVID: the caller is pinned when its connection is accepted, and each
  RPC checks it still runs the same file.
- An entry whose only selector is a path is refused.
- The CA admin API needs the token the agent writes beside its socket (mode 0600), and publishes at
  most three CAs at once.
"""

import os
import shutil
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from conftest import NodeAgent, binary, free_port

TD = "cluster.local"
PY_ID = f"spiffe://{TD}/ns/test/sa/py"
TARGET_ID = f"spiffe://{TD}/ns/test/sa/target"


def start_agent(work: Path, entries_text: str, admin_port=None):
    agent = NodeAgent(work, entries_text).start(admin_port=admin_port)
    return agent.proc, agent.sock


def fetch_over(sock_fd: socket.socket) -> tuple:
    """FetchX509SVID over an already connected socket, spoken with h2: (grpc-status, SPIFFE IDs
    seen in the response body)."""
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [
        (":method", "POST"), (":scheme", "http"), (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ])
    conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    sock_fd.sendall(conn.data_to_send())
    body, status = b"", None
    sock_fd.settimeout(10)
    while status is None:
        data = sock_fd.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v) for k, v in ev.headers)
                if "grpc-status" in headers:
                    status = int(headers["grpc-status"])
            if isinstance(ev, h2.events.StreamReset):
                status = -1
        if status is None and len(body) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big"):
            status = 0  # one whole message of the (endless) response stream
        pending = conn.data_to_send()
        if pending:
            sock_fd.sendall(pending)
    ids = [i for i in (PY_ID, TARGET_ID) if i.encode() in body]
    return status, ids


def relay_attack(sock_path: Path, target: str, out: Path):
    """Child: connect, fork a relay that keeps the socket, exec `target`. The relay asks for an SVID
    once the exec is done and writes what it got to `out`."""
    pid = os.fork()
    if pid:
        return pid
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        time.sleep(0.3)  # the scenario: connect well before the exec
        parent = os.getpid()
        if os.fork() == 0:
            try:
                # Ask only once the parent runs `target` (an event, read from /proc).
                deadline = time.time() + 10
                while os.path.realpath(f"/proc/{parent}/exe") != target and time.time() < deadline:
                    time.sleep(0.01)
                status, ids = fetch_over(s)
                out.write_text(f"{status} {','.join(ids)}")
            finally:
                os._exit(0)
        os.execv(target, [target, "3"])
    finally:
        os._exit(1)


def test_a_relay_cannot_inherit_the_identity_of_what_its_parent_execs(tmp_path):
    os.chmod(tmp_path, 0o755)
    target = os.path.realpath(shutil.which("sleep"))
    uid = os.getuid()
    entries = (
        f"trust_domain: {TD}\nentries:\n"
        f"  - spiffe_id: {PY_ID}\n    selectors: [\"unix:uid:{uid}\"]\n"
        f"  - spiffe_id: {TARGET_ID}\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{target}\"]\n"
    )
    proc, sock = start_agent(tmp_path, entries)
    try:
        # Control: a plain caller gets its uid identity only.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            status, ids = fetch_over(s)
        assert status == 0 and ids == [PY_ID], (status, ids)
        out = tmp_path / "relay.out"
        child = relay_attack(sock, target, out)
        deadline = time.time() + 15
        while not out.exists() or not out.read_text():
            assert time.time() < deadline, "the relay never reported"
            time.sleep(0.05)
        os.waitpid(child, 0)
        status, _, ids = out.read_text().partition(" ")
        assert TARGET_ID not in ids, "the relay got the exec'd binary's identity"
        assert status == "7", out.read_text()  # PERMISSION_DENIED
        assert "runs" in (tmp_path / "agent.log").read_text()  # refused for the exec, by name
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_path_only_entries_are_refused(tmp_path):
    entries = f"trust_domain: {TD}\nentries:\n  - spiffe_id: {TARGET_ID}\n    selectors: [\"unix:path:/usr/bin/sleep\"]\n"
    (tmp_path / "entries.yaml").write_text(entries)
    r = subprocess.run([binary(), "node-agent", "--workload-api-socket", str(tmp_path / "a.sock"), "--entries", str(tmp_path / "entries.yaml")],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "needs a unix:uid or unix:gid" in r.stderr, r.stderr


def test_ca_admin_needs_the_token_and_bounds_prepare(tmp_path):
    port = free_port()
    proc, sock = start_agent(tmp_path, f"trust_domain: {TD}\nentries:\n  - spiffe_id: {PY_ID}\n    selectors: [\"unix:uid:{os.getuid()}\"]\n", admin_port=port)
    try:
        token_file = Path(str(sock) + ".admin-token")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text()

        def call(path, auth=None, method="POST"):
            headers = {"authorization": auth} if auth else {}
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        for auth in [None, "Bearer wrong", f"Basic {token}", f"Bearer {token}x"]:
            assert call("/ca/taint", auth)[0] == 401
            assert call("/ca", auth, method="GET")[0] == 401
        ok = f"Bearer {token}"
        assert call("/ca", ok, method="GET")[1].count("\n") == 1
        assert call("/ca/prepare", ok)[0] == 200
        assert call("/ca/prepare", ok)[0] == 200
        status, body = call("/ca/prepare", ok)
        assert status == 409 and "activate and taint" in body, body
        assert call("/ca", ok, method="GET")[1].count("\n") == 3
        assert call("/ca/activate", ok)[0] == 200 and call("/ca/taint", ok)[0] == 200
        assert call("/ca/prepare", ok)[0] == 200, "room again after taint"
        # The Workload API still serves SVIDs (now from the activated CA).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            assert fetch_over(s) == (0, [PY_ID])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ca_dir_keeps_the_key_private_and_the_ca_across_restarts(tmp_path):
    ca_dir = tmp_path / "ca"
    entries = f"trust_domain: {TD}\nentries:\n  - spiffe_id: {PY_ID}\n    selectors: [\"unix:uid:{os.getuid()}\"]\n"

    def bundle_once():
        agent = NodeAgent(tmp_path, entries).start(extra=["--ca-dir", str(ca_dir)])
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(agent.sock))
                status, ids = fetch_over(s)
            assert status == 0 and ids == [PY_ID]
            return (ca_dir / "ca.json").read_text()
        finally:
            agent.stop()

    first = bundle_once()
    key = ca_dir / "ca.key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)
    assert "PRIVATE KEY" in key.read_text()
    # Restarted, the agent reuses the persisted CA rather than minting another.
    assert bundle_once() == first
