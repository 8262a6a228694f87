//! Aggregation per (service, method, template, caller, status class), bounded, with an overflow
//! row; read whole ([`Inventory::rows`]) or as deltas since the last drain
//! ([`Inventory::drain`]).
//!
//! Memory bound with the default [`Limits`]: at most `max_services` × (`max_nodes` trie nodes of
//! ≤ `max_segment_len` bytes + `max_templates` × `examples` × `example_len`) + `max_rows` rows of
//! bounded strings — 64 × (2,048 × ~260 B + 512 × 384 B) + 4,096 × ~600 B ≈ 49 MiB in the worst
//! case a client can force, and far less in practice (the README states it).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::call::{AuthScheme, Call};
use crate::sensitive::{DataType, Direction, Report};
use crate::template::{OVERFLOW, TemplateId, TemplateLimits, Templates};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub templates: TemplateLimits,
    /// Services with templates; calls for more go to the overflow row.
    pub max_services: usize,
    /// Aggregation rows; past it, calls count in one overflow row.
    pub max_rows: usize,
    /// Content types kept per row.
    pub content_types: usize,
    /// Object-level enumeration detection; `None`: off.
    pub bola: Option<crate::bola::Limits>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            templates: TemplateLimits::default(),
            max_services: 64,
            max_rows: 4096,
            content_types: 4,
            bola: Some(crate::bola::Limits::default()),
        }
    }
}

/// Method names are an open set; a row keeps the standard ones and `OTHER`.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// A row's key, `Copy`: observing a call of a known row allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    service: u32,
    method: &'static str,
    template: TemplateId,
    /// Index into `callers`; `NO_CALLER` for a plaintext caller.
    caller: u32,
    status_class: u16,
}

const NO_CALLER: u32 = u32::MAX;

#[derive(Debug, Clone, Default)]
struct Counters {
    calls: u64,
    denied: u64,
    request_bytes: u64,
    response_bytes: u64,
    latency: Duration,
    max_latency: Duration,
    auth: u8,
    request_types: Vec<String>,
    response_types: Vec<String>,
    first_seen: Option<SystemTime>,
    last_seen: Option<SystemTime>,
}

/// One row of the inventory, as exported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub service: String,
    pub method: String,
    /// The path template (`http.route`), `{overflow}` for calls past a cap.
    pub template: String,
    /// The verified caller SPIFFE ID, `null` for plaintext callers.
    pub caller: Option<String>,
    /// `2xx`, `4xx` …
    pub status_class: String,
    pub calls: u64,
    /// Calls RBAC denied.
    pub denied: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub latency_ms_total: f64,
    pub latency_ms_max: f64,
    pub auth_schemes: Vec<&'static str>,
    pub request_content_types: Vec<String>,
    pub response_content_types: Vec<String>,
    pub examples: Vec<String>,
    pub first_seen_unix: u64,
    pub last_seen_unix: u64,
}

impl Row {
    /// Adds a later delta of the same key (lists stay short: at most four content types).
    pub fn absorb(&mut self, r: Row) {
        self.calls += r.calls;
        self.denied += r.denied;
        self.request_bytes += r.request_bytes;
        self.response_bytes += r.response_bytes;
        self.latency_ms_total += r.latency_ms_total;
        self.latency_ms_max = self.latency_ms_max.max(r.latency_ms_max);
        self.first_seen_unix = self.first_seen_unix.min(r.first_seen_unix);
        self.last_seen_unix = self.last_seen_unix.max(r.last_seen_unix);
        for s in r.auth_schemes {
            if !self.auth_schemes.contains(&s) {
                self.auth_schemes.push(s);
            }
        }
        for (into, new) in [
            (&mut self.request_content_types, r.request_content_types),
            (&mut self.response_content_types, r.response_content_types),
        ] {
            for t in new {
                if into.len() < 4 && !into.contains(&t) {
                    into.push(t);
                }
            }
        }
    }
}

