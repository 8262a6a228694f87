//! The evidence report (`GET /report`, `eastguard report`): what the control plane's registry and
//! store show, mapped to PCI DSS v4.0.1 (1.2/1.3 network security controls, 4.2.1 strong
//! cryptography in transit, 7.2 least privilege, 10.2 audit logs) and SOC 2 (CC6.1, CC6.6, CC7.2).
//! Every figure links to the API answer it was computed from; the page is self-contained (no
//! script, styles inline) and prints to PDF as it shows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::ControlPlane;
use crate::generate::Mesh;
use crate::registry::Registry;

use super::ApiInventory;
use super::store::StoreError;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:13px/1.45 system-ui,sans-serif;margin:2em;color:#1b1f24}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #d0d7de}\
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}\
.ok{color:#15803d}.gap{color:#b91c1c;font-weight:600}.ref{font-size:.9em;color:#57606a}\
@media print{a{color:inherit}section{break-inside:avoid}}";

/// What the report says, computed once (also for tests).
#[derive(Debug, Default)]
pub struct Evidence {
    pub workloads: usize,
    pub operations: usize,
    pub calls: u64,
    pub mtls_calls: u64,
    pub plaintext_calls: u64,
    pub denied_calls: u64,
    /// Workloads no ALLOW policy selects (everything is allowed to them).
    pub open_workloads: Vec<String>,
    /// Workloads whose mTLS mode is not STRICT.
    pub not_strict: Vec<(String, String)>,
    pub unused_rules: usize,
    pub shadow_or_zombie: usize,
    pub events_by_class: BTreeMap<String, usize>,
    pub first_seen: i64,
    pub last_seen: i64,
}

pub fn evidence(inv: &ApiInventory, reg: &Registry, mesh: &Mesh) -> Result<Evidence, StoreError> {
    let mut e = Evidence {
        workloads: reg.workloads.len(),
        first_seen: i64::MAX,
        ..Default::default()
    };
    let view = inv.view(reg)?;
    for op in &view.operations {
        if matches!(
            op.status,
            apisec::spec::Status::Shadow | apisec::spec::Status::Zombie
        ) {
            e.shadow_or_zombie += 1;
        }
        let Some(seen) = &op.seen else { continue };
        e.operations += 1;
        e.calls += seen.calls;
        e.denied_calls += seen.denied;
        e.first_seen = e.first_seen.min(seen.first_seen);
        e.last_seen = e.last_seen.max(seen.last_seen);
        for c in &seen.callers {
            if c.id.starts_with("spiffe://") {
                e.mtls_calls += c.calls;
            } else {
                e.plaintext_calls += c.calls;
            }
        }
    }
    if e.first_seen == i64::MAX {
        e.first_seen = 0;
    }
    for w in &reg.workloads {
        let target = policy::istio::Target {
            namespace: w.meta.namespace.clone(),
            labels: w.spec.labels.clone(),
            root_namespace: mesh.root_namespace.clone(),
            trust_domain: mesh.trust_domain.clone(),
            trust_domain_aliases: Vec::new(),
        };
        let id = format!("{}/{}", w.meta.namespace, w.meta.name);
        let allow = policy::istio::translate(&reg.authorization, &target, false)
            .map(|fs| {
                fs.iter().any(|f| {
                    f.typed_config
                        .rbac
                        .rules
                        .as_ref()
                        .is_some_and(|r| r.action == policy::rbac::Action::Allow)
                })
            })
            // A policy that cannot be translated denies everything: not open.
            .unwrap_or(true);
        if !allow {
            e.open_workloads.push(id.clone());
        }
        let mtls = policy::istio::peer_authn::effective_with_default(
            &reg.peer_authentication,
            &target,
            mesh.default_mtls,
        );
        let modes: BTreeSet<String> = std::iter::once(mtls.mode)
            .chain(mtls.ports.values().copied())
            .map(|m| format!("{m:?}").to_uppercase())
            .collect();
        if modes.iter().any(|m| m != "STRICT") {
            e.not_strict
                .push((id, modes.into_iter().collect::<Vec<_>>().join(", ")));
        }
    }
    e.unused_rules = super::least_privilege::unused(&inv.edges(0)?, reg, mesh)
        .map(|u| u.len())
        .unwrap_or(0);
    for ev in inv.events(None, 1000)? {
        *e.events_by_class.entry(ev.class_name).or_default() += 1;
    }
    Ok(e)
}

fn verdict(ok: bool, yes: &str, no: &str) -> String {
    if ok {
        format!("<span class=ok>{}</span>", esc(yes))
    } else {
        format!("<span class=gap>{}</span>", esc(no))
    }
}

fn time(unix: i64) -> String {
    if unix <= 0 {
        return "—".into();
    }
    let days = unix / 86_400;
    let (secs, mut y, mut d) = (unix % 86_400, 1970i64, days);
    loop {
        let len = if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) {
            366
        } else {
            365
        };
        if d < len {
            break;
        }
        d -= len;
        y += 1;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let months = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut m = 0;
    while d >= months[m] {
        d -= months[m];
        m += 1;
    }
    format!(
        "{y:04}-{:02}-{:02} {:02}:{:02} UTC",
        m + 1,
        d + 1,
        secs / 3600,
        secs % 3600 / 60
    )
}

/// The report as HTML.
pub fn html(
    cp: &ControlPlane,
    inv: &ApiInventory,
    retention_hours: u64,
) -> Result<String, StoreError> {
    let reg = cp.registry();
    let e = evidence(inv, &reg, cp.mesh())?;
    let mut h = String::new();
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>eastguard evidence report</title>\
         <style>{STYLE}</style></head><body>\
         <h1>eastguard evidence report</h1>\
         <p>Trust domain <b>{}</b>; {} workloads; {} operations observed with {} calls between {} and {}. \
         Figures come from the control plane's registry and inventory store; each links to the data behind it.</p>",
        esc(&cp.mesh().trust_domain),
        e.workloads,
        e.operations,
        e.calls,
        time(e.first_seen),
        time(e.last_seen),
    );
    // PCI DSS 1.2 / 1.3, SOC 2 CC6.6
    let _ = write!(
        h,
        "<section id=pci-1><h2>PCI DSS 1.2, 1.3 — network security controls (SOC 2 CC6.6)</h2>\
         <p>Every inbound call is authorized by Envoy RBAC from Istio AuthorizationPolicies. \
         Workloads no ALLOW policy selects accept any authenticated caller: {}.</p>\
         <p><span id=denied-calls>{}</span> calls were denied in the window \
         (<a href=\"/apis\">/apis</a>, <a href=\"/apis/events?class=6003\">denials</a>).</p>",
        if e.open_workloads.is_empty() {
            verdict(true, "none", "")
        } else {
            verdict(false, "", &e.open_workloads.join(", "))
        },
        e.denied_calls,
    );
    h.push_str("</section>");
    // PCI DSS 4.2.1
    let _ = write!(
        h,
        "<section id=pci-4><h2>PCI DSS 4.2.1 — strong cryptography in transit</h2>\
         <p>Calls from verified SPIFFE identities (mutual TLS, TLS 1.2+ with X509-SVIDs): \
         <b id=mtls-share>{:.1} %</b> ({} of {}); plaintext callers: {} \
         (<a href=\"/apis?caller=plaintext\">which operations</a>).</p>\
         <p>Workloads whose mTLS mode is not STRICT: {}.</p>",
        pct(e.mtls_calls, e.mtls_calls + e.plaintext_calls),
        e.mtls_calls,
        e.mtls_calls + e.plaintext_calls,
        verdict(
            e.plaintext_calls == 0,
            "none",
            &e.plaintext_calls.to_string()
        ),
        if e.not_strict.is_empty() {
            verdict(true, "none", "")
        } else {
            verdict(
                false,
                "",
                &e.not_strict
                    .iter()
                    .map(|(w, m)| format!("{w} ({m})"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        },
    );
    h.push_str(
        "<p>Certificate inventory: each workload's identity, and the X509-SVID its sidecar last \
         reported using (serial, expiry):</p><table id=certs><tr><th>workload</th><th>SPIFFE ID</th>\
         <th>serial</th><th>not after</th><th>reported</th></tr>",
    );
    let certs: BTreeMap<String, super::store::CertRow> = inv
        .certs()?
        .into_iter()
        .map(|c| (c.workload.clone(), c))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for w in &reg.workloads {
        let key = format!("{}/{}", w.meta.namespace, w.meta.name);
        let expected = cp.mesh().spiffe_id(&w.meta.namespace, w.service_account());
        let (serial, not_after, reported) = match certs.get(&key) {
            Some(c) if c.spiffe_id == expected => (
                esc(&c.serial),
                verdict(
                    c.not_after > now,
                    &time(c.not_after),
                    &format!("{} (expired)", time(c.not_after)),
                ),
                time(c.reported),
            ),
            Some(c) => (
                verdict(false, "", &format!("reported as {}", c.spiffe_id)),
                String::new(),
                String::new(),
            ),
            None => ("—".into(), "—".into(), "not reported".into()),
        };
        let _ = write!(
            h,
            "<tr data-workload=\"{}\"><td>{}</td><td>{}</td><td class=serial>{serial}</td><td>{not_after}</td><td>{reported}</td></tr>",
            esc(&key),
            esc(&key),
            esc(&expected),
        );
    }
    h.push_str("</table></section>");
    // PCI DSS 7.2, SOC 2 CC6.1
    let _ = write!(
        h,
        "<section id=pci-7><h2>PCI DSS 7.2 — least privilege (SOC 2 CC6.1)</h2>\
         <p>ALLOW rules in force that admitted none of the observed calls: <b id=unused-rules>{}</b> \
         (<a href=\"/apis/policy/unused\">which</a>); policies allowing exactly the observed calls: \
         <a href=\"/apis/policy/suggest\">suggested</a>.</p>\
         <p>Operations live but undocumented or deprecated (shadow, zombie): {} \
         (<a href=\"/apis?status=shadow\">shadow</a>, <a href=\"/apis?status=zombie\">zombie</a>).</p></section>",
        e.unused_rules,
        verdict(
            e.shadow_or_zombie == 0,
            "0",
            &e.shadow_or_zombie.to_string()
        ),
    );
    // PCI DSS 10.2, SOC 2 CC7.2
    h.push_str(
        "<section id=pci-10><h2>PCI DSS 10.2 — audit logs (SOC 2 CC7.2)</h2>\
         <p>Every denial, detection and policy change is an OCSF event; the newest of them, by kind \
         (<a href=\"/apis/events\">/apis/events</a>):</p><table><tr><th>kind</th><th>events</th></tr>",
    );
    for (class, n) in &e.events_by_class {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=events data-class=\"{}\">{n}</td></tr>",
            esc(class),
            esc(class)
        );
    }
    let _ = write!(
        h,
        "</table><p>Retention of the inventory and events: {retention_hours} hours; each workload's newest 10,000 events are kept.</p></section>"
    );
    h.push_str("<p class=ref>Generated by eastguard. PCI DSS v4.0.1 and SOC 2 (2017 TSC) references are to the requirement each section supports; an assessor decides whether it is met.</p></body></html>");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_dates_are_right() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(time(0), "—");
        assert_eq!(time(1_796_143_339), "2026-12-01 16:42 UTC");
        assert_eq!(time(951_782_400), "2000-02-29 00:00 UTC");
    }
}
