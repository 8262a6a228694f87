//! Istio's pod annotations that change what is injected, read strictly.
//!
//! A malformed value is refused, as Istio's injector refuses it: the pod asked for something and
//! cannot be given it, and admitting it without its sidecar would take it out of the mesh.
//! Annotations eastguard does not act on are listed as warnings, never silently dropped.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Why a pod's annotations cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {annotation}: {reason}")]
pub struct BadAnnotation {
    pub annotation: String,
    pub reason: String,
}

fn bad(annotation: &str, reason: impl Into<String>) -> BadAnnotation {
    BadAnnotation {
        annotation: annotation.to_owned(),
        reason: reason.into(),
    }
}

/// How the pod's traffic is captured: what the node agent's eBPF programs get for this pod,
/// recorded on the pod as `sidecar.eastguard.io/capture-settings`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capture {
    /// `NONE` (interceptionMode NONE): nothing is captured.
    pub enabled: bool,
    /// `None`: every inbound port (Istio's `*`); otherwise only these.
    pub include_inbound_ports: Option<Vec<u16>>,
    pub exclude_inbound_ports: Vec<u16>,
    /// `None`: every destination (`*`); otherwise only these CIDRs.
    pub include_outbound_cidrs: Option<Vec<String>>,
    pub exclude_outbound_cidrs: Vec<String>,
    /// `None`: every destination port; otherwise only these.
    pub include_outbound_ports: Option<Vec<u16>>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Interfaces whose traffic is left alone (kubevirtInterfaces, excludeInterfaces).
    pub exclude_interfaces: Vec<String>,
}

/// What the annotations ask of the sidecar.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub capture: Option<Capture>,
    pub rewrite_probes: Option<bool>,
    pub native: Option<bool>,
    pub image: Option<String>,
    pub concurrency: Option<u16>,
    pub hold_application: Option<bool>,
    pub requests: BTreeMap<&'static str, String>,
    pub limits: BTreeMap<&'static str, String>,
    pub readiness: BTreeMap<&'static str, i64>,
    pub user_volumes: Vec<Value>,
    pub user_mounts: Vec<Value>,
    pub warnings: Vec<String>,
}

const TRAFFIC: &str = "traffic.sidecar.istio.io/";

