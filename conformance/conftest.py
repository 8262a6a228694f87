"""Shared fixtures: the eastguard binary, a test PKI, an upstream app, and sidecar processes.

Every test talks to real processes on 127.0.0.1 with real TLS and independent clients.
"""

import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pki import CA

ROOT = Path(__file__).resolve().parent.parent
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/test/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/test/sa/server"


def binary() -> str:
    path = os.environ.get("EASTGUARD_BIN") or str(ROOT / "target" / "debug" / "eastguard")
    if not Path(path).exists():
        pytest.fail(f"eastguard binary not found at {path}; run `cargo build` first (scripts/test.sh does)")
    return path


def sidecar_binary() -> str:
    """The sidecar-only program (`eastguard-sidecar`, the flags of `eastguard proxy`), which cargo
    builds beside `eastguard`; EASTGUARD_SIDECAR_BIN names another."""
    path = os.environ.get("EASTGUARD_SIDECAR_BIN") or str(Path(binary()).with_name("eastguard-sidecar"))
    if not Path(path).exists():
        pytest.fail(f"eastguard-sidecar not found at {path}; run `cargo build` first (scripts/test.sh does)")
    return path


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (scripts/test.sh installs it)")
        pytest.skip(f"!!! SKIPPING: {name} not installed")
    return path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out = set()


def free_port() -> int:
    """A loopback port nothing listens on, below the ephemeral range: the kernel hands ports in
    that range to outgoing connections, so a port picked there can be taken by one before the
    process meant to listen on it binds it. Never the same port twice in one test run, and never
    one of Istio's fixed ports (15000-15099: the generated listeners bind 15001 and 15006)."""
    import random

    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(10000, max(low, 10001))
        if port in _handed_out or 15000 <= port < 15100:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # the range is exhausted: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, pred, limit=10.0, step=0.02):
    """Waits for an event (`pred()` true) with a generous deadline; returns when it happened."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if pred():
            return time.time()
        time.sleep(step)
    raise AssertionError(f"timed out: {what}")


def listening(port, host="127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def mtls_socket(mesh, alpn="http/1.1", cert=None, key=None):
    """A TLS connection to the mesh's server sidecar inbound port, as the client workload (or
    with another SVID), offering one ALPN protocol."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(mesh.bundle))
    ctx.load_cert_chain(str(cert or mesh.client_cert), str(key or mesh.client_key))
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection(("127.0.0.1", mesh.inbound_port), timeout=10)
    return ctx.wrap_socket(raw)


