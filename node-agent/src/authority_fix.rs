//! Lets grpc-core clients (Python grpcio → py-spiffe, C++) reach the Workload API with an absolute
//! `unix:///path` target: they send the percent-encoded socket path as HTTP/2 `:authority`, which
//! the `http` crate under tonic refuses (`%` is only allowed in an IPv6 zone), resetting the stream.
//!
//! This read-side adapter parses the client's HTTP/2 frames, decodes each header block (HPACK),
//! replaces a `:authority` holding `%` with `localhost` (the authority has no meaning on a unix
//! socket) and re-encodes it. Every client header block passes through it, so the client's and the
//! server's HPACK tables each stay in step with the side that talks to them. Everything else is
//! passed through byte for byte; the server-to-client direction is untouched.
//!
//! Delete this module once either side is fixed upstream:
//! - grpc-core sends the %-encoded socket path since grpc/grpc#33571 (1.57); the report asking for
//!   `localhost` again is <https://github.com/grpc/grpc/issues/38142> (and
//!   <https://github.com/grpc/grpc/issues/34305>);
//! - h2 refuses such an authority: <https://github.com/hyperium/h2/issues/442>, with the open
//!   <https://github.com/hyperium/h2/pull/487>.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE, which tonic's server keeps.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (the server's own limit is lower).
const MAX_BLOCK: usize = 256 * 1024;

pub(super) struct AuthorityFix {
    inner: UnixStream,
    /// The peer, pinned as the connection was accepted (see `caller.rs`).
    caller: Option<crate::caller::PinnedCaller>,
    raw: BytesMut,
    ready: BytesMut,
    preface_done: bool,
    eof: bool,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

struct Pending {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

impl AuthorityFix {
    pub(super) fn new(inner: UnixStream) -> Self {
        Self {
            caller: crate::caller::PinnedCaller::pin(&inner),
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            preface_done: false,
            eof: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
        }
    }

    /// Moves every complete frame from `raw` to `ready`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_done {
            if self.raw.len() < PREFACE_LEN {
                return Ok(());
            }
            let preface = self.raw.split_to(PREFACE_LEN);
            self.ready.extend_from_slice(&preface);
            self.preface_done = true;
        }
        while self.raw.len() >= FRAME_HEADER {
            let len = usize::from(self.raw[0]) << 16
                | usize::from(self.raw[1]) << 8
                | usize::from(self.raw[2]);
            if self.raw.len() < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (self.raw[3], self.raw[4]);
            let stream_id =
                u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                    & 0x7fff_ffff;
            let frame = self.raw.split_to(FRAME_HEADER + len);
            let payload = &frame[FRAME_HEADER..];
            match kind {
                HEADERS => {
                    let mut p = payload;
                    let mut pad = 0usize;
                    if flags & PADDED != 0 {
                        pad = usize::from(*p.first().ok_or_else(bad)?);
                        p = &p[1..];
                    }
                    let mut priority = None;
                    if flags & PRIORITY != 0 {
                        let f: [u8; 5] =
                            p.get(..5).ok_or_else(bad)?.try_into().map_err(|_| bad())?;
                        priority = Some(f);
                        p = &p[5..];
                    }
                    let fragment = p
                        .get(..p.len().checked_sub(pad).ok_or_else(bad)?)
                        .ok_or_else(bad)?;
                    self.pending = Some(Pending {
                        stream_id,
                        flags,
                        priority,
                        block: fragment.to_vec(),
                    });
                    if flags & END_HEADERS != 0 {
                        self.finish()?;
                    }
                }
                CONTINUATION => {
                    let pending = self.pending.as_mut().ok_or_else(bad)?;
                    if pending.stream_id != stream_id
                        || pending.block.len() + payload.len() > MAX_BLOCK
                    {
                        return Err(bad());
                    }
                    pending.block.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        self.finish()?;
                    }
                }
                _ if self.pending.is_some() => return Err(bad()), // HTTP/2: nothing between HEADERS and CONTINUATION
                _ => self.ready.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let headers = self
            .decoder
            .decode(&p.block)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
        let headers: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(n, v)| {
                if n == b":authority" && v.contains(&b'%') {
                    (n, b"localhost".to_vec())
                } else {
                    (n, v)
                }
            })
            .collect();
        let mut block = Vec::with_capacity(p.block.len());
        self.encoder.encode_into(
            headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
            &mut block,
        )?;
        // First frame: HEADERS (with priority fields, no padding); the rest: CONTINUATION.
        let prio_len = if p.priority.is_some() { 5 } else { 0 };
        let first_room = MAX_FRAME - prio_len;
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        let mut flags = p.flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame(
            HEADERS,
            flags,
            p.stream_id,
            p.priority.as_ref().map(|x| x.as_slice()),
            first,
        );
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            self.frame(CONTINUATION, flags, p.stream_id, None, chunk);
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, prefix: Option<&[u8]>, body: &[u8]) {
        let len = prefix.map_or(0, <[u8]>::len) + body.len();
        self.ready.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
        ]);
        self.ready.extend_from_slice(&stream_id.to_be_bytes());
        if let Some(p) = prefix {
            self.ready.extend_from_slice(p);
        }
        self.ready.extend_from_slice(body);
    }
}

