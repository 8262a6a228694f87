//! AdmissionReview v1 in, AdmissionReview v1 out.
//!
//! Whatever the body, the answer is a well-formed AdmissionReview: a request the webhook cannot
//! read or a pod it cannot handle is admitted unchanged with a warning, so a webhook bug never
//! blocks pods. Only a pod whose own annotations are wrong is refused, with the reason.

use base64::Engine as _;
use serde_json::{Value, json};

use super::{Decision, Template};

/// Bodies past this are not read; the API server sends objects of at most a few MiB.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// What was decided, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(String),
    Refused(String),
    Unreadable(String),
}

/// Answers one AdmissionReview body.
pub fn answer(body: &[u8], t: &Template) -> (Value, Outcome) {
    let (v, o, _) = answer_with_pod(body, t);
    (v, o)
}

/// A pod the answer is about: its namespace and its name (or the prefix its controller gives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

fn none((v, o): (Value, Outcome)) -> (Value, Outcome, Option<PodRef>) {
    (v, o, None)
}

/// `answer`, and which pod it is about (for events).
pub fn answer_with_pod(body: &[u8], t: &Template) -> (Value, Outcome, Option<PodRef>) {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return none(unreadable("", format!("the body is not JSON: {e}"))),
    };
    let Some(request) = review.get("request").filter(|r| r.is_object()) else {
        return none(unreadable("", "not an AdmissionReview: no request".into()));
    };
    let uid = request["uid"].as_str().unwrap_or_default();
    if uid.is_empty() {
        return none(unreadable("", "the request has no uid".into()));
    }
    let kind = &request["kind"];
    let is_pod = kind["kind"].as_str() == Some("Pod")
        && kind["version"].as_str() == Some("v1")
        && kind["group"].as_str().unwrap_or_default().is_empty();
    if !is_pod {
        return none(admitted(uid, Outcome::Skipped("not a Pod".into()), None));
    }
    if let Some(sub) = request["subResource"].as_str().filter(|s| !s.is_empty()) {
        return none(admitted(
            uid,
            Outcome::Skipped(format!("subresource {sub}")),
            None,
        ));
    }
    match request["operation"].as_str() {
        Some("CREATE") => {}
        // A running pod's containers cannot change; Istio injects at creation only too.
        Some(op) => {
            return none(admitted(
                uid,
                Outcome::Skipped(format!("operation {op}")),
                None,
            ));
        }
        None => return none(unreadable(uid, "the request has no operation".into())),
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return none(unreadable(uid, "the request has no object".into()));
    };
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| pod["metadata"]["namespace"].as_str())
        .unwrap_or_default();
    let meta = &pod["metadata"];
    let pod_ref = PodRef {
        namespace: namespace.to_owned(),
        name: meta["name"]
            .as_str()
            .or_else(|| meta["generateName"].as_str())
            .unwrap_or_default()
            .to_owned(),
    };
    let (v, o) = match super::inject(pod, namespace, t) {
        Decision::Skip { reason, warn } => {
            let w = warn.then(|| format!("eastguard: sidecar not injected: {reason}"));
            admitted(uid, Outcome::Skipped(reason), w)
        }
        Decision::Refuse(reason) => (
            response(
                uid,
                json!({
                    "allowed": false,
                    "status": {
                        "code": 400,
                        "reason": "BadRequest",
                        "message": format!("eastguard sidecar injection: {reason}"),
                    },
                }),
            ),
            Outcome::Refused(reason),
        ),
        Decision::Inject {
            pod: injected,
            warnings,
        } => {
            let patch = json_patch::diff(pod, &injected);
            let patch = match serde_json::to_vec(&patch) {
                Ok(p) => p,
                Err(e) => return none(unreadable(uid, format!("cannot write the patch: {e}"))),
            };
            let mut body = json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            });
            if !warnings.is_empty() {
                body["warnings"] = json!(
                    warnings
                        .iter()
                        .map(|w| format!("eastguard: {w}"))
                        .collect::<Vec<_>>()
                );
            }
            (response(uid, body), Outcome::Injected)
        }
    };
    (v, o, Some(pod_ref))
}

/// The answer to a body larger than `MAX_BODY`.
pub fn too_large() -> (Value, Outcome) {
    unreadable("", format!("the body is larger than {MAX_BODY} bytes"))
}

fn response(uid: &str, mut body: Value) -> Value {
    body["uid"] = json!(uid);
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": body})
}

fn admitted(uid: &str, outcome: Outcome, warning: Option<String>) -> (Value, Outcome) {
    let mut body = json!({"allowed": true});
    if let Some(w) = warning {
        body["warnings"] = json!([w]);
    }
    (response(uid, body), outcome)
}

fn unreadable(uid: &str, why: String) -> (Value, Outcome) {
    let w = format!("eastguard: sidecar not injected: {why}");
    let (v, _) = admitted(uid, Outcome::Unreadable(why.clone()), Some(w));
    (v, Outcome::Unreadable(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request,
        }))
        .unwrap()
    }

    fn pod_request(op: &str) -> Value {
        json!({
            "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": op, "namespace": "shop",
            "object": {"metadata": {"generateName": "web-"},
                       "spec": {"containers": [{"name": "web", "image": "web"}]}},
        })
    }

    #[test]
    fn a_create_is_patched_and_the_patch_applies() {
        let (v, outcome) = answer(&review(pod_request("CREATE")), &Template::default());
        assert_eq!(outcome, Outcome::Injected);
        let r = &v["response"];
        assert_eq!(r["uid"], "u-1");
        assert_eq!(r["allowed"], true);
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut pod = pod_request("CREATE")["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        assert_eq!(
            pod["spec"]["initContainers"][0]["name"],
            super::super::SIDECAR
        );
    }

    #[test]
    fn anything_unreadable_is_admitted_with_a_warning() {
        for body in [
            b"garbage".to_vec(),
            b"{}".to_vec(),
            review(json!({"kind": {"kind": "Pod", "version": "v1"}})),
            review(
                json!({"uid": "u", "kind": {"kind": "Pod", "version": "v1"}, "operation": "CREATE"}),
            ),
            "[".repeat(10_000).into_bytes(),
        ] {
            let (v, outcome) = answer(&body, &Template::default());
            assert!(matches!(outcome, Outcome::Unreadable(_)), "{outcome:?}");
            assert_eq!(v["response"]["allowed"], true);
            assert!(
                v["response"]["warnings"][0]
                    .as_str()
                    .unwrap()
                    .contains("not injected")
            );
        }
    }

    #[test]
    fn updates_and_other_kinds_pass_unchanged() {
        let (v, _) = answer(&review(pod_request("UPDATE")), &Template::default());
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none());
        let mut r = pod_request("CREATE");
        r["kind"]["kind"] = json!("Service");
        let (v, _) = answer(&review(r), &Template::default());
        assert!(v["response"].get("patch").is_none());
    }
}