def http_get(url: str, timeout=5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stats(sidecar) -> dict:
    """A sidecar's /stats (Envoy's text form) as {name: value}."""
    text = http_get(sidecar.admin("/stats"))[1]
    out = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def stat(sidecar, suffix) -> int:
    """The sum of a sidecar's stats whose name is `suffix` or ends with `.suffix`."""
    return sum(v for k, v in stats(sidecar).items() if k == suffix or k.endswith("." + suffix))


def wait_stat(sidecar, suffix, value, limit=10.0):
    """Waits until `stat(sidecar, suffix)` is `value` (or, for a callable, satisfies it)."""
    pred = value if callable(value) else (lambda v: v == value)
    wait_for(f"{sidecar.name} {suffix} to reach {value}", lambda: pred(stat(sidecar, suffix)), limit=limit)
    return stat(sidecar, suffix)


def read_head(s, limit=10.0) -> bytes:
    """Reads from a socket until the end of an HTTP/1.1 head (or the peer closes)."""
    s.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_response(s, limit=10.0):
    """One HTTP/1.1 response with a content-length body: (status, body, raw); (None, b"", raw)
    when the peer closed before a head."""
    data = read_head(s, limit)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return None, b"", data
    status = int(head.split(b" ")[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body, data


# === node agent ===


class NodeAgent:
    """An `eastguard node-agent` serving the Workload API on `<work>/agent.sock` from the
    registration entries in `<work>/entries.yaml`; its log is `<work>/agent.log`."""

    def __init__(self, work: Path, entries_text: str):
        self.work = work
        self.sock = work / "agent.sock"
        self.entries = work / "entries.yaml"
        self.entries.write_text(entries_text)
        self.log_path = work / "agent.log"
        self.proc = None
        self.admin = None

    def start(self, admin_port=None, extra=()):
        self._log = open(self.log_path, "ab")
        cmd = [binary(), "node-agent", "--workload-api-socket", str(self.sock), "--entries", str(self.entries), *extra]
        if admin_port:
            cmd += ["--admin-address", f"127.0.0.1:{admin_port}"]
            self.admin = f"http://127.0.0.1:{admin_port}"
        self.proc = subprocess.Popen(cmd, stderr=self._log)
        token = Path(str(self.sock) + ".admin-token")

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node-agent exited {self.proc.returncode}: {self.logs()[-2000:]}")
            return self.sock.exists() and (not admin_port or token.exists())

        wait_for("the node agent serves its socket", up)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()


# === upstream app ===


class EchoHandler(BaseHTTPRequestHandler):
    """Answers JSON with what it received; `?size=N` pads the body, `?delay=S` sleeps first."""

    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without NODELAY, Nagle and the peer's delayed ACK
    # add 40 ms to every response.
    disable_nagle_algorithm = True

    def _serve(self):
        self.server.seen.append(self.path)  # what has arrived, before any delay
        length = int(self.headers.get("content-length") or 0)
        body_in = self.rfile.read(length) if length else b""
        query = dict(q.split("=", 1) for q in self.path.partition("?")[2].split("&") if "=" in q)
        if "delay" in query:
            time.sleep(float(query["delay"]))
        out = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "header_list": [[k.lower(), v] for k, v in self.headers.items()],
            "body_len": len(body_in),
            "canary": "ok",
        }
        data = json.dumps(out).encode()
        if "size" in query:
            data = b"x" * int(query["size"])
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, *args):
        pass


class Upstream:
    """The app behind the server sidecar; `seen` lists the request targets that reached it."""

    def __init__(self):
        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), EchoHandler)
        self.server.daemon_threads = True
        self.server.seen = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self):
        return list(self.server.seen)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# === sidecars ===


