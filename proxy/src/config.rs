//! The static configuration file (`eastguard proxy --config FILE`): a YAML subset shaped like Envoy's
//! bootstrap (listeners with filter chains, HTTP connection manager routes, clusters, TCP proxy).
//!
//! Parsing is strict: unknown fields are errors, and every error names the field and the line.
//! Cross-references (a route naming a cluster that does not exist) are checked after parsing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use identity::SpiffeId;
use serde::{Deserialize, Serialize};

/// Why a config file was refused. The proxy does not start with a refused file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {field}: {message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        path: String,
        field: String,
        message: String,
        line: Option<usize>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub node: Node,
    pub admin: Admin,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub drain: DrainConfig,
    /// Listeners, routes, clusters and endpoints from an ADS server, besides the static ones.
    #[serde(default)]
    pub xds: Option<XdsConfig>,
    /// Traffic capture this sidecar depends on: it is not ready until capture is attached.
    #[serde(default)]
    pub capture: Option<CaptureConfig>,
    /// The API inventory of inbound calls (`GET /apis` on the admin port).
    #[serde(default)]
    pub inventory: InventoryConfig,
    /// Audit events (OCSF or CEF) for every denial and detection.
    #[serde(default)]
    pub audit: Option<crate::audit::AuditConfig>,
    /// Distributed tracing: W3C / B3 propagation and OTLP span export.
    #[serde(default)]
    pub tracing: Option<crate::trace::TracingConfig>,
}

/// The API inventory's switch and bounds (see `apisec::Limits`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Aggregation rows (service, method, template, caller, status class); past it, one overflow row.
    #[serde(default = "default_inventory_rows")]
    pub max_rows: usize,
    /// Distinct literals at one path position before they become one parameter.
    #[serde(default = "default_literal_fanout")]
    pub literal_fanout: usize,
    /// Path templates per service; past it, calls count as `{overflow}`.
    #[serde(default = "default_inventory_templates")]
    pub max_templates: usize,
    /// Deltas exported as OTLP metrics: to the xDS server (over the same mTLS) unless an address
    /// is given; off without either.
    #[serde(default)]
    pub export: InventoryExport,
    /// Sensitive-data classification of a sampled copy of calls (never delaying or altering them).
    #[serde(default)]
    pub sensitive: SensitiveConfig,
    /// Object-level enumeration (BOLA) detection per (verified caller, operation).
    #[serde(default)]
    pub bola: BolaConfig,
    /// Authorization drift against a baseline of caller → operation edges.
    #[serde(default)]
    pub drift: crate::drift::DriftConfig,
}

/// Thresholds of the BOLA / enumeration detector (see `apisec::bola`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BolaConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_bola_window", with = "duration")]
    pub window: Duration,
    #[serde(default = "default_bola_distinct")]
    pub distinct_ids: usize,
    #[serde(default = "default_bola_sequential")]
    pub sequential: u32,
    #[serde(default = "default_bola_ratio")]
    pub error_ratio: f64,
    #[serde(default = "default_bola_min_calls")]
    pub min_calls: u32,
    #[serde(default = "default_bola_keys")]
    pub max_keys: usize,
}

impl Default for BolaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: default_bola_window(),
            distinct_ids: default_bola_distinct(),
            sequential: default_bola_sequential(),
            error_ratio: default_bola_ratio(),
            min_calls: default_bola_min_calls(),
            max_keys: default_bola_keys(),
        }
    }
}

fn default_bola_window() -> Duration {
    apisec::bola::Limits::default().window
}
fn default_bola_distinct() -> usize {
    apisec::bola::Limits::default().distinct_ids
}
fn default_bola_sequential() -> u32 {
    apisec::bola::Limits::default().sequential
}
fn default_bola_ratio() -> f64 {
    apisec::bola::Limits::default().error_ratio
}
fn default_bola_min_calls() -> u32 {
    apisec::bola::Limits::default().min_calls
}
fn default_bola_keys() -> usize {
    apisec::bola::Limits::default().max_keys
}

/// What share of inbound HTTP calls is copied and classified, how much of each body, and custom
/// types. The copy is classified off the request path; findings keep no value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitiveConfig {
    /// 0 (off) to 1 (every call).
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// Bytes of each body copied.
    #[serde(default = "default_sample_bytes")]
    pub body_bytes: usize,
    /// Copies waiting for the classifier; past it, copies are dropped and counted
    /// (`inventory.sensitive_dropped`).
    #[serde(default = "default_sample_queue")]
    pub max_queue: usize,
    #[serde(default)]
    pub custom: Vec<CustomDataType>,
}

/// A data type of one's own: a key regex, a value regex, or both.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDataType {
    pub name: String,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

impl Default for SensitiveConfig {
    fn default() -> Self {
        Self {
            sample_rate: default_sample_rate(),
            body_bytes: default_sample_bytes(),
            max_queue: default_sample_queue(),
            custom: Vec::new(),
        }
    }
}

