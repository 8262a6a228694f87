"""`eastguard control-plane --kubernetes`: Services, EndpointSlices, Pods and Istio's resources
watched through the API, feeding real sidecars over xDS.

The API server is a stand-in at the HTTP level (kube_standin.py: recorded-shape objects, paged
LIST, WATCH with bookmarks, 410 Gone, 429/500, a watch cut mid-event); no cluster runs on these
machines. What must hold: config from Kubernetes objects reaches the sidecars; a policy change is
enforced within 1 s of the watch event; a cut watch resumes from the last version (bookmarks);
410 Gone makes it list again (and a deletion missed meanwhile is seen); LIST errors back off and
retry; while the API is away the last good state is served; nothing from Kubernetes is served
before every resource is listed."""

import json
import time
import urllib.request

import pytest
import yaml

from conftest import CLIENT_ID, ROOT, free_port, listening, wait_for
from kube_standin import KubeStandIn
from test_xds import DENIED, XdsMesh

# The files hold only an unrelated service; everything the test is about comes from the API.
FILES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: unrelated, namespace: other}}
spec: {{hosts: [unrelated.example], ports: [{{number: 80, name: http, protocol: HTTP}}]}}
"""

SVC = "/api/v1/services"
PODS = "/api/v1/pods"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
AUTHZ = "/apis/security.istio.io/v1/authorizationpolicies"
NAMESPACES = "/api/v1/namespaces"
ACCOUNTS = "/api/v1/serviceaccounts"


def deny(paths, name="deny-admin"):
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "test", "uid": f"uid-{name}"},
            "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                     "rules": [{"to": [{"operation": {"paths": paths}}]}]}}


class KubeMesh(XdsMesh):
    """XdsMesh's sidecars and app, with the control plane reading the stand-in API."""

    def __init__(self, tmp_path, api, wait_ready=True, tls=False, cp_extra=(), sidecar_extra=None):
        self.api = api
        self.kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        super().__init__(tmp_path, registry=FILES, tls=tls, sidecar_extra=sidecar_extra,
                         cp_extra=["--kubernetes", "--kubeconfig", str(self.kubeconfig), *cp_extra],
                         before_sidecars=self.objects, wait_ready=wait_ready)

    def objects(self):
        api = self.api
        api.put(SVC, {"metadata": {"name": "server", "namespace": "test", "uid": "svc-1"},
                      "spec": {"selector": {"app": "server"}, "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"}]}})
        for name, ann in (("server", {"sidecar.eastguard.io/inbound-port": str(self.inbound)}),
                          ("client", {"sidecar.eastguard.io/outbound-port": str(self.outbound)})):
            api.put(PODS, {"metadata": {"name": name, "namespace": "test", "uid": f"pod-{name}",
                                        "labels": {"app": name}, "annotations": ann},
                           "spec": {"serviceAccountName": name, "nodeName": "node-a",
                                    "containers": [{"name": name, "image": name,
                                                    "ports": [{"name": "web", "containerPort": self.upstream.port}]}]},
                           "status": {"phase": "Running", "podIP": "127.0.0.1",
                                      "conditions": [{"type": "Ready", "status": "True"}]}})
        api.put(SLICES, {"metadata": {"name": "server-x1", "namespace": "test",
                                      "labels": {"kubernetes.io/service-name": "server"}},
                         "addressType": "IPv4",
                         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                                        "targetRef": {"kind": "Pod", "name": "server", "namespace": "test"}}],
                         "ports": [{"name": "http", "port": self.upstream.port, "protocol": "TCP"}]})


@pytest.fixture
def api():
    a = KubeStandIn(page_size=1)  # every LIST is paged, one object a page
    # Istio's ServiceEntry CRD is not installed here; the others are.
    a.missing.add("/apis/networking.istio.io/v1/serviceentries")
    # The first two LISTs of pods fail as an overloaded API server does.
    a.fail[PODS] = [500, 429]
    yield a
    a.stop()


