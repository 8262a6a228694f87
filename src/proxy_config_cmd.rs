//! `eastguard proxy-config`: a running sidecar's configuration (its admin `/config_dump`, or a
//! saved one) as the tables `istioctl proxy-config` prints, or as JSON / YAML.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    Secret,
    Authz,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Short,
    Json,
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct ProxyConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    pub section: Section,
    /// The sidecar's admin address.
    #[arg(long, default_value = "127.0.0.1:15000", conflicts_with = "file")]
    pub admin: String,
    /// A saved `/config_dump` instead of a running sidecar.
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Output format: `short` (tables), `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value = "short")]
    pub output: Output,
}

pub fn run(args: &ProxyConfigArgs) -> anyhow::Result<ExitCode> {
    let text = match &args.file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => crate::apis_cmd::http_get(&args.admin, "/config_dump").with_context(|| {
            format!(
                "cannot read /config_dump from the sidecar at {}",
                args.admin
            )
        })?,
    };
    let dump: Value = serde_json::from_str(&text).context("the config dump is not JSON")?;
    let Some(configs) = dump.get("configs").and_then(Value::as_array) else {
        bail!("not an Envoy config dump: no `configs` array");
    };
    let view = View::of(configs);
    let sections = match args.section {
        Section::All => vec![
            Section::Listeners,
            Section::Routes,
            Section::Clusters,
            Section::Endpoints,
            Section::Secret,
            Section::Authz,
        ],
        one => vec![one],
    };
    let mut out = String::new();
    match args.output {
        Output::Short => {
            for (i, s) in sections.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str(&render(&view.table(*s)));
            }
        }
        Output::Json | Output::Yaml => {
            let value = if sections.len() == 1 {
                view.objects(sections[0])
            } else {
                Value::Object(
                    sections
                        .iter()
                        .map(|s| (format!("{s:?}").to_lowercase(), view.objects(*s)))
                        .collect(),
                )
            };
            out = if args.output == Output::Json {
                serde_json::to_string_pretty(&value)? + "\n"
            } else {
                serde_yaml::to_string(&value)?
            };
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// The objects of a config dump, static and dynamic alike.
struct View {
    listeners: Vec<Value>,
    /// (route config name, route config) — RDS ones and those inline in HTTP connection managers.
    routes: Vec<(String, Value)>,
    clusters: Vec<Value>,
    /// (cluster name, ClusterLoadAssignment).
    endpoints: Vec<(String, Value)>,
    secrets: Vec<(String, Value)>,
}

fn typed<'a>(configs: &'a [Value], suffix: &str) -> Option<&'a Value> {
    configs.iter().find(|c| {
        c.get("@type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with(suffix))
    })
}

fn array<'a>(v: Option<&'a Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The HTTP connection managers (and their filter chain) of a listener.
fn hcms(listener: &Value) -> impl Iterator<Item = (&Value, &Value)> {
    array(Some(listener), "filter_chains").flat_map(|chain| {
        array(Some(chain), "filters")
            .filter(|f| s(f, &["name"]) == Some("envoy.filters.network.http_connection_manager"))
            .filter_map(move |f| Some((chain, f.get("typed_config")?)))
    })
}

impl View {
    fn of(configs: &[Value]) -> Self {
        let l = typed(configs, "ListenersConfigDump");
        let listeners: Vec<Value> = array(l, "static_listeners")
            .filter_map(|x| x.get("listener"))
            .chain(array(l, "dynamic_listeners").filter_map(|x| {
                x.get("active_state")
                    .or_else(|| x.get("warming_state"))?
                    .get("listener")
            }))
            .cloned()
            .collect();
        let r = typed(configs, "RoutesConfigDump");
        let mut routes: Vec<(String, Value)> = array(r, "static_route_configs")
            .chain(array(r, "dynamic_route_configs"))
            .filter_map(|x| x.get("route_config"))
            .map(|rc| (s(rc, &["name"]).unwrap_or("").to_owned(), rc.clone()))
            .collect();
        for listener in &listeners {
            for (chain, hcm) in hcms(listener) {
                if let Some(rc) = hcm.get("route_config") {
                    let name = s(rc, &["name"])
                        .map(str::to_owned)
                        .or_else(|| s(chain, &["name"]).map(|c| format!("{c} (inline)")))
                        .unwrap_or_else(|| "(inline)".to_owned());
                    routes.push((name, rc.clone()));
                }
            }
        }
        let c = typed(configs, "ClustersConfigDump");
        let clusters: Vec<Value> = array(c, "static_clusters")
            .chain(array(c, "dynamic_active_clusters"))
            .filter_map(|x| x.get("cluster"))
            .cloned()
            .collect();
        let e = typed(configs, "EndpointsConfigDump");
        let mut endpoints: Vec<(String, Value)> = array(e, "static_endpoint_configs")
            .chain(array(e, "dynamic_endpoint_configs"))
            .filter_map(|x| x.get("endpoint_config"))
            .map(|cla| {
                (
                    s(cla, &["cluster_name"]).unwrap_or("").to_owned(),
                    cla.clone(),
                )
            })
            .collect();
        for cluster in &clusters {
            if let Some(cla) = cluster.get("load_assignment") {
                let name = s(cluster, &["name"]).unwrap_or("").to_owned();
                if !endpoints.iter().any(|(n, _)| *n == name) {
                    endpoints.push((name, cla.clone()));
                }
            }
        }
        let sd = typed(configs, "SecretsConfigDump");
        let secrets = array(sd, "static_secrets")
            .chain(array(sd, "dynamic_active_secrets"))
            .filter_map(|x| {
                let secret = x.get("secret")?;
                let name = s(x, &["name"]).or_else(|| s(secret, &["name"]))?;
                Some((name.to_owned(), secret.clone()))
            })
            .collect();
        Self {
            listeners,
            routes,
            clusters,
            endpoints,
            secrets,
        }
    }

    /// The Envoy objects of a section, for `-o json|yaml`.
    fn objects(&self, section: Section) -> Value {
        match section {
            Section::Listeners => json!(self.listeners),
            Section::Routes => json!(self.routes.iter().map(|(_, r)| r).collect::<Vec<_>>()),
            Section::Clusters => json!(self.clusters),
            Section::Endpoints => json!(self.endpoints.iter().map(|(_, e)| e).collect::<Vec<_>>()),
            Section::Secret => json!(self.secrets.iter().map(|(_, s)| s).collect::<Vec<_>>()),
            Section::Authz => json!(self.rbac_filters().map(|(_, r)| r).collect::<Vec<_>>()),
            Section::All => Value::Null,
        }
    }

    fn table(&self, section: Section) -> Table {
        match section {
            Section::Listeners => self.listeners_table(),
            Section::Routes => self.routes_table(),
            Section::Clusters => self.clusters_table(),
            Section::Endpoints => self.endpoints_table(),
            Section::Secret => self.secrets_table(),
            Section::Authz | Section::All => self.authz_table(),
        }
    }

    fn listeners_table(&self) -> Table {
        let mut t = Table::new(&["NAME", "ADDRESSES", "PORT", "MATCH", "DESTINATION"]);
        for l in &self.listeners {
            let name = s(l, &["name"]).unwrap_or("-");
            let address = s(l, &["address", "socket_address", "address"]).unwrap_or("-");
            let port = l
                .pointer("/address/socket_address/port_value")
                .map_or("-".to_owned(), Value::to_string);
            for chain in array(Some(l), "filter_chains") {
                t.row(vec![
                    name.to_owned(),
                    address.to_owned(),
                    port.clone(),
                    chain_match(chain.get("filter_chain_match")),
                    destination(chain),
                ]);
            }
        }
        t
    }

    fn routes_table(&self) -> Table {
        let mut t = Table::new(&["NAME", "VHOST NAME", "DOMAINS", "MATCH", "CLUSTER"]);
        for (name, rc) in &self.routes {
            for vh in array(Some(rc), "virtual_hosts") {
                let domains: Vec<&str> = array(Some(vh), "domains")
                    .filter_map(Value::as_str)
                    .collect();
                let domains = match domains.as_slice() {
                    [] => "-".to_owned(),
                    [one] => (*one).to_owned(),
                    [first, rest @ ..] => format!("{first} + {} more...", rest.len()),
                };
                for route in array(Some(vh), "routes") {
                    let m = route.get("match");
                    let matched = m
                        .and_then(|m| {
                            s(m, &["prefix"])
                                .map(|p| format!("{p}*"))
                                .or_else(|| s(m, &["path"]).map(str::to_owned))
                                .or_else(|| {
                                    s(m, &["safe_regex", "regex"]).map(|r| format!("regex {r}"))
                                })
                        })
                        .unwrap_or_else(|| "-".to_owned());
                    let cluster = s(route, &["route", "cluster"])
                        .map(str::to_owned)
                        .or_else(|| {
                            route
                                .pointer("/direct_response/status")
                                .map(|st| format!("direct response {st}"))
                        })
                        .unwrap_or_else(|| "-".to_owned());
                    t.row(vec![
                        name.clone(),
                        s(vh, &["name"]).unwrap_or("-").to_owned(),
                        domains.clone(),
                        matched,
                        cluster,
                    ]);
                }
            }
        }
        t
    }

    fn clusters_table(&self) -> Table {
        let mut t = Table::new(&[
            "SERVICE FQDN",
            "PORT",
            "SUBSET",
            "DIRECTION",
            "TYPE",
            "DESTINATION RULE",
        ]);
        for c in &self.clusters {
            let name = s(c, &["name"]).unwrap_or("-");
            let kind = if c.get("eds_cluster_config").is_some() {
                "EDS"
            } else {
                s(c, &["type"]).unwrap_or("STATIC")
            };
            // Istio's names: direction|port|subset|fqdn.
            let parts: Vec<&str> = name.split('|').collect();
            let row = match parts.as_slice() {
                [direction, port, subset, fqdn] => vec![
                    if fqdn.is_empty() { name } else { fqdn }.to_owned(),
                    dash(port),
                    dash(subset),
                    direction.to_owned().to_owned(),
                    kind.to_owned(),
                    "-".to_owned(),
                ],
                _ => vec![
                    name.to_owned(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    kind.to_owned(),
                    "-".into(),
                ],
            };
            t.row(row);
        }
        t
    }

    fn endpoints_table(&self) -> Table {
        let mut t = Table::new(&["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"]);
        for (cluster, cla) in &self.endpoints {
            for locality in array(Some(cla), "endpoints") {
                for lb in array(Some(locality), "lb_endpoints") {
                    let sa = lb.pointer("/endpoint/address/socket_address");
                    let endpoint = match sa {
                        Some(sa) => format!(
                            "{}:{}",
                            s(sa, &["address"]).unwrap_or("-"),
                            sa.get("port_value")
                                .map_or("-".to_owned(), Value::to_string)
                        ),
                        None => "-".to_owned(),
                    };
                    let status = s(lb, &["health_status"]).unwrap_or("HEALTHY");
                    t.row(vec![
                        endpoint,
                        status.to_owned(),
                        "OK".into(),
                        cluster.clone(),
                    ]);
                }
            }
        }
        t
    }

    fn secrets_table(&self) -> Table {
        let mut t = Table::new(&[
            "RESOURCE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
            "SPIFFE ID",
        ]);
        for (name, secret) in &self.secrets {
            let (kind, pem) =
                if let Some(chain) = secret.pointer("/tls_certificate/certificate_chain") {
                    ("Cert Chain", data_source(chain))
                } else if let Some(ca) = secret.pointer("/validation_context/trusted_ca") {
                    ("CA", data_source(ca))
                } else {
                    ("-", None)
                };
            let mut certs = pem.map(|p| certificates(&p)).unwrap_or_default();
            if certs.is_empty() {
                certs.push(CertInfo::default());
            }
            // The leaf of a chain; every certificate of a bundle.
            let shown = if kind == "Cert Chain" {
                &certs[..1]
            } else {
                &certs[..]
            };
            for c in shown {
                t.row(vec![
                    name.clone(),
                    kind.to_owned(),
                    "ACTIVE".into(),
                    c.valid.to_string(),
                    c.serial.clone(),
                    c.not_after.clone(),
                    c.not_before.clone(),
                    c.spiffe_id.clone(),
                ]);
            }
        }
        t
    }

    /// Every RBAC filter: (where, the filter's `rules` / `shadow_rules` holder).
    fn rbac_filters(&self) -> impl Iterator<Item = (String, &Value)> {
        self.listeners.iter().flat_map(|l| {
            let listener = s(l, &["name"]).unwrap_or("-").to_owned();
            array(Some(l), "filter_chains").flat_map(move |chain| {
                let at = format!("{listener}/{}", s(chain, &["name"]).unwrap_or("-"));
                let network = array(Some(chain), "filters")
                    .filter(|f| s(f, &["name"]) == Some("envoy.filters.network.rbac"));
                let http = array(Some(chain), "filters")
                    .filter_map(|f| f.get("typed_config"))
                    .flat_map(|hcm| array(Some(hcm), "http_filters"))
                    .filter(|f| s(f, &["name"]) == Some("envoy.filters.http.rbac"));
                network
                    .chain(http)
                    .filter_map(|f| f.get("typed_config"))
                    .map(move |r| (at.clone(), r))
            })
        })
    }

    fn authz_table(&self) -> Table {
        let mut t = Table::new(&["ACTION", "AuthorizationPolicy", "RULES", "FILTER CHAIN"]);
        for (at, rbac) in self.rbac_filters() {
            for (key, dry_run) in [("rules", false), ("shadow_rules", true)] {
                let Some(rules) = rbac.get(key) else { continue };
                let action = s(rules, &["action"]).unwrap_or("ALLOW");
                let action = if dry_run {
                    format!("{action} (dry-run)")
                } else {
                    action.to_owned()
                };
                let policies = rules.get("policies").and_then(Value::as_object);
                match policies {
                    Some(p) if !p.is_empty() => {
                        for (name, policy) in p {
                            let n = array(Some(policy), "permissions").count();
                            t.row(vec![
                                action.clone(),
                                name.clone(),
                                n.to_string(),
                                at.clone(),
                            ]);
                        }
                    }
                    _ => t.row(vec![
                        action.clone(),
                        "(none: matches nothing)".into(),
                        "0".into(),
                        at.clone(),
                    ]),
                }
            }
        }
        t
    }
}

fn dash(v: &str) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.to_owned()
    }
}

/// How a filter chain is picked, as istioctl words it ("ALL" when it matches everything).
fn chain_match(m: Option<&Value>) -> String {
    let Some(m) = m.filter(|m| m.as_object().is_some_and(|o| !o.is_empty())) else {
        return "ALL".into();
    };
    let mut parts = Vec::new();
    if let Some(p) = m.get("destination_port") {
        parts.push(format!("Port: {p}"));
    }
    let list = |k: &str| -> Vec<String> {
        array(Some(m), k)
            .map(|v| match v.as_str() {
                Some(s) => s.to_owned(),
                None => format!(
                    "{}/{}",
                    s(v, &["address_prefix"]).unwrap_or("?"),
                    v.get("prefix_len")
                        .map_or("32".to_owned(), Value::to_string)
                ),
            })
            .collect()
    };
    for (key, label) in [
        ("prefix_ranges", "Addr"),
        ("server_names", "SNI"),
        ("application_protocols", "ALPN"),
        ("source_prefix_ranges", "Source"),
    ] {
        let v = list(key);
        if !v.is_empty() {
            parts.push(format!("{label}: {}", v.join(",")));
        }
    }
    if let Some(t) = s(m, &["transport_protocol"]) {
        parts.push(format!("Trans: {t}"));
    }
    if parts.is_empty() {
        "ALL".into()
    } else {
        parts.join("; ")
    }
}

/// Where a filter chain sends traffic.
fn destination(chain: &Value) -> String {
    for f in array(Some(chain), "filters") {
        let cfg = f.get("typed_config");
        match s(f, &["name"]) {
            Some("envoy.filters.network.http_connection_manager") => {
                let Some(cfg) = cfg else { continue };
                if let Some(name) = s(cfg, &["rds", "route_config_name"]) {
                    return format!("Route: {name}");
                }
                let vhosts = array(cfg.get("route_config"), "virtual_hosts").count();
                return format!("Inline Route: {vhosts} virtual host(s)");
            }
            Some("envoy.filters.network.tcp_proxy") => {
                if let Some(c) = cfg.and_then(|c| s(c, &["cluster"])) {
                    return format!("Cluster: {c}");
                }
            }
            _ => {}
        }
    }
    if array(Some(chain), "filters").next().is_none() {
        return "Non-HTTP/Non-TCP".into();
    }
    "-".into()
}

/// An Envoy DataSource's bytes as text.
fn data_source(v: &Value) -> Option<String> {
    if let Some(b) = s(v, &["inline_bytes"]) {
        let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
        return String::from_utf8(bytes).ok();
    }
    s(v, &["inline_string"]).map(str::to_owned)
}

#[derive(Default)]
struct CertInfo {
    valid: bool,
    serial: String,
    not_after: String,
    not_before: String,
    spiffe_id: String,
}

fn certificates(pem: &str) -> Vec<CertInfo> {
    use x509_parser::prelude::*;
    let now = ASN1Time::now();
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter_map(|p| {
            let (_, cert) = X509Certificate::from_der(&p.contents).ok()?;
            let v = cert.validity();
            let spiffe_id = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value.general_names.iter().find_map(|n| match n {
                        GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
                        _ => None,
                    })
                })
                .unwrap_or_else(|| "-".into());
            let time = |t: ASN1Time| {
                let t = t.to_datetime();
                format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                )
            };
            Some(CertInfo {
                valid: v.not_before <= now && now <= v.not_after,
                serial: cert.raw_serial_as_string().replace(':', ""),
                not_after: time(v.not_after),
                not_before: time(v.not_before),
                spiffe_id,
            })
        })
        .collect()
}

/// Left-aligned columns, three spaces apart, as istioctl prints them.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
}

fn render(t: &Table) -> String {
    let mut widths: Vec<usize> = t.header.iter().map(|h| h.chars().count()).collect();
    for r in &t.rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&t.header).chain(&t.rows) {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Debug, clap::Args)]
pub struct ProxyStatusArgs {
    /// The control plane's HTTP address (`control-plane --http-address`).
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub control_plane: String,
    /// Output format: `short` (a table), `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value = "short")]
    pub output: Output,
}

