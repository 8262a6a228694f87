//! `eastguard`: the command line. Each subcommand is a thin shell over a library crate.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod apis_cmd;
mod capture_cmd;
mod demo;
mod lifecycle;
mod policy_cmd;
mod proxy_cmd;
mod proxy_config_cmd;

use proxy_cmd::{describe, init_logging};

#[derive(Parser)]
#[command(
    name = "eastguard",
    version,
    about = "Service-mesh sidecar proxy for east-west API security"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `eastguard_proxy=debug`).
    #[arg(long, global = true, default_value = "info", env = "EASTGUARD_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the sidecar proxy: a bootstrap file (Envoy-shaped YAML), plus listeners, routes,
    /// clusters and endpoints from an xDS server (`--xds` or the file's `xds`).
    Proxy(proxy_cmd::ProxyArgs),
    /// Serve xDS (ADS) from Istio ServiceEntry, WorkloadEntry, AuthorizationPolicy,
    /// PeerAuthentication and Telemetry files in a directory (watched); receive the sidecars' API inventory and
    /// audit events (OTLP) and serve them (`--http-address`: `/apis`, `/ui/`, `/report`).
    ControlPlane {
        /// The directory of YAML files.
        #[arg(long)]
        config_dir: PathBuf,
        /// Plaintext ADS (development; Istio's 15010).
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_address: std::net::SocketAddr,
        /// The trust domain of the SPIFFE IDs workloads get (`spiffe://TD/ns/NS/sa/SA`).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Istio's root namespace (mesh-wide policies).
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
        /// The mTLS mode where no PeerAuthentication sets one: `strict` (plaintext refused) or
        /// `permissive` (Istio's default).
        #[arg(long, default_value = "strict", value_parser = ["strict", "permissive"])]
        default_mtls: String,
        /// Istio's meshConfig.h2UpgradePolicy: `UPGRADE` carries every HTTP request between the
        /// sidecars on one multiplexed HTTP/2 connection per peer and worker; `DO_NOT_UPGRADE` (Istio's
        /// default) keeps HTTP/1.1 requests HTTP/1.1, on keep-alive connections.
        #[arg(long, default_value = "UPGRADE", value_parser = ["UPGRADE", "DO_NOT_UPGRADE"])]
        h2_upgrade_policy: String,
        /// Mesh-wide access log of every sidecar (Istio's meshConfig.accessLogFile, e.g.
        /// /dev/stdout); Telemetry resources turn it on or off per namespace or workload.
        #[arg(long, default_value = "")]
        access_log_file: String,
        /// Istio's meshConfig.accessLogEncoding: TEXT or JSON.
        #[arg(long, default_value = "TEXT", value_parser = ["TEXT", "JSON"])]
        access_log_encoding: String,
        /// Istio's meshConfig.accessLogFormat: Envoy operators (TEXT), or a JSON object of key →
        /// operators (JSON). Default: Istio's.
        #[arg(long)]
        access_log_format: Option<String>,
        /// ADS over mTLS (Istio's 15012); needs --cert, --key and --bundle.
        #[arg(long, requires_all = ["cert", "key", "bundle"])]
        tls_address: Option<std::net::SocketAddr>,
        /// The control plane's X509-SVID (PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The trust bundle callers' SVIDs are verified against (PEM).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Keep the API inventory here (`inventory.sqlite3`, kept across restarts); default: in
        /// memory only.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve the API inventory over HTTP (`/apis`, `/ui/`, read by `eastguard apis`) on this
        /// loopback address; off by default.
        #[arg(long)]
        http_address: Option<std::net::SocketAddr>,
        /// Write policy changes (AuthorizationPolicy, PeerAuthentication created, updated or
        /// deleted) here as OCSF events, one per line; they are also at `/apis/events`.
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// Inventory rows not seen for this many hours are deleted (the window for "unused").
        #[arg(long, default_value_t = 720, value_parser = clap::value_parser!(u64).range(1..=87_600))]
        inventory_retention_hours: u64,
        /// Serve the sidecar injection webhook (HTTPS, `POST /inject`; Istio's 15017) here,
        /// with --webhook-cert and --webhook-key, or a certificate the CA root mints
        /// (--ca-address) for --webhook-dns-name, its root kept in the caBundle of
        /// --webhook-configuration.
        #[arg(long)]
        webhook_address: Option<std::net::SocketAddr>,
        /// The webhook's certificate chain (PEM; re-read when it changes).
        #[arg(long, requires_all = ["webhook_address", "webhook_key"])]
        webhook_cert: Option<PathBuf>,
        /// The webhook's private key (PEM).
        #[arg(long, requires_all = ["webhook_address", "webhook_cert"])]
        webhook_key: Option<PathBuf>,
        /// A DNS name of the webhook's certificate when the CA mints it (repeatable).
        #[arg(long = "webhook-dns-name", requires = "webhook_address", conflicts_with = "webhook_cert", default_values_t = [String::from("eastguard-control-plane.eastguard-system.svc")])]
        webhook_dns_names: Vec<String>,
        /// The MutatingWebhookConfiguration whose caBundle gets the CA root when the CA mints the
        /// webhook's certificate.
        #[arg(
            long,
            requires = "webhook_address",
            conflicts_with = "webhook_cert",
            default_value = "eastguard-sidecar-injector"
        )]
        webhook_configuration: String,
        /// Also read the registry from the Kubernetes API (Services, EndpointSlices, Pods and
        /// Istio's resources, watched): in-cluster credentials, or --kubeconfig.
        #[arg(long)]
        kubernetes: bool,
        /// A kubeconfig (its current context) instead of the pod's service account.
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// The cluster's DNS domain (services are NAME.NAMESPACE.svc.DOMAIN).
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// What the webhook injects (YAML, or a ConfigMap with it under data.config); default:
        /// the built-in template.
        #[arg(long, requires = "webhook_address")]
        injection_template: Option<PathBuf>,
        /// Serve the node CA here (HTTPS, `POST /v1/node-ca`): node agents get an intermediate
        /// that may sign only the identities of pods on their node. Needs --kubernetes.
        #[arg(long, requires = "kubernetes")]
        ca_address: Option<std::net::SocketAddr>,
        /// The CA root's directory (`ca.key.pem`, `ca.json`, `root.pem`; created on first start
        /// if empty). Without it the root lives in memory.
        #[arg(long, requires = "ca_address")]
        ca_dir: Option<PathBuf>,
        /// A DNS name of the CA's serving certificate (repeatable).
        #[arg(long = "ca-dns-name", requires = "ca_address", default_values_t = [String::from("eastguard-control-plane.eastguard-system.svc")])]
        ca_dns_names: Vec<String>,
        /// How long a node's intermediate is valid, in seconds (how long a node keeps an identity
        /// after its last pod with it has gone).
        #[arg(long, default_value_t = 4 * 3600, value_parser = clap::value_parser!(u64).range(300..=30 * 86_400))]
        node_ca_ttl_seconds: u64,
        /// The audience of node agents' projected service-account tokens.
        #[arg(long, default_value = "eastguard-ca")]
        ca_audience: String,
        /// The node agent's service account, NAMESPACE/NAME: only its pod-bound tokens are served.
        #[arg(long, default_value = "eastguard-system/eastguard-node-agent")]
        node_agent_service_account: String,
    },
    /// Create the trust domain's root for `control-plane --ca-dir` (`ca.key.pem` mode 0600,
    /// `ca.json`, `root.pem`), to be stored as a Secret; `root.pem` is what node agents trust.
    /// An existing root in DIR is kept.
    CaInit {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// The evidence report (PCI DSS v4.0.1, SOC 2) from a control plane's registry and inventory:
    /// self-contained HTML, printable to PDF.
    Report {
        /// The control plane's `--http-address`.
        #[arg(long, default_value = "127.0.0.1:15014")]
        control_plane: String,
        /// Write here instead of standard output.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// The API inventory a control plane built from its sidecars' reports: operations with their
    /// status against the specs (documented, shadow, zombie, unused, drift), owners and callers.
    #[command(subcommand)]
    Apis(apis_cmd::ApisCommand),
    /// A sidecar's configuration as `istioctl proxy-config` shows it: listeners, routes, clusters,
    /// endpoints, secrets (SVIDs and bundles) and authorization policies, from its admin port or a
    /// saved `/config_dump`.
    ProxyConfig(proxy_config_cmd::ProxyConfigArgs),
    /// Per sidecar connected to a control plane, whether each resource type it was sent is ACKed
    /// (SYNCED), pending (STALE) or rejected (NACKED), like `istioctl proxy-status`.
    ProxyStatus(proxy_config_cmd::ProxyStatusArgs),
    /// Run a node agent, the control plane, three sample services with their sidecars on loopback,
    /// and scripted traffic.
    Demo {
        /// Run the script once, print the table and exit: 0 only if every expectation held.
        #[arg(long)]
        once: bool,
        /// Run frontend → orders on pod networking (network namespaces, cgroups) with eBPF capture
        /// and unmodified curl clients calling pod IPs. Needs root, iproute2 and curl.
        #[arg(long)]
        ebpf: bool,
        /// Where to write the demo's SVIDs, configs and access logs (default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// One of the demo's sample HTTP apps (used by `demo --ebpf` inside a pod namespace).
    #[command(hide = true)]
    DemoApp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Tries to open a raw packet socket (used by `demo --ebpf` inside a pod's app): exit 0 and
    /// "refused" when the kernel says no, exit 1 when it opened.
    #[command(hide = true)]
    DemoRawSocket,
    /// The node agent: the SPIFFE Workload API on a unix socket (X509-SVIDs for attested local
    /// workloads), and/or eBPF traffic capture for the pods in a registry (`--capture`) or the
    /// kubelet's pods set up for it (`--capture-pods`).
    #[command(group(clap::ArgGroup::new("capturing").args(["capture", "capture_pods"]).multiple(false)))]
    NodeAgent {
        /// Where to create the Workload API socket (with --entries).
        #[arg(long, requires = "entries")]
        workload_api_socket: Option<PathBuf>,
        /// Registration entries (YAML: trust_domain, entries with spiffe_id and selectors).
        #[arg(long, requires = "workload_api_socket")]
        entries: Option<PathBuf>,
        /// eBPF capture: the pods to capture (YAML, re-read while running). Needs root.
        #[arg(long, value_name = "REGISTRY")]
        capture: Option<PathBuf>,
        /// eBPF capture of the pods the kubelet lists (--kubelet-url) that the injection webhook
        /// set up for it (`sidecar.eastguard.io/capture-settings`), instead of a registry file.
        #[arg(long, requires = "kubelet_url")]
        capture_pods: bool,
        /// Where captured pods' status files go (`<pod uid>.capture`, read by their sidecars):
        /// the directory shared with them, the Workload API socket's by default.
        #[arg(long, requires = "capture_pods")]
        capture_status_dir: Option<PathBuf>,
        /// The bpf filesystem capture pins under (`<bpffs>/eastguard/<pod>`).
        #[arg(long, default_value = "/sys/fs/bpf", requires = "capturing")]
        bpffs: PathBuf,
        /// Loopback address of the capture admin endpoint (/capture, /stats/prometheus,
        /// /healthz/ready).
        #[arg(long, requires = "capturing")]
        capture_admin: Option<std::net::SocketAddr>,
        /// How often the capture registry is re-read and pods reconciled, in milliseconds.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000), requires = "capturing")]
        capture_poll_ms: u64,
        /// Loopback address for the CA admin API (POST /ca/prepare, /ca/activate, /ca/taint);
        /// requests need `Authorization: Bearer TOKEN` from `<socket>.admin-token` (mode 0600).
        #[arg(long)]
        admin_address: Option<std::net::SocketAddr>,
        /// Persist the CA here (created on first start, reused after); default: in memory only.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Kubernetes attestation: this node's kubelet pod list (`https://127.0.0.1:10250/pods`
        /// with --kubelet-token and --kubelet-ca, or an `http://` URL). Callers in pod containers
        /// get `k8s:` selectors; pods eastguard injected get `spiffe://TD/ns/NS/sa/SA` for their
        /// sidecar container without an entry in the file.
        #[arg(long, requires = "entries")]
        kubelet_url: Option<String>,
        /// A bearer token file for the kubelet (a projected service-account token; re-read).
        #[arg(long, requires = "kubelet_url")]
        kubelet_token: Option<PathBuf>,
        /// The CA of the kubelet's serving certificate (PEM).
        #[arg(long, requires = "kubelet_url")]
        kubelet_ca: Option<PathBuf>,
        /// The host's cgroup tree, where a caller's pod container is verified.
        #[arg(long, default_value = "/sys/fs/cgroup", requires = "kubelet_url")]
        cgroup_root: PathBuf,
        /// How often the kubelet's pod list is read, in milliseconds (and at once for a caller
        /// whose pod is not in the last one).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000), requires = "kubelet_url")]
        kubelet_poll_ms: u64,
        /// Sign with a per-node intermediate from the control plane's CA (`control-plane
        /// --ca-address`, `https://…`) instead of a CA of the agent's own: it may sign only the
        /// identities of pods on this node. Needs --ca-trust and --ca-token.
        #[arg(long, requires_all = ["ca_trust", "ca_token", "entries"], conflicts_with_all = ["ca_dir", "admin_address"])]
        ca_url: Option<String>,
        /// The trust domain's root (PEM), as the control plane writes it (`root.pem`).
        #[arg(long, requires = "ca_url")]
        ca_trust: Option<PathBuf>,
        /// The node agent's projected service-account token for the CA's audience (re-read).
        #[arg(long, requires = "ca_url")]
        ca_token: Option<PathBuf>,
    },
    /// Policy tools: translate Istio AuthorizationPolicy to Envoy RBAC, check a request, and least
    /// privilege from a control plane's inventory (suggest, unused).
    #[command(subcommand)]
    Policy(Box<policy_cmd::PolicyCommand>),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<std::process::ExitCode> {
    if let lifecycle::Parent::Gone(pid) = lifecycle::follow_parent()? {
        eprintln!("eastguard: the process that started this one ({pid}) is gone; not starting");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let cli = Cli::parse();
    let log_control = init_logging(&cli.log_level)?;
    let runtime = match &cli.command {
        Command::Proxy(_) => proxy_cmd::control_runtime()?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?,
    };
    // Long-running commands handle SIGTERM and SIGINT from before their work starts.
    let listen_signals = || {
        let _in_runtime = runtime.enter();
        lifecycle::Shutdown::listen()
    };
    match cli.command {
        Command::Proxy(args) => proxy_cmd::run(args, &runtime, log_control),
        Command::Demo { once, ebpf, dir } => {
            let shutdown = listen_signals()?;
            if ebpf {
                let dir = dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("eastguard-demo-ebpf-{}", std::process::id()))
                });
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                runtime.block_on(demo::ebpf::run(once, dir, shutdown))?;
            } else {
                runtime.block_on(demo::run(once, dir, shutdown))?;
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::DemoApp { name, listen } => {
            let shutdown = listen_signals()?;
            runtime.block_on(demo::serve_app(name, listen, shutdown))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::DemoRawSocket => Ok(demo::raw_socket_probe()),
        Command::Policy(cmd) => policy_cmd::run(*cmd),
        Command::Apis(cmd) => apis_cmd::run(cmd),
        Command::ProxyConfig(args) => proxy_config_cmd::run(&args),
        Command::ProxyStatus(args) => proxy_config_cmd::status(&args),
        Command::CaInit { dir, trust_domain } => {
            let td = identity::TrustDomain::parse(&trust_domain)
                .map_err(|e| anyhow::anyhow!("--trust-domain {trust_domain:?}: {e}"))?;
            let root = identity::DevCa::load_or_create(td, &dir)?;
            let path = dir.join("root.pem");
            std::fs::write(&path, root.cert_pem())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            println!("{}", path.display());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Report {
            control_plane,
            file,
        } => {
            let html = apis_cmd::http_get(&control_plane, "/report")?;
            match file {
                Some(f) => std::fs::write(&f, html).with_context(|| f.display().to_string())?,
                None => print!("{html}"),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::ControlPlane {
            config_dir,
            xds_address,
            trust_domain,
            root_namespace,
            default_mtls,
            h2_upgrade_policy,
            access_log_file,
            access_log_encoding,
            access_log_format,
            tls_address,
            cert,
            key,
            bundle,
            data_dir,
            http_address,
            audit_log,
            inventory_retention_hours,
            webhook_address,
            webhook_cert,
            webhook_key,
            webhook_dns_names,
            webhook_configuration,
            injection_template,
            kubernetes,
            kubeconfig,
            cluster_domain,
            ca_address,
            ca_dir,
            ca_dns_names,
            node_ca_ttl_seconds,
            ca_audience,
            node_agent_service_account,
        } => {
            // The inventory API and UI have no authentication of their own: like Envoy's admin
            // port, they listen on loopback only (reach them with a port-forward).
            if let Some(a) = http_address {
                anyhow::ensure!(
                    a.ip().is_loopback(),
                    "--http-address {a}: the inventory API must listen on a loopback address"
                );
            }
            let tls = match (tls_address, cert, key, bundle) {
                (Some(address), Some(cert), Some(key), Some(bundle)) => {
                    Some(control_plane::TlsOptions {
                        address,
                        cert,
                        key,
                        bundle,
                    })
                }
                (None, ..) => None,
                _ => anyhow::bail!("--tls-address needs --cert, --key and --bundle"),
            };
            let webhook = match (webhook_address, webhook_cert, webhook_key) {
                (Some(address), cert, key) => {
                    let cert = match (cert, key) {
                        (Some(cert), Some(key)) => {
                            control_plane::webhook::WebhookCert::Files { cert, key }
                        }
                        _ => {
                            anyhow::ensure!(
                                ca_address.is_some(),
                                "--webhook-address needs --webhook-cert and --webhook-key, or --ca-address to mint its certificate"
                            );
                            control_plane::webhook::WebhookCert::FromCa {
                                dns_names: webhook_dns_names,
                                configuration: webhook_configuration,
                            }
                        }
                    };
                    Some(control_plane::webhook::WebhookOptions {
                        address,
                        cert,
                        template: match &injection_template {
                            Some(p) => control_plane::inject::Template::from_file(p)?,
                            None => control_plane::inject::Template::default(),
                        },
                        template_file: injection_template,
                        events: None,
                    })
                }
                _ => None,
            };
            let ca = match ca_address {
                Some(address) => {
                    let Some((ns, sa)) = node_agent_service_account
                        .split_once('/')
                        .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'))
                    else {
                        anyhow::bail!(
                            "--node-agent-service-account {node_agent_service_account:?}: expected NAMESPACE/NAME"
                        );
                    };
                    Some(control_plane::ca::CaOptions {
                        address,
                        dir: ca_dir,
                        dns_names: ca_dns_names,
                        node_ca_ttl: std::time::Duration::from_secs(node_ca_ttl_seconds),
                        audience: ca_audience,
                        agent: (ns.to_owned(), sa.to_owned()),
                    })
                }
                None => None,
            };
            let opts = control_plane::Options {
                ca,
                webhook,
                kubernetes: kubernetes.then_some(control_plane::kube::KubeOptions {
                    kubeconfig,
                    cluster_domain,
                    trust_domain: trust_domain.clone(),
                    watch_timeout: 300,
                }),
                config_dir,
                xds_address,
                tls,
                mesh: control_plane::Mesh {
                    trust_domain,
                    root_namespace,
                    default_mtls: if default_mtls == "permissive" {
                        policy::istio::peer_authn::MtlsMode::Permissive
                    } else {
                        policy::istio::peer_authn::MtlsMode::Strict
                    },
                    h2_upgrade: h2_upgrade_policy == "UPGRADE",
                    access_log: mesh_access_log(
                        access_log_file,
                        access_log_encoding == "JSON",
                        access_log_format,
                    )?,
                },
                poll_interval: std::time::Duration::from_millis(200),
                data_dir,
                http_address,
                inventory: control_plane::inventory::store::StoreLimits {
                    retention: std::time::Duration::from_secs(inventory_retention_hours * 3600),
                    ..Default::default()
                },
                audit_log,
            };
            let shutdown = listen_signals()?;
            runtime.block_on(control_plane::run(opts, shutdown.requested()))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::NodeAgent {
            workload_api_socket,
            entries,
            capture,
            capture_pods,
            capture_status_dir,
            bpffs,
            capture_admin,
            capture_poll_ms,
            admin_address,
            ca_dir,
            kubelet_url,
            kubelet_token,
            kubelet_ca,
            cgroup_root,
            kubelet_poll_ms,
            ca_url,
            ca_trust,
            ca_token,
        } => {
            anyhow::ensure!(
                entries.is_some() || capture.is_some(),
                "node-agent needs --workload-api-socket and --entries, --capture, or both"
            );
            let shutdown = listen_signals()?;
            // One shutdown for both roles; a watch, so a task that starts waiting late still sees it.
            let (stop, stopping) = tokio::sync::watch::channel(false);
            let stopped = move || {
                let mut rx = stopping.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            };
            // With --capture-pods, capture reads the pod lists the identity side fetches.
            let pods_tx = capture_pods.then(|| {
                tokio::sync::watch::channel(std::sync::Arc::new(node_agent::k8s::Pods::default())).0
            });
            let capture_source = match (capture, &pods_tx) {
                (Some(file), _) => Some(capture_cmd::Source::File(file)),
                (None, Some(tx)) => Some(capture_cmd::Source::Pods {
                    pods: tx.subscribe(),
                    cgroup_root: cgroup_root.clone(),
                    status_dir: match (capture_status_dir, &workload_api_socket) {
                        (Some(d), _) => d,
                        (None, Some(sock)) => sock
                            .parent()
                            .map(std::path::Path::to_path_buf)
                            .unwrap_or_default(),
                        (None, None) => PathBuf::from("."),
                    },
                }),
                (None, None) => None,
            };
            let identity_task = workload_api_socket.zip(entries).map(|(socket, entries)| {
                let config = node_agent::AgentConfig {
                    pods: pods_tx,
                    socket,
                    entries,
                    poll: std::time::Duration::from_millis(500),
                    admin: admin_address,
                    ca_dir,
                    kubelet: kubelet_url.map(|url| node_agent::k8s::KubeletOptions {
                        url,
                        token_file: kubelet_token,
                        ca_file: kubelet_ca,
                        cgroup_root,
                        poll: std::time::Duration::from_millis(kubelet_poll_ms),
                    }),
                    ca: match (ca_url, ca_trust, ca_token) {
                        (Some(url), Some(trust), Some(token)) => {
                            Some(node_agent::ca_client::CaClientOptions { url, trust, token })
                        }
                        _ => None,
                    },
                };
                let stop = stopped();
                async move {
                    node_agent::run(config, stop)
                        .await
                        .map_err(anyhow::Error::from)
                }
            });
            let capture_task = capture_source.map(|source| {
                let opts = capture_cmd::CaptureOptions {
                    source,
                    bpffs,
                    admin: capture_admin,
                    poll: std::time::Duration::from_millis(capture_poll_ms),
                };
                let stop = stopped();
                async move { capture_cmd::run(opts, stop).await }
            });
            runtime.block_on(async {
                let requested = shutdown.requested();
                tokio::spawn(async move {
                    requested.await;
                    let _ = stop.send(true);
                });
                let identity = async {
                    match identity_task {
                        Some(t) => t.await,
                        None => Ok(()),
                    }
                };
                let capture = async {
                    match capture_task {
                        Some(t) => t.await,
                        None => Ok(()),
                    }
                };
                // Either failing stops the agent with its error.
                tokio::try_join!(identity, capture).map(drop)
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// The error and its causes, each cause once: our error messages already quote their cause, and
/// repeating it would bury the message.
/// The control plane's `--access-log-*` flags, checked here: every sidecar would NACK a format
/// it cannot fill.
fn mesh_access_log(
    file: String,
    json: bool,
    format: Option<String>,
) -> anyhow::Result<Option<control_plane::generate::telemetry::MeshAccessLog>> {
    use proxy::access_log::format::Template;
    if let Some(f) = &format {
        if json {
            let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(f)
                .context("--access-log-format with JSON encoding must be a JSON object")?;
            for (k, v) in &map {
                let v = v.as_str().with_context(|| {
                    format!("--access-log-format: {k}: values must be format strings")
                })?;
                Template::parse(v).map_err(|e| anyhow::anyhow!("--access-log-format: {k}: {e}"))?;
            }
        } else {
            Template::parse(f).map_err(|e| anyhow::anyhow!("--access-log-format: {e}"))?;
        }
    }
    Ok(Some(control_plane::generate::telemetry::MeshAccessLog {
        file,
        json,
        format,
    }))
}
