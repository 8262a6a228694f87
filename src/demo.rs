//! `eastguard demo`: a dev CA, three sample services (frontend → orders → ledger) each with its own
//! sidecar process on loopback, a scripted run of real traffic, and a table of what happened.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use identity::SpiffeId;
use proxy::config::{
    AccessLogConfig, AccessLogFormat, Admin, Bootstrap, Cluster, DestinationMetadata, Direction,
    DrainConfig, FilterChain, FilterChainMatch, ForwardClientCertDetails, HttpConnectionManager,
    IdentityConfig, Limits, Listener, Node, Route, RouteAction, RouteConfiguration, RouteMatch,
    TcpProxy, UpgradeConfig, UpstreamProtocol, UpstreamTls, VirtualHost, WorkloadApiIdentity,
    XdsConfig,
};

use crate::lifecycle::{self, Shutdown};

mod apps;
mod client;
pub mod ebpf;

/// `eastguard demo-app`: one of the demo's sample HTTP apps as its own process (for pods in
/// network namespaces).
pub async fn serve_app(name: String, listen: SocketAddr, shutdown: Shutdown) -> anyhow::Result<()> {
    let name: &'static str = Box::leak(name.into_boxed_str());
    apps::spawn_http(name, listen, None).await?;
    shutdown.requested().await;
    Ok(())
}

/// `eastguard demo-raw-socket`: whether this process can open an `AF_PACKET` raw socket, which
/// sees and sends frames below the cgroup hooks that capture TCP (so app containers must not have
/// `CAP_NET_RAW`).
pub fn raw_socket_probe() -> std::process::ExitCode {
    use rustix::net::{AddressFamily, SocketType, socket};
    match socket(AddressFamily::PACKET, SocketType::RAW, None) {
        Ok(_) => {
            println!("opened");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            println!("refused: {e}");
            std::process::ExitCode::SUCCESS
        }
    }
}

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

/// The orders service's API spec, as its team wrote it: the demo calls one operation it does
/// not list (shadow) and one it marks deprecated (zombie).
const ORDERS_SPEC: &str = r#"openapi: 3.0.3
info: {title: orders, version: "1.4"}
paths:
  /orders/{orderId}:
    get:
      responses:
        "200": {content: {application/json: {}}}
  /orders/{orderId}/receipt:
    get:
      deprecated: true
      responses:
        "200": {content: {application/json: {}}}
  /orders:
    post:
      responses:
        "201": {content: {application/json: {}}}
"#;
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
    /// Frontend's static listener whose one route goes to the impostor endpoint.
    frontend_impostor: SocketAddr,
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

/// Runs the demo until the script is done (`once`) or SIGTERM/SIGINT; a signal at any point stops
/// what was started so far, and the exit is then 0.
pub async fn run(once: bool, dir: Option<PathBuf>, shutdown: Shutdown) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("eastguard-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("eastguard demo — files in {}", dir.display());

    let mut started = Started::default();
    let outcome = tokio::select! {
        r = start_and_script(&mut started, &dir) => r.map(Some),
        () = shutdown.requested() => Ok(None),
    };
    if matches!(outcome, Ok(Some(_))) && !once {
        println!("\nrunning; press Ctrl-C (or send SIGTERM) to stop");
        shutdown.requested().await;
    }
    started.stop().await;
    match outcome? {
        Some(false) if once => bail!("demo expectations failed"),
        Some(_) => {}
        None => println!("stopped before the script finished"),
    }
    Ok(())
}

