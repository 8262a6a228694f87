//! `sudo eastguard demo --ebpf`: the demo's frontend → orders hop on real pod networking. Each pod
//! is a network namespace on a bridge (IPv4 and IPv6) with a cgroup holding `app` and `sidecar`;
//! the node agent serves SVIDs and attaches eBPF capture; clients are unmodified `curl` processes
//! calling pod IPs. Needs root, `ip` (iproute2) and `curl`; a cgroup v2 mount; a bpf filesystem
//! (a private one is mounted in the demo directory).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{Hop, NAMESPACE, NodeAgent, Task, print_table, spiffe_id, start_agent};
use crate::lifecycle::{self, Shutdown};

mod leftovers;

/// Every object the demo creates carries this prefix and its PID (`egdemo<pid>`): network
/// namespaces `egdemo<pid>-<pod>`, the cgroup `eastguard-egdemo<pid>`, the bpffs mounted with the
/// source `egdemo<pid>`. A later run removes what a dead one left.
const TAG_PREFIX: &str = "egdemo";

const APP_PORT: u16 = 8080;
const OUTSIDER_PORT: u16 = 9090;

/// A pod: its namespace and last address byte.
struct Pod {
    name: &'static str,
    n: u8,
    captured: bool,
}

const PODS: [Pod; 3] = [
    Pod {
        name: "frontend",
        n: 2,
        captured: true,
    },
    Pod {
        name: "orders",
        n: 3,
        captured: true,
    },
    // No sidecar and no capture: what a bypass would reach, and a client with no identity.
    Pod {
        name: "outsider",
        n: 4,
        captured: false,
    },
];

fn v4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 78, 0, n))
}

fn v6(n: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, u16::from(n)))
}

struct Net {
    tag: String,
    cgroup_root: PathBuf,
    bpffs: PathBuf,
    children: Vec<tokio::process::Child>,
    agent: Option<Task<node_agent::AgentError>>,
    capture: Option<Capture>,
    binaries: Vec<PathBuf>,
}

/// The in-process capture loop and the registry it reads.
struct Capture {
    registry: PathBuf,
    task: Task<anyhow::Error>,
}

