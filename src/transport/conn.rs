//! The connection driver: runs one established connection until it ends.
//!
//! One task per connection drives both directions concurrently (`select!` over a read loop and a
//! write loop on the two halves of the stream); whichever ends first ends the connection. In the
//! usual layout a connection mostly flows one way (the dialer writes, the acceptor reads) and the
//! other direction carries only keepalives, so one task costs no parallelism.
//!
//! * **Writer** — waits for the first envelope of the outbound queue, then drains everything
//!   already queued up to `write_batch_bytes`, encodes it all into one buffer and writes the batch
//!   with vectored writes (`writev`) + `flush`. Under load this is one syscall per batch instead
//!   of one per frame. Large payloads (event batches) are not copied into the buffer: the batch
//!   is a list of segments — runs of the buffer, and those payloads in their own memory — written
//!   together (see [`encode_envelope_frame`]). When the queue stays empty for
//!   `keepalive_interval`, it sends a keepalive (an empty envelope).
//! * **Reader** — decodes frames and hands `(peer id, envelope)` to the inbound channel, awaiting
//!   its capacity (a slow consumer slows the peer down through TCP instead of growing memory).
//!   Keepalives are consumed. A connection that delivers nothing, not even a keepalive, for
//!   `idle_timeout` is dead (a frozen peer, a silent network partition) and is dropped.
//!
//! An error (oversized or undecodable frame, I/O error, idle timeout) drops this connection only:
//! it is logged with the peer and the reason and returned. Envelopes in the batch being written
//! when a connection fails are lost; the layers above retry (Raft retransmits, events are acked).

use std::time::Duration;

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead};

use super::frame::{encode_envelope_frame, FrameCodec, FrameError};
use super::wire::Envelope;
use super::{BYTES_TOTAL, FRAMES_TOTAL};

/// Initial capacity of the read and write buffers.
const BUF_CAPACITY: usize = 64 * 1024;
/// Segments handed to one vectored write (Linux accepts 1024).
const MAX_IOV: usize = 64;

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Reading failed: an oversized or undecodable frame, a frame cut off, or an I/O error.
    #[error("reading from the peer failed: {0}")]
    Read(#[from] FrameError),
    /// Writing failed (the peer went away, or the network broke).
    #[error("writing to the peer failed: {0}")]
    Write(#[source] std::io::Error),
    /// Nothing, not even a keepalive, arrived for this long.
    #[error("nothing received for {0:?} (keepalives included); the peer is frozen or unreachable")]
    Idle(Duration),
}

/// How a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The peer closed the connection cleanly.
    PeerClosed,
    /// This node closed it: the peer was removed, or the transport shut down.
    ClosedLocally,
    /// The inbound channel's receiver is gone: nobody consumes what this node receives.
    InboundClosed,
}

/// The settings the driver needs.
#[derive(Debug, Clone)]
pub(crate) struct ConnOptions {
    /// Largest envelope frame accepted or sent.
    pub(crate) max_frame_len: usize,
    /// Stop draining the queue into a batch once it holds this many bytes.
    pub(crate) write_batch_bytes: usize,
    /// Send a keepalive after this long without an outbound envelope.
    pub(crate) keepalive_interval: Duration,
    /// Drop the connection after this long without any inbound frame.
    pub(crate) idle_timeout: Duration,
}

/// Runs an established connection to `peer` until it ends.
///
/// `read_buf` holds bytes read past the handshake. Envelopes for the peer are taken from
/// `outbound`; envelopes from the peer go to `inbound`. The connection's error, if any, has been
/// logged (warn, with the peer and the reason) when this returns.
pub(crate) async fn drive<S>(
    stream: S,
    read_buf: BytesMut,
    peer: u64,
    outbound: &mut mpsc::Receiver<Envelope>,
    inbound: &mpsc::Sender<(u64, Envelope)>,
    opts: &ConnOptions,
) -> Result<ConnectionEnd, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let result = tokio::select! {
        r = read_loop(rd, read_buf, peer, inbound, opts) => r,
        w = write_loop(wr, peer, outbound, opts) => w,
    };
    match &result {
        Ok(end) => tracing::debug!(peer, ?end, "peer connection closed"),
        Err(reason) => tracing::warn!(peer, %reason, "dropping peer connection"),
    }
    result
}