fn default_sample_rate() -> f64 {
    0.01
}

fn default_sample_bytes() -> usize {
    16 * 1024
}

fn default_sample_queue() -> usize {
    64
}

impl SensitiveConfig {
    /// The classifier for this config; a custom type's regex that does not compile is an error
    /// naming it.
    pub fn classifier(&self) -> Result<apisec::sensitive::Classifier, (String, String)> {
        let mut custom = Vec::new();
        for (i, c) in self.custom.iter().enumerate() {
            let re = |field: &str,
                      v: &Option<String>|
             -> Result<Option<regex::Regex>, (String, String)> {
                v.as_deref()
                    .map(|r| {
                        regex::RegexBuilder::new(r)
                            .size_limit(1 << 20)
                            .build()
                            .map_err(|e| {
                                (
                                    format!("inventory.sensitive.custom[{i}].{field}"),
                                    e.to_string(),
                                )
                            })
                    })
                    .transpose()
            };
            if c.key.is_none() && c.value.is_none() {
                return Err((
                    format!("inventory.sensitive.custom[{i}]"),
                    "needs a key or a value regex".into(),
                ));
            }
            custom.push(apisec::sensitive::CustomType {
                name: c.name.clone(),
                key: re("key", &c.key)?,
                value: re("value", &c.value)?,
            });
        }
        Ok(apisec::sensitive::Classifier {
            custom,
            limits: apisec::sensitive::Limits {
                body_bytes: self.body_bytes,
                ..Default::default()
            },
        })
    }
}

/// Where and how often the inventory is exported (OTLP/gRPC `MetricsService/Export`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryExport {
    /// `host:port` or `http://host:port` of an OTLP/gRPC receiver (plaintext); default: the xDS
    /// server, with the xDS client's mTLS.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default = "default_export_interval", with = "duration")]
    pub interval: Duration,
    /// Rows kept while the receiver cannot be reached; past it, new rows are dropped and counted
    /// (`inventory.export_dropped_rows`). Requests are never slowed or failed by the export.
    #[serde(default = "default_inventory_rows")]
    pub max_backlog: usize,
}

impl Default for InventoryExport {
    fn default() -> Self {
        Self {
            address: None,
            interval: default_export_interval(),
            max_backlog: default_inventory_rows(),
        }
    }
}

fn default_export_interval() -> Duration {
    Duration::from_secs(10)
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_rows: default_inventory_rows(),
            literal_fanout: default_literal_fanout(),
            max_templates: default_inventory_templates(),
            export: InventoryExport::default(),
            sensitive: SensitiveConfig::default(),
            bola: BolaConfig::default(),
            drift: crate::drift::DriftConfig::default(),
        }
    }
}

impl InventoryConfig {
    pub fn limits(&self) -> apisec::Limits {
        let d = apisec::Limits::default();
        let b = &self.bola;
        apisec::Limits {
            bola: b.enabled.then_some(apisec::bola::Limits {
                window: b.window,
                distinct_ids: b.distinct_ids,
                sequential: b.sequential,
                error_ratio: b.error_ratio,
                min_calls: b.min_calls,
                max_keys: b.max_keys,
            }),
            max_rows: self.max_rows,
            templates: apisec::template::TemplateLimits {
                literal_fanout: self.literal_fanout,
                max_templates: self.max_templates,
                ..d.templates
            },
            ..d
        }
    }
}

fn default_inventory_rows() -> usize {
    apisec::Limits::default().max_rows
}

fn default_literal_fanout() -> usize {
    apisec::template::TemplateLimits::default().literal_fanout
}

fn default_inventory_templates() -> usize {
    apisec::template::TemplateLimits::default().max_templates
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Written by `eastguard node-agent --capture` (the registry's `status_file`): `attached`, or
    /// `not-ready: why`. Missing or anything else: not ready.
    pub status_file: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// `host:port` or `http://host:port`.
    pub address: String,
    /// mTLS with this proxy's SVID (Istio's 15012): the control plane must present one of these
    /// SPIFFE IDs. Empty: plaintext (the development port 15010).
    #[serde(default)]
    pub control_plane_ids: Vec<SpiffeId>,
    /// SNI for the mTLS connection.
    #[serde(default = "default_xds_server_name")]
    pub server_name: String,
    /// Incremental xDS (`DeltaAggregatedResources`) instead of state of the world.
    #[serde(default)]
    pub delta: bool,
}

fn default_xds_server_name() -> String {
    "istiod.istio-system.svc".into()
}

/// Who this proxy is; feeds Istio metric labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    pub workload: String,
    pub namespace: String,
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default = "default_cluster_id")]
    pub cluster: String,
}

/// The access log's settings live beside its writer; the bootstrap reads them from here too.
pub use crate::access_log::{AccessLogConfig, AccessLogFormat};