/// What the demo has started so far; [`Started::stop`] stops all of it, wherever the start got to.
#[derive(Default)]
struct Started {
    sidecars: Vec<(&'static str, tokio::process::Child)>,
    control_plane: Option<Task<control_plane::StartError>>,
    agent: Option<Task<node_agent::AgentError>>,
    binaries: Vec<PathBuf>,
}

/// An in-process task and the switch that stops it.
struct Task<E> {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Display> Task<E> {
    async fn stop(self, what: &str) {
        let _ = self.stop.send(());
        if let Ok(Err(e)) = self.handle.await {
            tracing::warn!(error = %e, "{what} ended with an error");
        }
    }
}

impl Started {
    async fn stop(self) {
        for (w, mut child) in self.sidecars {
            stop_child(&mut child).await;
            tracing::debug!(workload = w, "sidecar stopped");
        }
        if let Some(cp) = self.control_plane {
            cp.stop("control plane").await;
        }
        if let Some(agent) = self.agent {
            agent.stop("node agent").await;
        }
        for copy in &self.binaries {
            let _ = std::fs::remove_file(copy);
        }
    }
}

/// Starts the agent, apps, control plane and sidecars, runs the script and prints the table;
/// `true` when every expectation held.
async fn start_and_script(started: &mut Started, dir: &Path) -> anyhow::Result<bool> {
    // Identity: a node agent serving the SPIFFE Workload API. Every sidecar runs from its own copy
    // of the binary, and the agent tells them apart by uid and executable path, which the kernel
    // reports; nothing a workload says about itself counts.
    let uid = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").context("reading /proc/self")?,
    );
    let NodeAgent {
        socket: agent_socket,
        binaries,
        task: agent,
    } = start_agent(dir, uid, &WORKLOADS)?;
    started.agent = Some(agent);
    started.binaries.clone_from(&binaries);
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
        frontend_impostor: free_port()?,
        ledger_tcp_app: free_port()?,
    };

    // The apps: orders calls ledger through its own sidecar; ledger also serves opaque TCP.
    apps::spawn_http("orders", mesh.ports[1].app, Some(mesh.ports[1].outbound)).await?;
    apps::spawn_http("ledger", mesh.ports[2].app, None).await?;
    apps::spawn_tcp_echo(mesh.ledger_tcp_app).await?;

