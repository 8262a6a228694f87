"""`eastguard proxy-config` against sidecars configured over xDS by the control plane from Istio
files: the istioctl-style tables name what the sidecar really holds (its listeners, clusters,
endpoints, SVID and policies), `-o json|yaml` give the Envoy objects, a saved dump reads the same
as the live one, and bad input is refused with a clear message."""

import json
import subprocess

import pytest
import yaml
from cryptography import x509

from conftest import SERVER_ID, binary, free_port, wait_for
from test_xds import DENY_ADMIN, DENIED, XdsMesh


def proxy_config(*args):
    r = subprocess.run([binary(), "proxy-config", *args], capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout, r.stderr


def table(text):
    """Rows of an istioctl-style table as dicts (columns are three or more spaces apart)."""
    import re

    lines = [l for l in text.splitlines() if l.strip()]
    header = re.split(r"\s{3,}", lines[0].strip())
    starts = [lines[0].index(h) for h in header]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows.append(dict(zip(header, cells)))
    return rows


def test_tables_name_what_the_sidecars_hold(tmp_path):
    m = XdsMesh(tmp_path)
    try:
        wait_for("config from the control plane", lambda: m.get("/hello")[0] == 200)
        (m.config_dir / "authz.yaml").write_text(DENY_ADMIN)
        wait_for("the DENY policy in force", lambda: m.get("/admin/x") == DENIED, limit=5)
        server = f"127.0.0.1:{m.sidecars['server'].admin_port}"
        client = f"127.0.0.1:{m.sidecars['client'].admin_port}"

        rc, out, err = proxy_config("listeners", "--admin", server)
        assert rc == 0, err
        inbound = [r for r in table(out) if r["NAME"] == "virtualInbound"]
        assert inbound and all(r["PORT"] == str(m.inbound) for r in inbound), out

        rc, out, err = proxy_config("clusters", "--admin", client)
        assert rc == 0, err
        rows = table(out)
        assert {
            "SERVICE FQDN": "server.test.svc.cluster.local",
            "PORT": "80",
            "SUBSET": "-",
            "DIRECTION": "outbound",
            "TYPE": "EDS",
            "DESTINATION RULE": "-",
        } in rows, out

        rc, out, err = proxy_config("endpoints", "--admin", client)
        assert rc == 0, err
        assert {
            "ENDPOINT": f"127.0.0.1:{m.inbound}",
            "STATUS": "HEALTHY",
            "OUTLIER CHECK": "OK",
            "CLUSTER": "outbound|80||server.test.svc.cluster.local",
        } in table(out), out

        rc, out, err = proxy_config("secret", "--admin", server)
        assert rc == 0, err
        leaf = x509.load_pem_x509_certificate((tmp_path / "server.cert.pem").read_bytes())
        default = next(r for r in table(out) if r["RESOURCE NAME"] == "default")
        assert (default["TYPE"], default["STATUS"], default["VALID CERT"]) == ("Cert Chain", "ACTIVE", "true")
        assert default["SPIFFE ID"] == SERVER_ID
        assert int(default["SERIAL NUMBER"], 16) == leaf.serial_number
        assert any(r["TYPE"] == "CA" for r in table(out))

        rc, out, err = proxy_config("authz", "--admin", server)
        assert rc == 0, err
        deny = [r for r in table(out) if r["ACTION"] == "DENY"]
        assert deny and "deny-admin" in deny[0]["AuthorizationPolicy"], out

        rc, out, err = proxy_config("routes", "--admin", client)
        assert rc == 0, err
        assert any(r["CLUSTER"] == "outbound|80||server.test.svc.cluster.local" for r in table(out)), out

        # JSON and YAML carry the Envoy objects.
        rc, out, _ = proxy_config("clusters", "--admin", client, "-o", "json")
        names = [c["name"] for c in json.loads(out)]
        assert "outbound|80||server.test.svc.cluster.local" in names
        rc, out, _ = proxy_config("all", "--admin", server, "-o", "yaml")
        everything = yaml.safe_load(out)
        assert set(everything) == {"listeners", "routes", "clusters", "endpoints", "secret", "authz"}
        assert "PRIVATE KEY" not in out

        # A saved dump reads the same as the live sidecar.
        import urllib.request

        saved = tmp_path / "dump.json"
        saved.write_bytes(urllib.request.urlopen(f"http://{client}/config_dump", timeout=5).read())
        assert proxy_config("all", "--file", str(saved))[1] == proxy_config("all", "--admin", client)[1]
    finally:
        m.stop()


def test_bad_input_is_refused_clearly(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    rc, out, err = proxy_config("listeners", "--file", str(junk))
    assert rc != 0 and "not JSON" in err and "panicked" not in err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    rc, _, err = proxy_config("listeners", "--file", str(other))
    assert rc != 0 and "no `configs` array" in err
    rc, _, err = proxy_config("listeners", "--admin", f"127.0.0.1:{free_port()}")
    assert rc != 0 and "cannot read /config_dump" in err and "panicked" not in err
    rc, _, err = proxy_config("sideways", "--file", str(junk))
    assert rc != 0 and "invalid value" in err
    # Odd shapes (wrong types where objects are expected) print empty tables, never crash.
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "static_listeners": [{"listener": 5}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
         "dynamic_active_secrets": [{"name": "default", "secret": {"tls_certificate": {"certificate_chain": {"inline_bytes": "!!"}}}}]},
    ]}))
    rc, out, err = proxy_config("all", "--file", str(odd))
    assert rc == 0, err


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_proxy_status_shows_synced_and_nacked_per_type(tmp_path, mode):
    http = free_port()
    m = XdsMesh(tmp_path, delta=mode == "delta", cp_extra=["--http-address", f"127.0.0.1:{http}"])
    cp = f"127.0.0.1:{http}"
    nodes = {name: s.config["node"]["id"] for name, s in m.sidecars.items()}

    def rows():
        r = subprocess.run([binary(), "proxy-status", "--control-plane", cp], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\nNACKED: ")
        return {row["NAME"]: row for row in table(lines[0])}, r.stdout

    def status(name, ty):
        return rows()[0].get(nodes[name], {}).get(ty)

    try:
        wait_for("config from the control plane", lambda: m.get("/hello")[0] == 200)
        for name in nodes:
            for ty in ("CDS", "LDS", "EDS"):
                wait_for(f"{name} {ty} SYNCED", lambda name=name, ty=ty: status(name, ty) == "SYNCED")
        assert set(rows()[0]) == set(nodes.values())
        # A cluster the proxies cannot build: both NACK the CDS update, and say why.
        (m.config_dir / "bad-host.yaml").write_text(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: test}\n"
            "spec: {hosts: ['bad host!'], ports: [{number: 80, name: http, protocol: HTTP}], workloadSelector: {labels: {app: server}}}\n"
        )
        for name in nodes:
            wait_for(f"{name} CDS NACKED", lambda name=name: status(name, "CDS") == "NACKED")
        out = rows()[1]
        assert f"NACKED: {nodes['client']} CDS version" in out and "invalid SNI" in out, out
        assert status("client", "LDS") == "SYNCED"
        rc = subprocess.run([binary(), "proxy-status", "--control-plane", cp, "-o", "json"], capture_output=True, text=True, timeout=30)
        proxies = {p["node"]: p for p in json.loads(rc.stdout)["proxies"]}
        assert "invalid SNI" in proxies[nodes["server"]]["types"]["CDS"]["nack"]
        assert proxies[nodes["server"]]["delta"] is (mode == "delta")
        # Fixed: the next update is ACKed, the NACK is gone.
        (m.config_dir / "bad-host.yaml").unlink()
        for name in nodes:
            wait_for(f"{name} CDS SYNCED again", lambda name=name: status(name, "CDS") == "SYNCED")
        assert "NACKED:" not in rows()[1]
        # A sidecar that goes away leaves the view.
        m.sidecars["client"].stop()
        wait_for("the stopped sidecar's row gone", lambda: nodes["client"] not in rows()[0])
        assert nodes["server"] in rows()[0]
    finally:
        m.stop()
    rc = subprocess.run([binary(), "proxy-status", "--control-plane", cp], capture_output=True, text=True, timeout=30)
    assert rc.returncode != 0 and "cannot read /debug/syncz" in rc.stderr