impl Node {
    /// This node as the resource of the spans it exports.
    pub fn trace_origin(&self) -> crate::trace::Origin<'_> {
        crate::trace::Origin {
            service_name: format!(
                "{}.{}",
                self.app.as_deref().unwrap_or(&self.workload),
                self.namespace
            ),
            namespace: &self.namespace,
            node_id: &self.id,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Envoy admin API; must be a loopback address.
    pub address: SocketAddr,
    /// Istio's health port (`/healthz/ready`, 15021).
    #[serde(default)]
    pub health_address: Option<SocketAddr>,
    /// Istio's Prometheus port (`/stats/prometheus`, 15090).
    #[serde(default)]
    pub prometheus_address: Option<SocketAddr>,
    /// Istio's status port (15020): `/healthz/ready`, `/stats/prometheus`, and the app's kubelet
    /// probes from `ISTIO_KUBE_APP_PROBERS` at `/app-health/<container>/<kind>`.
    #[serde(default)]
    pub status_address: Option<SocketAddr>,
}

/// Where the SVID comes from. Exactly one source is given.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM files, re-read when they change.
    #[serde(default)]
    pub files: Option<FileIdentity>,
    /// The SPIFFE Workload API (SPIRE or `eastguard node-agent`).
    #[serde(default)]
    pub workload_api: Option<WorkloadApiIdentity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiIdentity {
    /// The unix socket (`unix:///path` or a path); default `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    pub socket: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// Bundles of other trust domains (trust domain → PEM file).
    #[serde(default)]
    pub federated_bundles: BTreeMap<String, PathBuf>,
    #[serde(default = "default_poll", with = "duration")]
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Direction {
    /// Terminates mTLS from peer sidecars and forwards to the local app.
    Inbound,
    /// Accepts plaintext from the local app and originates mTLS to peers.
    Outbound,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub direction: Direction,
    pub filter_chains: Vec<FilterChain>,
    /// Most connections this listener holds at once; past that new ones are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Envoy's `envoy.filters.listener.original_dst`: connections were redirected here (eBPF
    /// capture or iptables REDIRECT) and their destination is read back with
    /// `getsockopt(SO_ORIGINAL_DST)`, and chains match on it (`destination_port`, `prefix_ranges`).
    /// A connection whose original destination cannot be read keeps its local address (as in
    /// Envoy), so only chains matching that address serve it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub original_dst: bool,
    /// Envoy's `bind_to_port`: `false` binds nothing; the listener is reached only by hand-off
    /// from a `use_original_dst` listener whose connection was going to this address (exactly,
    /// or `0.0.0.0:PORT` / `[::]:PORT` for any address of that family).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub bind_to_port: bool,
    /// Envoy's `use_original_dst`: each connection is handed to the listener at its original
    /// destination when there is one, and served by this listener's chains otherwise. Implies
    /// `original_dst`. (Istio's `virtualOutbound` on 15001.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_original_dst: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterChain {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub filter_chain_match: FilterChainMatch,
    /// Exactly one of the two network filters.
    #[serde(default)]
    pub http_connection_manager: Option<HttpConnectionManager>,
    #[serde(default)]
    pub tcp_proxy: Option<TcpProxy>,
    /// Network RBAC filters (`envoy.filters.network.rbac`), checked when a connection starts.
    #[serde(default)]
    pub rbac_filters: Vec<FilterConfig>,
    /// A chain that closes every connection it matches, and why: what an xDS chain becomes when it
    /// asks for something this proxy cannot do (so its traffic cannot fall through to a wider one),
    /// or a black hole by hand (Istio's `BlackHoleCluster` on a hand-off listener). No network
    /// filter goes with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse: Option<String>,
}

/// An Envoy filter entry: `name` and `typed_config` (proto3 JSON, camelCase or snake_case keys),
/// or, for an RBAC filter read from xDS, the typed filter itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub name: String,
    #[serde(default, alias = "typedConfig")]
    pub typed_config: Option<serde_json::Value>,
    /// An RBAC filter from xDS, typed and shared by every copy of the configuration: as a JSON
    /// tree it cost the sidecar ~90 KiB of heap per AuthorizationPolicy (benches/RESULTS.md).
    #[serde(skip)]
    pub rbac: Option<std::sync::Arc<policy::rbac::Filter>>,
}

impl FilterConfig {
    /// An RBAC filter held typed.
    pub fn rbac(filter: policy::rbac::Filter) -> Self {
        Self {
            name: filter.name.clone(),
            typed_config: None,
            rbac: Some(std::sync::Arc::new(filter)),
        }
    }
}

/// The filter names this proxy runs.
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";

/// Why a filter chain's filters or routes do not build (the chain then refuses its connections;
/// static configuration is refused at load with the field and line).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("[{index}] {name}: typed_config is required")]
    NoTypedConfig { index: usize, name: String },
    #[error("[{index}] {name}: {source}")]
    Filter {
        index: usize,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Rbac(#[from] policy::CompileError),
    #[error("regex {pattern:?}: {source}")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// Compiles the RBAC filters of a chain, in order; any other filter (but the router) is refused.
pub fn compile_rbac(filters: &[FilterConfig]) -> Result<Option<policy::Engine>, ChainError> {
    let mut rbac = Vec::new();
    for (index, f) in filters.iter().enumerate() {
        if f.name == ROUTER_FILTER {
            continue;
        }
        if let Some(typed) = &f.rbac {
            rbac.push(typed.as_ref().clone());
            continue;
        }
        let Some(tc) = &f.typed_config else {
            return Err(ChainError::NoTypedConfig {
                index,
                name: f.name.clone(),
            });
        };
        let value =
            policy::proto_json_keys(serde_json::json!({ "name": f.name, "typedConfig": tc }));
        let parsed: policy::rbac::Filter =
            serde_json::from_value(value).map_err(|source| ChainError::Filter {
                index,
                name: f.name.clone(),
                source,
            })?;
        rbac.push(parsed);
    }
    if rbac.is_empty() {
        return Ok(None);
    }
    Ok(Some(policy::Engine::compile(&rbac)?))
}

/// Selects a chain. The first chain (in file order) whose every given criterion matches is used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterChainMatch {
    /// TLS SNI values (inbound).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// Negotiated ALPN (inbound) or sniffed protocol (outbound: `http/1.1`, `h2c`, `tcp`).
    #[serde(default)]
    pub application_protocols: Vec<String>,
    /// Inbound only: `tls` (the default: mTLS required) or `raw_buffer` (plaintext, no peer
    /// identity). Istio's PERMISSIVE is a `tls` chain plus a `raw_buffer` chain; STRICT has none.
    #[serde(default)]
    pub transport_protocol: Option<String>,
    /// The local port the connection arrived on (Istio's virtualInbound chains per port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    /// Destination address ranges (`10.0.0.0/8`, `fd00::/8`): the local address, or the original
    /// destination on an `original_dst` listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_ranges: Vec<CidrRange>,
}

/// An address range, written `ADDRESS/PREFIX_LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRange {
    pub address: std::net::IpAddr,
    pub prefix_len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A CIDR that does not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {reason}")]
pub struct BadCidr {
    pub text: String,
    pub reason: String,
}

impl std::str::FromStr for CidrRange {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = |reason: String| BadCidr {
            text: s.to_owned(),
            reason,
        };
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX_LEN".into()))?;
        let address: std::net::IpAddr = a
            .parse()
            .map_err(|_| bad(format!("{a:?} is not an IP address")))?;
        let prefix_len: u8 = l
            .parse()
            .map_err(|_| bad(format!("{l:?} is not a prefix length")))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(bad(format!("prefix length above {max}")));
        }
        Ok(CidrRange {
            address,
            prefix_len,
        })
    }
}

