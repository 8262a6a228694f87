"""deploy/: the Kubernetes manifests and the fortio bench manifests.

Built-in kinds are validated against the real Kubernetes schemas (`kubernetes-validate`, 1.29
and the newest it has); `kubectl apply --dry-run=client` parses every file (against the API
stand-in's discovery: no cluster runs here); the flags the containers are given are flags the
binary has; the injection ConfigMap is what the webhook reads; the bench's AuthorizationPolicy
admits the fortio client and nobody else."""

import os
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, binary, require_tool
from kube_standin import KubeStandIn

MANIFESTS = sorted((ROOT / "deploy").glob("*/*.yaml"))
ISTIO_GROUPS = ("security.istio.io/", "networking.istio.io/", "telemetry.istio.io/")
VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_manifests():
    names = {p.relative_to(ROOT / "deploy").as_posix() for p in MANIFESTS}
    assert {"kubernetes/eastguard.yaml", "bench/fortio.yaml"} <= names, names


def validate_all(all_docs):
    """Built-in kinds against Kubernetes 1.29's and the newest schemas, strictly."""
    kinds = []
    for d in all_docs:
        kinds.append(d["kind"])
        if d["apiVersion"].startswith(ISTIO_GROUPS):
            continue  # Istio's CRDs: checked by eastguard's own reader below
        for v in VERSIONS:
            kubernetes_validate.validate(d, v, strict=True)
    assert kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_manifests_are_valid_kubernetes(path):
    validate_all(docs(path))


def container_args(d):
    spec = d["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        yield c


def check_flags(all_docs):
    """Every `--flag` the Deployments and DaemonSets pass to eastguard exists in that
    subcommand's help; returns how many were checked."""
    checked = 0
    helps = {}
    for d in all_docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for c in container_args(d):
            sub, *args = c["args"]
            if sub not in helps:
                helps[sub] = subprocess.run([binary(), sub, "--help"], capture_output=True, text=True, timeout=30).stdout
            for a in args:
                flag = a.split("=", 1)[0]
                assert re.search(rf"\s{re.escape(flag)}[\s=<]", helps[sub]), f"{sub} has no {flag}"
                checked += 1
    return checked


def test_the_containers_flags_are_the_binarys():
    assert check_flags(docs(ROOT / "deploy" / "kubernetes" / "eastguard.yaml")) >= 15


def test_the_injection_configmap_is_what_the_webhook_reads(tmp_path):
    from test_inject import Webhook, corpus_pods, patched, review, schema_errors, sidecar_of

    cm = next(d for d in docs(ROOT / "deploy" / "kubernetes" / "eastguard.yaml") if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "eastguard-injection")
    w = Webhook(tmp_path, template=yaml.safe_dump(cm))
    try:
        pod = corpus_pods("hello.yaml")[0]
        out = patched(pod, w.answer(review(pod)))
        _, sidecar = sidecar_of(out)
        assert sidecar["image"] == "ghcr.io/eastguard/eastguard:0.1.0"
        vol = next(v for v in out["spec"]["volumes"] if v["name"] == "eastguard-workload-socket")
        # The socket directory the node agent DaemonSet serves.
        ds = next(d for d in docs(ROOT / "deploy" / "kubernetes" / "eastguard.yaml") if d["kind"] == "DaemonSet")
        host_dirs = [v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"] if "hostPath" in v]
        assert vol["hostPath"]["path"] in host_dirs
        assert schema_errors(out) == []
        # Captured with eBPF: the control plane is told, and the sidecar waits for the node
        # agent's status file beside the socket (the agent's default --capture-status-dir is
        # the socket's directory, the same host directory).
        assert out["metadata"]["annotations"]["sidecar.eastguard.io/capture"] == "ebpf"
        env = {e["name"]: e for e in sidecar["env"]}
        assert env["POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
        boot = yaml.safe_load(env["EASTGUARD_BOOTSTRAP"]["value"])
        mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "eastguard-workload-socket")
        assert boot["capture"]["status_file"] == f"{mount['mountPath']}/${{POD_UID}}.capture"
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--capture-pods" in args
        sock = next(a.split("=", 1)[1] for a in args if a.startswith("--workload-api-socket="))
        agent_mount = next(m for m in ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if sock.startswith(m["mountPath"] + "/"))
        agent_vol = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == agent_mount["name"])
        assert agent_vol["hostPath"]["path"] == vol["hostPath"]["path"]
    finally:
        w.stop()


def test_the_bench_policy_admits_the_client_only(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bench.yaml").write_text(yaml.safe_dump_all([d for d in docs(ROOT / "deploy" / "bench" / "fortio.yaml") if d["apiVersion"].startswith(ISTIO_GROUPS)]))

    def check(principal):
        return subprocess.run([binary(), "policy", "check", "--policies", str(policies), "--namespace", "eastguard-bench",
                               "--workload-labels", "app=fortio-server", "--principal", principal, "--path", "/echo"],
                              capture_output=True, text=True, timeout=30).returncode

    assert check("spiffe://cluster.local/ns/eastguard-bench/sa/fortio-client") == 0
    assert check("spiffe://cluster.local/ns/eastguard-bench/sa/other") == 3


def kubectl_dry_run(tmp_path, paths):
    """`kubectl apply --dry-run=client` parses each file and would create each of its objects."""
    kubectl = require_tool("kubectl")
    api = KubeStandIn(token=None)  # kubectl sends no token over plain HTTP
    try:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        for path in paths:
            r = subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "apply", "--dry-run=client", "--validate=false", "-f", str(path)],
                               capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=str(tmp_path)))
            assert r.returncode == 0, f"{path}: {r.stderr}"
            created = [l for l in r.stdout.splitlines() if l.endswith("(dry run)")]
            assert len(created) == len(docs(path)), (path, r.stdout)
    finally:
        api.stop()


