"""Access-log formats operators configure: Istio's default text format, a format string of Envoy
operators, and `json_format` with Envoy's typing, each filled from a real call through the pair;
an operator the proxy cannot fill is refused at start, by name."""

import json
import re
import subprocess
import time
import urllib.error
import urllib.request

import yaml

from conftest import CLIENT_ID, SERVER_ID, Mesh, binary, free_port, wait_for

# Istio's default format, field by field (quoted fields may hold spaces).
ISTIO_LINE = re.compile(
    r'^\[(?P<start>[0-9T:.\-]+Z)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<details>\S+) (?P<termination>\S+) "(?P<transport_failure>[^"]*)" (?P<rx>\d+) (?P<tx>\d+) (?P<duration>\d+) '
    r'(?P<upstream_time>\S+) "(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<request_id>[^"]*)" "(?P<authority>[^"]*)" '
    r'"(?P<upstream_host>[^"]*)" (?P<cluster>\S+) (?P<upstream_local>\S+) (?P<downstream_local>\S+) '
    r'(?P<downstream_remote>\S+) (?P<sni>\S+) (?P<route>\S+)$'
)


def mesh_with(tmp_path, upstream, access_log):
    m = Mesh(tmp_path, upstream.port)
    for s in (m.client, m.server):
        s.config["access_log"] = {"path": str(s.access_log), **access_log}
        s.rewrite()
    return m.start()