impl std::fmt::Display for CidrRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl Serialize for CidrRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CidrRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub route_config: RouteConfiguration,
    /// xDS only: the RDS name `route_config` is filled from when the model is assembled.
    #[serde(skip)]
    pub rds: Option<String>,
    /// Envoy's `forward_client_cert_details`; inbound default SANITIZE_SET.
    #[serde(default)]
    pub forward_client_cert_details: ForwardClientCertDetails,
    /// HTTP filters in order: `envoy.filters.http.rbac` (any number) and the router.
    #[serde(default)]
    pub http_filters: Vec<FilterConfig>,
    /// Envoy's `upgrade_configs`: the `Upgrade` types this connection manager tunnels after a
    /// `101` (default: `websocket`, the one Istio lists). A request asking for another type is
    /// refused (403, as Envoy does); `h2c` is never tunnelled: its `Upgrade` is stripped and the
    /// request goes on as a plain HTTP/1.1 one.
    #[serde(default = "default_upgrade_configs")]
    pub upgrade_configs: Vec<UpgradeConfig>,
    /// Refuse (400) a request whose path backends may read in more than one way beyond letter
    /// case (`policy::path::ambiguous`: escaped slashes, escapes that decode again, `;params`,
    /// trailing dots or spaces). Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST`
    /// translates to it. Off by default: DENY rules already match every such reading.
    #[serde(default)]
    pub reject_ambiguous_paths: bool,
    /// This connection manager's access logs (Envoy's `access_log`: file, stdout, stderr), besides
    /// the bootstrap's `access_log`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_log: Vec<AccessLogConfig>,
    /// Tracing of this connection manager's calls (Envoy's `tracing` with the OpenTelemetry
    /// provider); overrides the bootstrap's `tracing` for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<HcmTracing>,
}