def test_the_control_plane_follows_the_kubernetes_api(tmp_path, api):
    mesh = KubeMesh(tmp_path, api)
    try:
        wait_for("config from Kubernetes objects", lambda: mesh.get("/hello")[0] == 200, limit=20)
        assert mesh.get("/admin/x")[0] == 200
        # The failed LISTs were retried; pages were followed.
        lists = [q for q in api.requests_for(PODS) if "watch" not in q]
        assert len(lists) >= 4 and any("continue" in q for q in lists), lists

        # A policy change is enforced within 1 s of its watch event.
        t0 = time.time()
        api.put(AUTHZ, deny(["/admin*"]))
        t1 = wait_for("DENY from the API", lambda: mesh.get("/admin/x") == DENIED, limit=5)
        print(f"DENY in force {t1 - t0:.3f} s after the watch event")
        assert t1 - t0 <= 1.0
        assert mesh.get("/hello")[0] == 200

        # A watch cut in the middle of an event resumes from the last version it saw, which a
        # bookmark moved past changes to other resources (so nothing is replayed or skipped).
        svc = dict(api.collections[SVC][("test", "server")])
        other_rv = api.put(SVC, dict(svc, metadata=dict(svc["metadata"], annotations={"touched": "yes"})))
        wait_for("a bookmark past the other change", lambda: api.bookmarks.get(AUTHZ, 0) >= other_rv)
        api.cut.add(AUTHZ)
        watches = lambda: [q for q in api.requests_for(AUTHZ) if q.get("watch")]
        before = len(watches())
        api.put(AUTHZ, deny(["/admin*", "/secret*"]))  # this event is cut off ...
        wait_for("the watch resumed", lambda: len(watches()) > before, limit=10)
        resumed = watches()[-1]
        assert int(resumed["resourceVersion"]) >= other_rv, (resumed, other_rv)
        # ... and is delivered on the resumed watch.
        wait_for("the cut event delivered", lambda: mesh.get("/secret/x") == DENIED, limit=5)
        lists_before = len([q for q in api.requests_for(AUTHZ) if not q.get("watch")])

        # 410 Gone: history compacted while a deletion was never sent as an event. The next watch
        # is refused, the control plane lists again and sees the policy gone.
        api.delete(AUTHZ, "test", "deny-admin", notify=False)
        api.compact()
        api.end_watches()
        wait_for("DENY gone after the relist", lambda: mesh.get("/admin/x")[0] == 200, limit=10)
        assert len([q for q in api.requests_for(AUTHZ) if not q.get("watch")]) > lists_before

        # An ERROR 410 event in a watch stream does the same.
        api.put(AUTHZ, deny(["/admin*"], name="deny-again"), notify=False)
        api.gone_event.add(AUTHZ)
        api.end_watches()
        wait_for("the policy seen after an ERROR 410", lambda: mesh.get("/admin/x") == DENIED, limit=10)

        # The API goes away: the last good state is served, policies included.
        api.stop()
        time.sleep(1.5)
        assert mesh.get("/hello")[0] == 200
        assert mesh.get("/admin/x") == DENIED
        assert mesh.cp.proc.poll() is None
        logs = mesh.cp.logs()
        assert "retrying" in logs or "resuming" in logs, logs[-2000:]
    finally:
        mesh.stop()


def test_nothing_from_kubernetes_is_served_before_every_resource_is_listed(tmp_path, api):
    """Policies that cannot be listed (the API refuses them) hold back the services too: a
    sidecar gets no route to `server` rather than a route without its DENY."""
    api.fail[AUTHZ] = [500] * 1000
    api.put(AUTHZ, deny(["/admin*"]))
    mesh = KubeMesh(tmp_path, api, wait_ready=False)
    try:
        time.sleep(2)
        try:
            status = mesh.get("/admin/x")[0]
        except OSError:  # no listener yet: the client sidecar has no config at all
            status = None
        assert status != 200, status
        assert "every Kubernetes resource listed" not in mesh.cp.logs()
        api.fail[AUTHZ] = []

        def served():
            try:
                return mesh.get("/hello")[0] == 200
            except OSError:
                return False

        wait_for("served once listed", served, limit=20)
        assert mesh.get("/admin/x") == DENIED
    finally:
        mesh.stop()


@pytest.mark.parametrize("auth", ["http-token", "https-token", "https-client-certificate"])
def test_pods_admitted_without_a_sidecar_or_refused_get_an_event(tmp_path, auth):
    """With --kubernetes, the webhook writes a Warning Event in the pod's namespace for a pod it
    admits without a sidecar (with a warning) or refuses; a pod it injects gets none. The API is
    reached over plain HTTP with a token, or HTTPS (the kubeconfig's CA) with a token or a client
    certificate."""
    from test_inject import Webhook, corpus_pods, review

    if auth == "http-token":
        api = KubeStandIn()
    else:
        api = KubeStandIn(tls_dir=tmp_path, client_certs=auth == "https-client-certificate")
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    w = Webhook(tmp_path, extra=["--kubernetes", "--kubeconfig", str(kubeconfig)])
    try:
        pod = corpus_pods("hello.yaml")[0]
        assert "patch" in w.answer(review(pod, namespace="shop"))
        istio = corpus_pods("merge-probers.yaml")[0]  # Istio's sidecar already in it
        assert "patch" not in w.answer(review(istio, namespace="shop"))
        bad = corpus_pods("traffic-annotations-bad-excludeipranges.yaml")[0]
        assert w.answer(review(bad, namespace="shop"))["allowed"] is False

        events = lambda: [o for p, o in api.created if p == "/api/v1/namespaces/shop/events"]
        wait_for("two events", lambda: len(events()) >= 2, limit=5)
        time.sleep(0.3)
        got = sorted((e["reason"], e["involvedObject"]["name"]) for e in events())
        name = lambda p: p["metadata"].get("name") or p["metadata"]["generateName"]
        assert got == [("InjectionRefused", name(bad)), ("InjectionSkipped", name(istio))], got
        for e in events():
            assert e["type"] == "Warning" and e["involvedObject"]["kind"] == "Pod"
            assert e["source"]["component"] == "eastguard-sidecar-injector" and e["message"]
        # The reflectors read the API over the same connection settings.
        wait_for("every resource listed", lambda: "every Kubernetes resource listed" in w.log.read_text(), limit=10)
    finally:
        w.stop()
        api.stop()