/// A map every call looks up. Its keys are names from the configuration, verified caller IDs
/// and small numbers, and it holds at most `max_rows`, so foldhash (seeded per map) is enough;
/// SipHash cost more than the rest of a lookup.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A sidecar's API inventory.
#[derive(Debug)]
pub struct Inventory {
    limits: Limits,
    services: Vec<(Box<str>, Templates)>,
    by_name: FastMap<Box<str>, u32>,
    /// Verified caller IDs seen, interned (at most `max_rows`: each has a row).
    callers: Vec<Box<str>>,
    caller_ids: FastMap<Box<str>, u32>,
    rows: FastMap<Key, Counters>,
    /// Deltas since the last drain.
    delta: FastMap<Key, Counters>,
    overflow: Counters,
    overflow_delta: Counters,
    /// Sensitive-data findings per operation (service, method, template), at most `max_rows`
    /// operations and [`SENSITIVE_PER_OPERATION`] (type, direction, place) each.
    sensitive: HashMap<(u32, &'static str, TemplateId), BTreeMap<SensitiveKey, u64>>,
    sensitive_delta: HashMap<(u32, &'static str, TemplateId), BTreeMap<SensitiveKey, u64>>,
    /// (service, method, template, caller) → object IDs asked for.
    bola: Option<crate::bola::Detector<(u32, &'static str, TemplateId, u32)>>,
}

/// A BOLA / enumeration finding with who and what it is about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BolaEvent {
    /// The verified caller; `None` for plaintext callers.
    pub caller: Option<String>,
    pub service: String,
    pub method: String,
    pub template: String,
    #[serde(flatten)]
    pub finding: crate::bola::Finding,
}

type SensitiveKey = (DataType, Direction, String);

/// Distinct (type, direction, place) findings kept per operation.
pub const SENSITIVE_PER_OPERATION: usize = 32;

/// Sensitive data seen in an operation's calls: what, where, how often — never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SensitiveRow {
    pub service: String,
    pub method: String,
    pub template: String,
    pub data_type: String,
    pub direction: Direction,
    pub location: String,
    pub count: u64,
}

impl Inventory {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            services: Vec::new(),
            by_name: FastMap::default(),
            callers: Vec::new(),
            caller_ids: FastMap::default(),
            rows: FastMap::default(),
            delta: FastMap::default(),
            overflow: Counters::default(),
            overflow_delta: Counters::default(),
            sensitive: HashMap::new(),
            sensitive_delta: HashMap::new(),
            bola: limits.bola.map(crate::bola::Detector::new),
        }
    }

    /// Adds what classifying a sampled call found, and returns the findings new to their
    /// operation (for a detection event). The call was observed before, so its path is learned;
    /// a path that is not (a cap was reached) is left out.
    pub fn add_sensitive(
        &mut self,
        service: &str,
        method: &str,
        path: &str,
        report: &Report,
    ) -> Vec<SensitiveRow> {
        let mut new = Vec::new();
        if report.findings.is_empty() {
            return new;
        }
        let Some(&svc) = self.by_name.get(service) else {
            return new;
        };
        let Some(t) = self.services[svc as usize].1.lookup(path) else {
            return new;
        };
        let template = self.services[svc as usize].1.text(t);
        let method = METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("OTHER");
        let key = (svc, method, t);
        let max_ops = self.limits.max_rows;
        for (i, map) in [&mut self.sensitive, &mut self.sensitive_delta]
            .into_iter()
            .enumerate()
        {
            if !map.contains_key(&key) && map.len() >= max_ops {
                continue;
            }
            let entry = map.entry(key).or_default();
            for f in &report.findings {
                let k = (f.data_type.clone(), f.direction, f.location.clone());
                if let Some(n) = entry.get_mut(&k) {
                    *n += u64::from(f.count);
                } else if entry.len() < SENSITIVE_PER_OPERATION {
                    entry.insert(k, u64::from(f.count));
                    if i == 0 {
                        new.push(SensitiveRow {
                            service: service.to_owned(),
                            method: method.to_owned(),
                            template: template.clone(),
                            data_type: f.data_type.name().to_owned(),
                            direction: f.direction,
                            location: f.location.clone(),
                            count: u64::from(f.count),
                        });
                    }
                }
            }
        }
        new
    }

    /// The template a path of `service` was learned as (`None` if it was not).
    pub fn template_of(&self, service: &str, path: &str) -> Option<String> {
        let &svc = self.by_name.get(service)?;
        let t = &self.services[svc as usize].1;
        t.lookup(path).map(|id| t.text(id))
    }

    /// Sensitive data per operation since start.
    pub fn sensitive(&self) -> Vec<SensitiveRow> {
        self.sensitive_rows(&self.sensitive)
    }

    /// Sensitive data per operation since the last drain, and forget it.
    pub fn drain_sensitive(&mut self) -> Vec<SensitiveRow> {
        let delta = std::mem::take(&mut self.sensitive_delta);
        self.sensitive_rows(&delta)
    }

    fn sensitive_rows(
        &self,
        map: &HashMap<(u32, &'static str, TemplateId), BTreeMap<SensitiveKey, u64>>,
    ) -> Vec<SensitiveRow> {
        let mut merged: BTreeMap<(String, String, String, String, Direction, String), u64> =
            BTreeMap::new();
        for ((svc, method, t), found) in map {
            let (name, templates) = &self.services[*svc as usize];
            let template = templates.text(templates.resolve(*t));
            for ((dt, d, loc), n) in found {
                *merged
                    .entry((
                        name.to_string(),
                        (*method).to_owned(),
                        template.clone(),
                        dt.name().to_owned(),
                        *d,
                        loc.clone(),
                    ))
                    .or_default() += n;
            }
        }
        merged
            .into_iter()
            .map(
                |((service, method, template, data_type, direction, location), count)| {
                    SensitiveRow {
                        service,
                        method,
                        template,
                        data_type,
                        direction,
                        location,
                        count,
                    }
                },
            )
            .collect()
    }

    /// Records one call; a BOLA / enumeration finding it completes, if any.
    pub fn observe(&mut self, call: &Call<'_>, now: SystemTime) -> Option<BolaEvent> {
        let Some(service) = self.service(call.service) else {
            add(&mut self.overflow, call, now, &self.limits);
            add(&mut self.overflow_delta, call, now, &self.limits);
            return None;
        };
        let templates = &mut self.services[service as usize].1;
        // gRPC's `/package.Service/Method` is learned like any path: its segments are words, so
        // it stays literal.
        let template = templates.learn(call.path);
        let caller = match call.caller {
            None => NO_CALLER,
            Some(id) => match self.caller_ids.get(id) {
                Some(&i) => i,
                None if self.callers.len() < self.limits.max_rows => {
                    let i = self.callers.len() as u32;
                    self.callers.push(id.into());
                    self.caller_ids.insert(id.into(), i);
                    i
                }
                None => {
                    add(&mut self.overflow, call, now, &self.limits);
                    add(&mut self.overflow_delta, call, now, &self.limits);
                    return None;
                }
            },
        };
        let key = Key {
            service,
            method: METHODS
                .iter()
                .find(|m| **m == call.method)
                .copied()
                .unwrap_or("OTHER"),
            template,
            caller,
            status_class: call.status / 100,
        };
        let limits = self.limits;
        let full = self.rows.len() >= limits.max_rows;
        match self.rows.get_mut(&key) {
            Some(c) => add(c, call, now, &limits),
            None if !full => {
                let mut c = Counters::default();
                add(&mut c, call, now, &limits);
                self.rows.insert(key, c);
            }
            None => {
                add(&mut self.overflow, call, now, &limits);
                add(&mut self.overflow_delta, call, now, &limits);
                return None;
            }
        }
        add(self.delta.entry(key).or_default(), call, now, &limits);
        self.bola(call, key, now)
    }

    /// Feeds the object ID (the path's segment at the template's last parameter) to the BOLA
    /// detector. Calls RBAC denied count too: asking for objects one may not see is the pattern.
    fn bola(&mut self, call: &Call<'_>, key: Key, now: SystemTime) -> Option<BolaEvent> {
        let detector = self.bola.as_mut()?;
        if call.grpc || key.template == OVERFLOW {
            return None;
        }
        let templates = &self.services[key.service as usize].1;
        let depth = templates.last_param_depth(key.template)?;
        let id = call.path.split('/').filter(|s| !s.is_empty()).nth(depth)?;
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let finding = detector.observe(
            (
                key.service,
                key.method,
                templates.resolve(key.template),
                key.caller,
            ),
            id,
            call.status,
            secs,
        )?;
        Some(BolaEvent {
            caller: (key.caller != NO_CALLER)
                .then(|| self.callers[key.caller as usize].to_string()),
            service: self.services[key.service as usize].0.to_string(),
            method: key.method.to_owned(),
            template: templates.text(key.template),
            finding,
        })
    }

    fn service(&mut self, name: &str) -> Option<u32> {
        if let Some(&i) = self.by_name.get(name) {
            return Some(i);
        }
        if self.services.len() >= self.limits.max_services {
            return None;
        }
        let i = self.services.len() as u32;
        self.services
            .push((name.into(), Templates::new(self.limits.templates)));
        self.by_name.insert(name.into(), i);
        Some(i)
    }

    /// Everything since start, rows merged by their current template (a template merged into a
    /// parameter adds to the parameter's rows).
    pub fn rows(&self) -> Vec<Row> {
        self.export(&self.rows, &self.overflow)
    }

    /// What changed since the last drain, and forget it.
    pub fn drain(&mut self) -> Vec<Row> {
        let delta = std::mem::take(&mut self.delta);
        let overflow = std::mem::take(&mut self.overflow_delta);
        self.export(&delta, &overflow)
    }

    /// Calls that went to an overflow row or template (a cap was reached).
    pub fn overflow_calls(&self) -> u64 {
        self.overflow.calls
            + self
                .rows
                .iter()
                .filter(|(k, _)| k.template == OVERFLOW)
                .map(|(_, c)| c.calls)
                .sum::<u64>()
    }

    /// Templates per service: (service, template, examples).
    pub fn templates(&self) -> Vec<(String, String, Vec<String>)> {
        let mut out = Vec::new();
        for (name, t) in &self.services {
            for id in t.all() {
                out.push((name.to_string(), t.text(id), t.examples(id).to_vec()));
            }
        }
        out.sort();
        out
    }

    fn export(&self, rows: &FastMap<Key, Counters>, overflow: &Counters) -> Vec<Row> {
        let mut merged: HashMap<Key, Counters> = HashMap::new();
        for (k, c) in rows {
            let mut k = *k;
            if k.template != OVERFLOW {
                k.template = self.services[k.service as usize].1.resolve(k.template);
            }
            merge(merged.entry(k).or_default(), c, &self.limits);
        }
        let mut out: Vec<Row> = merged
            .iter()
            .map(|(k, c)| {
                let (service, templates) = &self.services[k.service as usize];
                row(
                    service.to_string(),
                    k.method.to_owned(),
                    templates.text(k.template),
                    (k.caller != NO_CALLER).then(|| self.callers[k.caller as usize].to_string()),
                    format!("{}xx", k.status_class),
                    c,
                    templates.examples(k.template).to_vec(),
                )
            })
            .collect();
        if overflow.calls > 0 {
            out.push(row(
                "{overflow}".into(),
                "OTHER".into(),
                "{overflow}".into(),
                None,
                "-".into(),
                overflow,
                Vec::new(),
            ));
        }
        out.sort_by(|a, b| {
            (
                &a.service,
                &a.template,
                &a.method,
                &a.caller,
                &a.status_class,
            )
                .cmp(&(
                    &b.service,
                    &b.template,
                    &b.method,
                    &b.caller,
                    &b.status_class,
                ))
        });
        out
    }
}