    // Configuration: the control plane, from Istio resources in a directory (edit them while the
    // demo runs: changes reach the sidecars within a second).
    let istio_dir = dir.join("istio");
    std::fs::create_dir_all(&istio_dir)?;
    std::fs::write(istio_dir.join("demo.yaml"), istio_registry(&mesh))?;
    std::fs::create_dir_all(istio_dir.join("openapi"))?;
    std::fs::write(
        istio_dir
            .join("openapi")
            .join(format!("{}.yaml", service_host("orders"))),
        ORDERS_SPEC,
    )?;
    let xds_address = free_port()?;
    let inventory_address = free_port()?;
    let (cp_stop, cp_stopped) = tokio::sync::oneshot::channel::<()>();
    let control_plane = tokio::spawn(control_plane::run(
        control_plane::Options {
            config_dir: istio_dir.clone(),
            xds_address,
            tls: None,
            mesh: control_plane::Mesh {
                trust_domain: TRUST_DOMAIN.into(),
                root_namespace: "istio-system".into(),
                default_mtls: policy::istio::peer_authn::MtlsMode::Strict,
                h2_upgrade: true,
                access_log: None,
            },
            poll_interval: Duration::from_millis(200),
            data_dir: None,
            http_address: Some(inventory_address),
            inventory: Default::default(),
            audit_log: None,
            webhook: None,
            kubernetes: None,
            ca: None,
        },
        async move {
            let _ = cp_stopped.await;
        },
    ));
    started.control_plane = Some(Task {
        stop: cp_stop,
        handle: control_plane,
    });
    println!(
        "control plane (ADS): {xds_address}, reading {}; API inventory: http://{inventory_address}/ui/ (UI), /apis (JSON)",
        istio_dir.display()
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let config = sidecar_config(w, i, &mesh, dir, &agent_socket, xds_address);
        let path = dir.join(format!("{w}-sidecar.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        let log = std::fs::File::create(dir.join(format!("{w}-sidecar.log")))?;
        let child = lifecycle::child(&binaries[i])
            .args(["--log-level", "info", "proxy", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {w}'s sidecar"))?;
        started.sidecars.push((w, child));
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

    let hops = script(&mesh, dir).await;
    print_table(&hops);
    inventory_traffic(&mesh).await;
    print_inventory(&mesh).await;
    print_control_plane_inventory(inventory_address).await;
    print_detections(&mesh, dir).await;
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
    Ok(all_ok)
}

/// The demo's node agent (SPIFFE Workload API) and the binary copies it tells workloads apart by.
struct NodeAgent {
    socket: PathBuf,
    /// One copy of this binary per workload, in `workloads` order.
    binaries: Vec<PathBuf>,
    task: Task<node_agent::AgentError>,
}

/// Starts the node agent in-process. Every sidecar runs from its own copy of the binary, and the
/// agent tells them apart by uid and executable path, which the kernel reports; nothing a workload
/// says about itself counts.
fn start_agent(dir: &Path, uid: u32, workloads: &[&str]) -> anyhow::Result<NodeAgent> {
    let exe = std::env::current_exe().context("finding the eastguard binary")?;
    let mut entries = format!("trust_domain: {TRUST_DOMAIN}\nentries:\n");
    let mut binaries = Vec::new();
    for w in workloads {
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
    let socket = dir.join("agent.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node_agent::run(
        node_agent::AgentConfig {
            socket: socket.clone(),
            entries: entries_path,
            poll: Duration::from_millis(500),
            admin: None,
            ca_dir: None,
            kubelet: None,
            ca: None,
            pods: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(NodeAgent {
        socket,
        binaries,
        task: Task { stop, handle: task },
    })
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

    // 4. Opaque TCP frontend → ledger: ledger's ALLOW policy admits only orders, and Istio applies
    //    it to TCP too, so ledger's sidecar verifies frontend and closes the connection unanswered.
    hops.push(
        match client::tcp_roundtrip(mesh.frontend_tcp, b"ping").await {
            Ok(reply) => {
                let caller = client::tcp_caller(mesh.ports[2].admin)
                    .await
                    .unwrap_or_else(|_| "-".into());
                Hop {
                    ok: reply.is_empty() && caller == id("frontend"),
                    mtls: if caller == id("frontend") {
                        "yes; denied (no ALLOW matched), closed".into()
                    } else {
                        "NO".into()
                    },
                    caller,
                    callee: "ledger".into(),
                    protocol: "TCP",
                    status: if reply.is_empty() {
                        "closed".into()
                    } else {
                        format!("{reply:?}")
                    },
                    expectation: "denied: wrong identity",
                }
            }
            Err(e) => failed("ledger", "TCP", &e),
        },
    );

    // 5. Identity binding: an endpoint that answers as ledger where orders is expected is refused.
    hops.push(
        match client::get(
            mesh.frontend_impostor,
            "orders-impostor",
            "/orders/1",
            &[],
            false,
        )
        .await
        {
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

/// What each sidecar's API inventory (`/apis`) learned from the calls it served: operations as
/// path templates, with the verified callers and status classes.
async fn print_inventory(mesh: &Mesh) {
    println!(
        "\nAPI inventory (each sidecar's /apis: inbound calls by path template and verified caller):"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let Ok((200, body)) = client::get(mesh.ports[i].admin, "admin", "/apis", &[], false).await
        else {
            println!("  {w}: /apis did not answer");
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        for row in v["rows"].as_array().into_iter().flatten() {
            let caller = row["caller"].as_str().unwrap_or("plaintext");
            println!(
                "  {w:>9}  {:<6} {:<22} {} ← {caller} ({} calls, {} denied)",
                row["method"].as_str().unwrap_or("-"),
                row["template"].as_str().unwrap_or("-"),
                row["status_class"].as_str().unwrap_or("-"),
                row["calls"],
                row["denied"],
            );
        }
    }
}

/// Calls the inventory should flag: one operation the orders spec does not list (shadow) and one
/// it marks deprecated (zombie). Not expectations of the table: any answer is recorded.
async fn inventory_traffic(mesh: &Mesh) {
    let frontend_out = mesh.ports[0].outbound;
    for path in ["/internal/debug/vars", "/orders/7/receipt"] {
        let _ = client::get(frontend_out, "orders", path, &[], false).await;
    }
    // A compromised frontend walks order IDs one by one (BOLA / enumeration).
    for id in 1000..1030 {
        let _ = client::get(frontend_out, "orders", &format!("/orders/{id}"), &[], false).await;
    }
}

/// What the sidecars detected, and how many audit events they wrote.
async fn print_detections(mesh: &Mesh, dir: &Path) {
    println!("\nDetections (each sidecar's /apis; values are never kept):");
    // The classifier runs off the request path: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, w) in WORKLOADS.iter().enumerate() {
        let Ok((200, body)) = client::get(mesh.ports[i].admin, "admin", "/apis", &[], false).await
        else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        for d in v["detections"].as_array().into_iter().flatten() {
            println!(
                "  {w:>9}  enumeration ({}) of {} {} by {}: examples {}",
                d["pattern"].as_str().unwrap_or("-"),
                d["method"].as_str().unwrap_or("-"),
                d["template"].as_str().unwrap_or("-"),
                d["caller"].as_str().unwrap_or("plaintext"),
                d["examples"],
            );
        }
        for f in v["sensitive"].as_array().into_iter().flatten() {
            println!(
                "  {w:>9}  sensitive data: {} in the {} of {} {} at {}",
                f["data_type"].as_str().unwrap_or("-"),
                f["direction"].as_str().unwrap_or("-"),
                f["method"].as_str().unwrap_or("-"),
                f["template"].as_str().unwrap_or("-"),
                f["location"].as_str().unwrap_or("-"),
            );
        }
    }
    for w in WORKLOADS {
        let path = dir.join(format!("{w}-audit.log"));
        let n = std::fs::read_to_string(&path).map_or(0, |t| t.lines().count());
        println!("  {w:>9}  {n} OCSF audit events in {}", path.display());
    }
}

/// The control plane's view (`/apis`): every operation the sidecars reported, against the specs.
async fn print_control_plane_inventory(address: SocketAddr) {
    // Sidecars export every 300 ms; wait for the last calls to arrive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let view = loop {
        let v = match client::get(address, "control-plane", "/apis", &[], false).await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).ok(),
            _ => None,
        };
        let complete = v.as_ref().is_some_and(|v| {
            let text = v["operations"].to_string();
            text.contains("/internal/debug/vars") && text.contains("/orders/{id}/receipt")
        });
        if complete || tokio::time::Instant::now() >= deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "\nAPI inventory at the control plane, against the specs (http://{address}/apis, or `eastguard apis list --control-plane {address}`):"
    );
    let Some(view) = view else {
        println!("  the control plane's /apis did not answer");
        return;
    };
    for op in view["operations"].as_array().into_iter().flatten() {
        let callers: Vec<&str> = op["callers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["id"].as_str())
            .collect();
        println!(
            "  {:<10} {:<30} {:<6} {:<24} owner {:<9} {}",
            op["status"].as_str().unwrap_or("-"),
            op["service"].as_str().unwrap_or("-"),
            op["method"].as_str().unwrap_or("-"),
            op["template"].as_str().unwrap_or("-"),
            op["owner"].as_str().unwrap_or("(orphan)"),
            if callers.is_empty() {
                "(not called)".to_owned()
            } else {
                format!("← {}", callers.join(", "))
            },
        );
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

/// A loopback port nothing listens on, below the kernel's ephemeral range: a port picked inside
/// it (`bind(:0)`) can be taken as the source port of an outgoing connection before the sidecar
/// meant to listen on it binds it. Never the same port twice in one run.
fn free_port() -> anyhow::Result<SocketAddr> {
    use std::hash::{BuildHasher as _, Hasher as _};
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(10_001);
    // Randomly seeded per call (std's hasher keys): spread, not secret.
    let seed = std::collections::hash_map::RandomState::new();
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for attempt in 0u32..1000 {
        let mut h = seed.build_hasher();
        h.write_u32(attempt);
        let port = 10_000 + (h.finish() % u64::from(low - 10_000)) as u16;
        if handed.contains(&port) {
            continue;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            handed.push(port);
            return Ok(l.local_addr()?);
        }
    }
    // The range below is exhausted: the kernel's pick.
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}

async fn stop_child(child: &mut tokio::process::Child) {
    // SIGTERM first so the sidecar drains; SIGKILL if it does not exit.
    lifecycle::terminate(child);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_ok()
    {
        return;
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
        upgrade_configs: vec![UpgradeConfig::websocket()],
        reject_ambiguous_paths: false,
        access_log: vec![],
        tracing: None,
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

/// The control plane's input: the three workloads and two services as Istio resources, and
/// ledger's policies.
fn istio_registry(mesh: &Mesh) -> String {
    let mut out = String::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let p = mesh.ports[i];
        let tcp = if *w == "ledger" {
            format!(", tcp: {}", mesh.ledger_tcp_app.port())
        } else {
            String::new()
        };
        out.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {w}\n  namespace: {NAMESPACE}\n  annotations: {{sidecar.eastguard.io/inbound-port: \"{}\", sidecar.eastguard.io/outbound-port: \"{}\"}}\nspec: {{address: 127.0.0.1, ports: {{http: {}{tcp}}}, labels: {{app: {w}}}, serviceAccount: {w}}}\n---\n",
            p.inbound.port(),
            p.outbound.port(),
            p.app.port(),
        ));
    }
    for (w, ports) in [
        ("orders", "[{number: 80, name: http, protocol: HTTP}]"),
        (
            "ledger",
            "[{number: 80, name: http, protocol: HTTP}, {number: 9000, name: tcp, protocol: TCP}]",
        ),
    ] {
        out.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {w}, namespace: {NAMESPACE}{labels}}}\nspec:\n  hosts: [{}]\n  ports: {ports}\n  workloadSelector: {{labels: {{app: {w}}}}}\n---\n",
            service_host(w),
            // orders has an owning team; ledger has none (an orphan in the inventory).
            labels = if w == "orders" { ", labels: {team: checkout}" } else { "" },
        ));
    }
    out.push_str(LEDGER_POLICIES);
    out
}

/// A sidecar's bootstrap: who it is, its admin port, its identity source and the control plane.
/// Listeners, routes, clusters and endpoints come over xDS; frontend also has two static
/// listeners for what the control plane would never generate: opaque TCP to ledger on a port of
/// its own (no capture in this demo) and an "impostor" endpoint for the identity-binding check.
fn sidecar_config(
    w: &str,
    i: usize,
    mesh: &Mesh,
    dir: &Path,
    agent_socket: &Path,
    xds: SocketAddr,
) -> Bootstrap {
    let p = mesh.ports[i];
    let file = |suffix: &str| dir.join(format!("{w}{suffix}"));
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if w == "frontend" {
        // An endpoint that is really ledger, configured as if it were orders: must be refused.
        let name = "static|orders-impostor";
        clusters.push(peer_cluster(
            name,
            80,
            "orders",
            mesh.ports[2].inbound,
            "orders",
        ));
        listeners.push(Listener {
            name: "impostor_outbound".into(),
            address: mesh.frontend_impostor,
            direction: Direction::Outbound,
            filter_chains: vec![FilterChain {
                name: "http".into(),
                filter_chain_match: FilterChainMatch::default(),
                http_connection_manager: Some(hcm(
                    "impostor_http",
                    vec![VirtualHost {
                        name: "orders-impostor:80".into(),
                        domains: vec!["*".into()],
                        routes: vec![route_to(name)],
                    }],
                )),
                tcp_proxy: None,
                rbac_filters: vec![],
                refuse: None,
            }],
            max_connections: 10_000,
            original_dst: false,
            bind_to_port: true,
            use_original_dst: false,
        });
        let tcp_cluster = "static|ledger-tcp".to_owned();
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
            original_dst: false,
            bind_to_port: true,
            use_original_dst: false,
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
            status_address: None,
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
            text_format: None,
            json_format: None,
        }),
        limits: Limits::default(),
        drain: DrainConfig {
            duration: Duration::from_secs(1),
            grace: Duration::from_secs(2),
        },
        xds: Some(XdsConfig {
            address: xds.to_string(),
            control_plane_ids: vec![],
            server_name: "istiod.istio-system.svc".into(),
            delta: false,
        }),
        capture: None,
        tracing: None,
        audit: Some(proxy::audit::AuditConfig {
            path: file("-audit.log"),
            format: proxy::audit::AuditFormat::Ocsf,
        }),
        inventory: proxy::config::InventoryConfig {
            export: proxy::config::InventoryExport {
                interval: Duration::from_millis(300),
                ..Default::default()
            },
            // Every call is classified here (1 % by default).
            sensitive: proxy::config::SensitiveConfig {
                sample_rate: 1.0,
                ..Default::default()
            },
            ..Default::default()
        },
    }
}