def test_the_inventory_reads_owners_and_caller_identities_from_namespaces_and_service_accounts(tmp_path, api):
    """Namespaces and ServiceAccounts (metadata only) feed the API inventory, not xDS: a service
    with no owner of its own takes its namespace's; a verified caller whose ID names no
    ServiceAccount in the cluster (deleted since its SVID was issued, or never there) is listed
    as unknown, and a known one carries its owner."""
    http_port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    api.put(NAMESPACES, {"metadata": {"name": "test", "uid": "ns-test", "labels": {"team": "payments"}}})
    api.put(ACCOUNTS, {"metadata": {"name": "server", "namespace": "test", "uid": "sa-server"}})
    mesh = KubeMesh(tmp_path, api, tls=True,
                    cp_extra=["--http-address", f"127.0.0.1:{http_port}", "--data-dir", str(data)],
                    sidecar_extra={"inventory": {"export": {"interval": "200ms"}}})
    try:
        wait_for("inventory HTTP API", lambda: listening(http_port))

        def view():
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/apis", timeout=10) as r:
                return json.load(r)

        def hello():
            return next((o for o in view()["operations"] if o["template"] == "/hello" and o.get("callers")), None)

        assert mesh.get("/hello")[0] == 200
        # Reports can arrive before Namespaces and ServiceAccounts are listed.
        wait_for("the sidecar's report, with identities", lambda: (hello() or {}).get("callers", [{}])[0].get("identity"))
        op = hello()
        assert op["service"] == "server.test.svc.cluster.local"
        # The Service has no owner label; its namespace has.
        assert op["owner"] == "payments" and op["orphan"] is False
        # The client's service account does not exist.
        assert op["callers"][0]["id"] == CLIENT_ID
        assert op["callers"][0]["identity"] == {"kind": "unknown"}
        assert view()["unknown_callers"] == [CLIENT_ID]

        api.put(ACCOUNTS, {"metadata": {"name": "client", "namespace": "test", "uid": "sa-client",
                                        "annotations": {"eastguard.io/owner": "storefront"}}})
        wait_for("the account is seen", lambda: hello()["callers"][0]["identity"] == {"kind": "service_account", "owner": "storefront"})
        assert "unknown_callers" not in view()

        api.put(NAMESPACES, {"metadata": {"name": "test", "uid": "ns-test", "labels": {"team": "checkout"}}})
        wait_for("the namespace's new owner", lambda: hello()["owner"] == "checkout")
        api.delete(ACCOUNTS, "test", "client")
        wait_for("the deletion is seen", lambda: view().get("unknown_callers") == [CLIENT_ID])
        # Without any owner the service is an orphan again.
        api.put(NAMESPACES, {"metadata": {"name": "test", "uid": "ns-test"}})
        wait_for("no owner", lambda: hello()["orphan"] is True)
        # None of this touched the sidecars' configuration: the call still goes through.
        assert mesh.get("/hello")[0] == 200
    finally:
        mesh.stop()
    # The shipped ClusterRole lets the control plane list and watch everything it asked for.
    rules = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "eastguard.yaml").read_text())
                 if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] == "eastguard-control-plane")["rules"]
    watched = {p for p, q in api.requests if q.get("watch") in ("1", "true")}
    assert {NAMESPACES, ACCOUNTS, SVC, PODS, SLICES, AUTHZ} <= watched, watched
    for path in watched:
        parts = path.strip("/").split("/")
        group, resource = ("" if parts[0] == "api" else parts[1]), parts[-1]
        assert any(group in r["apiGroups"] and resource in r["resources"] and {"list", "watch"} <= set(r["verbs"])
                   for r in rules), f"the ClusterRole does not let the control plane watch {path}"
