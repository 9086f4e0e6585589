//! Framing: the one place where the byte layout of a peer connection is defined.
//!
//! ```text
//! ┌──────────────────────────────┬──────────────────────────────────────────┐
//! │ length N: u32, big-endian    │ N bytes: one prost-encoded message       │
//! └──────────────────────────────┴──────────────────────────────────────────┘
//! ```
//!
//! * The length counts the payload only (not the 4 header bytes). `N = 0` is valid: it is an
//!   empty message, which for an [`Envelope`](super::wire::Envelope) is a keepalive.
//! * A connection carries [`Handshake`](super::wire::Handshake) frames first (at most
//!   [`HANDSHAKE_MAX_FRAME_LEN`] bytes each), then [`Envelope`](super::wire::Envelope) frames of at
//!   most the configured `max_frame_len` (default [`DEFAULT_MAX_FRAME_LEN`], 16 MiB).
//! * Decoding uses `tokio_util::codec::LengthDelimitedCodec` with that limit. The header is checked
//!   before any payload is buffered, so an oversized (or garbage) length never allocates.
//! * A frame that is too large, does not decode, or is cut off by the end of the stream is a
//!   [`FrameError`]: the reader drops that one connection (logging the peer and the reason) and
//!   returns the error; nothing else is affected.
//! * The writer encodes many frames back to back into one buffer ([`encode_frame`]) and writes the
//!   buffer at once; the receiver cannot tell, since the layout is the same. An envelope whose
//!   `raft` or `app` payload is large ([`ZERO_COPY_MIN`] bytes or more) is framed by
//!   [`encode_envelope_frame`]: the header and the envelope's field key and length go into the
//!   buffer, and the payload is handed back to be written from its own memory (one vectored
//!   write for the batch), so event batches are not copied into the write buffer. The bytes on
//!   the wire are exactly what [`encode_frame`] writes.
//! * The reader reserves room for a whole frame (and the start of the next one) as soon as it
//!   has the frame's header, so a large frame is read into one allocation of its size instead of
//!   regrowing (and copying) a smaller buffer several times.

use std::io;
use std::marker::PhantomData;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Bytes in the length header.
pub const HEADER_LEN: usize = 4;
/// Default limit of one envelope frame's payload: 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
/// Limit of one handshake frame's payload. Handshake messages are a few hundred bytes; a bigger
/// length is garbage (an HTTP request's `GET ` reads as ~1.2 GB) and is refused at once.
pub const HANDSHAKE_MAX_FRAME_LEN: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length header announces more than the limit.
    #[error(
        "frame of {len} bytes exceeds the limit of {max} bytes; the peer is not a herald node, \
         or its frames need a larger transport max_frame_len on this node"
    )]
    TooLarge {
        /// The announced (or, when sending, the encoded) payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid message of the expected type.
    #[error("frame of {len} bytes is not a valid {what}: {source}; the peer is not a herald node or speaks another protocol")]
    Decode {
        /// Which message was expected (`Envelope`, `Handshake`).
        what: &'static str,
        /// The payload length.
        len: usize,
        /// What prost reported.
        #[source]
        source: prost::DecodeError,
    },
    /// The stream ended in the middle of a frame.
    #[error("the connection closed in the middle of a frame ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// Encoding a message failed (cannot happen with a growable buffer; kept for completeness).
    #[error("cannot encode a frame: {0}")]
    Encode(#[from] prost::EncodeError),
    /// The stream failed.
    #[error("connection i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Appends one frame carrying `msg` to `dst` and returns the bytes appended (header included).
///
/// Refuses (and appends nothing) when the encoded message is longer than `max`, since the
/// receiver would drop the whole connection on it.
pub fn encode_frame<M: Message>(msg: &M, max: usize, dst: &mut BytesMut) -> Result<usize, FrameError> {
    let len = msg.encoded_len();
    if len > max || u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge { len, max });
    }
    dst.reserve(HEADER_LEN + len);
    // `len` fits in u32: checked above.
    dst.put_u32(len as u32);
    msg.encode(dst)?;
    Ok(HEADER_LEN + len)
}

/// A `raft` or `app` payload of at least this many bytes is not copied into the write buffer: it
/// is written from its own memory (see [`encode_envelope_frame`]).
pub const ZERO_COPY_MIN: usize = 8 * 1024;

/// Room reserved beyond a frame being read, so the next frame's header (and, for small frames,
/// the whole next frame) is read into the same allocation.
const READ_SLACK: usize = 16 * 1024;