/// Reads the annotations (a JSON object of strings). Only values that are strings are read;
/// Kubernetes allows nothing else.
pub fn read(annotations: &Map<String, Value>) -> Result<Settings, BadAnnotation> {
    let get = |k: &str| annotations.get(k).and_then(Value::as_str);
    let mut s = Settings::default();

    let mode = match get("sidecar.istio.io/interceptionMode") {
        None | Some("REDIRECT") => true,
        Some("TPROXY") => {
            s.warnings.push(
                "sidecar.istio.io/interceptionMode TPROXY: eastguard captures with eBPF; the \
                 original source address is kept either way"
                    .into(),
            );
            true
        }
        Some("NONE") => false,
        Some(other) => {
            return Err(bad(
                "sidecar.istio.io/interceptionMode",
                format!("{other:?} is not REDIRECT, TPROXY or NONE"),
            ));
        }
    };
    let key = |name: &str| format!("{TRAFFIC}{name}");
    let ports = |name: &str, star: bool| -> Result<Option<Option<Vec<u16>>>, BadAnnotation> {
        let k = key(name);
        get(&k)
            .map(|v| port_list(v, star).map_err(|r| bad(&k, r)))
            .transpose()
    };
    let cidrs = |name: &str, star: bool| -> Result<Option<Option<Vec<String>>>, BadAnnotation> {
        let k = key(name);
        get(&k)
            .map(|v| cidr_list(v, star).map_err(|r| bad(&k, r)))
            .transpose()
    };
    let mut capture = Capture {
        enabled: mode,
        include_inbound_ports: ports("includeInboundPorts", true)?.unwrap_or(None),
        exclude_inbound_ports: ports("excludeInboundPorts", false)?
            .flatten()
            .unwrap_or_default(),
        include_outbound_cidrs: cidrs("includeOutboundIPRanges", true)?.unwrap_or(None),
        exclude_outbound_cidrs: cidrs("excludeOutboundIPRanges", false)?
            .flatten()
            .unwrap_or_default(),
        include_outbound_ports: ports("includeOutboundPorts", false)?.unwrap_or(None),
        exclude_outbound_ports: ports("excludeOutboundPorts", false)?
            .flatten()
            .unwrap_or_default(),
        exclude_interfaces: Vec::new(),
    };
    for name in ["kubevirtInterfaces", "excludeInterfaces"] {
        let k = key(name);
        if let Some(v) = get(&k) {
            capture
                .exclude_interfaces
                .extend(interface_list(v).map_err(|r| bad(&k, r))?);
        }
    }
    // The sidecar's own ports are never captured inbound (kubelet probes reach 15020/15021,
    // Prometheus 15090), as in Istio.
    for p in [15020, 15021, 15090] {
        if !capture.exclude_inbound_ports.contains(&p) {
            capture.exclude_inbound_ports.push(p);
        }
    }
    s.capture = Some(capture);

    s.rewrite_probes = flag(get, "sidecar.istio.io/rewriteAppHTTPProbers")?;
    s.native = flag(get, "sidecar.istio.io/nativeSidecar")?;
    if let Some(v) = get("status.sidecar.istio.io/port") {
        let port: u16 = v.parse().map_err(|_| {
            bad(
                "status.sidecar.istio.io/port",
                format!("{v:?} is not a port"),
            )
        })?;
        if port == 0 {
            // Istio: no status port, so nothing to rewrite probes to.
            s.rewrite_probes = Some(false);
        } else if port != 15020 {
            s.warnings.push(format!(
                "status.sidecar.istio.io/port {port}: eastguard's status port is 15020"
            ));
        }
    }
    for (field, name) in [
        ("initialDelaySeconds", "initialDelaySeconds"),
        ("periodSeconds", "periodSeconds"),
        ("failureThreshold", "failureThreshold"),
    ] {
        let k = format!("readiness.status.sidecar.istio.io/{name}");
        if let Some(v) = get(&k) {
            let n: i64 = v
                .parse()
                .ok()
                .filter(|n| (0..=86_400).contains(n))
                .ok_or_else(|| bad(&k, format!("{v:?} is not a whole number of 0..86400")))?;
            // Kubernetes wants periodSeconds and failureThreshold at least 1.
            if n == 0 && field != "initialDelaySeconds" {
                return Err(bad(&k, "must be at least 1"));
            }
            s.readiness.insert(field, n);
        }
    }
    if let Some(v) = get("readiness.status.sidecar.istio.io/applicationPorts") {
        port_list(v, true)
            .map_err(|r| bad("readiness.status.sidecar.istio.io/applicationPorts", r))?;
    }
    if let Some(v) = get("sidecar.istio.io/proxyImage") {
        if v.trim().is_empty() || v.chars().any(char::is_whitespace) {
            return Err(bad("sidecar.istio.io/proxyImage", "not an image reference"));
        }
        s.image = Some(v.to_owned());
    }
    for (k, target, resource) in [
        ("sidecar.istio.io/proxyCPU", true, "cpu"),
        ("sidecar.istio.io/proxyMemory", true, "memory"),
        ("sidecar.istio.io/proxyCPULimit", false, "cpu"),
        ("sidecar.istio.io/proxyMemoryLimit", false, "memory"),
    ] {
        if let Some(v) = get(k) {
            if !is_quantity(v) {
                return Err(bad(k, format!("{v:?} is not a Kubernetes quantity")));
            }
            let map = if target {
                &mut s.requests
            } else {
                &mut s.limits
            };
            map.insert(resource, v.to_owned());
        }
    }
    if let Some(v) = get("proxy.istio.io/config") {
        proxy_config(v, &mut s)?;
    }
    if let Some(v) = get("sidecar.istio.io/userVolume") {
        s.user_volumes = named_objects("sidecar.istio.io/userVolume", v)?;
    }
    if let Some(v) = get("sidecar.istio.io/userVolumeMount") {
        s.user_mounts = named_objects("sidecar.istio.io/userVolumeMount", v)?;
        for m in &mut s.user_mounts {
            if m.get("mountPath").and_then(Value::as_str).is_none() {
                return Err(bad(
                    "sidecar.istio.io/userVolumeMount",
                    "every mount needs a mountPath",
                ));
            }
        }
    }
    Ok(s)
}

/// `true`/`false` (Istio reads these with Go's ParseBool).
fn flag<'a>(get: impl Fn(&str) -> Option<&'a str>, k: &str) -> Result<Option<bool>, BadAnnotation> {
    match get(k) {
        None => Ok(None),
        Some("true" | "True" | "TRUE" | "1" | "t" | "T") => Ok(Some(true)),
        Some("false" | "False" | "FALSE" | "0" | "f" | "F") => Ok(Some(false)),
        Some(v) => Err(bad(k, format!("{v:?} is not true or false"))),
    }
}

/// A comma-separated port list; `*` (all) where `star`; empty: none. `Ok(None)` is `*`.
fn port_list(v: &str, star: bool) -> Result<Option<Vec<u16>>, String> {
    let v = v.trim();
    if star && v == "*" {
        return Ok(None);
    }
    let mut out = Vec::new();
    for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => out.push(n),
            _ => return Err(format!("{p:?} is not a port (1..65535)")),
        }
    }
    Ok(Some(out))
}

/// A comma-separated CIDR list; `*` where `star`; empty: none. `Ok(None)` is `*`.
fn cidr_list(v: &str, star: bool) -> Result<Option<Vec<String>>, String> {
    let v = v.trim();
    if star && v == "*" {
        return Ok(None);
    }
    let mut out = Vec::new();
    for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let (ip, len) = c
            .split_once('/')
            .ok_or_else(|| format!("{c:?} is not a CIDR (address/prefix)"))?;
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{c:?}: {ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{c:?}: the prefix length is not 0..{max}"))?;
        out.push(format!("{ip}/{len}"));
    }
    Ok(Some(out))
}

