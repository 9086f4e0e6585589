//! The socket under a peer's TLS session: reads ahead once the connection is busy.
//!
//! rustls asks its reader for at most 4 KiB at a time (its deframer's read size), so a busy
//! events connection read through TLS costs a `read` syscall per 4 KiB, where the plaintext path
//! reads up to 64 KiB at once into its frame buffer. [`ReadAhead`] passes reads straight through
//! until one fills the whole request (more is probably waiting in the socket); from then on it
//! reads up to [`READ_AHEAD`] bytes at a time into a buffer of its own and serves the small reads
//! from it. Connections that stay quiet (control traffic, keepalives) never allocate the buffer:
//! at 20 nodes a node has about 76 peer connections. Writes pass through untouched (vectored
//! included).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many bytes a busy connection reads at once.
pub(crate) const READ_AHEAD: usize = 64 * 1024;

/// A stream whose reads go through a buffer once a read has filled its whole request.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Allocated on the first read that filled its request.
    buf: Option<Box<[u8]>>,
    /// `buf[pos..filled]` is read from `inner` and not yet handed out.
    pos: usize,
    filled: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`, reading straight through until it is busy.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: None,
            pos: 0,
            filled: 0,
        }
    }

    /// The stream underneath (never to read from it: bytes may be buffered here).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Whether the read-ahead buffer was allocated (the connection was busy once).
    #[cfg(test)]
    fn is_buffering(&self) -> bool {
        self.buf.is_some()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            let wanted = out.remaining();
            match this.buf.as_mut() {
                // Quiet so far, or a request as large as the buffer: straight through.
                None => {
                    let before = out.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                    let got = out.filled().len() - before;
                    if wanted > 0 && got == wanted {
                        this.buf = Some(vec![0; READ_AHEAD].into_boxed_slice());
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(buf) if wanted >= buf.len() => return Pin::new(&mut this.inner).poll_read(cx, out),
                Some(buf) => {
                    let mut ahead = ReadBuf::new(buf);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut ahead))?;
                    this.pos = 0;
                    this.filled = ahead.filled().len();
                    if this.filled == 0 {
                        // End of stream.
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
        let buf = this.buf.as_ref().expect("bytes are buffered only in the buffer");
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reached the stream underneath.
    struct Counted<S> {
        inner: S,
        reads: Arc<AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_read(cx, out);
            if r.is_ready() {
                this.reads.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
    }

    /// Bytes in a pattern that shows any reordering or loss.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Reads `len` bytes in `chunk`-byte requests, as rustls does (4 KiB).
    async fn read_all<R: AsyncRead + Unpin>(r: &mut R, len: usize, chunk: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut part = vec![0; chunk];
        while got.len() < len {
            let n = r.read(&mut part).await.expect("read");
            assert!(n > 0, "the stream ended after {} of {len} bytes", got.len());
            got.extend_from_slice(&part[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_busy_stream_is_read_ahead_in_large_reads_and_arrives_intact() {
        const LEN: usize = 4 * 1024 * 1024;
        let (mut tx, rx) = tokio::io::duplex(1024 * 1024);
        let data = pattern(LEN);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.expect("write");
        });
        let reads = Arc::new(AtomicUsize::new(0));
        let mut r = ReadAhead::new(Counted {
            inner: rx,
            reads: reads.clone(),
        });
        let got = read_all(&mut r, LEN, 4096).await;
        writer.await.expect("writer");
        assert!(got == data, "the bytes arrive in order and intact");
        assert!(r.is_buffering(), "a stream that filled 4 KiB requests is read ahead");
        let reads = reads.load(Ordering::Relaxed);
        // 1024 reads of 4 KiB without read-ahead; with it, about one per 64 KiB.
        assert!(
            reads <= LEN / READ_AHEAD * 2 + 8,
            "{reads} reads underneath for {LEN} bytes in 4 KiB requests: not read ahead"
        );
    }

    #[tokio::test]
    async fn a_quiet_stream_is_read_straight_through_without_a_buffer() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let mut r = ReadAhead::new(rx);
        // Small messages, each read whole by a larger request: never a full request.
        for i in 0..100u8 {
            let msg = vec![i; 100];
            tx.write_all(&msg).await.expect("write");
            let mut got = [0u8; 4096];
            let n = r.read(&mut got).await.expect("read");
            assert_eq!(&got[..n], &msg[..]);
        }
        assert!(!r.is_buffering(), "a quiet stream allocates no read-ahead buffer");
        drop(tx);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.expect("read to the end");
        assert!(rest.is_empty(), "the end of the stream is passed on");
    }

    #[tokio::test]
    async fn the_end_of_a_buffered_stream_is_passed_on_after_its_last_bytes() {
        let (mut tx, rx) = tokio::io::duplex(1024 * 1024);
        let data = pattern(300 * 1024);
        tx.write_all(&data).await.expect("write");
        drop(tx);
        let mut r = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut part = [0u8; 4096];
        loop {
            let n = r.read(&mut part).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&part[..n]);
        }
        assert!(r.is_buffering());
        assert!(got == data, "every byte, in order, then the end");
    }
}