/// Appends one frame carrying `env` to `dst`, like [`encode_frame`], except that a `raft` or
/// `app` payload of [`ZERO_COPY_MIN`] bytes or more is not copied: `dst` gets everything up to
/// the payload, and the payload is returned; the frame is `dst`'s new bytes followed by it.
/// Returns the frame's bytes on the wire (header included) and the payload, if held back.
pub fn encode_envelope_frame(
    env: &super::wire::Envelope,
    max: usize,
    dst: &mut BytesMut,
) -> Result<(usize, Option<Bytes>), FrameError> {
    use super::wire::envelope::Body;
    let (tag, payload) = match &env.body {
        Some(Body::App(p)) if p.len() >= ZERO_COPY_MIN => (6, p),
        Some(Body::Raft(p)) if p.len() >= ZERO_COPY_MIN => (1, p),
        _ => return encode_frame(env, max, dst).map(|n| (n, None)),
    };
    let len = env.encoded_len();
    if len > max || u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge { len, max });
    }
    dst.reserve(HEADER_LEN + 1 + 10);
    dst.put_u32(len as u32);
    // `Envelope` is one `oneof` of length-delimited fields: key, length, payload.
    encode_key(tag, WireType::LengthDelimited, dst);
    encode_varint(payload.len() as u64, dst);
    Ok((HEADER_LEN + len, Some(payload.clone())))
}

/// A `tokio_util` codec for frames carrying messages of type `M`.
///
/// Decoding yields `(message, wire bytes)`, the wire bytes including the header (for metrics).
/// Encoding takes a message by value (used by the handshake, which sends one frame at a time).
#[derive(Debug)]
pub struct FrameCodec<M> {
    /// Does the length-prefix bookkeeping; configured with the same limit.
    inner: LengthDelimitedCodec,
    /// The payload limit, checked on the header before the payload is buffered.
    max: usize,
    /// Whether `inner` has consumed the header of a frame whose payload is still incomplete (then
    /// the buffer starts with payload bytes, not with a header).
    in_frame: bool,
    /// The message type this codec reads and writes.
    _message: PhantomData<fn() -> M>,
}

impl<M> FrameCodec<M> {
    /// A codec refusing payloads longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(HEADER_LEN)
            .big_endian()
            .max_frame_length(max_frame_len)
            .new_codec();
        FrameCodec {
            inner,
            max: max_frame_len,
            in_frame: false,
            _message: PhantomData,
        }
    }

    /// The payload limit.
    pub fn max_frame_len(&self) -> usize {
        self.max
    }
}

impl<M: Message + Default> Decoder for FrameCodec<M> {
    type Item = (M, usize);
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        if !self.in_frame {
            let Some(header) = src.get(..HEADER_LEN) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if len > self.max {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
            let frame = HEADER_LEN + len;
            if len >= READ_SLACK && src.len() < frame && src.capacity() < frame + READ_SLACK {
                // Room for the rest of the frame and the start of the next one, in one
                // allocation: the inner codec would reserve only the rest of this frame, and the
                // reader's next `reserve(1)` would then allocate a small buffer that the next
                // large frame regrows, copying what it holds each time.
                src.reserve(frame + READ_SLACK - src.len());
            }
        }
        // With a complete header buffered, the inner codec consumes it whether or not the payload
        // is complete, and remembers the length until it is.
        let Some(payload) = self.inner.decode(src)? else {
            self.in_frame = true;
            return Ok(None);
        };
        self.in_frame = false;
        let len = payload.len();
        let msg = M::decode(payload.freeze()).map_err(|source| FrameError::Decode {
            what: short_type_name::<M>(),
            len,
            source,
        })?;
        Ok(Some((msg, HEADER_LEN + len)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && !self.in_frame => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len() + if self.in_frame { HEADER_LEN } else { 0 },
            }),
        }
    }
}

impl<M: Message> Encoder<M> for FrameCodec<M> {
    type Error = FrameError;

    fn encode(&mut self, msg: M, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&msg, self.max, dst).map(|_| ())
    }
}