/// A connection manager's tracing: sampling, and where spans go — an address, or a cluster
/// (Envoy's `envoy_grpc.cluster_name`) whose first endpoint is used when the chain is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HcmTracing {
    /// Percent of new traces sampled (Envoy's `random_sampling`; a caller's flag wins).
    #[serde(default = "default_hcm_sampling")]
    pub sampling: f64,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub cluster: Option<String>,
}

fn default_hcm_sampling() -> f64 {
    100.0
}

/// One entry of [`HttpConnectionManager::upgrade_configs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// The `Upgrade` token, compared case-insensitively (`websocket`).
    pub upgrade_type: String,
    /// Envoy's `enabled` (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl UpgradeConfig {
    pub fn websocket() -> Self {
        Self {
            upgrade_type: "websocket".into(),
            enabled: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForwardClientCertDetails {
    /// Remove any client XFCC and set one from the verified peer (inbound).
    #[default]
    SanitizeSet,
    /// Remove any client XFCC and set none.
    Sanitize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfiguration {
    #[serde(default)]
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    /// `*`, exact hosts, `*.suffix` or `prefix.*`; an optional `:port` is matched too.
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match")]
    pub match_: RouteMatch,
    pub route: RouteAction,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// The whole path (query removed) must match this RE2-style regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_regex: Option<String>,
    /// The path equals this, or continues it with `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_separated_prefix: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatcher>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatcher {
    pub name: String,
    #[serde(default)]
    pub exact_match: Option<String>,
    #[serde(default)]
    pub prefix_match: Option<String>,
    #[serde(default)]
    pub present_match: Option<bool>,
    #[serde(default)]
    pub invert_match: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    /// The cluster; or, when empty, a pick from `weighted_clusters` by weight.
    #[serde(default)]
    pub cluster: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_clusters: Vec<WeightedCluster>,
    /// Time to the upstream's response headers; default 15 s, `0s` disables.
    #[serde(default = "default_route_timeout", with = "duration")]
    pub timeout: Duration,
}

impl RouteAction {
    /// Every cluster this action may send to.
    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.cluster.as_str())
            .filter(|c| !c.is_empty())
            .chain(self.weighted_clusters.iter().map(|w| w.name.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    /// xDS only: the EDS name `endpoints` is filled from when the model is assembled.
    #[serde(skip)]
    pub eds: Option<String>,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Protocol spoken to the endpoints: `HTTP1`, `HTTP2`, `DOWNSTREAM` (the one the request
    /// arrived with, Envoy's `use_downstream_protocol_config`), or `AUTO`: HTTP/2 to mTLS peers
    /// and for gRPC requests, HTTP/1.1 otherwise.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// mTLS to a peer sidecar; absent means plaintext (only for the local app).
    #[serde(default)]
    pub transport_socket: Option<UpstreamTls>,
    /// Who the destination is, for Istio metric labels.
    #[serde(default)]
    pub metadata: DestinationMetadata,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
    /// Of two endpoints picked at random, the one with fewer requests in flight.
    LeastRequest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    Downstream,
    #[default]
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// SNI sent to the peer; the peer's inbound listener selects a filter chain by it.
    pub sni: String,
    /// The peer must present one of these SPIFFE IDs (Envoy's `match_typed_subject_alt_names`).
    pub match_spiffe_ids: Vec<SpiffeId>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationMetadata {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub app: Option<String>,
}

/// DESIGN §5 limits; every field has the safe default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    pub max_request_headers_kb: u32,
    pub max_headers_count: usize,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "duration")]
    pub stream_idle_timeout: Duration,
    #[serde(with = "duration")]
    pub connection_idle_timeout: Duration,
    pub per_connection_buffer_limit_bytes: usize,
    /// Distinct label sets each family of Istio metrics may hold (HTTP and TCP apart); past it,
    /// the labels a caller can influence read `overflow`.
    pub max_metric_series: usize,
    /// Connections open at once across every listener (Envoy's overload manager
    /// `global_downstream_max_connections`): past it new connections are closed at accept
    /// (`downstream_global_cx_overflow`); from 90 % of it, HTTP/1.1 responses carry
    /// `Connection: close` so clients spread out.
    pub global_max_connections: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// After SIGTERM, listeners keep accepting (in close-after-response mode) this long.
    #[serde(with = "duration")]
    pub duration: Duration,
    /// Then in-flight requests get this long to finish before the process exits.
    #[serde(with = "duration")]
    pub grace: Duration,
}

// === defaults ===

fn default_upgrade_configs() -> Vec<UpgradeConfig> {
    vec![UpgradeConfig::websocket()]
}
fn default_true() -> bool {
    true
}

fn default_cluster_id() -> String {
    "Kubernetes".into()
}
fn default_poll() -> Duration {
    Duration::from_millis(500)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_route_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            initial_stream_window_size: 64 * 1024,
            initial_connection_window_size: 1024 * 1024,
            max_request_headers_kb: 60,
            max_headers_count: 100,
            max_pending_accept_reset_streams: 100,
            max_local_error_reset_streams: 100,
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(300),
            connection_idle_timeout: Duration::from_secs(3600),
            per_connection_buffer_limit_bytes: 32 * 1024,
            max_metric_series: 1_000,
            global_max_connections: 20_000,
        }
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(5),
            grace: Duration::from_secs(5),
        }
    }
}