def route(cluster, timeout="15s"):
    return {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": timeout}}


def inbound_listener(port, app_cluster="inbound|app||", extra_chains=()):
    return {
        "name": "virtualInbound",
        "address": f"127.0.0.1:{port}",
        "direction": "INBOUND",
        "filter_chains": list(extra_chains)
        + [
            {
                "name": "http",
                "http_connection_manager": {
                    "stat_prefix": "inbound_http",
                    "route_config": {
                        "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [route(app_cluster)]}]
                    },
                },
            }
        ],
    }


def outbound_listener(port, vhosts):
    return {
        "name": "virtualOutbound",
        "address": f"127.0.0.1:{port}",
        "direction": "OUTBOUND",
        "filter_chains": [
            {
                "name": "http",
                "http_connection_manager": {"stat_prefix": "outbound_http", "route_config": {"virtual_hosts": vhosts}},
            }
        ],
    }


def peer_cluster(name, port, expected_ids, sni="outbound_.80_._.server.test.svc.cluster.local", **extra):
    c = {
        "name": name,
        "endpoints": [f"127.0.0.1:{port}"],
        "transport_socket": {"sni": sni, "match_spiffe_ids": list(expected_ids)},
        "metadata": {"service": "server.test.svc.cluster.local", "workload": "server", "namespace": "test"},
    }
    c.update(extra)
    return c


class Sidecar:
    """An `eastguard proxy` process with its own config, SVID files, logs and admin port."""

    def __init__(self, workdir: Path, name: str, cert: Path, key: Path, bundle: Path, listeners, clusters, **extra):
        self.name = name
        self.dir = workdir
        self.admin_port = free_port()
        self.access_log = workdir / f"{name}-access.log"
        self.stderr_path = workdir / f"{name}.log"
        self.stdout_path = workdir / f"{name}.out"  # where a /dev/stdout access log goes
        self.stdout = None
        self.args = []  # more `eastguard proxy` flags
        self.sidecar_only = False  # run `eastguard-sidecar` instead of `eastguard proxy`
        self.config = {
            "node": {"id": name, "workload": name, "namespace": "test"},
            "admin": {"address": f"127.0.0.1:{self.admin_port}"},
            "identity": {"files": {"cert": str(cert), "key": str(key), "bundle": str(bundle), "poll_interval": "200ms"}},
            "access_log": {"path": str(self.access_log), "format": "JSON"},
            "listeners": listeners,
            "clusters": clusters,
        }
        self.config.update(extra)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc = None

    def rewrite(self):
        """Writes `self.config` again (after a test changed it, before `start`)."""
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait=True):
        self.stderr = open(self.stderr_path, "ab")
        self.stdout = open(self.stdout_path, "ab")
        level = ["--log-level", os.environ.get("EASTGUARD_TEST_LOG", "info")]
        # `eastguard proxy`, or the sidecar-only program with the same flags.
        if self.sidecar_only or os.environ.get("EASTGUARD_SIDECAR_BIN"):
            program = [sidecar_binary(), *level]
        else:
            program = [binary(), *level, "proxy"]
        self.proc = subprocess.Popen(
            [*program, "--config", str(self.config_path), *self.args],
            stdout=self.stdout,
            stderr=self.stderr,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, limit=20.0):
        deadline = time.time() + limit
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.stderr_path.read_text()[-2000:]}")
            try:
                if http_get(self.admin("/ready"), timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready: {self.stderr_path.read_text()[-2000:]}")

    def admin(self, path):
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def log_records(self):
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def stop(self, timeout=15):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.stderr.close()
            if self.stdout is not None:  # a test that starts the process itself may not set it
                self.stdout.close()


class Mesh:
    """client sidecar (outbound) → mTLS → server sidecar (inbound) → upstream app."""

    def __init__(self, workdir: Path, upstream_port: int, server_extra=None, client_extra=None, server_clusters=(), server_chains=(), peer_protocol=None):
        """`peer_protocol`: the client's peer clusters' `protocol` (unset: AUTO, HTTP/2)."""
        self.dir = workdir
        self.ca = CA(TD)
        self.bundle = workdir / "bundle.pem"
        self.bundle.write_bytes(self.ca.pem())
        self.client_cert, self.client_key = self.ca.write_svid(workdir, "client", CLIENT_ID)
        self.server_cert, self.server_key = self.ca.write_svid(workdir, "server", SERVER_ID)
        self.inbound_port = free_port()
        self.outbound_port = free_port()
        self.server = Sidecar(
            workdir,
            "server",
            self.server_cert,
            self.server_key,
            self.bundle,
            [inbound_listener(self.inbound_port, extra_chains=server_chains)],
            [{"name": "inbound|app||", "endpoints": [f"127.0.0.1:{upstream_port}"]}] + list(server_clusters),
            **(server_extra or {}),
        )
        proto = {"protocol": peer_protocol} if peer_protocol else {}
        vhosts = [
            {"name": "server", "domains": ["server", "server:80", "server.test.svc.cluster.local"], "routes": [route("outbound|80||server")]},
            {"name": "wrong-id", "domains": ["wrong-id"], "routes": [route("outbound|80||wrong-id")]},
        ]
        self.client = Sidecar(
            workdir,
            "client",
            self.client_cert,
            self.client_key,
            self.bundle,
            [outbound_listener(self.outbound_port, vhosts)],
            [
                peer_cluster("outbound|80||server", self.inbound_port, [SERVER_ID], **proto),
                peer_cluster("outbound|80||wrong-id", self.inbound_port, [f"spiffe://{TD}/ns/test/sa/someone-else"], **proto),
            ],
            **(client_extra or {}),
        )

    def start(self):
        self.server.start()
        self.client.start()
        return self

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.outbound_port}{path}"

    def stop(self):
        self.client.stop()
        self.server.stop()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


