//! `eastguard apis list | diff | export`: the API inventory of a running control plane (its
//! `--http-address`), as a table, as JSON, or as an OpenAPI 3.1 document per service.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};

/// Exit code of `apis diff` when an operation is not documented as it is used.
const EXIT_DIFF: u8 = 3;
/// Largest response read.
const MAX_RESPONSE: u64 = 256 * 1024 * 1024;

#[derive(Subcommand)]
pub enum ApisCommand {
    /// Every operation: service, method, template, status, calls, callers, owner.
    List {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        filter: Filter,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Operations that are not as their spec says (shadow, zombie, drift, unused): exit 3 if any.
    Diff {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        filter: Filter,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// A service's observed operations as an OpenAPI 3.1 document (JSON, or YAML for a .yaml file).
    Export {
        #[command(flatten)]
        source: Source,
        /// The service host (`orders.shop.svc.cluster.local`).
        #[arg(long)]
        service: String,
        /// Write here instead of standard output.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct Source {
    /// The control plane's `--http-address`.
    #[arg(long, default_value = "127.0.0.1:15014")]
    control_plane: String,
}

#[derive(Args)]
pub struct Filter {
    /// Only this service host.
    #[arg(long)]
    service: Option<String>,
    /// Only operations of this status.
    #[arg(long, value_parser = ["documented", "shadow", "zombie", "unused", "drift"])]
    status: Option<String>,
    /// Only services of this owner (`none`: orphans).
    #[arg(long)]
    owner: Option<String>,
    /// Only operations this SPIFFE ID called.
    #[arg(long)]
    caller: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn get(source: &Source, path: &str) -> anyhow::Result<String> {
    http_get(&source.control_plane, path)
}

/// GET `path` from the control plane's HTTP address; the body of a 200, an error naming the
/// status otherwise.
pub fn http_get(control_plane: &str, path: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = control_plane
        .to_socket_addrs()
        .with_context(|| format!("--control-plane {control_plane}"))?
        .next()
        .with_context(|| format!("--control-plane {control_plane}: no address"))?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
        format!(
            "cannot reach the control plane at {addr} (is it running with --http-address {addr}?)"
        )
    })?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    tcp.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path}: HTTP {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}

fn view(source: &Source, filter: &Filter) -> anyhow::Result<serde_json::Value> {
    let mut q = Vec::new();
    for (k, v) in [
        ("service", &filter.service),
        ("status", &filter.status),
        ("owner", &filter.owner),
        ("caller", &filter.caller),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", encode(v)));
        }
    }
    let body = get(source, &format!("/apis?{}", q.join("&")))?;
    serde_json::from_str(&body).context("the control plane's /apis is not JSON")
}

fn print_table(ops: &[&serde_json::Value]) {
    println!(
        "{:<36} {:<7} {:<32} {:<10} {:>7} {:>6}  {:<12} CALLERS",
        "SERVICE", "METHOD", "TEMPLATE", "STATUS", "CALLS", "DENIED", "OWNER"
    );
    for op in ops {
        let s = |k: &str| op[k].as_str().unwrap_or("-").to_owned();
        let callers: Vec<String> = op["callers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{} ({})",
                    c["id"].as_str().unwrap_or("?"),
                    c["calls"].as_u64().unwrap_or(0)
                )
            })
            .collect();
        let mut status = s("status");
        if let Some(d) = op["drift"].as_array() {
            let d: Vec<&str> = d.iter().filter_map(|x| x.as_str()).collect();
            status = format!("{status} ({})", d.join(", "));
        }
        println!(
            "{:<36} {:<7} {:<32} {:<10} {:>7} {:>6}  {:<12} {}",
            s("service"),
            s("method"),
            s("template"),
            status,
            op["calls"].as_u64().unwrap_or(0),
            op["denied"].as_u64().unwrap_or(0),
            op["owner"].as_str().unwrap_or("(orphan)"),
            callers.join(", ")
        );
    }
}

fn show(
    view: &serde_json::Value,
    ops: Vec<&serde_json::Value>,
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&ops)?),
        Output::Table => {
            print_table(&ops);
            for (file, e) in view["spec_errors"].as_object().into_iter().flatten() {
                eprintln!("spec {file} refused: {}", e.as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

pub fn run(cmd: ApisCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ApisCommand::List {
            source,
            filter,
            output,
        } => {
            let v = view(&source, &filter)?;
            let ops: Vec<&serde_json::Value> =
                v["operations"].as_array().into_iter().flatten().collect();
            show(&v, ops, output)?;
            Ok(ExitCode::SUCCESS)
        }
        ApisCommand::Diff {
            source,
            filter,
            output,
        } => {
            let v = view(&source, &filter)?;
            let ops: Vec<&serde_json::Value> = v["operations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| o["status"] != "documented")
                .collect();
            let differ = !ops.is_empty();
            show(&v, ops, output)?;
            Ok(if differ {
                ExitCode::from(EXIT_DIFF)
            } else {
                ExitCode::SUCCESS
            })
        }
        ApisCommand::Export {
            source,
            service,
            file,
        } => {
            let body = get(
                &source,
                &format!("/apis/openapi?service={}", encode(&service)),
            )?;
            let doc: serde_json::Value = serde_json::from_str(&body).context("not JSON")?;
            let text = match &file {
                Some(f) if f.extension().is_some_and(|e| e == "yaml" || e == "yml") => {
                    serde_yaml::to_string(&doc)?
                }
                _ => serde_json::to_string_pretty(&doc)? + "\n",
            };
            match file {
                Some(f) => std::fs::write(&f, text).with_context(|| format!("{}", f.display()))?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
