//! `eastguard policy translate | check`: offline tools over Istio AuthorizationPolicy files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use policy::istio::{self, Target};

/// Exit code of `policy check` for a denied request.
const EXIT_DENY: u8 = 3;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Least privilege from traffic: Istio AuthorizationPolicies (YAML) that allow exactly the
    /// calls a control plane's inventory observed, per workload and verified caller.
    Suggest {
        /// The control plane's `--http-address`.
        #[arg(long, default_value = "127.0.0.1:15014")]
        control_plane: String,
        /// Only calls seen in the last this many hours (default: everything kept).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=87_600))]
        window_hours: Option<u64>,
        /// Write here instead of standard output.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// ALLOW rules of the policies in force that admitted none of the observed calls
    /// (over-permissive); exit 3 if there is any.
    Unused {
        #[arg(long, default_value = "127.0.0.1:15014")]
        control_plane: String,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=87_600))]
        window_hours: Option<u64>,
    },
    /// Print the Envoy RBAC filters istiod would generate for a workload (YAML, proto3 JSON form).
    Translate {
        #[command(flatten)]
        workload: Workload,
        /// Generate network (TCP) filters instead of HTTP filters.
        #[arg(long)]
        tcp: bool,
        /// Istio YAML files (multi-document), or `-` for standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the mTLS mode PeerAuthentications give a workload (istiod's precedence), per port.
    Mtls {
        #[command(flatten)]
        workload: Workload,
        /// Istio YAML files (multi-document), or `-` for standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Decide one request: prints the decision and the deciding policy; exit 0 allow, 3 deny.
    Check {
        /// A directory of Istio YAML files (every *.yaml / *.yml in it).
        #[arg(long)]
        policies: PathBuf,
        #[command(flatten)]
        workload: Workload,
        /// The caller's SPIFFE ID (omit for a caller without a client certificate).
        #[arg(long)]
        principal: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Extra request headers, `name=value`.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

#[derive(Args)]
pub struct Workload {
    /// The workload's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The workload's labels, `k=v,k2=v2`.
    #[arg(long, default_value = "")]
    workload_labels: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long = "trust-domain-alias")]
    trust_domain_aliases: Vec<String>,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

impl Workload {
    fn target(&self) -> anyhow::Result<Target> {
        let mut labels = BTreeMap::new();
        for kv in self.workload_labels.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--workload-labels: {kv:?} is not k=v"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Ok(Target {
            namespace: self.namespace.clone(),
            labels,
            root_namespace: self.root_namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            trust_domain_aliases: self.trust_domain_aliases.clone(),
        })
    }
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Suggest {
            control_plane,
            window_hours,
            file,
        } => {
            let q = window_hours.map_or(String::new(), |h| format!("?window_hours={h}"));
            let yaml =
                crate::apis_cmd::http_get(&control_plane, &format!("/apis/policy/suggest{q}"))?;
            match file {
                Some(f) => std::fs::write(&f, &yaml).with_context(|| f.display().to_string())?,
                None => print!("{yaml}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Unused {
            control_plane,
            window_hours,
        } => {
            let q = window_hours.map_or(String::new(), |h| format!("?window_hours={h}"));
            let body =
                crate::apis_cmd::http_get(&control_plane, &format!("/apis/policy/unused{q}"))?;
            let rules: Vec<serde_json::Value> =
                serde_json::from_str(&body).context("the control plane's answer is not JSON")?;
            for r in &rules {
                println!(
                    "{}  {}  admitted no observed call",
                    r["workload"].as_str().unwrap_or("?"),
                    r["rule"].as_str().unwrap_or("?")
                );
            }
            Ok(if rules.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENY)
            })
        }
        PolicyCommand::Translate {
            workload,
            tcp,
            files,
        } => {
            let policies = read_policies(&files)?;
            let filters = istio::translate(&policies, &workload.target()?, tcp)?;
            print!(
                "{}",
                serde_yaml::to_string(&serde_json::to_value(&filters)?)?
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Mtls { workload, files } => {
            let mut all = Vec::new();
            for f in &files {
                all.extend(
                    istio::peer_authn::parse(&read_text(f)?)
                        .with_context(|| f.display().to_string())?,
                );
            }
            let settings = istio::peer_authn::effective(&all, &workload.target()?);
            print!(
                "{}",
                serde_yaml::to_string(&serde_json::to_value(&settings)?)?
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check {
            policies,
            workload,
            principal,
            method,
            path,
            host,
            port,
            headers,
        } => {
            let files = yaml_files(&policies)?;
            let parsed = read_policies(&files)?;
            let filters = istio::translate(&parsed, &workload.target()?, false)?;
            let engine = policy::Engine::compile(&filters)?;
            let normalized = policy::path::normalize(&path)
                .map_err(|e| anyhow::anyhow!("--path {path:?}: {e}"))?;
            let authority = policy::path::normalize_authority(&host);
            let full_path = normalized.path_and_query();
            let extra: Vec<(String, String)> = headers
                .iter()
                .map(|h| {
                    h.split_once('=')
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
                        .with_context(|| format!("--header {h:?} is not name=value"))
                })
                .collect::<anyhow::Result<_>>()?;
            let mut hs: Vec<(&str, &[u8])> = vec![
                (":authority", authority.as_bytes()),
                (":method", method.as_bytes()),
                (":path", full_path.as_bytes()),
                (":scheme", b"http"),
            ];
            hs.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
            let without_params = normalized.without_params();
            let decision = engine.evaluate(&policy::Request {
                principal: principal.as_deref(),
                path: &normalized.path,
                path_without_params: without_params.as_deref(),
                headers: &hs,
                destination_port: port,
                ..Default::default()
            });
            let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
            let by = match (&decision.policy, decision.allowed) {
                (Some(p), _) => format!("policy {p}"),
                (None, true) => "no policy applies".to_owned(),
                (None, false) => "no ALLOW policy matched".to_owned(),
            };
            println!("{verdict} ({by})");
            if let Some((allowed, p)) = &decision.shadow {
                println!(
                    "dry-run: {} ({})",
                    if *allowed { "ALLOW" } else { "DENY" },
                    p.as_deref().unwrap_or("-")
                );
            }
            Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENY)
            })
        }
    }
}

fn read_policies(files: &[PathBuf]) -> anyhow::Result<Vec<istio::AuthorizationPolicy>> {
    let mut all = Vec::new();
    for f in files {
        all.extend(istio::parse(&read_text(f)?).with_context(|| f.display().to_string())?);
    }
    Ok(all)
}

fn read_text(f: &Path) -> anyhow::Result<String> {
    if f.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")
    } else {
        std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
    }
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.yaml files in {}", dir.display());
    }
    Ok(files)
}