/// `Envelope` for `herald::transport::wire::Envelope`, for error messages.
fn short_type_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::{envelope::Body, Envelope};

    fn decode_all(codec: &mut FrameCodec<Envelope>, buf: &mut BytesMut) -> Vec<Envelope> {
        let mut out = Vec::new();
        while let Some((env, _)) = codec.decode(buf).expect("valid frames") {
            out.push(env);
        }
        out
    }

    #[test]
    fn frames_written_back_to_back_decode_one_by_one() {
        let mut buf = BytesMut::new();
        let sent: Vec<Envelope> = (0..100).map(|i| Envelope::ping(i, -(i as i64))).collect();
        let mut total = 0;
        for env in &sent {
            total += encode_frame(env, 1024, &mut buf).expect("fits");
        }
        // A keepalive is a zero-length frame.
        total += encode_frame(&Envelope::default(), 1024, &mut buf).expect("fits");
        assert_eq!(total, buf.len());
        let mut codec = FrameCodec::<Envelope>::new(1024);
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(got.len(), 101);
        assert_eq!(&got[..100], &sent[..]);
        assert!(got[100].is_keepalive());
        assert!(buf.is_empty());
    }

    #[test]
    fn layout_is_big_endian_length_then_payload() {
        let env = Envelope::app(vec![7u8; 3]);
        let mut buf = BytesMut::new();
        encode_frame(&env, 1024, &mut buf).expect("fits");
        let payload = env.encode_to_vec();
        assert_eq!(&buf[..4], &(payload.len() as u32).to_be_bytes());
        assert_eq!(&buf[4..], &payload[..]);
        // The plain LengthDelimitedCodec agrees on the layout.
        let mut plain = LengthDelimitedCodec::new();
        let frame = plain.decode(&mut buf).expect("ok").expect("one frame");
        assert_eq!(&frame[..], &payload[..]);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        // Two frames whose payloads would read as huge lengths if mistaken for headers.
        let sent = [Envelope::app(vec![0xffu8; 40]), Envelope::ping(u64::MAX, -1)];
        let mut full = BytesMut::new();
        for env in &sent {
            encode_frame(env, 1024, &mut full).expect("fits");
        }
        let mut codec = FrameCodec::<Envelope>::new(1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in full.iter() {
            buf.put_u8(*b);
            if let Some((env, _)) = codec.decode(&mut buf).expect("no error") {
                got.push(env);
            }
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn oversized_header_is_refused_before_the_payload_arrives() {
        let mut codec = FrameCodec::<Envelope>::new(100);
        let mut buf = BytesMut::from(&101u32.to_be_bytes()[..]);
        match codec.decode(&mut buf) {
            Err(FrameError::TooLarge { len: 101, max: 100 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // An HTTP request is garbage with a huge length.
        let mut codec = FrameCodec::<Envelope>::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn large_payloads_frame_like_encode_frame_without_being_copied() {
        for env in [
            Envelope::app(vec![1u8; ZERO_COPY_MIN - 1]),
            Envelope::app(vec![2u8; ZERO_COPY_MIN]),
            Envelope::raft(vec![3u8; 300_000]),
            Envelope::ping(1, 2),
            Envelope::default(),
        ] {
            let mut expect = BytesMut::new();
            let n = encode_frame(&env, 1 << 20, &mut expect).expect("fits");
            let mut head = BytesMut::new();
            let (m, payload) = encode_envelope_frame(&env, 1 << 20, &mut head).expect("fits");
            assert_eq!(m, n);
            let large = matches!(&env.body, Some(Body::App(p) | Body::Raft(p)) if p.len() >= ZERO_COPY_MIN);
            assert_eq!(payload.is_some(), large);
            let mut wire = head.to_vec();
            wire.extend_from_slice(payload.as_deref().unwrap_or_default());
            assert_eq!(wire, expect.to_vec());
        }
        let mut buf = BytesMut::new();
        let big = Envelope::app(vec![0u8; 20_000]);
        assert!(matches!(
            encode_envelope_frame(&big, 10_000, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_large_frame_is_read_into_one_allocation() {
        let env = Envelope::app(vec![5u8; 200_000]);
        let mut wire = BytesMut::new();
        encode_frame(&env, 1 << 20, &mut wire).expect("fits");
        let mut codec = FrameCodec::<Envelope>::new(1 << 20);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&wire[..64 * 1024]);
        assert!(codec.decode(&mut buf).expect("ok").is_none());
        // Room for the whole rest of the frame, so reading it needs no regrowth.
        assert!(buf.capacity() - buf.len() >= wire.len() - 64 * 1024);
        buf.extend_from_slice(&wire[64 * 1024..]);
        let (got, n) = codec.decode(&mut buf).expect("ok").expect("frame");
        assert_eq!((got, n), (env, wire.len()));
    }

    #[test]
    fn encoding_over_the_limit_appends_nothing() {
        let mut buf = BytesMut::new();
        let env = Envelope::app(vec![0u8; 200]);
        assert!(matches!(
            encode_frame(&env, 100, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn undecodable_payload_is_a_decode_error() {
        let mut codec = FrameCodec::<Envelope>::new(1024);
        // Field 2 (ping) declared length-delimited with a length past the end.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 0x12, 0x7f][..]);
        match codec.decode(&mut buf) {
            Err(FrameError::Decode {
                what: "Envelope",
                len: 2,
                ..
            }) => {}
            other => panic!("expected Decode, got {other:?}"),
        }
    }

    #[test]
    fn end_of_stream_inside_a_frame_is_truncated() {
        let mut codec = FrameCodec::<Envelope>::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 1, 2][..]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated { buffered: 6 })
        ));
        // A header alone is truncated too.
        let mut codec = FrameCodec::<Envelope>::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0][..]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated { buffered: 2 })
        ));
        let mut empty = BytesMut::new();
        assert!(matches!(codec.decode_eof(&mut empty), Ok(None)));
    }

    #[test]
    fn unknown_variant_decodes_as_keepalive() {
        // Tag 15, varint: a field a later version might add.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 15 << 3, 1][..]);
        let mut codec = FrameCodec::<Envelope>::new(1024);
        let (env, wire) = codec.decode(&mut buf).expect("ok").expect("frame");
        assert!(env.is_keepalive());
        assert_eq!(wire, 6);
    }
}
