"""Stopping: every long-running command treats SIGTERM and SIGINT alike (graceful stop, exit 0),
and no process the demo starts outlives it, even when the demo is killed with SIGKILL.

The eBPF demo's counterparts (namespaces, cgroups, pins, mounts) are in test_ebpf.py.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SERVER_ID, Mesh, binary, free_port, http_get

SIGNALS = [signal.SIGTERM, signal.SIGINT]


def pids_running(exe_dir: Path) -> dict[int, str]:
    """Processes whose executable lives in `exe_dir` (the demo's per-workload binary copies)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            exe = os.readlink(proc / "exe")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and exe.removesuffix(" (deleted)").startswith(str(exe_dir) + "/"):
            found[int(proc.name)] = exe
    return found


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def start_demo(tmp_path, wait_for="running; press Ctrl-C", limit=120):
    """`eastguard demo` until its output shows `wait_for` (None: return at once)."""
    out = open(tmp_path / "demo.out", "wb")
    proc = subprocess.Popen(
        [binary(), "--log-level", "warn", "demo", "--dir", str(tmp_path / "demo")],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + limit
    while wait_for is not None and wait_for not in (tmp_path / "demo.out").read_text():
        assert proc.poll() is None, (tmp_path / "demo.out").read_text()
        assert time.time() < deadline, f"demo never printed {wait_for!r}: " + (tmp_path / "demo.out").read_text()
        time.sleep(0.1)
    return proc


def wait_exit(proc, limit):
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {limit}s after the signal")


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_demo_stops_on_signal_and_leaves_no_process(tmp_path, sig):
    proc = start_demo(tmp_path)
    demo_dir = tmp_path / "demo"
    sidecars = pids_running(demo_dir)
    # Positive control: the three sidecars run from their binary copies while the demo runs.
    assert len(sidecars) == 3, sidecars
    proc.send_signal(sig)
    rc = wait_exit(proc, 20)
    output = (tmp_path / "demo.out").read_text()
    assert rc == 0, output
    assert "all 10 expectations held" in output, output
    assert alive(sidecars) == [], f"sidecars outlived the demo: {alive(sidecars)}"
    assert not list(demo_dir.glob("*-eastguard")), "binary copies left behind"
    # Each sidecar drained (it got SIGTERM from the demo, not SIGKILL).
    for w in ("frontend", "orders", "ledger"):
        assert "drained; exiting" in (demo_dir / f"{w}-sidecar.log").read_text(), w


def test_demo_stopped_while_starting_leaves_no_process(tmp_path):
    """SIGTERM before the script is done: what was started is stopped, and the exit is 0."""
    proc = start_demo(tmp_path, wait_for=None)
    demo_dir = tmp_path / "demo"
    deadline = time.time() + 60
    while not pids_running(demo_dir):
        assert proc.poll() is None, (tmp_path / "demo.out").read_text()
        assert time.time() < deadline, "no sidecar started"
        time.sleep(0.02)
    started = pids_running(demo_dir)
    proc.send_signal(signal.SIGTERM)
    rc = wait_exit(proc, 20)
    output = (tmp_path / "demo.out").read_text()
    assert rc == 0, output
    assert "expectations held" not in output, "the signal came too late to test a stop while starting"
    assert alive(started) == [] and pids_running(demo_dir) == {}, "sidecars outlived the demo"


def test_sigkilled_demo_takes_its_sidecars_with_it(tmp_path):
    proc = start_demo(tmp_path)
    sidecars = pids_running(tmp_path / "demo")
    assert len(sidecars) == 3, sidecars
    proc.kill()
    proc.wait()
    deadline = time.time() + 8
    while alive(sidecars) and time.time() < deadline:
        time.sleep(0.1)
    assert alive(sidecars) == [], f"sidecars still running 8 s after the demo was killed: {alive(sidecars)}"


def test_child_whose_parent_is_already_gone_does_not_start(tmp_path):
    """A process started by an eastguard parent that died before the child could ask to follow it
    exits at once instead of running unsupervised."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = dict(os.environ, EASTGUARD_PARENT_PID=str(gone.pid))
    r = subprocess.run([binary(), "demo-app", "--name", "x", "--listen", f"127.0.0.1:{free_port()}"],
                       env=env, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "is gone; not starting" in r.stderr, r.stderr
    # Control: with this process as the parent it runs (and stops on SIGTERM with 0).
    env["EASTGUARD_PARENT_PID"] = str(os.getpid())
    port = free_port()
    p = subprocess.Popen([binary(), "demo-app", "--name", "x", "--listen", f"127.0.0.1:{port}"],
                         env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while True:
        try:
            assert http_get(f"http://127.0.0.1:{port}/hello", timeout=1)[0] == 200
            break
        except OSError:
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "not serving"
            time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert wait_exit(p, 10) == 0


# === the other long-running commands ===


def _control_plane(tmp_path):
    (tmp_path / "istio").mkdir()
    port = free_port()
    cmd = [binary(), "control-plane", "--config-dir", str(tmp_path / "istio"), "--xds-address", f"127.0.0.1:{port}"]
    return cmd, lambda: _connects(port)


def _node_agent(tmp_path):
    sock = tmp_path / "agent.sock"
    entries = tmp_path / "entries.yaml"
    entries.write_text(f"trust_domain: cluster.local\nentries:\n  - spiffe_id: {SERVER_ID}\n    selectors: [\"unix:uid:{os.getuid()}\"]\n")
    return [binary(), "node-agent", "--workload-api-socket", str(sock), "--entries", str(entries)], sock.exists


def _connects(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["control-plane", "node-agent"])
def test_servers_stop_on_signal_with_exit_0(tmp_path, command, sig):
    cmd, ready = {"control-plane": _control_plane, "node-agent": _node_agent}[command](tmp_path)
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while not ready():
        assert proc.poll() is None, (tmp_path / "log").read_text()
        assert time.time() < deadline, "never became ready"
        time.sleep(0.05)
    assert proc.poll() is None, "exited before the signal"
    proc.send_signal(sig)
    rc = wait_exit(proc, 15)
    assert rc == 0, (tmp_path / "log").read_text()
    assert f'signal="{sig.name}"' in (tmp_path / "log").read_text()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_proxy_stops_on_signal_with_exit_0(tmp_path, upstream, sig):
    mesh = Mesh(tmp_path, upstream.port, server_extra={"drain": {"duration": "200ms", "grace": "1s"}}).start()
    try:
        # Control: it serves before the signal.
        assert http_get(mesh.server.admin("/ready"))[0] == 200
        mesh.server.proc.send_signal(sig)
        assert wait_exit(mesh.server.proc, 15) == 0
        assert "drained; exiting" in mesh.server.stderr_path.read_text()
    finally:
        mesh.stop()
