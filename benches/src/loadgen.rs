//! Fixed-rate HTTP/1.1 load generator (fortio's and wrk2's method) and a fixed-size upstream.
//!
//! `loadgen run`: `connections` keep-alive connections share the target rate; each request has a
//! scheduled send time, and its latency is measured from that time, so a stalled server is charged
//! for the requests it delayed (no coordinated omission). Prints JSON with percentiles.
//! `loadgen serve`: an HTTP/1.1 server answering every request with `size` bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send GETs at a fixed rate and print latency percentiles as JSON.
    Run {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "server")]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// Seconds of measured load (after a 2 s warm-up that is not recorded).
        #[arg(long, default_value_t = 20)]
        duration: u64,
    },
    /// Connection setup: `workers` loops of connect, one GET, read the response, close, for
    /// `duration` seconds (closed loop). Prints connections per second and per-connection latency.
    Connrate {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "server")]
        host: String,
        #[arg(long, default_value_t = 4)]
        workers: u32,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Throughput: `connections` keep-alive connections fetch back to back for `duration`
    /// seconds (closed loop). Prints body megabytes per second.
    Throughput {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "server")]
        host: String,
        #[arg(long, default_value_t = 4)]
        connections: u32,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Answer every request with `size` bytes.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run {
            target,
            host,
            path,
            rate,
            connections,
            duration,
        } => rt.block_on(run(
            target,
            host,
            path,
            rate,
            connections,
            Duration::from_secs(duration),
        )),
        Command::Connrate {
            target,
            host,
            workers,
            duration,
        } => rt.block_on(connrate(
            target,
            host,
            workers,
            Duration::from_secs(duration),
        )),
        Command::Throughput {
            target,
            host,
            connections,
            duration,
        } => rt.block_on(throughput(
            target,
            host,
            connections,
            Duration::from_secs(duration),
        )),
        Command::Serve { listen, size } => rt.block_on(serve(listen, size)),
    }
}

async fn serve(listen: SocketAddr, size: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let body = Bytes::from(vec![b'x'; size]);
    println!("serving {size} bytes on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

struct ConnResult {
    latencies_us: Vec<u64>,
    errors: u64,
}

async fn run(
    target: SocketAddr,
    host: String,
    path: String,
    rate: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<()> {
    if rate == 0 || connections == 0 {
        bail!("rate and connections must be positive");
    }
    let warmup = Duration::from_secs(2);
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for i in 0..connections {
        let (host, path) = (host.clone(), path.clone());
        // Stagger the connections evenly across one interval.
        let offset = interval.mul_f64(i as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            one_connection(
                target,
                host,
                path,
                start + offset,
                interval,
                warmup,
                duration,
            )
            .await
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let r = t.await??;
        all.extend(r.latencies_us);
        errors += r.errors;
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let idx = ((p / 100.0) * (all.len() - 1) as f64).round() as usize;
        all[idx] as f64 / 1000.0
    };
    let out = serde_json::json!({
        "target": target.to_string(),
        "rate": rate,
        "connections": connections,
        "duration_s": duration.as_secs(),
        "requests": all.len(),
        "errors": errors,
        "achieved_rps": all.len() as f64 / duration.as_secs_f64(),
        "p50_ms": pct(50.0),
        "p90_ms": pct(90.0),
        "p99_ms": pct(99.0),
        "max_ms": pct(100.0),
    });
    println!("{out}");
    Ok(())
}

async fn one_connection(
    target: SocketAddr,
    host: String,
    path: String,
    first: Instant,
    interval: Duration,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<ConnResult> {
    let measure_from = first + warmup;
    let end = measure_from + duration;
    let mut sender = None;
    let mut result = ConnResult {
        latencies_us: Vec::new(),
        errors: 0,
    };
    let mut scheduled = first;
    // When the previous response on this connection arrived: a later one than `scheduled` means
    // the request is late because the server was slow (counted, fortio's and wrk2's correction
    // for coordinated omission); otherwise any lateness is this generator's timer (tokio's wheel
    // wakes up to ~1 ms late) and is not the server's.
    let mut previous_done = first;
    while scheduled < end {
        tokio::time::sleep_until(scheduled).await;
        let origin = if previous_done > scheduled {
            scheduled
        } else {
            Instant::now()
        };
        if sender.is_none() {
            let tcp = TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender = Some(s);
        }
        let Some(s) = sender.as_mut() else { continue };
        let req = http::Request::get(path.as_str())
            .header("host", host.as_str())
            .body(Empty::<Bytes>::new())?;
        let ok = match s.send_request(req).await {
            Ok(resp) => resp.status().is_success() && resp.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        previous_done = Instant::now();
        if scheduled >= measure_from {
            if ok {
                result
                    .latencies_us
                    .push(previous_done.duration_since(origin).as_micros() as u64);
            } else {
                result.errors += 1;
            }
        }
        if !ok {
            sender = None;
        }
        scheduled += interval;
    }
    Ok(result)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx] as f64 / 1000.0
}

/// One connection, one request, closed.
async fn fetch_once(target: SocketAddr, host: &str) -> anyhow::Result<usize> {
    let tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .header("connection", "close")
        .body(Empty::<Bytes>::new())?;
    let resp = s.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let n = resp.into_body().collect().await?.to_bytes().len();
    drop(s);
    let _ = conn.await;
    Ok(n)
}

async fn connrate(
    target: SocketAddr,
    host: String,
    workers: u32,
    duration: Duration,
) -> anyhow::Result<()> {
    if workers == 0 {
        bail!("workers must be positive");
    }
    // One second of warm-up, then the measured window.
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                let ok = tokio::time::timeout(Duration::from_secs(5), fetch_once(target, &host))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if t0 >= start {
                    if ok {
                        lat.push(t0.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let out = serde_json::json!({
        "target": target.to_string(),
        "workers": workers,
        "duration_s": duration.as_secs(),
        "connections": all.len(),
        "errors": errors,
        "connections_per_s": all.len() as f64 / duration.as_secs_f64(),
        "p50_ms": percentile(&all, 50.0),
        "p99_ms": percentile(&all, 99.0),
    });
    println!("{out}");
    Ok(())
}

async fn throughput(
    target: SocketAddr,
    host: String,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<()> {
    if connections == 0 {
        bail!("connections must be positive");
    }
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let mut bytes = 0u64;
            let mut requests = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                let req = http::Request::get("/")
                    .header("host", host.as_str())
                    .body(Empty::<Bytes>::new())?;
                let resp = s.send_request(req).await?;
                if !resp.status().is_success() {
                    bail!("throughput: status {}", resp.status());
                }
                let n = resp.into_body().collect().await?.to_bytes().len() as u64;
                if t0 >= start {
                    bytes += n;
                    requests += 1;
                }
            }
            anyhow::Ok((bytes, requests))
        }));
    }
    let (mut bytes, mut requests) = (0u64, 0u64);
    for t in tasks {
        let (b, r) = t.await??;
        bytes += b;
        requests += r;
    }
    let out = serde_json::json!({
        "target": target.to_string(),
        "connections": connections,
        "duration_s": duration.as_secs(),
        "requests": requests,
        "mbytes_per_s": bytes as f64 / 1e6 / duration.as_secs_f64(),
    });
    println!("{out}");
    Ok(())
}
