//! Body types: one boxed body for everything the proxy sends, and wrappers that count bytes and
//! carry a call's [`CallGuard`] until the response body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::telemetry::CallGuard;

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
}

impl<B> Counting<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub fn boxed(inner: B, count: Arc<AtomicU64>) -> Body {
        Self { inner, count }.boxed_unsync()
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

/// A response body that counts bytes, notes the gRPC status from trailers, and drops the call's
/// guard (writing its log record) when the body ends or is abandoned.
pub struct Guarded {
    inner: Body,
    guard: Option<CallGuard>,
}

impl Guarded {
    pub fn boxed(inner: Body, guard: CallGuard) -> Body {
        let mut this = Self {
            inner,
            guard: Some(guard),
        };
        if this.inner.is_end_stream() {
            this.finish();
        }
        this.boxed_unsync()
    }

    fn finish(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.completed = true;
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(g) = self.guard.as_mut() {
                    if let Some(d) = f.data_ref() {
                        g.response_bytes
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                    {
                        g.grpc_status = Some(s.to_owned());
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Some(Err(_)) => {
                if let Some(g) = self.guard.as_mut() {
                    g.record.response_flags = "UPE".into();
                }
                self.guard = None;
            }
            None => self.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
