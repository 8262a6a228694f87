//! The webhook's `caBundle`, kept by the control plane when it mints the webhook's certificate
//! itself (as Istio's webhook controller does): every webhook of the named
//! MutatingWebhookConfiguration gets the root. Checked at start and every few seconds, since
//! re-applying the manifest blanks it and, with `failurePolicy: Fail`, pods could then not be
//! created. Each patch tests the object's resourceVersion first, so a concurrent edit is never
//! overwritten; the next round tries again.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::client::Client;

/// How often the configuration is checked.
const PERIOD: Duration = Duration::from_secs(5);

pub async fn keep_ca_bundle(
    client: Client,
    name: String,
    root_pem: String,
    mut closing: watch::Receiver<bool>,
) {
    use base64::Engine as _;
    let want = base64::engine::general_purpose::STANDARD.encode(root_pem.as_bytes());
    let path =
        format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}");
    let mut last_error: Option<String> = None;
    loop {
        match ensure(&client, &path, &want).await {
            Ok(patched) => {
                if patched > 0 {
                    tracing::info!(configuration = %name, webhooks = patched, "webhook caBundle set to the CA root");
                }
                last_error = None;
            }
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(configuration = %name, error = %e, "webhook caBundle not checked; retrying");
                }
                last_error = Some(e);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PERIOD) => {}
            _ = closing.wait_for(|c| *c) => return,
        }
    }
}

/// Sets `want` where a webhook lacks it; how many were patched.
async fn ensure(client: &Client, path: &str, want: &str) -> Result<usize, String> {
    let timeout = Duration::from_secs(10);
    let obj = client
        .get_json(path, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let version = obj["metadata"]["resourceVersion"]
        .as_str()
        .ok_or("the configuration has no resourceVersion")?;
    let hooks = obj["webhooks"]
        .as_array()
        .ok_or("the configuration has no webhooks")?;
    let mut ops =
        vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": version})];
    for (i, hook) in hooks.iter().enumerate() {
        if hook["clientConfig"]["caBundle"].as_str() != Some(want) {
            ops.push(json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": want,
            }));
        }
    }
    if ops.len() == 1 {
        return Ok(0);
    }
    client
        .json_patch(path, &Value::Array(ops.clone()), timeout)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ops.len() - 1)
}