fn add(c: &mut Counters, call: &Call<'_>, now: SystemTime, limits: &Limits) {
    c.calls += 1;
    c.denied += u64::from(!call.allowed);
    c.request_bytes += call.request_bytes;
    c.response_bytes += call.response_bytes;
    c.latency += call.latency;
    c.max_latency = c.max_latency.max(call.latency);
    c.auth |= call.auth.bit();
    for (have, new) in [
        (&mut c.request_types, call.request_type),
        (&mut c.response_types, call.response_type),
    ] {
        if let Some(t) = new
            && have.len() < limits.content_types
            && !have.iter().any(|h| h == t)
        {
            have.push(t.to_owned());
        }
    }
    c.first_seen.get_or_insert(now);
    c.last_seen = Some(now);
}

fn merge(into: &mut Counters, c: &Counters, limits: &Limits) {
    into.calls += c.calls;
    into.denied += c.denied;
    into.request_bytes += c.request_bytes;
    into.response_bytes += c.response_bytes;
    into.latency += c.latency;
    into.max_latency = into.max_latency.max(c.max_latency);
    into.auth |= c.auth;
    for (have, new) in [
        (&mut into.request_types, &c.request_types),
        (&mut into.response_types, &c.response_types),
    ] {
        for t in new {
            if have.len() < limits.content_types && !have.contains(t) {
                have.push(t.clone());
            }
        }
    }
    into.first_seen = match (into.first_seen, c.first_seen) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    into.last_seen = into.last_seen.max(c.last_seen);
}

