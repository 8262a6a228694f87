//! `eastguard proxy`, and the whole of the `eastguard-sidecar` binary: the same flags and the same
//! run, so a sidecar can be a program that holds nothing else (it pages in less code: see
//! benches/RESULTS.md, "Where a sidecar's memory goes").

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// The config file.
    #[arg(
        long,
        short,
        required_unless_present = "config_env",
        conflicts_with = "config_env"
    )]
    pub config: Option<PathBuf>,
    /// The config in this environment variable instead (what the injection webhook writes);
    /// `${NAME}` in its string values is filled from the environment (POD_NAME, INSTANCE_IP …).
    #[arg(long, value_name = "VAR")]
    pub config_env: Option<String>,
    /// Check the config and exit without starting.
    #[arg(long)]
    pub check: bool,
    /// Take listeners, routes, clusters and endpoints from this ADS server (`host:port`),
    /// in addition to the file's static ones (overrides the file's `xds.address`).
    #[arg(long)]
    pub xds: Option<String>,
    /// Data-plane worker threads (Envoy's `--concurrency`; Istio runs sidecars with 2), each
    /// serving its connections start to end on its own single-threaded runtime. Default: one
    /// per CPU.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: Option<u16>,
}

/// The runtime `run` takes: xDS, SDS, admin, stats export and the accept loops, on one thread;
/// connections are served on the data-plane workers `run` starts.
pub fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("eastguard-control")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the sidecar on `runtime` until SIGTERM or SIGINT (then drains), or checks its config.
pub fn run(
    args: ProxyArgs,
    runtime: &tokio::runtime::Runtime,
    log_control: proxy::LogControl,
) -> anyhow::Result<std::process::ExitCode> {
    let ProxyArgs {
        config,
        config_env,
        check,
        xds,
        concurrency,
    } = args;
    let (mut bootstrap, source) = match (config, config_env) {
        (Some(path), _) => (
            proxy::Bootstrap::from_file(&path)
                .with_context(|| format!("refusing to start with config {}", path.display()))?,
            path.display().to_string(),
        ),
        (None, Some(var)) => (
            proxy::Bootstrap::from_env_var(&var, |n| std::env::var(n).ok())
                .with_context(|| format!("refusing to start with the config in ${var}"))?,
            format!("${var}"),
        ),
        (None, None) => anyhow::bail!("--config or --config-env is needed"),
    };
    if let Some(address) = xds {
        match &mut bootstrap.xds {
            Some(x) => x.address = address,
            None => {
                bootstrap.xds = Some(proxy::config::XdsConfig {
                    address,
                    control_plane_ids: Vec::new(),
                    server_name: "istiod.istio-system.svc".into(),
                    delta: false,
                });
            }
        }
    }
    if check {
        println!("{source}: OK");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let workers = concurrency.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        usize::from,
    );
    proxy::workers::start(workers).context("starting the data-plane workers")?;
    let opts = proxy::RunOptions {
        log_control: Some(log_control),
        command_line: std::env::args().collect(),
        authz_hook: None,
    };
    let shutdown = {
        let _in_runtime = runtime.enter();
        crate::lifecycle::Shutdown::listen()?
    };
    runtime.block_on(proxy::run(bootstrap, shutdown.requested(), opts))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Logs to stderr; returns the switch `/logging` uses to change the level at run time.
pub fn init_logging(level: &str) -> anyhow::Result<proxy::LogControl> {
    let filter = EnvFilter::try_new(level).with_context(|| format!("bad --log-level {level:?}"))?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    Ok(Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level)?;
        Ok(handle.reload(f)?)
    }))
}

/// An error with its causes, each said once.
pub fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
