//! `eastguard-sidecar`: the sidecar proxy alone, with `eastguard proxy`'s flags. The one
//! `eastguard` binary also holds the control plane, the node agent and the demo; a sidecar run
//! from this one pages in less code (benches/RESULTS.md, "Where a sidecar's memory goes").

use clap::Parser;

#[path = "../lifecycle.rs"]
#[allow(
    dead_code,
    reason = "the child-process helpers serve the demo, not the sidecar"
)]
mod lifecycle;
#[path = "../proxy_cmd.rs"]
mod proxy_cmd;

#[derive(Parser)]
#[command(
    name = "eastguard-sidecar",
    version,
    about = "eastguard's sidecar proxy alone (the flags of `eastguard proxy`)"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `eastguard_proxy=debug`).
    #[arg(long, default_value = "info", env = "EASTGUARD_LOG")]
    log_level: String,
    #[command(flatten)]
    proxy: proxy_cmd::ProxyArgs,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", proxy_cmd::describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<std::process::ExitCode> {
    if let lifecycle::Parent::Gone(pid) = lifecycle::follow_parent()? {
        eprintln!(
            "eastguard-sidecar: the process that started this one ({pid}) is gone; not starting"
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let cli = Cli::parse();
    let log_control = proxy_cmd::init_logging(&cli.log_level)?;
    let runtime = proxy_cmd::control_runtime()?;
    proxy_cmd::run(cli.proxy, &runtime, log_control)
}