/// `eastguard proxy-status`: per connected sidecar, whether each resource type it was sent is
/// ACKed (SYNCED), not yet (STALE) or rejected (NACKED), as `istioctl proxy-status` shows it.
pub fn status(args: &ProxyStatusArgs) -> anyhow::Result<ExitCode> {
    let text =
        crate::apis_cmd::http_get(&args.control_plane, "/debug/syncz").with_context(|| {
            format!(
                "cannot read /debug/syncz from the control plane at {} (is --http-address set?)",
                args.control_plane
            )
        })?;
    let view: Value =
        serde_json::from_str(&text).context("the control plane's answer is not JSON")?;
    let out = match args.output {
        Output::Json => serde_json::to_string_pretty(&view)? + "\n",
        Output::Yaml => serde_yaml::to_string(&view)?,
        Output::Short => {
            let mut t = Table::new(&["NAME", "CLUSTER", "CDS", "LDS", "EDS", "RDS", "VERSION"]);
            let mut nacks = Vec::new();
            for p in array(Some(&view), "proxies") {
                let node = s(p, &["node"]).unwrap_or("-").to_owned();
                let mut row = vec![node.clone(), dash(s(p, &["cluster"]).unwrap_or(""))];
                for ty in ["CDS", "LDS", "EDS", "RDS"] {
                    let state = p.pointer(&format!("/types/{ty}"));
                    row.push(
                        state
                            .and_then(|st| s(st, &["status"]))
                            .unwrap_or("NOT SENT")
                            .to_owned(),
                    );
                    if let Some(detail) = state.and_then(|st| s(st, &["nack"])) {
                        let version = state
                            .and_then(|st| s(st, &["nacked_version"]))
                            .unwrap_or("");
                        nacks.push(format!("{node} {ty} version {version}: {detail}"));
                    }
                }
                row.push(dash(s(p, &["version"]).unwrap_or("")));
                t.row(row);
            }
            let mut out = render(&t);
            for n in nacks {
                let _ = writeln!(out, "NACKED: {n}");
            }
            out
        }
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