def test_kubectl_parses_every_manifest(tmp_path):
    kubectl_dry_run(tmp_path, MANIFESTS)


def test_the_node_ca_is_wired_as_the_binary_expects():
    check_node_ca_wiring(docs(ROOT / "deploy" / "kubernetes" / "eastguard.yaml"))


def check_node_ca_wiring(all_docs):
    """The node agents reach the control plane's CA, with tokens for its audience, bound to
    their pods, as the service account the CA serves; the control plane may review them."""
    by = {(d["kind"], d["metadata"]["name"]): d for d in all_docs}
    cp = by[("Deployment", "eastguard-control-plane")]["spec"]["template"]["spec"]
    ds = by[("DaemonSet", "eastguard-node-agent")]["spec"]["template"]["spec"]
    cp_args = dict(a.split("=", 1) for a in cp["containers"][0]["args"][1:] if "=" in a)
    ds_args = dict(a.split("=", 1) for a in ds["containers"][0]["args"][1:] if "=" in a)
    ca_port = int(cp_args["--ca-address"].rsplit(":", 1)[1])
    svc = by[("Service", "eastguard-control-plane")]
    host_port = ds_args["--ca-url"].removeprefix("https://")
    host, port = host_port.rsplit(":", 1)
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert host == cp_args["--ca-dns-name"]
    assert any(p["port"] == int(port) and p["targetPort"] == ca_port for p in svc["spec"]["ports"])
    # The token: projected, for the audience the CA checks (its default), mounted where the flag says.
    help_text = subprocess.run([binary(), "control-plane", "--help"], capture_output=True, text=True, timeout=30).stdout
    audience = cp_args.get("--ca-audience") or re.search(r"--ca-audience <CA_AUDIENCE>.*?\[default: ([^\]]+)\]", help_text, re.S).group(1)
    agent_sa = cp_args.get("--node-agent-service-account") or re.search(r"--node-agent-service-account <[A-Z_]+>.*?\[default: ([^\]]+)\]", help_text, re.S).group(1)
    vol = next(v for v in ds["volumes"] if v["name"] == "ca-token")
    src = vol["projected"]["sources"][0]["serviceAccountToken"]
    assert src["audience"] == audience
    mount = next(m for m in ds["containers"][0]["volumeMounts"] if m["name"] == "ca-token")
    assert ds_args["--ca-token"] == f"{mount['mountPath']}/{src['path']}"
    assert agent_sa == f"{by[('DaemonSet', 'eastguard-node-agent')]['metadata']['namespace']}/{ds['serviceAccountName']}"
    # The control plane may create TokenReviews; the node agent may not.
    rules = by[("ClusterRole", "eastguard-control-plane")]["rules"]
    assert any("authentication.k8s.io" in r["apiGroups"] and "tokenreviews" in r["resources"] and r["verbs"] == ["create"] for r in rules)
    agent_rules = by[("ClusterRole", "eastguard-node-agent")]["rules"]
    assert not any("tokenreviews" in r["resources"] for r in agent_rules)
    # The webhook's certificate comes from the same root, for the Service's name, and the
    # control plane may keep exactly that configuration's caBundle.
    assert "--webhook-cert" not in cp_args and cp_args["--webhook-dns-name"] == host
    mwc = by[("MutatingWebhookConfiguration", cp_args["--webhook-configuration"])]
    assert all(w["clientConfig"]["service"]["name"] == svc["metadata"]["name"] for w in mwc["webhooks"])
    assert any("mutatingwebhookconfigurations" in r["resources"] and r.get("resourceNames") == [mwc["metadata"]["name"]]
               and sorted(r["verbs"]) == ["get", "patch"] for r in rules)
    # The node agent signs with the intermediate only: no CA of its own.
    assert "--ca-dir" not in ds_args and "--admin-address" not in ds_args
