//! Sensitive-data sampling: a share of inbound HTTP calls (`inventory.sensitive.sample_rate`) is
//! copied — query, headers (never `authorization` or cookies), and the first
//! `inventory.sensitive.body_bytes` of each body — while it flows, without delaying or altering
//! it. When the call ends the copy goes to a classifier thread over a bounded queue (full: the
//! copy is dropped and counted); findings (type, place, count — never a value) join the call's
//! operation in the inventory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::stats::Stat;

/// The first bytes of one body.
#[derive(Debug, Default)]
pub struct Tee {
    chunks: Vec<Bytes>,
    len: usize,
    cap: usize,
    pub truncated: bool,
}

impl Tee {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Default::default()
        }
    }

    /// Keeps what fits of `d` (a cheap slice of the frame, not a copy).
    pub fn push(&mut self, d: &Bytes) {
        let take = (self.cap - self.len).min(d.len());
        if take > 0 {
            self.chunks.push(d.slice(..take));
            self.len += take;
        }
        if take < d.len() {
            self.truncated = true;
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for c in &self.chunks {
            v.extend_from_slice(c);
        }
        v
    }
}

/// Headers whose values are credentials: never copied.
const NOT_COPIED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

fn copy_headers(h: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .filter(|(n, _)| !NOT_COPIED.contains(&n.as_str()))
        .take(64)
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn encoded(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// A sampled call's copy.
#[derive(Debug)]
pub struct SampleCopy {
    query: Option<String>,
    request_headers: Vec<(String, Vec<u8>)>,
    request_encoded: bool,
    /// Filled by the request body as the upstream reads it.
    pub request: Arc<Mutex<Tee>>,
    response_headers: Vec<(String, Vec<u8>)>,
    response_encoded: bool,
    /// Filled by the response body as the client reads it.
    pub response: Tee,
}

impl SampleCopy {
    pub fn of_request<B>(req: &http::Request<B>, cap: usize) -> Self {
        Self {
            query: req.uri().query().map(str::to_owned),
            request_headers: copy_headers(req.headers()),
            request_encoded: encoded(req.headers()),
            request: Arc::new(Mutex::new(Tee::new(cap))),
            response_headers: Vec::new(),
            response_encoded: false,
            response: Tee::new(cap),
        }
    }

    pub fn response_head(&mut self, h: &http::HeaderMap) {
        self.response_headers = copy_headers(h);
        self.response_encoded = encoded(h);
    }
}

fn body<'a>(
    bytes: &'a [u8],
    media: Option<&'a str>,
    encoded: bool,
    truncated: bool,
) -> Option<apisec::sensitive::Body<'a>> {
    (!bytes.is_empty()).then_some(apisec::sensitive::Body {
        bytes,
        media_type: media,
        encoded,
        truncated,
    })
}

fn view(h: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    h.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect()
}

/// One ended call to classify.
pub struct Job {
    pub service: String,
    pub method: String,
    pub path: String,
    pub request_type: Option<String>,
    pub response_type: Option<String>,
    pub copy: Box<SampleCopy>,
}

/// The sampler and the queue to the classifier thread.
#[derive(Debug)]
pub struct Sensitive {
    /// Calls sampled per million.
    per_million: u64,
    seen: AtomicU64,
    pub body_bytes: usize,
    tx: SyncSender<Job>,
    dropped: Stat,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("path", &self.path).finish()
    }
}

impl Sensitive {
    /// Starts the classifier thread, which adds findings to `inventory`.
    pub fn start(
        config: &crate::config::SensitiveConfig,
        classifier: apisec::sensitive::Classifier,
        inventory: Arc<Mutex<apisec::Inventory>>,
        stats: &crate::stats::EnvoyStats,
        audit: crate::audit::Audit,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(config.max_queue);
        let classified = stats.stat("inventory.sensitive_classified");
        let unclassified = stats.stat("inventory.sensitive_unclassified");
        std::thread::Builder::new()
            .name("eastguard-classify".into())
            .spawn(move || {
                // Ends when the last sender (the telemetry) is gone.
                for job in rx {
                    let request_body = job.copy.request.lock().map(|t| (t.bytes(), t.truncated));
                    let request_body = request_body.unwrap_or_default();
                    let response_body = job.copy.response.bytes();
                    let (rq, rs) = (
                        view(&job.copy.request_headers),
                        view(&job.copy.response_headers),
                    );
                    let report = classifier.classify(&apisec::sensitive::Sample {
                        query: job.copy.query.as_deref(),
                        request_headers: &rq,
                        request_body: body(
                            &request_body.0,
                            job.request_type.as_deref(),
                            job.copy.request_encoded,
                            request_body.1,
                        ),
                        response_headers: &rs,
                        response_body: body(
                            &response_body,
                            job.response_type.as_deref(),
                            job.copy.response_encoded,
                            job.copy.response.truncated,
                        ),
                    });
                    classified.inc();
                    unclassified.add(u64::from(report.unclassified));
                    let new = inventory
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add_sensitive(&job.service, &job.method, &job.path, &report);
                    for n in new {
                        audit.sensitive_data(
                            &job.service,
                            &job.method,
                            &n.template,
                            &n.data_type,
                            &n.location,
                            n.direction == apisec::sensitive::Direction::Response,
                        );
                    }
                }
            })?;
        Ok(Self {
            per_million: (config.sample_rate * 1_000_000.0).round() as u64,
            seen: AtomicU64::new(0),
            body_bytes: config.body_bytes,
            tx,
            dropped: stats.stat("inventory.sensitive_dropped"),
        })
    }

    /// Whether this call is sampled: exactly `sample_rate` of calls, evenly spread.
    pub fn sample(&self) -> bool {
        if self.per_million == 0 {
            return false;
        }
        let n = u128::from(self.seen.fetch_add(1, Ordering::Relaxed));
        let p = u128::from(self.per_million);
        (n + 1) * p / 1_000_000 > n * p / 1_000_000
    }

    /// Hands an ended call's copy to the classifier, or drops it if the queue is full.
    pub fn submit(&self, job: Job) {
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tee_keeps_the_first_bytes_and_says_it_cut() {
        let mut t = Tee::new(5);
        t.push(&Bytes::from_static(b"abc"));
        assert!(!t.truncated);
        t.push(&Bytes::from_static(b"defg"));
        t.push(&Bytes::from_static(b"h"));
        assert_eq!(t.bytes(), b"abcde");
        assert!(t.truncated);
    }

    #[test]
    fn the_sampler_takes_exactly_its_share() {
        let stats = crate::stats::EnvoyStats::default();
        let inv = Arc::new(Mutex::new(apisec::Inventory::new(Default::default())));
        for (rate, want) in [(0.0, 0), (0.01, 10), (0.25, 250), (1.0, 1000)] {
            let config = crate::config::SensitiveConfig {
                sample_rate: rate,
                ..Default::default()
            };
            let audit = crate::audit::Audit::off(stats.stat("audit.dropped"));
            let s =
                Sensitive::start(&config, Default::default(), inv.clone(), &stats, audit).unwrap();
            assert_eq!((0..1000).filter(|_| s.sample()).count(), want, "{rate}");
        }
    }
}