@pytest.fixture
def mesh(tmp_path, upstream):
    m = Mesh(tmp_path, upstream.port).start()
    yield m
    m.stop()


# === /config_dump secrets ===


def dumped_secret(sidecar, name):
    """The SDS secret `name` from a sidecar's /config_dump (Envoy's SecretsConfigDump shape)."""
    dump = json.loads(http_get(sidecar.admin("/config_dump"))[1])
    secrets = [c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")][0]["dynamic_active_secrets"]
    return {s["name"]: s for s in secrets}[name]


def dumped_svid(sidecar):
    """(serial number, SPIFFE ID) of the SVID a sidecar shows, read from the certificate itself."""
    import base64

    from cryptography import x509

    secret = dumped_secret(sidecar, "default")["secret"]
    assert secret["tls_certificate"]["private_key"] == {"inline_string": "[redacted]"}
    pem = base64.b64decode(secret["tls_certificate"]["certificate_chain"]["inline_bytes"])
    leaf = x509.load_pem_x509_certificates(pem)[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    return leaf.serial_number, uris[0]


# === steady load ===


class Load:
    """Bounded steady load: `workers` threads, each on its own keep-alive HTTP/1.1 connection,
    sending GETs until stopped or `limit` seconds pass. Records every failure with its reason,
    refused connections included."""

    def __init__(self, port, host="server", path="/", workers=4, limit=120.0, pause=0.005):
        import http.client

        self._http = http.client
        self.port, self.host, self.path = port, host, path
        self.workers, self.limit, self.pause = workers, limit, pause
        self.ok = 0
        self.failures = []
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return self

    def _run(self):
        deadline = time.time() + self.limit
        conn = None
        while not self._stop.is_set() and time.time() < deadline:
            try:
                if conn is None:
                    conn = self._http.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    conn.connect()
            except ConnectionRefusedError as e:
                # A refused connection is a failed request like any other: no "zero failures"
                # claim may leave it out. (`refused` says how many of the failures these were.)
                with self._lock:
                    self.refused += 1
                    self.failures.append(f"ConnectionRefusedError: {e}")
                conn = None
                time.sleep(0.05)
                continue
            try:
                conn.request("GET", self.path, headers={"host": self.host})
                r = conn.getresponse()
                body = r.read()
                with self._lock:
                    if r.status == 200 and b"canary" in body:
                        self.ok += 1
                    else:
                        self.failures.append(f"status {r.status}: {body[:200]!r}")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none hidden
                with self._lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                conn = None
            time.sleep(self.pause)


# === opaque TCP beside HTTP (protocol sniffing on one outbound port) ===

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
            # Both kinds of chain on one port, as Istio's protocol sniffing builds them: what the
            # first bytes look like decides which one takes the connection.
            "filter_chains": [
                {
                    "name": "http",
                    "filter_chain_match": {"application_protocols": ["http/1.1", "h2c"]},
                    "http_connection_manager": {
                        "stat_prefix": "outbound_9000_http",
                        "route_config": {"virtual_hosts": [{"name": "server", "domains": ["*"], "routes": [route("outbound|80||server")]}]},
                    },
                },
                {"name": "tcp", "tcp_proxy": {"stat_prefix": "outbound_9000", "cluster": "outbound|9000||server"}},
            ],
        }
    )
    m.client.config["clusters"].append(peer_cluster("outbound|9000||server", m.inbound_port, [SERVER_ID], sni=TCP_SNI))
    m.client.rewrite()
    m.start()
    yield m
    m.stop()
    echo.shutdown()
    echo.server_close()