/// Interface names as Linux allows them (1–15 bytes, no `/`, whitespace or `:`).
fn interface_list(v: &str) -> Result<Vec<String>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|i| {
            if i.len() > 15 || i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
                Err(format!("{i:?} is not an interface name"))
            } else {
                Ok(i.to_owned())
            }
        })
        .collect()
}

/// A Kubernetes resource quantity (`100m`, `1.5Gi`, `2e3`).
pub(crate) fn is_quantity(v: &str) -> bool {
    let v = v.strip_prefix(['+', '-']).unwrap_or(v);
    let digits_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(digits_end);
    let num_ok = !num.is_empty()
        && num != "."
        && num.matches('.').count() <= 1
        && num.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    num_ok && suffix_ok
}

/// The fields of Istio's ProxyConfig that apply to eastguard's sidecar.
fn proxy_config(v: &str, s: &mut Settings) -> Result<(), BadAnnotation> {
    const K: &str = "proxy.istio.io/config";
    let doc: Value = serde_yaml::from_str(v).map_err(|e| bad(K, format!("not YAML: {e}")))?;
    let Some(fields) = doc.as_object() else {
        if doc.is_null() {
            return Ok(());
        }
        return Err(bad(K, "not a ProxyConfig object"));
    };
    for (name, value) in fields {
        match name.as_str() {
            "concurrency" => {
                let n = value
                    .as_u64()
                    .filter(|n| *n <= 256)
                    .ok_or_else(|| bad(K, "concurrency is not a whole number of 0..256"))?;
                // 0 is Envoy's "one worker per core"; the sidecar's default is the template's.
                s.concurrency = (n > 0).then_some(n as u16);
            }
            "holdApplicationUntilProxyStarts" => {
                s.hold_application = Some(value.as_bool().ok_or_else(|| {
                    bad(K, "holdApplicationUntilProxyStarts is not true or false")
                })?);
            }
            other => s.warnings.push(format!(
                "{K}: {other} is not applied by eastguard's sidecar"
            )),
        }
    }
    Ok(())
}

/// Istio's userVolume / userVolumeMount: a JSON object of name → object.
fn named_objects(k: &str, v: &str) -> Result<Vec<Value>, BadAnnotation> {
    let doc: Value = serde_json::from_str(v).map_err(|e| bad(k, format!("not JSON: {e}")))?;
    let map = doc
        .as_object()
        .ok_or_else(|| bad(k, "not a JSON object of name → value"))?;
    map.iter()
        .map(|(name, body)| {
            let mut body = body
                .as_object()
                .cloned()
                .ok_or_else(|| bad(k, format!("{name}: not an object")))?;
            if !is_dns_label(name) {
                return Err(bad(k, format!("{name:?} is not a volume name")));
            }
            body.insert("name".into(), Value::String(name.clone()));
            Ok(Value::Object(body))
        })
        .collect()
}

/// An RFC 1123 label (a volume or container name).
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(a: Value) -> Result<Settings, BadAnnotation> {
        read(a.as_object().unwrap())
    }

    #[test]
    fn traffic_annotations_are_read_and_the_sidecar_ports_stay_outside_capture() {
        let s = settings(json!({
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.1/32, fd00::/8",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "3306,5432",
            "traffic.sidecar.istio.io/includeInboundPorts": "*",
            "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
        }))
        .unwrap();
        let c = s.capture.unwrap();
        assert_eq!(c.exclude_outbound_cidrs, ["10.96.0.1/32", "fd00::/8"]);
        assert_eq!(c.exclude_outbound_ports, [3306, 5432]);
        assert_eq!(c.include_inbound_ports, None);
        assert_eq!(c.exclude_inbound_ports, [9000, 15020, 15021, 15090]);
    }

    #[test]
    fn malformed_values_are_refused_with_the_annotation_named() {
        for (k, v) in [
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/33",
            ),
            ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*"),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "1.1.1.1",
            ),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "80,abc"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "65536"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "0"),
            ("sidecar.istio.io/interceptionMode", "MAGIC"),
            ("sidecar.istio.io/proxyCPU", "lots"),
            ("proxy.istio.io/config", "concurrency: many"),
            ("proxy.istio.io/config", "[1, 2]"),
            ("sidecar.istio.io/userVolume", "{not json"),
            ("sidecar.istio.io/rewriteAppHTTPProbers", "maybe"),
            ("readiness.status.sidecar.istio.io/periodSeconds", "0"),
        ] {
            let e = settings(json!({ k: v }))
                .err()
                .unwrap_or_else(|| panic!("{k}={v}"));
            assert_eq!(e.annotation, k);
        }
    }

    #[test]
    fn quantities() {
        for q in ["100m", "1", "1.5Gi", "2e3", "0.5", "128Mi", "+1k"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "m", "1.2.3", "1Gb", "one", "1e", "."] {
            assert!(!is_quantity(q), "{q}");
        }
    }
}