/// Durations written as `15s`, `250ms`, `1m`, `1h` (Envoy's JSON form `15s` and `0.25s` too).
pub(crate) mod duration {
    use std::time::Duration;

    /// A duration that does not parse, and why.
    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    pub(crate) enum BadDuration {
        #[error("duration {0:?} needs a unit (ms, s, m, h)")]
        NoUnit(String),
        #[error("duration {0:?} does not start with a number")]
        NotANumber(String),
        #[error("duration {text:?} has unknown unit {unit:?} (ms, s, m, h)")]
        UnknownUnit { text: String, unit: String },
        #[error("duration {0:?} is out of range")]
        OutOfRange(String),
    }

    pub(crate) fn parse(s: &str) -> Result<Duration, BadDuration> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| BadDuration::NoUnit(s.to_owned()))?;
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| BadDuration::NotANumber(s.to_owned()))?;
        let secs = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => {
                return Err(BadDuration::UnknownUnit {
                    text: s.to_owned(),
                    unit: unit.to_owned(),
                });
            }
        };
        if !secs.is_finite() || !(0.0..=366.0 * 86400.0).contains(&secs) {
            return Err(BadDuration::OutOfRange(s.to_owned()));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

// === loading and validation ===

/// Fills `${NAME}` (NAME: A–Z, 0–9, `_`) in every string value from `env`.
fn expand(v: &mut serde_yaml::Value, env: &impl Fn(&str) -> Option<String>) -> Result<(), String> {
    match v {
        serde_yaml::Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("{s:?}: an unclosed ${{"))?;
                let name = &after[..end];
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !valid {
                    return Err(format!(
                        "{s:?}: ${{{name}}} is not an environment variable name"
                    ));
                }
                let value = env(name).ok_or_else(|| format!("{s:?}: ${name} is not set"))?;
                out.push_str(&value);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        serde_yaml::Value::Sequence(items) => {
            for i in items {
                expand(i, env)?;
            }
        }
        serde_yaml::Value::Mapping(m) => {
            for (_, value) in m.iter_mut() {
                expand(value, env)?;
            }
        }
        serde_yaml::Value::Tagged(t) => expand(&mut t.value, env)?,
        _ => {}
    }
    Ok(())
}

