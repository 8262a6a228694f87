//! Body types: one boxed body for everything the proxy sends, and a wrapper that counts bytes.
//! (The wrapper that carries a call's guard to the end of its response is `telemetry::Guarded`.)

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy builds.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body with byte chunks.
pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Counts the data bytes that pass through.
pub struct Counting<B> {
    inner: B,
    count: Arc<AtomicU64>,
    /// A sampled call's request copy (sensitive-data classification).
    tee: Option<Arc<std::sync::Mutex<crate::sampling::Tee>>>,
}

impl<B> Counting<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Counting, and with a `tee` copying the first bytes into it.
    pub fn boxed_tee(
        inner: B,
        count: Arc<AtomicU64>,
        tee: Option<Arc<std::sync::Mutex<crate::sampling::Tee>>>,
    ) -> Body {
        Self { inner, count, tee }.boxed_unsync()
    }
}

impl<B> http_body::Body for Counting<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            if let Some(tee) = &self.tee
                && let Ok(mut t) = tee.lock()
            {
                t.push(d);
            }
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