fn row(
    service: String,
    method: String,
    template: String,
    caller: Option<String>,
    status_class: String,
    c: &Counters,
    examples: Vec<String>,
) -> Row {
    let unix = |t: Option<SystemTime>| {
        t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    };
    Row {
        service,
        method,
        template,
        caller,
        status_class,
        calls: c.calls,
        denied: c.denied,
        request_bytes: c.request_bytes,
        response_bytes: c.response_bytes,
        latency_ms_total: c.latency.as_secs_f64() * 1000.0,
        latency_ms_max: c.max_latency.as_secs_f64() * 1000.0,
        auth_schemes: AuthScheme::ALL
            .iter()
            .filter(|s| c.auth & s.bit() != 0)
            .map(|s| s.as_str())
            .collect(),
        request_content_types: c.request_types.clone(),
        response_content_types: c.response_types.clone(),
        examples,
        first_seen_unix: unix(c.first_seen),
        last_seen_unix: unix(c.last_seen),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(path: &'a str, caller: Option<&'a str>, status: u16) -> Call<'a> {
        Call {
            service: "orders.shop.svc.cluster.local",
            method: "GET",
            path,
            status,
            caller,
            allowed: status != 403,
            request_bytes: 10,
            response_bytes: 100,
            latency: Duration::from_millis(2),
            request_type: None,
            response_type: Some("application/json"),
            auth: AuthScheme::BearerJwt,
            grpc: false,
        }
    }

    #[test]
    fn rows_by_template_caller_and_status_class() {
        let mut inv = Inventory::new(Limits::default());
        let now = SystemTime::now();
        let fe = Some("spiffe://cluster.local/ns/shop/sa/frontend");
        for i in 0..5 {
            inv.observe(&call(&format!("/orders/{i}"), fe, 200), now);
        }
        inv.observe(&call("/orders/9", None, 403), now);
        let rows = inv.rows();
        assert_eq!(rows.len(), 2, "{rows:#?}");
        let ok = rows.iter().find(|r| r.caller.is_some()).unwrap();
        assert_eq!(
            (ok.template.as_str(), ok.calls, ok.status_class.as_str()),
            ("/orders/{id}", 5, "2xx")
        );
        assert_eq!(ok.auth_schemes, ["bearer-jwt"]);
        assert_eq!(ok.response_content_types, ["application/json"]);
        let denied = rows.iter().find(|r| r.caller.is_none()).unwrap();
        assert_eq!((denied.denied, denied.status_class.as_str()), (1, "4xx"));
        // Deltas: all of it once, then nothing, then only what is new.
        assert_eq!(inv.drain().iter().map(|r| r.calls).sum::<u64>(), 6);
        assert!(inv.drain().is_empty());
        inv.observe(&call("/orders/1", fe, 200), now);
        let d = inv.drain();
        assert_eq!((d.len(), d[0].calls), (1, 1));
        assert_eq!(inv.rows().iter().map(|r| r.calls).sum::<u64>(), 7);
    }

    #[test]
    fn rows_follow_a_merge_into_a_parameter() {
        let mut inv = Inventory::new(Limits {
            templates: TemplateLimits {
                literal_fanout: 4,
                ..Default::default()
            },
            ..Default::default()
        });
        let now = SystemTime::now();
        for n in ["alice", "bob", "carol", "dave", "erin", "frank"] {
            inv.observe(&call(&format!("/users/{n}"), None, 200), now);
        }
        let rows = inv.rows();
        assert_eq!(rows.len(), 1, "{rows:#?}");
        assert_eq!(
            (rows[0].template.as_str(), rows[0].calls),
            ("/users/{param}", 6)
        );
    }

    #[test]
    fn rows_services_and_callers_are_capped() {
        let mut inv = Inventory::new(Limits {
            max_rows: 10,
            max_services: 2,
            ..Default::default()
        });
        let now = SystemTime::now();
        for i in 0..50 {
            let caller = format!("spiffe://cluster.local/ns/x/sa/c{i}");
            inv.observe(&call("/a", Some(&caller), 200), now);
        }
        let mut other = call("/a", None, 200);
        for s in ["s2", "s3", "s4"] {
            other.service = s;
            inv.observe(&other, now);
        }
        let rows = inv.rows();
        assert!(rows.len() <= 11, "{}", rows.len());
        // 40 callers past the row cap, s2's first row past it too, s3 and s4 past the service cap.
        assert_eq!(inv.overflow_calls(), 40 + 1 + 2);
        assert!(
            rows.iter()
                .any(|r| r.service == "{overflow}" && r.calls == 43)
        );
    }
}