def get(m, path, host="server"):
    req = urllib.request.Request(m.url(path), headers={"host": host, "user-agent": "fmt-test"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()  # the whole response: a client gone before its end is logged DC
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def lines(sidecar, n):
    wait_for(f"{n} line(s) in {sidecar.name}'s access log",
             lambda: sidecar.access_log.exists() and len(sidecar.access_log.read_text().splitlines()) >= n)
    return sidecar.access_log.read_text().splitlines()


def test_istio_default_text_format(tmp_path, upstream):
    m = mesh_with(tmp_path, upstream, {"format": "ISTIO"})
    try:
        assert get(m, "/orders/7?x=1") == 200
        server = ISTIO_LINE.match(lines(m.server, 1)[-1])
        client = ISTIO_LINE.match(lines(m.client, 1)[-1])
        assert server and client, (lines(m.server, 1), lines(m.client, 1))
        for f in (server, client):
            assert (f["method"], f["path"], f["code"], f["flags"]) == ("GET", "/orders/7?x=1", "200", "-")
            assert f["ua"] == "fmt-test" and len(f["request_id"]) == 36
        assert server["request_id"] == client["request_id"]  # one call, seen from both sides
        assert client["cluster"] == "outbound|80||server" and server["cluster"] == "inbound|app||"
        assert server["upstream_host"] == f"127.0.0.1:{upstream.port}"
        assert client["upstream_host"] == f"127.0.0.1:{m.inbound_port}"
        # The client sidecar's end of its mTLS connection is the server sidecar's remote address.
        assert client["upstream_local"] == server["downstream_remote"]
        assert server["downstream_local"] == f"127.0.0.1:{m.inbound_port}"
    finally:
        m.stop()


def test_envoy_operators_in_text_and_json(tmp_path, upstream):
    text = "%RESPONSE_CODE% %RESPONSE_FLAGS% %DOWNSTREAM_PEER_URI_SAN% %UPSTREAM_PEER_URI_SAN% %REQ(:AUTHORITY)% %%\n"
    m = Mesh(tmp_path, upstream.port)
    m.server.config["access_log"] = {"path": str(m.server.access_log), "text_format": text}
    m.client.config["access_log"] = {
        "path": str(m.client.access_log),
        "json_format": {"code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "peer": "%UPSTREAM_PEER_URI_SAN%",
                        "bytes": "%BYTES_RECEIVED%", "sni": "%REQUESTED_SERVER_NAME%", "call": "%REQ(:METHOD)% %REQ(:PATH)%"},
    }
    m.server.rewrite()
    m.client.rewrite()
    m.start()
    try:
        assert get(m, "/a") == 200
        assert lines(m.server, 1)[-1] == f"200 - {CLIENT_ID} - server %"
        rec = json.loads(lines(m.client, 1)[-1])
        assert rec == {"code": 200, "flags": "-", "peer": SERVER_ID, "bytes": 0, "sni": None, "call": "GET /a"}
        # A peer with the wrong identity: refused, and the flag says why.
        assert get(m, "/b", host="wrong-id") == 503
        rec = json.loads(lines(m.client, 2)[-1])
        assert (rec["code"], rec["flags"], rec["peer"]) == (503, "UF", None)
    finally:
        m.stop()


def test_an_operator_the_proxy_cannot_fill_is_refused_by_name(tmp_path):
    for access_log, message in [
        ({"text_format": "%DYNAMIC_METADATA(istio.mixer:status)%"}, "access_log.text_format: unsupported operator %DYNAMIC_METADATA(istio.mixer:status)%"),
        ({"json_format": {"x": "%REQ(X-SECRET)%"}}, "access_log.json_format: x: unsupported operator %REQ(X-SECRET)%"),
        ({"text_format": "%RESPONSE_CODE"}, "unterminated operator"),
        ({"text_format": "x", "json_format": {"a": "b"}}, "cannot both be set"),
        ({"format": "SYSLOG"}, "unknown variant"),
    ]:
        cfg = {
            "node": {"id": "n", "workload": "w", "namespace": "test"},
            "admin": {"address": f"127.0.0.1:{free_port()}"},
            "identity": {"files": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"}},
            "access_log": {"path": str(tmp_path / "a.log"), **access_log},
        }
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([binary(), "proxy", "--config", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and message in r.stderr, (access_log, r.stderr)


def test_a_connection_managers_own_logs_share_writers_and_show_in_config_dump(tmp_path, upstream):
    from conftest import http_get

    own = tmp_path / "inbound-http.log"
    m = Mesh(tmp_path, upstream.port)
    hcm = m.server.config["listeners"][0]["filter_chains"][-1]["http_connection_manager"]
    hcm["access_log"] = [
        {"path": str(own), "text_format": "%RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% %REQ(:PATH)%\n"},
        # The bootstrap's file too: one writer per file, so records never interleave mid-line.
        {"path": str(m.server.access_log), "format": "JSON"},
    ]
    m.server.rewrite()
    m.start()
    try:
        for i in range(20):
            assert get(m, f"/own/{i}") == 200
        wait_for("the connection manager's log", lambda: own.exists() and len(own.read_text().splitlines()) == 20)
        assert own.read_text().splitlines()[0] == f"200 {CLIENT_ID} /own/0"
        # The bootstrap's record and the connection manager's, both whole JSON lines.
        records = [json.loads(l) for l in lines(m.server, 40)]
        assert len(records) == 40 and {r["path"] for r in records} == {f"/own/{i}" for i in range(20)}
        dump = json.loads(http_get(m.server.admin("/config_dump"))[1])
        text = json.dumps(dump)
        assert "envoy.extensions.access_loggers.file.v3.FileAccessLog" in text
        assert "%RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% %REQ(:PATH)%" in text
    finally:
        m.stop()


ROOT_TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
"""

SERVER_OFF = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: server-quiet, namespace: test}
spec:
  selector: {matchLabels: {app: server}}
  accessLogging: [{disabled: true}]
"""


def test_istio_telemetry_api_turns_sidecar_access_logs_on_and_off(tmp_path):
    """Over xDS, as Istio does it: no log by default; a root-namespace Telemetry with the built-in
    `envoy` provider gives every sidecar Istio's text format on stdout; a workload's Telemetry
    with `disabled: true` turns only its own off; an unknown provider is refused by name."""
    from test_xds import XdsMesh

    m = XdsMesh(tmp_path)
    out = {name: s.stdout_path for name, s in m.sidecars.items()}

    def logged(name, path):
        return any(f" {path} " in l or f'"GET {path} ' in l for l in out[name].read_text().splitlines())

    try:
        wait_for("config from the control plane", lambda: m.get("/before")[0] == 200)
        (m.config_dir / "telemetry.yaml").write_text(ROOT_TELEMETRY)
        n = iter(range(100000))

        def both_log():
            i = next(n)
            m.get(f"/on/{i}")
            time.sleep(0.05)  # the writer threads
            return logged("client", f"/on/{i}") and logged("server", f"/on/{i}")

        wait_for("both sidecars log", both_log)
        assert m.get("/on/x")[0] == 200
        wait_for("the server sidecar logged /on/x", lambda: logged("server", "/on/x"))
        line = next(l for l in out["server"].read_text().splitlines() if '"GET /on/x ' in l)
        assert ISTIO_LINE.match(line), line
        assert not logged("server", "/before") and not logged("client", "/before")
        # The server's own Telemetry turns its log off; the client keeps logging.
        (m.config_dir / "server-quiet.yaml").write_text(SERVER_OFF)
        k = iter(range(100000))

        def quiet():
            i = next(k)
            m.get(f"/off/{i}")
            time.sleep(0.05)  # the writer threads
            return logged("client", f"/off/{i}") and not logged("server", f"/off/{i}")

        wait_for("the server sidecar's log off, the client's on", quiet)
        # Not only quiet: the server sidecar's connection managers carry no logger at all.
        from conftest import http_get

        def loggers(name):
            return json.dumps(json.loads(http_get(m.sidecars[name].admin("/config_dump"))[1])).count("FileAccessLog")

        wait_for("the server's loggers removed", lambda: loggers("server") == 0)
        assert loggers("client") >= 1
        # A provider the control plane does not have: the file is refused, naming it.
        (m.config_dir / "otel.yaml").write_text(ROOT_TELEMETRY.replace("mesh-default", "otel").replace("envoy", "otel-als"))
        wait_for("the bad provider refused", lambda: '"otel-als" is not a provider here' in m.cp.logs())
    finally:
        m.stop()


def test_mesh_wide_access_log_flags_as_istio_mesh_config(tmp_path):
    """`--access-log-file` / `--access-log-encoding JSON`: every sidecar writes Istio's JSON keys,
    typed; a bad `--access-log-format` stops the control plane with a clear error."""
    from test_xds import XdsMesh

    log = tmp_path / "mesh-access.log"
    m = XdsMesh(tmp_path, cp_extra=["--access-log-file", str(log), "--access-log-encoding", "JSON"])
    try:
        wait_for("config from the control plane", lambda: m.get("/json")[0] == 200)
        wait_for("two JSON records (client and server)", lambda: log.exists() and len(log.read_text().splitlines()) >= 2)
        records = [json.loads(l) for l in log.read_text().splitlines()]
        r = next(r for r in records if r["path"] == "/json")
        assert r["response_code"] == 200 and r["method"] == "GET" and isinstance(r["duration"], int)
        assert {"upstream_cluster", "upstream_local_address", "x_forwarded_for", "start_time"} <= set(r)
    finally:
        m.stop()
    bad = subprocess.run(
        [binary(), "control-plane", "--config-dir", str(tmp_path), "--xds-address", f"127.0.0.1:{free_port()}",
         "--access-log-format", "%NOT_AN_OPERATOR%"],
        capture_output=True, text=True, timeout=30,
    )
    assert bad.returncode != 0 and "--access-log-format: unsupported operator %NOT_AN_OPERATOR%" in bad.stderr, bad.stderr