async fn read_loop<S: AsyncRead>(
    rd: ReadHalf<S>,
    mut read_buf: BytesMut,
    peer: u64,
    inbound: &mpsc::Sender<(u64, Envelope)>,
    opts: &ConnOptions,
) -> Result<ConnectionEnd, ConnectionError> {
    let frames = metrics::counter!(FRAMES_TOTAL, "direction" => "in");
    let bytes = metrics::counter!(BYTES_TOTAL, "direction" => "in");
    // Whole frames read along with the handshake go first: `FramedRead` decodes what is in its
    // buffer only after its next read from the stream, which may be the peer's next keepalive.
    let mut codec = FrameCodec::<Envelope>::new(opts.max_frame_len);
    while let Some((env, wire_len)) = codec.decode(&mut read_buf)? {
        frames.increment(1);
        bytes.increment(wire_len as u64);
        if !env.is_keepalive() && inbound.send((peer, env)).await.is_err() {
            return Ok(ConnectionEnd::InboundClosed);
        }
    }
    // The rest of a frame, if any (the codec remembers a header it has consumed).
    let mut reader = FramedRead::with_capacity(rd, codec, BUF_CAPACITY);
    reader.read_buffer_mut().extend_from_slice(&read_buf);
    loop {
        let next = tokio::time::timeout(opts.idle_timeout, reader.next())
            .await
            .map_err(|_| ConnectionError::Idle(opts.idle_timeout))?;
        let (env, wire_len) = match next {
            None => return Ok(ConnectionEnd::PeerClosed),
            // A TLS peer that went away without a close_notify (killed, or it dropped the
            // connection): closed all the same.
            Some(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(ConnectionEnd::PeerClosed)
            }
            Some(frame) => frame?,
        };
        frames.increment(1);
        bytes.increment(wire_len as u64);
        if env.is_keepalive() {
            continue;
        }
        if inbound.send((peer, env)).await.is_err() {
            return Ok(ConnectionEnd::InboundClosed);
        }
    }
}

async fn write_loop<S: AsyncWrite>(
    mut wr: WriteHalf<S>,
    peer: u64,
    outbound: &mut mpsc::Receiver<Envelope>,
    opts: &ConnOptions,
) -> Result<ConnectionEnd, ConnectionError> {
    let frames_out = metrics::counter!(FRAMES_TOTAL, "direction" => "out");
    let bytes_out = metrics::counter!(BYTES_TOTAL, "direction" => "out");
    let mut batch = Batch {
        buf: BytesMut::with_capacity(BUF_CAPACITY),
        segments: Vec::new(),
        bytes: 0,
        frames: 0,
    };
    loop {
        let first = match tokio::time::timeout(opts.keepalive_interval, outbound.recv()).await {
            Ok(Some(env)) => env,
            Ok(None) => {
                // Best effort: tell the peer we are done so it does not wait for the idle timeout.
                let _ = wr.shutdown().await;
                return Ok(ConnectionEnd::ClosedLocally);
            }
            Err(_) => Envelope::default(),
        };
        batch.push(&first, peer, opts);
        while batch.bytes < opts.write_batch_bytes {
            match outbound.try_recv() {
                Ok(env) => batch.push(&env, peer, opts),
                Err(_) => break,
            }
        }
        if batch.bytes == 0 {
            continue;
        }
        batch.seal();
        write_segments(&mut wr, &mut batch.segments)
            .await
            .map_err(ConnectionError::Write)?;
        wr.flush().await.map_err(ConnectionError::Write)?;
        frames_out.increment(batch.frames);
        bytes_out.increment(batch.bytes as u64);
        batch.bytes = 0;
        batch.frames = 0;
        if batch.buf.capacity() > 4 * opts.write_batch_bytes.max(BUF_CAPACITY) {
            // One huge frame should not pin its buffer for the life of the connection.
            batch.buf = BytesMut::with_capacity(BUF_CAPACITY);
        }
    }
}

/// The frames of one write: small frames are encoded into `buf`, large payloads stay in their
/// own memory, and `segments` lists the pieces in wire order.
struct Batch {
    /// Where frames (and the heads of frames with a large payload) are encoded.
    buf: BytesMut,
    /// The batch in wire order: runs split off `buf`, and large payloads.
    segments: Vec<Bytes>,
    /// Bytes of the batch on the wire.
    bytes: usize,
    /// Frames in the batch.
    frames: u64,
}