impl Bootstrap {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&path.display().to_string(), &text)
    }

    /// A bootstrap in an environment variable (what the injector writes), with `${NAME}` in its
    /// string values filled from the environment: the pod's name and IP exist only once it runs.
    /// Substitution happens after parsing, inside string values only, so a value cannot change
    /// the document's structure; a name that is not set is an error.
    pub fn from_env_var(
        var: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let path = format!("${var}");
        let text = env(var).ok_or_else(|| ConfigError::Syntax {
            path: path.clone(),
            message: "not set".into(),
        })?;
        let mut doc: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.clone(),
                message: e.to_string(),
            })?;
        expand(&mut doc, &env).map_err(|message| ConfigError::Syntax {
            path: path.clone(),
            message,
        })?;
        let config: Self = serde_yaml::from_value(doc).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config.validate(&path, &text)?;
        Ok(config)
    }

    pub fn from_yaml(path: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(path, text)?;
        Ok(config)
    }

    fn validate(&self, path: &str, text: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String, needle: &str| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, needle),
            field,
            message,
        };
        if self.identity.files.is_some() == self.identity.workload_api.is_some() {
            return Err(invalid(
                "identity".into(),
                "exactly one identity source is required (identity.files or identity.workload_api)"
                    .into(),
                "identity:",
            ));
        }
        if !self.admin.address.ip().is_loopback() {
            return Err(invalid(
                "admin.address".into(),
                "the admin API must listen on a loopback address".into(),
                &self.admin.address.to_string(),
            ));
        }
        let bola = &self.inventory.bola;
        if bola.distinct_ids < 2
            || bola.distinct_ids > 10_000
            || bola.sequential < 2
            || bola.min_calls < 1
            || !(0.0..=1.0).contains(&bola.error_ratio)
            || bola.max_keys > 1_000_000
            || bola.window < Duration::from_secs(1)
        {
            return Err(invalid(
                "inventory.bola".into(),
                "distinct_ids 2..=10000, sequential ≥ 2, min_calls ≥ 1, error_ratio 0..=1, max_keys ≤ 1000000, window ≥ 1s".into(),
                "bola:",
            ));
        }
        let sensitive = &self.inventory.sensitive;
        if !(0.0..=1.0).contains(&sensitive.sample_rate) {
            return Err(invalid(
                "inventory.sensitive.sample_rate".into(),
                "between 0 and 1".into(),
                "sample_rate:",
            ));
        }
        if sensitive.body_bytes > 1024 * 1024
            || sensitive.max_queue == 0
            || sensitive.max_queue > 4096
        {
            return Err(invalid(
                "inventory.sensitive".into(),
                "body_bytes at most 1048576, max_queue between 1 and 4096".into(),
                "sensitive:",
            ));
        }
        if let Err((field, message)) = sensitive.classifier() {
            return Err(invalid(field, message, "custom:"));
        }
        if let Some(Err((field, message))) = self
            .access_log
            .as_ref()
            .map(crate::access_log::Formatter::of)
        {
            return Err(invalid(field.into(), message, "access_log:"));
        }
        if let Some(Err((field, message))) = self.tracing.as_ref().map(|t| t.check()) {
            return Err(invalid(field.into(), message, "tracing:"));
        }
        let export = &self.inventory.export;
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&export.interval) {
            return Err(invalid(
                "inventory.export.interval".into(),
                "between 100ms and 1h".into(),
                "interval:",
            ));
        }
        if export.max_backlog == 0 || export.max_backlog > 1_000_000 {
            return Err(invalid(
                "inventory.export.max_backlog".into(),
                "between 1 and 1000000 rows".into(),
                "max_backlog:",
            ));
        }
        let mut clusters = std::collections::BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let field = |f: &str| format!("clusters[{i}].{f}");
            if !clusters.insert(c.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("duplicate cluster {:?}", c.name),
                    &c.name,
                ));
            }
            if c.endpoints.is_empty() {
                return Err(invalid(
                    field("endpoints"),
                    "a cluster needs at least one endpoint".into(),
                    &c.name,
                ));
            }
            if let Some(tls) = &c.transport_socket
                && tls.match_spiffe_ids.is_empty()
            {
                return Err(invalid(
                    field("transport_socket.match_spiffe_ids"),
                    "an mTLS upstream needs at least one expected SPIFFE ID (never \"any ID\")"
                        .into(),
                    "match_spiffe_ids",
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (li, l) in self.listeners.iter().enumerate() {
            let lfield = |f: &str| format!("listeners[{li}].{f}");
            if !names.insert(l.name.as_str()) {
                return Err(invalid(
                    lfield("name"),
                    format!("duplicate listener {:?}", l.name),
                    &l.name,
                ));
            }
            if l.filter_chains.is_empty() {
                return Err(invalid(
                    lfield("filter_chains"),
                    "a listener needs a filter chain".into(),
                    &l.name,
                ));
            }
            for (ci, fc) in l.filter_chains.iter().enumerate() {
                let cfield = |f: &str| lfield(&format!("filter_chains[{ci}].{f}"));
                let m = &fc.filter_chain_match;
                match (l.direction, m.transport_protocol.as_deref()) {
                    (_, None) | (Direction::Inbound, Some("tls")) => {}
                    (Direction::Inbound, Some("raw_buffer")) => {
                        if !m.server_names.is_empty() || !m.application_protocols.is_empty() {
                            return Err(invalid(
                                cfield("filter_chain_match"),
                                "a raw_buffer chain has no SNI or ALPN to match".into(),
                                "raw_buffer",
                            ));
                        }
                    }
                    (_, Some(other)) => {
                        return Err(invalid(
                            cfield("filter_chain_match.transport_protocol"),
                            format!(
                                "{other:?}: inbound listeners take \"tls\" or \"raw_buffer\"; outbound listeners none"
                            ),
                            other,
                        ));
                    }
                }
                let cluster_refs: Vec<(String, &str)> = match (&fc.http_connection_manager, &fc.tcp_proxy) {
                    (Some(hcm), None) => hcm
                        .route_config
                        .virtual_hosts
                        .iter()
                        .enumerate()
                        .flat_map(|(vi, vh)| {
                            vh.routes.iter().enumerate().flat_map(move |(ri, r)| {
                                r.route.cluster_names().map(move |c| {
                                    (format!("http_connection_manager.route_config.virtual_hosts[{vi}].routes[{ri}].route.cluster"), c)
                                })
                            })
                        })
                        .collect(),
                    (None, Some(tcp)) => vec![("tcp_proxy.cluster".to_owned(), tcp.cluster.as_str())],
                    // A refusing chain (a black hole) needs no network filter.
                    (None, None) if fc.refuse.is_some() => vec![],
                    _ => {
                        return Err(invalid(
                            cfield("http_connection_manager"),
                            "a filter chain needs exactly one of http_connection_manager and tcp_proxy (or `refuse`)".into(),
                            "filter_chains",
                        ));
                    }
                };
                for (f, cluster) in cluster_refs {
                    if !clusters.contains(cluster) {
                        return Err(invalid(
                            cfield(&f),
                            format!("unknown cluster {cluster:?}"),
                            cluster,
                        ));
                    }
                    let upstream_tls = self
                        .clusters
                        .iter()
                        .find(|c| c.name == cluster)
                        .is_some_and(|c| c.transport_socket.is_some());
                    if l.direction == Direction::Outbound && !upstream_tls {
                        return Err(invalid(
                            cfield(&f),
                            format!(
                                "outbound traffic must go to an mTLS cluster; {cluster:?} has no transport_socket"
                            ),
                            cluster,
                        ));
                    }
                }
                compile_rbac(&fc.rbac_filters)
                    .map_err(|e| invalid(cfield("rbac_filters"), e.to_string(), "rbac_filters"))?;
                if let Some(hcm) = &fc.http_connection_manager {
                    compile_rbac(&hcm.http_filters).map_err(|e| {
                        invalid(
                            cfield("http_connection_manager.http_filters"),
                            e.to_string(),
                            "http_filters",
                        )
                    })?;
                    for (vi, vh) in hcm.route_config.virtual_hosts.iter().enumerate() {
                        for (ri, r) in vh.routes.iter().enumerate() {
                            let rfield = |f: &str| {
                                cfield(&format!(
                                    "http_connection_manager.route_config.virtual_hosts[{vi}].routes[{ri}].{f}"
                                ))
                            };
                            check_route(r).map_err(|(f, m)| invalid(rfield(f), m, &vh.name))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A route's own rules: one path specifier that compiles, one kind of cluster choice.
pub fn check_route(r: &Route) -> Result<(), (&'static str, String)> {
    let m = &r.match_;
    let specifiers = [
        m.prefix.is_some(),
        m.path.is_some(),
        m.safe_regex.is_some(),
        m.path_separated_prefix.is_some(),
    ];
    if specifiers.iter().filter(|s| **s).count() != 1 {
        return Err((
            "match",
            "a route match needs exactly one of prefix, path, safe_regex and path_separated_prefix"
                .into(),
        ));
    }
    if let Some(re) = &m.safe_regex {
        compile_path_regex(re).map_err(|e| ("match.safe_regex", e.to_string()))?;
    }
    if let Some(p) = &m.path_separated_prefix
        && (!p.starts_with('/') || p.ends_with('/') || p.contains(['?', '#']))
    {
        return Err((
            "match.path_separated_prefix",
            format!("{p:?} must start with / and not end with / or hold ? or #"),
        ));
    }
    let a = &r.route;
    match (a.cluster.is_empty(), a.weighted_clusters.is_empty()) {
        (false, true) => {}
        (true, false) => {
            if a.weighted_clusters.iter().all(|w| w.weight == 0) {
                return Err(("route.weighted_clusters", "all weights are zero".into()));
            }
        }
        _ => {
            return Err((
                "route",
                "a route needs exactly one of cluster and weighted_clusters".into(),
            ));
        }
    }
    Ok(())
}

/// 1-based line of the first occurrence of `needle`, to point a reader at a cross-reference error.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Compiles a route's `safe_regex`: it must match the whole path; size-limited.
pub fn compile_path_regex(re: &str) -> Result<regex::Regex, ChainError> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|source| ChainError::Regex {
            pattern: re.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod env_tests {
    use super::*;

    const DOC: &str = r#"
node: {id: "sidecar~${INSTANCE_IP}~${POD_NAME}.${POD_NAMESPACE}~x", workload: w, namespace: "${POD_NAMESPACE}"}
admin: {address: "127.0.0.1:15000"}
identity: {workload_api: {}}
"#;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |n| {
            if n == "BOOT" {
                return Some(DOC.to_owned());
            }
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn a_bootstrap_from_the_environment_is_filled_in_string_values_only() {
        let b = Bootstrap::from_env_var(
            "BOOT",
            env(&[
                ("INSTANCE_IP", "10.1.2.3"),
                ("POD_NAME", "web-1"),
                ("POD_NAMESPACE", "a: b"),
            ]),
        )
        .unwrap();
        assert_eq!(b.node.id, "sidecar~10.1.2.3~web-1.a: b~x");
        // A value that looks like YAML stays a string.
        assert_eq!(b.node.namespace, "a: b");
    }

    #[test]
    fn an_unset_variable_or_a_bad_name_is_refused() {
        let e = Bootstrap::from_env_var("BOOT", env(&[("POD_NAME", "p")])).unwrap_err();
        assert!(e.to_string().contains("is not set"), "{e}");
        assert!(Bootstrap::from_env_var("MISSING", env(&[])).is_err());
        let mut v = serde_yaml::Value::String("${lower}".into());
        assert!(expand(&mut v, &|_| Some("x".into())).is_err());
        let mut v = serde_yaml::Value::String("${OPEN".into());
        assert!(expand(&mut v, &|_| Some("x".into())).is_err());
    }
}
