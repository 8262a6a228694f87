//! `eastguard demo`: a dev CA, three sample services (frontend → orders → ledger) each with its own
//! sidecar process on loopback, a scripted run of real traffic, and a table of what happened.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use identity::SpiffeId;
use proxy::config::{
    AccessLogConfig, AccessLogFormat, Admin, Bootstrap, Cluster, DestinationMetadata, Direction,
    DrainConfig, FilterChain, FilterChainMatch, FilterConfig, ForwardClientCertDetails,
    HttpConnectionManager, IdentityConfig, Limits, Listener, Node, Route, RouteAction,
    RouteConfiguration, RouteMatch, TcpProxy, UpstreamProtocol, UpstreamTls, VirtualHost,
    WorkloadApiIdentity,
};

mod apps;
mod client;

const TRUST_DOMAIN: &str = "cluster.local";

/// Ledger's authorization, as an Istio user writes it; the demo translates it like istiod does.
const LEDGER_POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-deny-admin, namespace: demo}
spec:
  selector: {matchLabels: {app: ledger}}
  action: DENY
  rules:
    - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-allow-orders, namespace: demo}
spec:
  selector: {matchLabels: {app: ledger}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/orders"]}}]
"#;
const NAMESPACE: &str = "demo";
const WORKLOADS: [&str; 3] = ["frontend", "orders", "ledger"];

/// Ports of one workload (app and sidecar).
#[derive(Clone, Copy)]
struct Ports {
    app: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
}

/// Everything the script needs to know about the running demo.
struct Mesh {
    ports: [Ports; 3],
    /// Frontend's outbound TCP listener for ledger's opaque TCP service.
    frontend_tcp: SocketAddr,
    ledger_tcp_app: SocketAddr,
}

/// One row of the table.
struct Hop {
    caller: String,
    callee: String,
    protocol: &'static str,
    status: String,
    mtls: String,
    ok: bool,
    expectation: &'static str,
}

pub async fn run(once: bool, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("eastguard-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("eastguard demo — files in {}", dir.display());

    // Identity: a node agent serving the SPIFFE Workload API. Every sidecar runs from its own copy
    // of the binary, and the agent tells them apart by uid and executable path, which the kernel
    // reports; nothing a workload says about itself counts.
    let exe = std::env::current_exe().context("finding the eastguard binary")?;
    let uid = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").context("reading /proc/self")?,
    );
    let mut entries = format!("trust_domain: {TRUST_DOMAIN}\nentries:\n");
    let mut binaries = Vec::new();
    for w in WORKLOADS {
        let copy = dir.join(format!("{w}-eastguard"));
        std::fs::copy(&exe, &copy).with_context(|| format!("copying the binary for {w}"))?;
        let copy = std::fs::canonicalize(&copy)?;
        entries.push_str(&format!(
            "  - spiffe_id: {}\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{}\"]\n    x509_svid_ttl: 1h\n",
            spiffe_id(w),
            copy.display()
        ));
        binaries.push(copy);
    }
    let entries_path = dir.join("entries.yaml");
    std::fs::write(&entries_path, entries)?;
    let agent_socket = dir.join("agent.sock");
    let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(identity::agent::run(
        identity::agent::AgentConfig {
            socket: agent_socket.clone(),
            entries: entries_path,
            poll: Duration::from_millis(500),
            admin: None,
            ca_dir: None,
        },
        async move {
            let _ = agent_stopped.await;
        },
    ));
    println!(
        "node agent (SPIFFE Workload API): unix://{}",
        agent_socket.display()
    );

    let mut ports = Vec::new();
    for _ in WORKLOADS {
        ports.push(Ports {
            app: free_port()?,
            inbound: free_port()?,
            outbound: free_port()?,
            admin: free_port()?,
        });
    }
    let mesh = Mesh {
        ports: [ports[0], ports[1], ports[2]],
        frontend_tcp: free_port()?,
        ledger_tcp_app: free_port()?,
    };

    // The apps: orders calls ledger through its own sidecar; ledger also serves opaque TCP.
    apps::spawn_http("orders", mesh.ports[1].app, Some(mesh.ports[1].outbound)).await?;
    apps::spawn_http("ledger", mesh.ports[2].app, None).await?;
    apps::spawn_tcp_echo(mesh.ledger_tcp_app).await?;

    std::fs::write(dir.join("ledger-authz.yaml"), LEDGER_POLICIES)?;
    let ledger_filters = ledger_http_filters()?;
    let mut sidecars = Vec::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let mut config = sidecar_config(w, i, &mesh, &dir, &agent_socket);
        if *w == "ledger" {
            for fc in config
                .listeners
                .iter_mut()
                .flat_map(|l| l.filter_chains.iter_mut())
            {
                if let Some(hcm) = fc.http_connection_manager.as_mut() {
                    hcm.http_filters = ledger_filters.clone();
                }
            }
        }
        let path = dir.join(format!("{w}-sidecar.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        let log = std::fs::File::create(dir.join(format!("{w}-sidecar.log")))?;
        let child = tokio::process::Command::new(&binaries[i])
            .args(["--log-level", "info", "proxy", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {w}'s sidecar"))?;
        sidecars.push((w, child));
    }
    for (i, w) in WORKLOADS.iter().enumerate() {
        client::wait_ready(mesh.ports[i].admin, Duration::from_secs(30))
            .await
            .with_context(|| {
                format!(
                    "{w}'s sidecar did not become ready (see {w}-sidecar.log in {})",
                    dir.display()
                )
            })?;
        println!("{w:>9} sidecar admin: http://{}", mesh.ports[i].admin);
    }

    let hops = script(&mesh, &dir).await;
    print_table(&hops);
    let all_ok = hops.iter().all(|h| h.ok);
    if all_ok {
        println!(
            "\nall {} expectations held; every allowed hop was mutually authenticated (mTLS)",
            hops.len()
        );
    } else {
        println!(
            "\nSOME EXPECTATIONS FAILED (sidecar logs in {})",
            dir.display()
        );
    }

    if !once {
        println!("\nrunning; press Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
    }
    for (w, mut child) in sidecars {
        stop_child(&mut child).await;
        tracing::debug!(workload = w, "sidecar stopped");
    }
    let _ = agent_stop.send(());
    for copy in &binaries {
        let _ = std::fs::remove_file(copy);
    }
    if let Ok(Err(e)) = agent.await {
        tracing::warn!(error = %e, "node agent ended with an error");
    }
    if !all_ok {
        bail!("demo expectations failed");
    }
    Ok(())
}

/// Ledger's Istio policies as the HTTP filters istiod would give ledger, plus the router.
fn ledger_http_filters() -> anyhow::Result<Vec<FilterConfig>> {
    let target = policy::istio::Target {
        namespace: NAMESPACE.into(),
        labels: [("app".to_owned(), "ledger".to_owned())].into(),
        root_namespace: "istio-system".into(),
        trust_domain: TRUST_DOMAIN.into(),
        trust_domain_aliases: vec![],
    };
    let policies = policy::istio::parse(LEDGER_POLICIES)?;
    let mut filters = Vec::new();
    for f in policy::istio::translate(&policies, &target, false)? {
        filters.push(FilterConfig {
            name: f.name.clone(),
            typed_config: Some(serde_json::to_value(&f.typed_config)?),
        });
    }
    filters.push(FilterConfig {
        name: proxy::config::ROUTER_FILTER.into(),
        typed_config: None,
    });
    Ok(filters)
}

/// The newest record in a sidecar's access log for `path`.
fn access_record(dir: &Path, workload: &str, path: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(format!("{workload}-access.log"))).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["path"].as_str() == Some(path))
}

/// A call that ledger's policy must refuse with 403; the row names the deciding policy.
async fn denied_hop(
    dir: &Path,
    from_outbound: SocketAddr,
    caller: &str,
    path: &str,
    expectation: &'static str,
) -> Hop {
    match client::get(from_outbound, "ledger", path, &[], false).await {
        Ok((status, body)) => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let normalized = policy::path::normalize(path)
                .map(|p| p.path)
                .unwrap_or_default();
            let policy = access_record(dir, "ledger", &normalized)
                .or_else(|| access_record(dir, "ledger", path))
                .and_then(|r| r["rbac_policy"].as_str().map(str::to_owned));
            Hop {
                caller: spiffe_id(caller).to_string(),
                callee: format!("ledger {path}"),
                protocol: "HTTP/1.1",
                ok: status == 403 && body == "RBAC: access denied",
                status: status.to_string(),
                mtls: match policy {
                    Some(p) => format!("yes; denied by {p}"),
                    None => "yes; denied (no ALLOW matched)".into(),
                },
                expectation,
            }
        }
        Err(e) => failed("ledger", "HTTP/1.1", &e),
    }
}

/// The scripted traffic. Each hop says what it expects; the table says whether it held.
async fn script(mesh: &Mesh, dir: &Path) -> Vec<Hop> {
    let frontend_out = mesh.ports[0].outbound;
    let id = |w: &str| spiffe_id(w).to_string();
    let mut hops = Vec::new();

    // 1. HTTP/1.1 frontend → orders, which calls ledger (two hops, both mTLS).
    match client::get(frontend_out, "orders", "/orders/42", &[], false).await {
        Ok((status, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let caller = v["caller"].as_str().unwrap_or("-").to_owned();
            hops.push(Hop {
                caller: caller.clone(),
                callee: "orders".into(),
                protocol: "HTTP/1.1",
                status: status.to_string(),
                mtls: yes_if(caller == id("frontend")),
                ok: status == 200 && caller == id("frontend"),
                expectation: "allowed, caller verified",
            });
            let lcaller = v["upstream"]["caller"].as_str().unwrap_or("-").to_owned();
            let lstatus = v["upstream"]["status"].as_u64().unwrap_or(0);
            hops.push(Hop {
                caller: lcaller.clone(),
                callee: "ledger".into(),
                protocol: "HTTP/1.1",
                status: lstatus.to_string(),
                mtls: yes_if(lcaller == id("orders")),
                ok: lstatus == 200 && lcaller == id("orders"),
                expectation: "allowed, caller verified",
            });
        }
        Err(e) => hops.push(failed("orders", "HTTP/1.1", &e)),
    }

    // 2. HTTP/2 (h2c prior knowledge) frontend → orders.
    hops.push(
        match client::get(frontend_out, "orders", "/orders/7", &[], true).await {
            Ok((status, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let caller = v["caller"].as_str().unwrap_or("-").to_owned();
                Hop {
                    ok: status == 200 && caller == id("frontend"),
                    mtls: yes_if(caller == id("frontend")),
                    caller,
                    callee: "orders".into(),
                    protocol: "HTTP/2 (h2c)",
                    status: status.to_string(),
                    expectation: "allowed, caller verified",
                }
            }
            Err(e) => failed("orders", "HTTP/2 (h2c)", &e),
        },
    );

    // 3. A forged XFCC header claiming to be an admin service never reaches orders.
    let forged = [(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/demo/sa/admin",
    )];
    hops.push(
        match client::get(frontend_out, "orders", "/orders/1", &forged, false).await {
            Ok((status, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let caller = v["caller"].as_str().unwrap_or("-").to_owned();
                let forged_seen = v["xfcc"].as_str().unwrap_or("").contains("sa/admin");
                Hop {
                    ok: status == 200 && caller == id("frontend") && !forged_seen,
                    mtls: yes_if(caller == id("frontend")),
                    caller,
                    callee: "orders".into(),
                    protocol: "HTTP/1.1",
                    status: status.to_string(),
                    expectation: "forged XFCC stripped",
                }
            }
            Err(e) => failed("orders", "HTTP/1.1", &e),
        },
    );

    // 4. Opaque TCP frontend → ledger; ledger's sidecar reports the verified caller.
    hops.push(
        match client::tcp_roundtrip(mesh.frontend_tcp, b"ping").await {
            Ok(reply) => {
                let echoed = reply == "ledger-tcp:ping";
                let caller = client::tcp_caller(mesh.ports[2].admin)
                    .await
                    .unwrap_or_else(|_| "-".into());
                Hop {
                    ok: echoed && caller == id("frontend"),
                    mtls: yes_if(caller == id("frontend")),
                    caller,
                    callee: "ledger".into(),
                    protocol: "TCP",
                    status: if echoed {
                        "echoed".into()
                    } else {
                        format!("{reply:?}")
                    },
                    expectation: "allowed, caller verified",
                }
            }
            Err(e) => failed("ledger", "TCP", &e),
        },
    );

    // 5. Identity binding: an endpoint that answers as ledger where orders is expected is refused.
    hops.push(
        match client::get(frontend_out, "orders-impostor", "/orders/1", &[], false).await {
            Ok((status, _)) => Hop {
                caller: id("frontend"),
                callee: "ledger posing as orders".into(),
                protocol: "HTTP/1.1",
                ok: status == 503,
                status: status.to_string(),
                mtls: "refused: wrong peer ID".into(),
                expectation: "refused (503 UF)",
            },
            Err(e) => failed("orders-impostor", "HTTP/1.1", &e),
        },
    );

    // 6. Authorization: ledger admits only orders; frontend's valid SVID is not enough.
    hops.push(
        denied_hop(
            dir,
            frontend_out,
            "frontend",
            "/ledger/entries",
            "denied: wrong identity",
        )
        .await,
    );
    // 7. A DENY rule on /admin that path tricks cannot sidestep (sent as orders, which is allowed).
    let orders_out = mesh.ports[1].outbound;
    for trick in ["/public/../admin", "/%61dmin/keys", "//admin"] {
        hops.push(denied_hop(dir, orders_out, "orders", trick, "denied: path trick").await);
    }
    hops
}

fn yes_if(b: bool) -> String {
    if b { "yes".into() } else { "NO".into() }
}

fn failed(callee: &str, protocol: &'static str, e: &anyhow::Error) -> Hop {
    Hop {
        caller: "-".into(),
        callee: callee.into(),
        protocol,
        status: format!("error: {e:#}"),
        mtls: "-".into(),
        ok: false,
        expectation: "-",
    }
}

fn print_table(hops: &[Hop]) {
    let header = [
        "caller SPIFFE ID",
        "callee",
        "protocol",
        "status",
        "mTLS",
        "expectation",
        "held",
    ];
    let rows: Vec<[String; 7]> = hops
        .iter()
        .map(|h| {
            [
                h.caller.clone(),
                h.callee.clone(),
                h.protocol.into(),
                h.status.clone(),
                h.mtls.clone(),
                h.expectation.into(),
                if h.ok { "ok".into() } else { "FAILED".into() },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("  {}", parts.join("  "));
    };
    println!();
    line(header.to_vec());
    line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    );
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[expect(
    clippy::expect_used,
    reason = "called only with the demo's constant workload names"
)]
fn spiffe_id(workload: &str) -> SpiffeId {
    SpiffeId::parse(&format!(
        "spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{workload}"
    ))
    .expect("demo workload names are valid SPIFFE path segments")
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}

async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SIGTERM first so the sidecar drains; SIGKILL if it does not exit.
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

// === sidecar configs ===

fn service_host(w: &str) -> String {
    format!("{w}.{NAMESPACE}.svc.cluster.local")
}

fn route_to(cluster: &str) -> Route {
    Route {
        name: String::new(),
        match_: RouteMatch {
            prefix: Some("/".into()),
            ..Default::default()
        },
        route: RouteAction {
            cluster: cluster.into(),
            weighted_clusters: vec![],
            timeout: Duration::from_secs(15),
        },
    }
}

fn hcm(stat_prefix: &str, virtual_hosts: Vec<VirtualHost>) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        route_config: RouteConfiguration {
            name: stat_prefix.into(),
            virtual_hosts,
        },
        rds: None,
        forward_client_cert_details: ForwardClientCertDetails::SanitizeSet,
        http_filters: vec![],
    }
}

fn peer_cluster(
    name: &str,
    port: u16,
    workload: &str,
    endpoint: SocketAddr,
    expected: &str,
) -> Cluster {
    Cluster {
        name: name.into(),
        endpoints: vec![endpoint],
        eds: None,
        lb_policy: Default::default(),
        connect_timeout: Duration::from_secs(5),
        protocol: UpstreamProtocol::Auto,
        transport_socket: Some(UpstreamTls {
            sni: format!("outbound_.{port}_._.{}", service_host(workload)),
            match_spiffe_ids: vec![spiffe_id(expected)],
        }),
        metadata: DestinationMetadata {
            service: Some(service_host(workload)),
            workload: Some(workload.into()),
            namespace: Some(NAMESPACE.into()),
            app: Some(workload.into()),
        },
    }
}

fn local_cluster(name: &str, endpoint: SocketAddr) -> Cluster {
    Cluster {
        name: name.into(),
        endpoints: vec![endpoint],
        eds: None,
        lb_policy: Default::default(),
        connect_timeout: Duration::from_secs(5),
        protocol: UpstreamProtocol::Auto,
        transport_socket: None,
        metadata: DestinationMetadata::default(),
    }
}

fn sidecar_config(w: &str, i: usize, mesh: &Mesh, dir: &Path, agent_socket: &Path) -> Bootstrap {
    let p = mesh.ports[i];
    let file = |suffix: &str| dir.join(format!("{w}{suffix}"));
    let mut inbound_chains = Vec::new();
    let mut clusters = vec![local_cluster("inbound|8080||", p.app)];
    if w == "ledger" {
        inbound_chains.push(FilterChain {
            name: "tcp-9000".into(),
            filter_chain_match: FilterChainMatch {
                server_names: vec![format!("outbound_.9000_._.{}", service_host("ledger"))],
                application_protocols: vec![],
                transport_protocol: None,
                destination_port: None,
            },
            http_connection_manager: None,
            tcp_proxy: Some(TcpProxy {
                stat_prefix: "inbound_9000".into(),
                cluster: "inbound|9000||".into(),
            }),
            rbac_filters: vec![],
            refuse: None,
        });
        clusters.push(local_cluster("inbound|9000||", mesh.ledger_tcp_app));
    }
    inbound_chains.push(FilterChain {
        name: "http".into(),
        filter_chain_match: FilterChainMatch::default(),
        http_connection_manager: Some(hcm(
            "inbound_8080",
            vec![VirtualHost {
                name: "inbound|http|8080".into(),
                domains: vec!["*".into()],
                routes: vec![route_to("inbound|8080||")],
            }],
        )),
        tcp_proxy: None,
        rbac_filters: vec![],
        refuse: None,
    });
    let mut listeners = vec![Listener {
        name: "virtualInbound".into(),
        address: p.inbound,
        direction: Direction::Inbound,
        filter_chains: inbound_chains,
        max_connections: 10_000,
    }];

    // Outbound: who this workload may call.
    let peers: &[&str] = match w {
        "frontend" => &["orders", "ledger"],
        "orders" => &["ledger"],
        _ => &[],
    };
    let mut vhosts = Vec::new();
    for peer in peers {
        let j = WORKLOADS.iter().position(|x| x == peer).unwrap_or(0);
        let name = format!("outbound|80||{}", service_host(peer));
        clusters.push(peer_cluster(&name, 80, peer, mesh.ports[j].inbound, peer));
        vhosts.push(VirtualHost {
            name: format!("{}:80", service_host(peer)),
            domains: vec![
                peer.to_string(),
                format!("{peer}:80"),
                service_host(peer),
                format!("{}:80", service_host(peer)),
            ],
            routes: vec![route_to(&name)],
        });
    }
    if w == "frontend" {
        // An endpoint that is really ledger, configured as if it were orders: must be refused.
        let name = "outbound|80||orders-impostor";
        clusters.push(peer_cluster(
            name,
            80,
            "orders",
            mesh.ports[2].inbound,
            "orders",
        ));
        vhosts.push(VirtualHost {
            name: "orders-impostor:80".into(),
            domains: vec!["orders-impostor".into()],
            routes: vec![route_to(name)],
        });
        let tcp_cluster = format!("outbound|9000||{}", service_host("ledger"));
        clusters.push(peer_cluster(
            &tcp_cluster,
            9000,
            "ledger",
            mesh.ports[2].inbound,
            "ledger",
        ));
        listeners.push(Listener {
            name: "outbound_9000_ledger".into(),
            address: mesh.frontend_tcp,
            direction: Direction::Outbound,
            filter_chains: vec![FilterChain {
                name: "tcp".into(),
                filter_chain_match: FilterChainMatch::default(),
                http_connection_manager: None,
                tcp_proxy: Some(TcpProxy {
                    stat_prefix: "outbound_9000_ledger".into(),
                    cluster: tcp_cluster,
                }),
                rbac_filters: vec![],
                refuse: None,
            }],
            max_connections: 10_000,
        });
    }
    if !vhosts.is_empty() {
        listeners.push(Listener {
            name: "virtualOutbound".into(),
            address: p.outbound,
            direction: Direction::Outbound,
            filter_chains: vec![FilterChain {
                name: "http".into(),
                filter_chain_match: FilterChainMatch::default(),
                http_connection_manager: Some(hcm("outbound_http", vhosts)),
                tcp_proxy: None,
                rbac_filters: vec![],
                refuse: None,
            }],
            max_connections: 10_000,
        });
    }
    Bootstrap {
        node: Node {
            id: format!("sidecar~127.0.0.1~{w}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"),
            workload: w.into(),
            namespace: NAMESPACE.into(),
            app: Some(w.into()),
            version: Some("v1".into()),
            cluster: "Kubernetes".into(),
        },
        admin: Admin {
            address: p.admin,
            health_address: None,
            prometheus_address: None,
        },
        identity: IdentityConfig {
            files: None,
            workload_api: Some(WorkloadApiIdentity {
                socket: Some(format!("unix://{}", agent_socket.display())),
            }),
        },
        listeners,
        clusters,
        access_log: Some(AccessLogConfig {
            path: file("-access.log"),
            format: AccessLogFormat::Json,
        }),
        limits: Limits::default(),
        drain: DrainConfig {
            duration: Duration::from_secs(1),
            grace: Duration::from_secs(2),
        },
        xds: None,
    }
}