impl Net {
    fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.tag)
    }

    fn cgroup(&self, pod: &str, part: Option<&str>) -> PathBuf {
        let p = self.cgroup_root.join(pod);
        match part {
            Some(part) => p.join(part),
            None => p,
        }
    }

    /// A command in a pod's namespace and, for captured pods, in its `part` cgroup. Everything
    /// but a sidecar runs without `CAP_NET_RAW` (as Istio's injection drops it from app
    /// containers): a raw packet socket would send below the cgroup hooks that capture TCP.
    fn command(&self, pod: &str, part: Option<&str>, args: &[String]) -> tokio::process::Command {
        let mut cmd = lifecycle::child("sh");
        // Join the cgroup before `ip netns exec`, which remounts /sys.
        let join = match part {
            Some(part) => format!(
                "echo $$ > {} && ",
                self.cgroup(pod, Some(part)).join("cgroup.procs").display()
            ),
            None => String::new(),
        };
        let drop_raw = if part == Some("sidecar") {
            ""
        } else {
            "setpriv --bounding-set -net_raw --inh-caps -net_raw -- "
        };
        cmd.arg("-c")
            .arg(format!(
                "{join}ns=\"$1\"; shift; exec ip netns exec \"$ns\" {drop_raw}\"$@\""
            ))
            .arg("sh")
            .arg(self.ns(pod))
            .args(args);
        cmd
    }

    async fn curl(&self, pod: &str, part: Option<&str>, url: &str) -> (bool, String) {
        let args: Vec<String> = ["curl", "-sS", "-g", "--max-time", "3", url]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        match self.command(pod, part, &args).output().await {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
                .trim()
                .to_owned(),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn preflight() -> anyhow::Result<PathBuf> {
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
    if uid != 0 {
        bail!("demo --ebpf needs root (network namespaces, cgroups, eBPF): run it with sudo");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("curl", "curl"),
        ("setpriv", "util-linux"),
    ] {
        if !have(tool) {
            bail!("demo --ebpf needs `{tool}` (Debian: {package})");
        }
    }
    cgroup2_root().context("demo --ebpf needs a cgroup v2 mount")
}

fn setup(net: &Net) -> anyhow::Result<()> {
    let host = net.ns("host");
    sh(&["ip", "netns", "add", &host])?;
    sh(&["ip", "-n", &host, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &host, "link", "set", "br0", "up"])?;
    for pod in &PODS {
        let ns = net.ns(pod.name);
        let veth = format!("v{}", pod.n);
        sh(&["ip", "netns", "add", &ns])?;
        sh(&[
            "ip", "link", "add", &veth, "netns", &host, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        sh(&[
            "ip", "-n", &host, "link", "set", &veth, "master", "br0", "up",
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", v4(pod.n)),
            "dev",
            "eth0",
        ])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/64", v6(pod.n)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        if pod.captured {
            for part in ["app", "sidecar"] {
                std::fs::create_dir_all(net.cgroup(pod.name, Some(part)))?;
            }
        }
    }
    std::fs::create_dir_all(&net.bpffs)?;
    sh(&["mount", "-t", "bpf", &net.tag, &net.bpffs.to_string_lossy()])
}

impl Net {
    /// Stops everything the demo started, gracefully first: the pods are unregistered (capture
    /// detached and unpinned), the agent stops, sidecars and apps get SIGTERM (SIGKILL after a
    /// few seconds, and for anything left in the pods' cgroups), then the cgroups, namespaces
    /// (and their veths) and the bpffs mount go.
    async fn stop(mut self) {
        if let Some(capture) = self.capture.take() {
            if std::fs::write(&capture.registry, "pods: []\n").is_ok() {
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            capture.task.stop("capture").await;
        }
        if let Some(agent) = self.agent.take() {
            agent.stop("node agent").await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        for c in &mut self.children {
            lifecycle::terminate(c);
        }
        for c in &mut self.children {
            if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                let _ = c.start_kill();
            }
        }
        tokio::task::block_in_place(|| self.teardown());
        for copy in &self.binaries {
            let _ = std::fs::remove_file(copy);
        }
    }

    fn teardown(&self) {
        let pods: Vec<String> = PODS.iter().map(|p| self.ns(p.name)).collect();
        let mut namespaces = pods;
        namespaces.push(self.ns("host"));
        leftovers::remove(&leftovers::Found {
            namespaces,
            cgroups: vec![self.cgroup_root.clone()],
            mounts: vec![self.bpffs.clone()],
        });
    }
}

/// Frontend's sidecar: app connects to orders' pod IP (either family) go to orders over mTLS.
/// Orders' sidecar: inbound 8080 to its app. Both listen for capture (15001 / 15006).
fn sidecar_config(pod: &str, dir: &Path, agent_socket: &Path) -> serde_json::Value {
    let orders = &PODS[1];
    let chain = |family: &str, prefix: String| {
        serde_json::json!({
            "name": format!("orders-{family}"),
            "filter_chain_match": {"destination_port": APP_PORT, "prefix_ranges": [prefix]},
            "http_connection_manager": {
                "stat_prefix": "outbound_orders",
                "route_config": {"virtual_hosts": [{"name": "orders", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": format!("outbound|{APP_PORT}||orders-{family}")}}]}]},
            },
        })
    };
    let outbound = |name: &str, addr: &str, chains: Vec<serde_json::Value>| {
        serde_json::json!({"name": name, "address": addr, "direction": "OUTBOUND",
            "original_dst": true, "filter_chains": chains})
    };
    let inbound = |name: &str, addr: &str| {
        serde_json::json!({"name": name, "address": addr, "direction": "INBOUND",
            "original_dst": true,
            "filter_chains": [{"name": format!("inbound|{APP_PORT}"),
                "filter_chain_match": {"destination_port": APP_PORT},
                "http_connection_manager": {"stat_prefix": "inbound_http",
                    "route_config": {"virtual_hosts": [{"name": "inbound", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"},
                            "route": {"cluster": format!("inbound|{APP_PORT}||")}}]}]}}}]})
    };
    let peer = |family: &str, endpoint: String| {
        serde_json::json!({"name": format!("outbound|{APP_PORT}||orders-{family}"),
            "endpoints": [endpoint],
            "transport_socket": {"sni": format!("outbound_.{APP_PORT}_._.orders.{NAMESPACE}.svc.cluster.local"),
                "match_spiffe_ids": [spiffe_id("orders").as_str()]},
            "metadata": {"service": format!("orders.{NAMESPACE}.svc.cluster.local"),
                "workload": "orders", "namespace": NAMESPACE}})
    };
    let (out4, out6) = if pod == "frontend" {
        (
            vec![chain("v4", format!("{}/32", v4(orders.n)))],
            vec![chain("v6", format!("{}/128", v6(orders.n)))],
        )
    } else {
        (vec![], vec![])
    };
    let mut listeners = vec![
        inbound("virtualInbound", "0.0.0.0:15006"),
        inbound("virtualInbound6", "[::]:15006"),
    ];
    if pod == "frontend" {
        listeners.push(outbound("virtualOutbound", "127.0.0.1:15001", out4));
        listeners.push(outbound("virtualOutbound6", "[::1]:15001", out6));
    }
    serde_json::json!({
        "node": {"id": format!("sidecar~{}~{pod}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local",
                    PODS.iter().find(|p| p.name == pod).map_or(v4(0), |p| v4(p.n))),
                 "workload": pod, "namespace": NAMESPACE, "app": pod},
        "admin": {"address": "127.0.0.1:15000"},
        "identity": {"workload_api": {"socket": format!("unix://{}", agent_socket.display())}},
        "access_log": {"path": dir.join(format!("{pod}-access.log")), "format": "JSON"},
        "capture": {"status_file": dir.join(format!("{pod}.capture"))},
        // A short drain: the demo's stop (and a sidecar whose demo died) should not take 10 s.
        "drain": {"duration": "1s", "grace": "2s"},
        "listeners": listeners,
        "clusters": [
            peer("v4", format!("{}:{APP_PORT}", v4(orders.n))),
            peer("v6", format!("[{}]:{APP_PORT}", v6(orders.n))),
            {"name": format!("inbound|{APP_PORT}||"), "endpoints": [format!("127.0.0.1:{APP_PORT}")]},
        ],
    })
}

/// Runs the scenario, then (unless `once`) waits for SIGTERM/SIGINT; a signal at any point stops
/// what was started so far and removes what was created, and the exit is then 0. What a crashed
/// earlier run left is removed first.
pub async fn run(once: bool, dir: PathBuf, shutdown: Shutdown) -> anyhow::Result<()> {
    let cgroup2 = preflight()?;
    let found = leftovers::find(&cgroup2);
    if !found.is_empty() {
        println!("removing what an earlier demo --ebpf left: {found}");
        tokio::task::block_in_place(|| leftovers::remove(&found));
    }
    let tag = format!("{TAG_PREFIX}{}", std::process::id());
    let mut net = Net {
        cgroup_root: cgroup2.join(format!("eastguard-{tag}")),
        bpffs: dir.join("bpffs"),
        tag,
        children: Vec::new(),
        agent: None,
        capture: None,
        binaries: Vec::new(),
    };
    let outcome = tokio::select! {
        r = async {
            setup(&net)?;
            scenario(&mut net, &dir).await
        } => r.map(Some),
        () = shutdown.requested() => Ok(None),
    };
    if matches!(outcome, Ok(Some(_))) && !once {
        println!(
            "\nrunning; press Ctrl-C (or send SIGTERM) to stop (capture is detached and the namespaces removed)"
        );
        shutdown.requested().await;
    }
    net.stop().await;
    match outcome? {
        Some(false) if once => bail!("demo expectations failed"),
        Some(_) => {}
        None => println!("stopped before the script finished; everything it created is removed"),
    }
    Ok(())
}

/// Starts the agent, pods and capture, runs the script and prints the table; `true` when every
/// expectation held.
async fn scenario(net: &mut Net, dir: &Path) -> anyhow::Result<bool> {
    println!("eastguard demo --ebpf — files in {}", dir.display());
    // Identity: the node agent, attesting each sidecar (root here) by executable path.
    let captured: Vec<&str> = PODS.iter().filter(|p| p.captured).map(|p| p.name).collect();
    let NodeAgent {
        socket: agent_socket,
        binaries,
        task: agent,
    } = start_agent(dir, 0, &captured)?;
    net.agent = Some(agent);
    net.binaries.clone_from(&binaries);
    let exe = std::env::current_exe().context("finding the eastguard binary")?;

    // Apps and sidecars, each in its pod's namespace and cgroup.
    let orders_app = vec![
        exe.to_string_lossy().into_owned(),
        "--log-level".into(),
        "warn".into(),
        "demo-app".into(),
        "--name".into(),
        "orders".into(),
        "--listen".into(),
        format!("[::]:{APP_PORT}"),
    ];
    let outsider_app = vec![
        exe.to_string_lossy().into_owned(),
        "--log-level".into(),
        "warn".into(),
        "demo-app".into(),
        "--name".into(),
        "outsider".into(),
        "--listen".into(),
        format!("[::]:{OUTSIDER_PORT}"),
    ];
    net.children.push(
        net.command("orders", Some("app"), &orders_app)
            .stdout(Stdio::null())
            .spawn()?,
    );
    net.children.push(
        net.command("outsider", None, &outsider_app)
            .stdout(Stdio::null())
            .spawn()?,
    );
    for (pod, bin) in PODS.iter().filter(|p| p.captured).zip(&binaries) {
        let config = sidecar_config(pod.name, dir, &agent_socket);
        let path = dir.join(format!("{}-sidecar.yaml", pod.name));
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        let log = std::fs::File::create(dir.join(format!("{}-sidecar.log", pod.name)))?;
        let args = vec![
            bin.to_string_lossy().into_owned(),
            "proxy".into(),
            "--config".into(),
            path.to_string_lossy().into_owned(),
        ];
        net.children.push(
            net.command(pod.name, Some("sidecar"), &args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
    }

    // Capture: the node agent's capture loop, from a registry file.
    let registry = dir.join("capture.yaml");
    let mut reg = String::from("pods:\n");
    for pod in PODS.iter().filter(|p| p.captured) {
        reg.push_str(&format!(
            "  - name: {tag}-{name}\n    cgroup: {cg}\n    sidecar_cgroup: {scg}\n    netns: /run/netns/{ns}\n    status_file: {status}\n",
            tag = net.tag,
            name = pod.name,
            cg = net.cgroup(pod.name, None).display(),
            scg = net.cgroup(pod.name, Some("sidecar")).display(),
            ns = net.ns(pod.name),
            status = dir.join(format!("{}.capture", pod.name)).display(),
        ));
    }
    std::fs::write(&registry, reg)?;
    let (cap_stop, cap_stopped) = tokio::sync::oneshot::channel::<()>();
    let capture = tokio::spawn(crate::capture_cmd::run(
        crate::capture_cmd::CaptureOptions {
            source: crate::capture_cmd::Source::File(registry.clone()),
            bpffs: net.bpffs.clone(),
            admin: None,
            poll: Duration::from_millis(200),
        },
        async move {
            let _ = cap_stopped.await;
        },
    ));
    net.capture = Some(Capture {
        registry: registry.clone(),
        task: Task {
            stop: cap_stop,
            handle: capture,
        },
    });
    println!(
        "node agent: Workload API unix://{}, capture registry {}",
        agent_socket.display(),
        registry.display()
    );

    // Ready: each sidecar's /ready turns 200 only once it holds an SVID and its capture is attached.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for pod in PODS.iter().filter(|p| p.captured) {
        loop {
            let (ok, out) = net
                .curl(pod.name, None, "http://127.0.0.1:15000/ready")
                .await;
            if ok && out.starts_with("LIVE") {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{}'s sidecar did not become ready ({out}); see {}-sidecar.log in {}",
                    pod.name,
                    pod.name,
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("{:>9} sidecar ready, capture attached", pod.name);
    }

    let hops = script(net).await;
    print_table(&hops);
    let all_ok = hops.iter().all(|h| h.ok);
    if all_ok {
        println!(
            "\nall {} expectations held: unmodified curl calls to pod IPs went through both sidecars over mTLS, and nothing got around them (apps cannot open raw sockets either)",
            hops.len()
        );
    } else {
        println!("\nSOME EXPECTATIONS FAILED (logs in {})", dir.display());
    }
    Ok(all_ok)
}

async fn script(net: &Net) -> Vec<Hop> {
    let orders = &PODS[1];
    let outsider = &PODS[2];
    let frontend_id = spiffe_id("frontend");
    let mut hops = Vec::new();
    for (family, ip) in [
        ("HTTP/1.1 IPv4", v4(orders.n)),
        ("HTTP/1.1 IPv6", v6(orders.n)),
    ] {
        let url = match ip {
            IpAddr::V4(a) => format!("http://{a}:{APP_PORT}/orders/42"),
            IpAddr::V6(a) => format!("http://[{a}]:{APP_PORT}/orders/42"),
        };
        let (ok, out) = net.curl("frontend", Some("app"), &url).await;
        let seen: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let caller = seen["caller"].as_str().unwrap_or("").to_owned();
        hops.push(Hop {
            caller: if caller.is_empty() {
                "-".into()
            } else {
                caller.clone()
            },
            callee: format!("orders ({ip})"),
            protocol: family,
            status: if ok {
                "200".into()
            } else {
                format!("failed: {out}")
            },
            mtls: if caller == frontend_id.as_str() {
                "yes".into()
            } else {
                "NO".into()
            },
            ok: ok && caller == frontend_id.as_str(),
            expectation: "allowed, via both sidecars",
        });
    }
    // No sidecar: steered to orders' sidecar, which wants mTLS (STRICT) and refuses.
    hops.push(
        refused(
            net,
            ("outsider", None),
            &format!("http://{}:{APP_PORT}/orders/42", v4(orders.n)),
            "(no sidecar: outsider)".into(),
            format!("orders ({})", v4(orders.n)),
            ("HTTP/1.1 plaintext", "refused by orders' sidecar"),
        )
        .await,
    );
    // Frontend's app straight to a pod without capture: redirected to its own sidecar, which has
    // no route there; nothing leaves around it.
    hops.push(
        refused(
            net,
            ("frontend", Some("app")),
            &format!("http://{}:{OUTSIDER_PORT}/", v4(outsider.n)),
            frontend_id.as_str().to_owned(),
            format!("outsider ({})", v4(outsider.n)),
            ("HTTP/1.1 direct", "no way around the sidecar"),
        )
        .await,
    );
    // Below the capture hooks: an app cannot open a raw packet socket (no CAP_NET_RAW).
    let exe = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "eastguard".into());
    let probe = net
        .command("frontend", Some("app"), &[exe, "demo-raw-socket".into()])
        .output()
        .await;
    let (ok, said) = match probe {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        ),
        Err(e) => (false, e.to_string()),
    };
    hops.push(Hop {
        caller: frontend_id.as_str().to_owned(),
        callee: "AF_PACKET raw socket".into(),
        protocol: "raw",
        status: if said.is_empty() { "-".into() } else { said },
        mtls: "-".into(),
        ok,
        expectation: "no raw sockets in apps",
    });
    hops
}

/// A call that must not get through: the row holds when curl fails.
async fn refused(
    net: &Net,
    (pod, part): (&str, Option<&str>),
    url: &str,
    caller: String,
    callee: String,
    (protocol, expectation): (&'static str, &'static str),
) -> Hop {
    let (ok, out) = net.curl(pod, part, url).await;
    Hop {
        caller,
        callee,
        protocol,
        status: if ok {
            format!("200 {out}")
        } else {
            "refused".into()
        },
        mtls: "-".into(),
        ok: !ok,
        expectation,
    }
}