fn bad() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP/2 header frames")
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.ready.is_empty() {
                let n = self.ready.len().min(buf.remaining());
                buf.put_slice(&self.ready[..n]);
                self.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                // Pass any incomplete tail through; the server reports it as it would have.
                let tail = self.raw.split();
                if tail.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                self.ready.extend_from_slice(&tail);
                continue;
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                self.eof = true;
                continue;
            }
            let filled = rb.filled().to_vec();
            self.raw.extend_from_slice(&filled);
            self.process()?;
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthorityFix {
    type ConnectInfo = Option<crate::caller::PinnedCaller>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.caller.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Other frames as (type, payload); header blocks joined across CONTINUATION frames.
    type Split = (Vec<(u8, Vec<u8>)>, Vec<Vec<u8>>);

    fn header_blocks(mut bytes: &[u8]) -> Split {
        let (mut others, mut blocks, mut cur) = (Vec::new(), Vec::new(), Vec::new());
        while bytes.len() >= FRAME_HEADER {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let (kind, flags) = (bytes[3], bytes[4]);
            let payload = &bytes[FRAME_HEADER..FRAME_HEADER + len];
            match kind {
                HEADERS => {
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    assert_eq!(flags & PADDED, 0, "padding is dropped");
                    cur = payload[skip..].to_vec();
                }
                CONTINUATION => cur.extend_from_slice(payload),
                _ => others.push((kind, payload.to_vec())),
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                blocks.push(std::mem::take(&mut cur));
            }
            bytes = &bytes[FRAME_HEADER + len..];
        }
        (others, blocks)
    }

    #[test]
    fn rewrites_only_a_percent_authority_across_padding_priority_and_continuation() {
        let mut client = loona_hpack::Encoder::new();
        let first: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"tmp%2Fagent.sock"),
            (b"workload.spiffe.io", b"true"),
        ];
        let block1 = client.encode(first.clone());
        let second: Vec<(&[u8], &[u8])> =
            vec![(b":method", b"POST"), (b":authority", b"example.org")];
        let block2 = client.encode(second.clone());

        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS passes through
        // Stream 1: padded + priority HEADERS, then the rest of the block in a CONTINUATION.
        let (a, b) = block1.split_at(7);
        let mut p = vec![3u8];
        p.extend_from_slice(&[0, 0, 0, 0, 16]);
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &p));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, END_STREAM, 1, b"grpc-body")); // DATA passes through
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block2));

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut fix = AuthorityFix::new(UnixStream::from_std(a).unwrap());
        // Feed in two pieces to cross a frame boundary.
        fix.raw.extend_from_slice(&input[..40]);
        fix.process().unwrap();
        fix.raw.extend_from_slice(&input[40..]);
        fix.process().unwrap();
        let out = fix.ready.to_vec();
        assert_eq!(&out[..PREFACE_LEN], &input[..PREFACE_LEN]);
        let (others, blocks) = header_blocks(&out[PREFACE_LEN..]);
        assert_eq!(others, vec![(0x4, vec![]), (0x0, b"grpc-body".to_vec())]);
        let mut server = loona_hpack::Decoder::new();
        let got1 = server.decode(&blocks[0]).unwrap();
        let got2 = server.decode(&blocks[1]).unwrap();
        let auth = |h: &Vec<(Vec<u8>, Vec<u8>)>| {
            h.iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| v.clone())
        };
        assert_eq!(auth(&got1).as_deref(), Some(&b"localhost"[..]));
        assert_eq!(
            auth(&got2).as_deref(),
            Some(&b"example.org"[..]),
            "a valid authority is kept"
        );
        assert_eq!(got1.len(), first.len());
        assert!(
            got1.iter()
                .any(|(n, v)| n == b"workload.spiffe.io" && v == b"true")
        );
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut fix = AuthorityFix::new(UnixStream::from_std(a).unwrap());
        fix.raw
            .extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        fix.raw
            .extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, b"xx"));
        assert!(fix.process().is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut fix = AuthorityFix::new(UnixStream::from_std(a).unwrap());
        fix.raw
            .extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        fix.raw
            .extend_from_slice(&frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 1]));
        assert!(fix.process().is_err());
    }
}