impl Batch {
    /// Appends one frame; an envelope over the limit is dropped with a warning (the transport's
    /// `send` refuses those before they are queued, so this is a last line of defence).
    fn push(&mut self, env: &Envelope, peer: u64, opts: &ConnOptions) {
        match encode_envelope_frame(env, opts.max_frame_len, &mut self.buf) {
            Ok((len, payload)) => {
                self.frames += 1;
                self.bytes += len;
                if let Some(payload) = payload {
                    // `buf` ends with this frame's head, so it is never empty here.
                    self.segments.push(self.buf.split().freeze());
                    self.segments.push(payload);
                }
            }
            Err(reason) => tracing::warn!(peer, %reason, "dropping an outbound envelope that cannot be framed"),
        }
    }

    /// Moves what `buf` still holds to the segments.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.segments.push(self.buf.split().freeze());
        }
    }
}

/// Writes every segment, in order, with as few vectored writes as the stream allows, and empties
/// `segments` (dropping the segments lets `buf` reuse its memory).
async fn write_segments<W: AsyncWrite + Unpin>(wr: &mut W, segments: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut next = 0;
    while next < segments.len() {
        let written = {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = (segments.len() - next).min(MAX_IOV);
            for (slice, segment) in slices.iter_mut().zip(&segments[next..next + n]) {
                *slice = IoSlice::new(segment);
            }
            wr.write_vectored(&slices[..n]).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let len = segments[next].len();
            if left >= len {
                left -= len;
                next += 1;
            } else {
                segments[next].advance(left);
                left = 0;
            }
        }
    }
    segments.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{duplex, AsyncReadExt, DuplexStream, ReadBuf};

    use crate::transport::frame::encode_frame;
    use crate::transport::wire::{envelope::Body, Ping};

    const DEADLINE: Duration = Duration::from_secs(20);

    fn opts() -> ConnOptions {
        ConnOptions {
            max_frame_len: 1024,
            write_batch_bytes: 1024 * 1024,
            keepalive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
        }
    }

    /// Counts the `poll_write` calls that wrote something (what would be `write` syscalls).
    struct Counting {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn writer_coalesces_many_frames_into_few_writes() {
        const N: u64 = 10_000;
        let (a, b) = duplex(256 * 1024);
        let writes = Arc::new(AtomicUsize::new(0));
        let a = Counting {
            inner: a,
            writes: writes.clone(),
        };
        let (out_tx, mut out_rx) = mpsc::channel(1024);
        let (in_tx, _in_rx) = mpsc::channel(16);
        let producer = tokio::spawn(async move {
            for seq in 0..N {
                out_tx.send(Envelope::ping(seq, 0)).await.expect("driver alive");
            }
            out_tx
        });
        let driver = tokio::spawn(async move {
            let opts = opts();
            drive(a, BytesMut::new(), 2, &mut out_rx, &in_tx, &opts).await
        });
        // The receiving side decodes everything, in order.
        let mut reader = FramedRead::new(b, FrameCodec::<Envelope>::new(1024));
        let received = tokio::time::timeout(DEADLINE, async {
            let mut next = 0u64;
            while next < N {
                let (env, _) = reader.next().await.expect("stream open").expect("valid frame");
                match env.body {
                    Some(Body::Ping(Ping { seq, .. })) => {
                        assert_eq!(seq, next, "frames arrive in order");
                        next += 1;
                    }
                    None => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            next
        })
        .await
        .expect("all frames arrive before the deadline");
        assert_eq!(received, N);
        let writes = writes.load(Ordering::Relaxed);
        assert!(writes > 0);
        assert!(
            (writes as u64) < N / 10,
            "{writes} writes for {N} frames: the writer does not coalesce"
        );
        drop(producer.await.expect("producer"));
        driver.abort();
    }

    #[tokio::test]
    async fn large_payloads_written_from_their_own_memory_arrive_intact_and_in_order() {
        // Small and large (zero-copy) envelopes interleaved, over a stream that takes a few KiB
        // per write, so segments are cut in the middle and resumed.
        let (a, b) = duplex(3000);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let (in_tx, _in_rx) = mpsc::channel(16);
        let sent: Vec<Envelope> = (0..40u64)
            .map(|i| match i % 4 {
                0 => Envelope::ping(i, 0),
                1 => Envelope::app(vec![i as u8; 9000 + i as usize * 37]),
                2 => Envelope::raft(vec![!(i as u8); 70_000]),
                _ => Envelope::app(vec![i as u8; 100]),
            })
            .collect();
        let producer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for env in sent {
                    out_tx.send(env).await.expect("driver alive");
                }
                out_tx
            })
        };
        let driver = tokio::spawn(async move {
            let opts = ConnOptions {
                max_frame_len: 1 << 20,
                ..opts()
            };
            drive(a, BytesMut::new(), 2, &mut out_rx, &in_tx, &opts).await
        });
        let mut reader = FramedRead::new(b, FrameCodec::<Envelope>::new(1 << 20));
        let got = tokio::time::timeout(DEADLINE, async {
            let mut got = Vec::new();
            while got.len() < sent.len() {
                let (env, _) = reader.next().await.expect("stream open").expect("valid frame");
                if !env.is_keepalive() {
                    got.push(env);
                }
            }
            got
        })
        .await
        .expect("all frames arrive before the deadline");
        assert_eq!(got, sent);
        drop(producer.await.expect("producer"));
        driver.abort();
    }

    #[tokio::test]
    async fn oversized_inbound_frame_drops_the_connection() {
        let (a, mut b) = duplex(64 * 1024);
        let (_out_tx, mut out_rx) = mpsc::channel(16);
        let (in_tx, mut in_rx) = mpsc::channel(16);
        let mut frame = BytesMut::new();
        encode_frame(&Envelope::ping(1, 1), 1024, &mut frame).expect("fits");
        frame.extend_from_slice(&2000u32.to_be_bytes());
        frame.extend_from_slice(&[0u8; 64]);
        b.write_all(&frame).await.expect("write");
        let opts = opts();
        let r = tokio::time::timeout(DEADLINE, drive(a, BytesMut::new(), 7, &mut out_rx, &in_tx, &opts))
            .await
            .expect("driver ends before the deadline");
        match r {
            Err(ConnectionError::Read(FrameError::TooLarge { len: 2000, max: 1024 })) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The good frame before it was delivered, and the stream is closed for the peer.
        let (from, env) = in_rx.try_recv().expect("first frame delivered");
        assert_eq!((from, env), (7, Envelope::ping(1, 1)));
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, b.read_to_end(&mut rest))
            .await
            .expect("peer sees the close before the deadline")
            .expect("clean end of stream");
    }

    #[tokio::test]
    async fn undecodable_frame_drops_the_connection() {
        let (a, mut b) = duplex(64 * 1024);
        let (_out_tx, mut out_rx) = mpsc::channel(16);
        let (in_tx, _in_rx) = mpsc::channel(16);
        b.write_all(&[0, 0, 0, 2, 0x12, 0x7f]).await.expect("write");
        let opts = opts();
        let r = tokio::time::timeout(DEADLINE, drive(a, BytesMut::new(), 7, &mut out_rx, &in_tx, &opts))
            .await
            .expect("driver ends before the deadline");
        assert!(
            matches!(r, Err(ConnectionError::Read(FrameError::Decode { .. }))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn read_buffer_from_the_handshake_is_decoded_first() {
        let (a, b) = duplex(64 * 1024);
        let (_out_tx, mut out_rx) = mpsc::channel(16);
        let (in_tx, mut in_rx) = mpsc::channel(16);
        let mut leftover = BytesMut::new();
        encode_frame(&Envelope::ping(1, 0), 1024, &mut leftover).expect("fits");
        let mut later = BytesMut::new();
        encode_frame(&Envelope::ping(2, 0), 1024, &mut later).expect("fits");
        // Half of the second frame is in the leftover, half arrives on the stream.
        let split = later.len() / 2;
        leftover.extend_from_slice(&later[..split]);
        let mut b = b;
        b.write_all(&later[split..]).await.expect("write");
        expect_pings_1_and_2(
            a,
            leftover,
            &mut out_rx,
            &in_tx,
            &mut in_rx,
            "both frames before the deadline",
        )
        .await;
    }

    #[tokio::test]
    async fn whole_frames_in_the_read_buffer_are_delivered_without_waiting_for_more_bytes() {
        // The peer's first envelopes came in with its handshake acceptance and it sends nothing
        // more (its next keepalive is a second away): they must be delivered at once anyway.
        let (a, _b) = duplex(64 * 1024);
        let (_out_tx, mut out_rx) = mpsc::channel(16);
        let (in_tx, mut in_rx) = mpsc::channel(16);
        let mut leftover = BytesMut::new();
        encode_frame(&Envelope::ping(1, 0), 1024, &mut leftover).expect("fits");
        encode_frame(&Envelope::default(), 1024, &mut leftover).expect("fits");
        encode_frame(&Envelope::ping(2, 0), 1024, &mut leftover).expect("fits");
        expect_pings_1_and_2(
            a,
            leftover,
            &mut out_rx,
            &in_tx,
            &mut in_rx,
            "both frames before the deadline, with nothing more arriving on the stream",
        )
        .await;
    }

    /// Drives a connection from peer 3 on `stream` with `leftover` already read, and expects
    /// `ping(1)` then `ping(2)` to be delivered before the deadline.
    async fn expect_pings_1_and_2(
        stream: tokio::io::DuplexStream,
        leftover: BytesMut,
        out_rx: &mut mpsc::Receiver<Envelope>,
        in_tx: &mpsc::Sender<(u64, Envelope)>,
        in_rx: &mut mpsc::Receiver<(u64, Envelope)>,
        what: &str,
    ) {
        let opts = opts();
        let driver = drive(stream, leftover, 3, out_rx, in_tx, &opts);
        let check = async {
            assert_eq!(in_rx.recv().await, Some((3, Envelope::ping(1, 0))));
            assert_eq!(in_rx.recv().await, Some((3, Envelope::ping(2, 0))));
        };
        tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                r = driver => panic!("driver ended early: {r:?}"),
                () = check => {}
            }
        })
        .await
        .expect(what);
    }

    #[tokio::test]
    async fn silent_peer_is_dropped_after_the_idle_timeout_and_keepalives_prevent_it() {
        let (a, b) = duplex(64 * 1024);
        let (_out_a, mut rx_a) = mpsc::channel(16);
        let (_out_b, mut rx_b) = mpsc::channel(16);
        let (in_tx, _in_rx) = mpsc::channel(16);
        let quick = ConnOptions {
            keepalive_interval: Duration::from_millis(20),
            idle_timeout: Duration::from_millis(200),
            ..opts()
        };
        // Both sides driven: keepalives flow both ways, so neither side goes idle.
        let both = async {
            tokio::select! {
                r = drive(a, BytesMut::new(), 2, &mut rx_a, &in_tx, &quick) => panic!("a ended: {r:?}"),
                r = drive(b, BytesMut::new(), 1, &mut rx_b, &in_tx, &quick) => panic!("b ended: {r:?}"),
            }
        };
        // Five idle timeouts pass without either side dropping the connection.
        assert!(tokio::time::timeout(Duration::from_secs(1), both).await.is_err());

        // One side silent (its stream is held but nobody writes): dropped after the idle timeout.
        let (a, _silent) = duplex(64 * 1024);
        let (_out_a, mut rx_a) = mpsc::channel(16);
        let r = tokio::time::timeout(DEADLINE, drive(a, BytesMut::new(), 2, &mut rx_a, &in_tx, &quick))
            .await
            .expect("driver ends before the deadline");
        assert!(matches!(r, Err(ConnectionError::Idle(_))), "{r:?}");
    }

    #[tokio::test]
    async fn closing_the_queue_ends_the_connection_cleanly() {
        let (a, mut b) = duplex(64 * 1024);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (in_tx, _in_rx) = mpsc::channel(16);
        out_tx.send(Envelope::app(&b"last words"[..])).await.expect("queued");
        drop(out_tx);
        let opts = opts();
        let r = tokio::time::timeout(DEADLINE, drive(a, BytesMut::new(), 2, &mut out_rx, &in_tx, &opts))
            .await
            .expect("driver ends before the deadline");
        assert!(matches!(r, Ok(ConnectionEnd::ClosedLocally)), "{r:?}");
        let mut reader = FramedRead::new(&mut b, FrameCodec::<Envelope>::new(1024));
        let (env, _) = reader.next().await.expect("one frame").expect("valid");
        assert_eq!(env, Envelope::app(&b"last words"[..]));
        assert!(reader.next().await.is_none(), "then end of stream");
    }
}
