"""A stand-in for the Kubernetes API server, at the HTTP level, for list and watch only.

It is not Kubernetes: it serves collections the way the API server does (paged LIST with a
resourceVersion, WATCH streams of newline-separated JSON events with BOOKMARKs, `410 Gone` for a
compacted version, Status bodies on errors), holds objects a test puts in it, and can be told to
fail in the ways a real API server does (429 and 500 on LIST, a watch cut in the middle of an
event, a compaction). Every request is recorded for assertions. No cluster runs on the machines
this project is tested on; this is what plays its part."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class KubeStandIn:
    def __init__(self, token="test-token", page_size=500, bookmark_every=0.3, tls_dir=None, client_certs=False):
        """`tls_dir`: serve HTTPS with a CA and certificate written there (the kubeconfig carries
        the CA); `client_certs`: also require a client certificate from that CA (no token)."""
        self.token = token
        self.page_size = page_size
        self.bookmark_every = bookmark_every
        self.lock = threading.Condition()
        self.rv = 100
        self.compacted = 0  # watches from a version at or below this get 410 Gone
        self.collections = {}  # path -> {(ns, name): obj}
        self.events = []  # (rv, path, type, obj)
        self.missing = set()  # collections answered 404 (a CRD not installed)
        self.fail = {}  # path -> [status, ...] for the next LISTs
        self.cut = set()  # paths whose next watch is cut mid-event
        self.gone_event = set()  # paths whose next watch gets an ERROR 410 event
        self.requests = []  # (path, query dict)
        self.created = []  # (path, object) of every POST
        # TokenReview: token -> {"user": {...}, "audiences": [...]} of the tokens it knows.
        self.tokens = {}
        self.reviews = []  # the tokens reviewed, in order
        self.patches = []  # (path, content type, body) of every PATCH
        self.down = False
        self.generation = 0  # bumped to end every open watch
        self.bookmarks = {}  # path -> the last resourceVersion a BOOKMARK carried
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                stand_in._handle(self)

            def do_POST(self):
                stand_in._create(self)

            def do_PATCH(self):
                stand_in._patch(self)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.ca = None
        if tls_dir is not None:
            import ssl

            from pki import CA

            self.ca = CA("kubernetes")
            (tls_dir / "api-ca.pem").write_bytes(self.ca.pem())
            cert, key = self.ca.write_svid(tls_dir, "api-server", [], dns=["kubernetes.default.svc"], ips=["127.0.0.1"])
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            if client_certs:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(tls_dir / "api-ca.pem")
                self.client_cert, self.client_key = self.ca.write_svid(tls_dir, "api-client", [], dns=["control-plane"])
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.client_certs = client_certs
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # === what tests do ===

    def kubeconfig(self, path):
        import base64

        b64 = lambda data: base64.b64encode(data).decode()
        cluster = {"server": f"http://127.0.0.1:{self.port}"}
        user = {"token": self.token} if self.token else {}
        if self.ca is not None:
            cluster = {"server": f"https://127.0.0.1:{self.port}", "certificate-authority-data": b64(self.ca.pem())}
            if self.client_certs:
                user = {"client-certificate-data": b64(self.client_cert.read_bytes()), "client-key-data": b64(self.client_key.read_bytes())}
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": cluster}],
            "users": [{"name": "cp", "user": user}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "cp"}}],
        }))
        return path

    def put(self, path, obj, notify=True):
        """Creates or replaces an object; a watch sees ADDED or MODIFIED."""
        with self.lock:
            self.rv += 1
            obj = json.loads(json.dumps(obj))
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            coll = self.collections.setdefault(path, {})
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            kind = "MODIFIED" if key in coll else "ADDED"
            coll[key] = obj
            if notify:
                self.events.append((self.rv, path, kind, obj))
            self.lock.notify_all()
            return self.rv

    def delete(self, path, namespace, name, notify=True):
        with self.lock:
            self.rv += 1
            obj = self.collections.get(path, {}).pop((namespace, name))
            obj = dict(obj, metadata=dict(obj["metadata"], resourceVersion=str(self.rv)))
            if notify:
                self.events.append((self.rv, path, "DELETED", obj))
            self.lock.notify_all()
            return self.rv

    def compact(self):
        """Forgets the event history: watches from older versions get 410 Gone."""
        with self.lock:
            self.compacted = self.rv
            self.events.clear()
            self.lock.notify_all()

    def end_watches(self):
        """Ends every open watch cleanly (as the API server does at timeoutSeconds)."""
        with self.lock:
            self.generation += 1
            self.lock.notify_all()

    def requests_for(self, path):
        return [q for p, q in list(self.requests) if p == path]

    def stop(self):
        self.down = True
        with self.lock:
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # === the server side ===

    def _status(self, h, code, reason, message):
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code}).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    # Discovery, as kubectl reads it to map kinds to resources (legacy, not aggregated, format).
    RESOURCES = {
        "v1": [("namespaces", "Namespace", False), ("serviceaccounts", "ServiceAccount", True), ("configmaps", "ConfigMap", True),
               ("secrets", "Secret", True), ("services", "Service", True), ("pods", "Pod", True)],
        "apps/v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)],
        "batch/v1": [("jobs", "Job", True)],
        "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False), ("clusterrolebindings", "ClusterRoleBinding", False)],
        "admissionregistration.k8s.io/v1": [("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False)],
        "discovery.k8s.io/v1": [("endpointslices", "EndpointSlice", True)],
        "networking.istio.io/v1": [("serviceentries", "ServiceEntry", True), ("workloadentries", "WorkloadEntry", True)],
        "security.istio.io/v1": [("authorizationpolicies", "AuthorizationPolicy", True), ("peerauthentications", "PeerAuthentication", True)],
        "telemetry.istio.io/v1": [("telemetries", "Telemetry", True)],
    }

    def _json(self, h, obj, code=200):
        body = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _discovery(self, h, path):
        if path == "/api":
            return self._json(h, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})
        if path == "/apis":
            groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                       "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                      for gv in self.RESOURCES if "/" in gv]
            return self._json(h, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
        return self._json(h, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
            {"name": n, "singularName": "", "namespaced": ns, "kind": k,
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
            for n, k, ns in self.RESOURCES[gv]]})

    def _handle(self, h):
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((url.path, query))
        if not self.client_certs and self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(h, 401, "Unauthorized", "Unauthorized")
        if url.path in ("/api", "/apis") or self._is_group_version(url.path):
            return self._discovery(h, url.path)
        if not self._is_collection(url.path):
            found = self._object(url.path)
            if found is not None:
                return self._json(h, found[2])
            # One object that does not exist (kubectl looks before a dry-run create).
            return self._status(h, 404, "NotFound", f"{url.path} not found")
        if url.path in self.missing:
            return self._status(h, 404, "NotFound", "the server could not find the requested resource")
        if query.get("watch") in ("1", "true"):
            return self._watch(h, url.path, query)
        fails = self.fail.get(url.path)
        if fails:
            code = fails.pop(0)
            return self._status(h, code, "TooManyRequests" if code == 429 else "InternalError", f"stand-in failure {code}")
        self._list(h, url.path, query)

    def _create(self, h):
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length)
        if not self.client_certs and self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(h, 401, "Unauthorized", "Unauthorized")
        try:
            obj = json.loads(body)
        except ValueError:
            return self._status(h, 400, "BadRequest", "the body is not JSON")
        if urlparse(h.path).path == "/apis/authentication.k8s.io/v1/tokenreviews":
            return self._review(h, obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("name", meta.get("generateName", "x") + str(len(self.created)))
        self.created.append((urlparse(h.path).path, obj))
        self._json(h, obj, code=201)

    def _object(self, path):
        """(collection, key, object) for a cluster-scoped `COLLECTION/NAME` or a namespaced
        `.../namespaces/NS/RESOURCE/NAME` path, if the object is held."""
        parts = path.rstrip("/").split("/")
        name = parts[-1]
        if len(parts) >= 4 and parts[-4] == "namespaces":
            ns = parts[-3]
            collection = "/".join(parts[:-4] + [parts[-2]])
        else:
            ns = ""
            collection = "/".join(parts[:-1])
        with self.lock:
            obj = self.collections.get(collection, {}).get((ns, name))
        return None if obj is None else (collection, (ns, name), obj)

    def _patch(self, h):
        """PATCH with a JSON Patch (application/json-patch+json), as the API server applies it:
        a failed `test` is a 422 and changes nothing."""
        import jsonpatch

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length)
        path = urlparse(h.path).path
        self.patches.append((path, h.headers.get("Content-Type"), body))
        if not self.client_certs and self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(h, 401, "Unauthorized", "Unauthorized")
        if h.headers.get("Content-Type") != "application/json-patch+json":
            return self._status(h, 415, "UnsupportedMediaType", "only JSON Patch here")
        found = self._object(path)
        if found is None:
            return self._status(h, 404, "NotFound", f"{path} not found")
        collection, _, obj = found
        try:
            new = jsonpatch.apply_patch(obj, json.loads(body))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, ValueError) as e:
            return self._status(h, 422, "Invalid", str(e))
        rv = self.put(collection, new)
        new["metadata"]["resourceVersion"] = str(rv)
        self._json(h, new)

    def _review(self, h, review):
        """A TokenReview as the API server answers it: authenticated only for a token it knows
        whose audiences meet the ones asked for; `status.audiences` is that intersection."""
        token = review.get("spec", {}).get("token", "")
        self.reviews.append(token)
        known = self.tokens.get(token)
        asked = review.get("spec", {}).get("audiences") or []
        status = {"authenticated": False, "error": "invalid bearer token"}
        if known is not None:
            meet = [a for a in asked if a in known["audiences"]] if asked else list(known["audiences"])
            if meet:
                status = {"authenticated": True, "user": known["user"], "audiences": meet}
            else:
                status = {"authenticated": False, "error": "token audiences are invalid for the target audiences"}
        review["status"] = status
        self._json(h, review, code=201)

    def _is_group_version(self, path):
        gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
        return gv in self.RESOURCES

    def _is_collection(self, path):
        """`/api/v1/pods`, `/apis/G/V/R`, or the namespaced forms of them."""
        parts = path.strip("/").split("/")
        if parts[0] == "api":
            rest = parts[2:]
        elif parts[0] == "apis":
            rest = parts[3:]
        else:
            return False
        return len(rest) == 1 or (len(rest) == 3 and rest[0] == "namespaces")

    def _list(self, h, path, query):
        with self.lock:
            items = sorted(self.collections.get(path, {}).items())
            rv = self.rv
        start = int(query.get("continue") or 0)
        limit = min(int(query.get("limit") or 500), self.page_size)
        page = [dict((k, v) for k, v in o.items() if k not in ("kind", "apiVersion")) for _, o in items[start:start + limit]]
        meta = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        body = json.dumps({"kind": "List", "apiVersion": "v1", "metadata": meta, "items": page}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _watch(self, h, path, query):
        since = int(query.get("resourceVersion") or 0)
        timeout = min(int(query.get("timeoutSeconds") or 300), 300)
        with self.lock:
            too_old = since <= self.compacted
        if too_old and path not in self.gone_event:
            return self._status(h, 410, "Expired", f"too old resource version: {since} ({self.compacted})")
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(obj):
            data = (json.dumps(obj) + "\n").encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        try:
            if path in self.gone_event:
                self.gone_event.discard(path)
                send({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                   "message": "too old resource version", "reason": "Expired", "code": 410}})
                h.wfile.write(b"0\r\n\r\n")
                return
            deadline = time.time() + timeout
            generation = self.generation
            sent = since
            last_bookmark = 0.0
            while time.time() < deadline and not self.down and self.generation == generation:
                with self.lock:
                    pending = [e for e in self.events if e[1] == path and e[0] > sent]
                    if not pending:
                        self.lock.wait(0.05)
                        # Read again: what arrived during the wait is sent before a bookmark
                        # claims its version.
                        pending = [e for e in self.events if e[1] == path and e[0] > sent]
                    rv = self.rv
                for erv, _, kind, obj in pending:
                    if path in self.cut:
                        # Half an event, then the connection drops.
                        self.cut.discard(path)
                        data = json.dumps({"type": kind, "object": obj}).encode()
                        half = data[: len(data) // 2]
                        h.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
                        h.wfile.flush()
                        h.close_connection = True
                        h.connection.shutdown(2)
                        return
                    send({"type": kind, "object": obj})
                    sent = erv
                if time.time() - last_bookmark >= self.bookmark_every and query.get("allowWatchBookmarks") == "true":
                    send({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}})
                    self.bookmarks[path] = rv
                    sent = max(sent, rv)
                    last_bookmark = time.time()
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
