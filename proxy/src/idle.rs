//! Idle timeouts (DESIGN §5): a stream whose body makes no progress for `stream_idle_timeout` is
//! reset, and a connection with no request in flight and no bytes moved for
//! `connection_idle_timeout` is closed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{Body, BoxError};

#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout ({0:?} without body progress)")]
pub struct StreamIdle(Duration);

/// A body that fails if no frame arrives for `timeout` while it is being read.
pub struct StreamIdleTimeout {
    inner: Body,
    timeout: Duration,
    /// Armed the first time the body has nothing to give, so a body read without waiting (most
    /// are) never touches the timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl StreamIdleTimeout {
    pub fn wrap(inner: Body, timeout: Duration) -> Body {
        // Nothing to wait for in a body that has ended (a request without one).
        if timeout.is_zero() || http_body::Body::is_end_stream(&inner) {
            return inner;
        }
        http_body_util::BodyExt::boxed_unsync(Self {
            inner,
            timeout,
            sleep: None,
        })
    }
}

impl http_body::Body for StreamIdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            let deadline = Instant::now() + self.timeout;
            if let Some(sleep) = self.sleep.as_mut() {
                sleep.as_mut().reset(deadline);
            }
            return Poll::Ready(frame);
        }
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(StreamIdle(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a connection's idle check reads: when bytes last moved, and requests in flight.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    pub inflight: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since bytes last moved, if no request is in flight.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.base.elapsed().saturating_sub(last))
    }

    /// Resolves once the connection has been idle for `timeout` (never, if `timeout` is zero).
    pub async fn idle(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        let check = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        loop {
            tokio::time::sleep(check).await;
            if self.idle_for().is_some_and(|d| d >= timeout) {
                return;
            }
        }
    }
}

/// Counts a request as in flight until dropped.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn new(activity: &Arc<Activity>) -> Self {
        activity.inflight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// An IO that records when bytes last moved.
pub struct ActivityIo<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> ActivityIo<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        activity.touch();
        Self { inner, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ActivityIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ActivityIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test(start_paused = true)]
    async fn stalled_body_fails_after_the_idle_timeout() {
        let (mut tx, rx) = futures_channel();
        let body = StreamIdleTimeout::wrap(rx, Duration::from_secs(300));
        let reader = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        tx.send(Bytes::from_static(b"a")).await;
        tokio::time::sleep(Duration::from_secs(299)).await;
        tx.send(Bytes::from_static(b"b")).await; // progress resets the clock
        tokio::time::sleep(Duration::from_secs(301)).await;
        let err = reader.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("stream idle timeout"), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_stalled_from_its_start_fails_too() {
        // The timer is armed only when the body first has nothing to give.
        let (tx, rx) = futures_channel();
        let body = StreamIdleTimeout::wrap(rx, Duration::from_secs(300));
        let reader = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert!(!reader.is_finished());
        let err = tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .expect("the body fails by its deadline")
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("stream idle timeout"), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn connection_idle_waits_for_no_inflight_and_no_bytes() {
        let a = Activity::new();
        let held = InFlight::new(&a);
        let t0 = Instant::now();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.idle(Duration::from_secs(3600)).await }
        });
        tokio::time::sleep(Duration::from_secs(7200)).await;
        assert!(
            !waiter.is_finished(),
            "a request in flight keeps the connection"
        );
        drop(held);
        waiter.await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(7200 + 3600));
    }

    /// A body fed through a channel, for the tests.
    struct ChanTx(tokio::sync::mpsc::Sender<Bytes>);
    impl ChanTx {
        async fn send(&mut self, b: Bytes) {
            self.0.send(b).await.unwrap();
        }
    }
    fn futures_channel() -> (ChanTx, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        (
            ChanTx(tx),
            http_body_util::StreamBody::new(stream).boxed_unsync(),
        )
    }
}

/// Envoy's premature-reset rule (CVE-2023-44487 and its slower variants): a connection whose
/// client resets most of its streams before they complete, within a second of opening them, is
/// closed. Within the first [`PREMATURE_RESET_WINDOW`] streams it trips at half that many premature
/// resets; after, when half of all closed streams were premature.
#[derive(Debug)]
pub struct StreamResets {
    closed: AtomicUsize,
    premature: AtomicUsize,
    tripped: tokio::sync::watch::Sender<bool>,
}

/// Envoy's `premature_reset_total_stream_count` default.
pub const PREMATURE_RESET_WINDOW: usize = 500;
/// Envoy's `premature_reset_min_stream_lifetime_seconds` default.
pub const PREMATURE_RESET_MIN_LIFETIME: Duration = Duration::from_secs(1);

impl Default for StreamResets {
    fn default() -> Self {
        Self {
            closed: AtomicUsize::new(0),
            premature: AtomicUsize::new(0),
            tripped: tokio::sync::watch::channel(false).0,
        }
    }
}

impl StreamResets {
    /// Counts a closed stream; `premature`: the client reset it before it completed, young.
    pub fn record(&self, premature: bool) {
        let closed = self.closed.fetch_add(1, Ordering::Relaxed) + 1;
        let resets = if premature {
            self.premature.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.premature.load(Ordering::Relaxed)
        };
        let trip = if closed < PREMATURE_RESET_WINDOW {
            resets * 2 >= PREMATURE_RESET_WINDOW
        } else {
            resets * 2 >= closed
        };
        if trip {
            self.tripped.send_replace(true);
        }
    }

    /// Resolves once the connection has too many premature resets.
    pub async fn tripped(&self) {
        let mut rx = self.tripped.subscribe();
        let _ = rx.wait_for(|t| *t).await;
    }
}
