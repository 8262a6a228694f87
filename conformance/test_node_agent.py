"""eastguard node-agent's Workload API against py-spiffe (an independent client): attestation by
peer credentials, the security header, hot-reloaded entries.

Known gap: for an absolute `unix:///path` target, grpc-core (Python grpcio, C++) sends the
percent-encoded path as HTTP/2 `:authority`, which the Rust `http` crate under tonic refuses
(`%` outside an IPv6 zone); clients here use a relative `unix:agent.sock` target from the socket's
directory, whose authority has no `%`. Go clients (SPIRE's) send `localhost` and are unaffected."""

import os
import subprocess
import sys

import grpc
import pytest
from cryptography import x509

from conftest import NodeAgent, wait_for

import spiffe  # noqa: E402  (py-spiffe, installed by scripts/test.sh)
import spiffe.errors  # noqa: E402
import spiffe.svid.errors  # noqa: E402
import spiffe.workloadapi.errors  # noqa: E402

ID = "spiffe://cluster.local/ns/test/sa/py"
TOOL_ID = "spiffe://cluster.local/ns/test/sa/py-by-exe"


def entries_yaml(uid, exe=None):
    text = f"trust_domain: cluster.local\nentries:\n  - spiffe_id: {ID}\n    selectors: [\"unix:uid:{uid}\"]\n    x509_svid_ttl: 10m\n"
    if exe:
        text += f"  - spiffe_id: {TOOL_ID}\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{exe}\"]\n"
    return text


@pytest.fixture
def agent(tmp_path):
    os.chmod(tmp_path, 0o755)
    a = NodeAgent(tmp_path, entries_yaml(os.getuid(), os.path.realpath(sys.executable))).start()
    yield a.sock, a.entries, tmp_path
    a.stop()


def client(sock):
    return spiffe.WorkloadApiClient(socket_path=f"unix://{sock}")


def test_py_spiffe_fetches_svids_and_bundle(agent):
    sock, _, _ = agent
    with client(sock) as c:
        svids = c.fetch_x509_svids()
        assert sorted(str(s.spiffe_id) for s in svids) == [ID, TOOL_ID], "uid and executable path both attested"
        svid = c.fetch_x509_svid()
        assert str(svid.spiffe_id) == ID
        bundles = c.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("cluster.local"))
        cas = list(bundle.x509_authorities)
        assert len(cas) == 1
        # The SVID is signed by the bundle's CA.
        leaf = svid.leaf
        ca = cas[0]
        ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(leaf.signature_hash_algorithm))
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_missing_security_header_is_invalid_argument(agent):
    sock, _, _ = agent
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        call = ch.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(call(b"", timeout=5)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unregistered_uid_is_permission_denied(agent):
    sock, _, tmp = agent
    if os.getuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root; this test needs it to switch uid")
        pytest.skip("!!! SKIPPING: needs root to run a client as another uid")
    code = (
        "import os, spiffe\n"
        # pytest's temp root is 0700: enter the socket's directory before dropping to uid 65534.
        f"os.chdir('{sock.parent}'); os.setgid(65534); os.setuid(65534)\n"
        f"c = spiffe.WorkloadApiClient(socket_path='unix:{sock.name}')\n"
        "try:\n    c.fetch_x509_svid(); print('GOT-SVID')\n"
        "except Exception as e:\n    print('ERR', type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "GOT-SVID" not in out.stdout
    assert "PERMISSION_DENIED" in out.stdout.upper() or "permission" in out.stdout.lower() or "no identity" in out.stdout, out.stdout + out.stderr


def test_entries_hot_reload_and_bad_file_keeps_previous(agent):
    sock, entries, _ = agent
    log = sock.parent / "agent.log"
    entries.write_text("trust_domain: cluster.local\nentries: [{spiffe_id: spiffe://cluster.local/x, selectors: [\"unix:bogus\"]}]\n")
    wait_for("the agent refuses the bad file", lambda: "registration entries file is not valid; keeping the previous entries" in log.read_text())
    with client(sock) as c:
        assert str(c.fetch_x509_svid().spiffe_id) == ID, "a bad file must not replace good entries"
    entries.write_text(entries_yaml(os.getuid() + 4242))

    def refused():
        with client(sock) as c:
            try:
                c.fetch_x509_svid()
                return None
            except spiffe.errors.PySpiffeError as e:
                return str(e)

    wait_for("the new entries (another uid) are in force", lambda: refused() is not None)
    assert "PERMISSION_DENIED" in refused(), refused()


def test_jwt_svid_fetch_and_validate_both_ways(agent):
    sock, _, _ = agent
    with client(sock) as c:
        jwt_svid = c.fetch_jwt_svid(audience={"orders"})
        assert str(jwt_svid.spiffe_id) == ID
        bundles = c.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("cluster.local"))
        # py-spiffe verifies the ES256 signature itself, against the JWKS we serve.
        checked = spiffe.JwtSvid.parse_and_validate(jwt_svid.token, bundle, {"orders"})
        assert str(checked.spiffe_id) == ID and "orders" in checked.audience
        with pytest.raises(spiffe.svid.errors.InvalidTokenError, match="Audience"):
            spiffe.JwtSvid.parse_and_validate(jwt_svid.token, bundle, {"ledger"})
        # And the agent validates it too.
        validated = c.validate_jwt_svid(jwt_svid.token, "orders")
        assert str(validated.spiffe_id) == ID
        with pytest.raises(spiffe.workloadapi.errors.ValidateJwtSvidError, match='audience "ledger" is not in'):
            c.validate_jwt_svid(jwt_svid.token, "ledger")
        tampered = jwt_svid.token[:-4] + ("AAAA" if not jwt_svid.token.endswith("AAAA") else "BBBB")
        with pytest.raises(spiffe.workloadapi.errors.ValidateJwtSvidError, match="signature does not verify"):
            c.validate_jwt_svid(tampered, "orders")


def test_relative_unix_target_works_too(agent):
    sock, _, _ = agent
    os.chdir(sock.parent)
    with spiffe.WorkloadApiClient(socket_path=f"unix:{sock.name}") as c:
        assert str(c.fetch_x509_svid().spiffe_id) == ID
