//! The TLS 1.3 record layer of peer connections: rustls's handshake, then records sealed and
//! opened in place.
//!
//! rustls does the whole handshake (the key exchange, both certificates, the peer's proof of its
//! key), through its unbuffered API, so that it consumes exactly the handshake's bytes and the
//! records behind them stay here. It then hands over the traffic secrets
//! (`dangerous_into_kernel_connection`, the API rustls offers for kernel TLS) and [`Sealed`]
//! seals and opens the application-data records itself with ring's AEADs, as RFC 8446 §5 says:
//! each record is sealed in place in the buffer it is written from, each received record is opened
//! in place in the buffer it was read into, and reads ask the socket for up to 64 KiB at a time
//! once the connection is busy. The bytes on the wire are TLS 1.3, as rustls writes them; the tests
//! check both directions against rustls itself.
//!
//! Why not rustls's own record layer: through tokio-rustls a received byte was copied three times
//! in user space (into rustls's 4 KiB-at-a-time deframer, into an owned `Vec` per record, into the
//! frame buffer) and a sent one once more than its encryption; the copies cost peer connections
//! more than the encryption did (BENCHMARKS.md, `nats`, "mTLS at 1 KiB").
//!
//! After the handshake a connection understands:
//! * application data — the stream;
//! * `close_notify` — the end of the stream; any other alert ends the connection with an error;
//! * `KeyUpdate` — the peer's: the next receiving secret (rustls derives it), and this side's own
//!   update when the peer requests one; this side updates its sending key itself before the
//!   cipher suite's confidentiality limit (2^24 records for AES-GCM);
//! * `NewSessionTicket` — ignored (peers never resume: each connection is fully authenticated).
//!
//! Anything else ends the connection with an error: a record that fails authentication, one
//! longer than RFC 8446 allows, an outer type other than application data, an inner type or
//! handshake message it does not know, a `KeyUpdate` not at the end of its record, another record
//! inside a split handshake message, a record sequence number that would wrap.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ExtractedSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// RFC 8446 §5.1: at most 2^14 bytes of plaintext in a record.
const MAX_PLAINTEXT: usize = 1 << 14;
/// RFC 8446 §5.2: at most 2^14 + 256 bytes of ciphertext in a record.
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const ALERT_WARNING: u8 = 1;
/// The record header's legacy version (RFC 8446 §5.1: always 0x0303).
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// Plaintext sealed per write call at most (sixteen full records, written with one `write`).
const WRITE_CHUNK: usize = 16 * MAX_PLAINTEXT;
/// What a quiet connection reads at once (keepalives and control messages fit).
const QUIET_READ: usize = 4 * 1024;
/// What a busy connection reads at once, once a read has filled its whole buffer.
const BUSY_READ: usize = 64 * 1024;
/// The largest handshake message (a ticket) taken after the handshake, and the largest buffer the
/// handshake itself may need (a certificate chain).
const MAX_HANDSHAKE_BYTES: usize = 128 * 1024;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(invalid("the negotiated cipher suite is not a TLS 1.3 suite of ring")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref()).map_err(|_| invalid("a traffic key of the wrong length"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("a traffic IV of the wrong length"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3: the IV xor the sequence number); the sequence
    /// number moves on, and never wraps.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("the record sequence number is exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// What derives the next traffic secrets at a key update (rustls's kernel connection).
trait Rekey: Send + Sync {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D> Rekey for KernelConnection<D>
where
    KernelConnection<D>: Send + Sync,
{
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_tx_secret()
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_rx_secret()
    }
}

/// An established TLS 1.3 connection whose records this node seals and opens (module docs).
pub struct Sealed<S> {
    io: S,
    rekey: Box<dyn Rekey>,
    tx: Keys,
    rx: Keys,
    /// The sending key is updated before the record with this sequence number.
    rekey_at: u64,
    suite: rustls::SupportedCipherSuite,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    /// Sealed records not yet written: `out[written..]`.
    out: Vec<u8>,
    written: usize,
    /// The peer asked for this side's key update; it goes before the next record.
    key_update_due: bool,
    close_sent: bool,
    /// Plaintext rustls opened during the handshake, handed out first.
    early: BytesMut,
    /// Bytes read: `buf[start..end]` not yet opened; `plain` is an opened record's plaintext
    /// not yet handed out (inside `buf`, before `start`).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: Range<usize>,
    /// A read has filled its whole buffer: read `BUSY_READ` at a time from now on.
    busy: bool,
    /// Handshake messages after the handshake, until whole.
    handshake: Vec<u8>,
    /// The peer's `close_notify` arrived.
    read_closed: bool,
}

impl<S> std::fmt::Debug for Sealed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

/// The two sides of rustls's unbuffered handshake, seen alike.
trait Handshaking: Send {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
    fn into_kernel(self) -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

/// The same methods under the same names on both sides' types.
macro_rules! handshaking {
    ($($conn:ty => $data:ty),*) => {$(
        impl Handshaking for $conn {
            type Data = $data;
            fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn common(&self) -> &rustls::CommonState {
                self
            }
            fn into_kernel(self) -> Result<(ExtractedSecrets, KernelConnection<$data>), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
        }
    )*};
}

handshaking!(UnbufferedClientConnection => ClientConnectionData, UnbufferedServerConnection => ServerConnectionData);

/// Runs the client side of the handshake on `io`. The configuration must enable secret
/// extraction.
pub(crate) async fn connect<S>(config: Arc<ClientConfig>, name: ServerName<'static>, io: S) -> io::Result<Sealed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    handshake(conn, io).await
}

/// Runs the server side of the handshake on `io`. The configuration must enable secret
/// extraction and send no session tickets.
pub(crate) async fn accept<S>(config: Arc<ServerConfig>, io: S) -> io::Result<Sealed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    handshake(conn, io).await
}

/// Drives rustls's handshake on `io` until the peer is authenticated, then takes over its secrets:
/// bytes read past the handshake stay in the new connection's buffer, and application data rustls
/// opened with the handshake is handed out first.
async fn handshake<C, S>(mut conn: C, mut io: S) -> io::Result<Sealed<S>>
where
    C: Handshaking,
    KernelConnection<C::Data>: Send + Sync + 'static,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut incoming = vec![0u8; MAX_RECORD];
    let mut used = 0;
    let mut outgoing = vec![0u8; QUIET_READ];
    let mut out_used = 0;
    let mut early = BytesMut::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..used]);
        let mut done = false;
        let mut more = false;
        match state {
            Err(e) => {
                // rustls queued an alert for the peer (why it is refused): send it if it goes at once.
                let mut alert = Vec::new();
                if let Ok(ConnectionState::EncodeTlsData(mut s)) = conn.process(&mut []).state {
                    alert.resize(256, 0);
                    let n = s.encode(&mut alert).unwrap_or(0);
                    alert.truncate(n);
                }
                if !alert.is_empty() {
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), async {
                        let _ = io.write_all(&alert).await;
                        let _ = io.flush().await;
                    })
                    .await;
                }
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut s)) => loop {
                match s.encode(&mut outgoing[out_used..]) {
                    Ok(n) => {
                        out_used += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(short)) => {
                        outgoing.resize(out_used + short.required_size, 0);
                    }
                    Err(e) => return Err(invalid(format!("TLS handshake: {e}"))),
                }
            },
            Ok(ConnectionState::TransmitTlsData(s)) => {
                io.write_all(&outgoing[..out_used]).await?;
                io.flush().await?;
                out_used = 0;
                s.done();
            }
            Ok(ConnectionState::ReadTraffic(mut s)) => {
                while let Some(record) = s.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
            }
            // A server may send before its peer's Finished; it is done only once the client is
            // authenticated.
            Ok(ConnectionState::WriteTraffic(_)) => {
                if conn.common().is_handshaking() {
                    more = true
                } else {
                    done = true
                }
            }
            Ok(ConnectionState::BlockedHandshake) => more = true,
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ))
            }
            Ok(_) => {
                return Err(invalid(
                    "TLS handshake: an unexpected state (early data is not accepted)",
                ))
            }
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if done {
            break;
        }
        if more {
            if used == incoming.len() {
                if incoming.len() >= MAX_HANDSHAKE_BYTES {
                    return Err(invalid("TLS handshake: a handshake message too large"));
                }
                incoming.resize(incoming.len() * 2, 0);
            }
            let n = io.read(&mut incoming[used..]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
            }
            used += n;
        }
    }
    let peer_certificates = conn
        .common()
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect());
    let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
    let suite = kernel.negotiated_cipher_suite();
    let limit = suite
        .tls13()
        .map(|s| s.common.confidentiality_limit)
        .ok_or_else(|| invalid("not a TLS 1.3 connection"))?;
    incoming.truncate(used);
    Ok(Sealed {
        io,
        rekey: Box::new(kernel),
        tx: Keys::new(secrets.tx)?,
        rx: Keys::new(secrets.rx)?,
        // Well before the limit: what a write call seals at most, and a margin.
        rekey_at: limit - limit / 8,
        suite,
        peer_certificates,
        out: Vec::new(),
        written: 0,
        key_update_due: false,
        close_sent: false,
        early,
        end: incoming.len(),
        buf: incoming,
        start: 0,
        plain: 0..0,
        busy: false,
        handshake: Vec::new(),
        read_closed: false,
    })
}

impl<S> Sealed<S> {
    /// The peer's certificate chain, as the handshake verified it.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certificates.as_deref()
    }

    /// The TLS 1.3 cipher suite the handshake agreed on.
    pub fn cipher_suite(&self) -> rustls::CipherSuite {
        self.suite.suite()
    }

    /// The stream underneath (to move a socket between runtimes; never to read or write it).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Seals one record of `content_type` whose plaintext `fill` appends to `out`.
    fn seal(&mut self, content_type: u8, fill: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        if self.tx.seq >= self.rekey_at {
            self.update_tx_key(false)?;
        }
        self.seal_record(content_type, fill)
    }

    fn seal_record(&mut self, content_type: u8, fill: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        // The nonce first: plaintext goes into `out` only once it can be sealed.
        let nonce = self.tx.next_nonce()?;
        let at = self.out.len();
        self.out
            .extend_from_slice(&[APPLICATION_DATA, LEGACY_VERSION[0], LEGACY_VERSION[1], 0, 0]);
        fill(&mut self.out);
        self.out.push(content_type);
        let len = self.out.len() - at - HEADER_LEN + TAG_LEN;
        debug_assert!(len <= MAX_CIPHERTEXT);
        self.out[at + 3..at + 5].copy_from_slice(&(len as u16).to_be_bytes());
        let header: [u8; HEADER_LEN] = self.out[at..at + HEADER_LEN].try_into().expect("five bytes");
        let sealed = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[at + HEADER_LEN..]);
        match sealed {
            Ok(tag) => {
                self.out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                // Never left where a drain would write it.
                self.out.truncate(at);
                Err(invalid("a record could not be sealed"))
            }
        }
    }

    /// Sends a KeyUpdate under the current key, then seals with the next one.
    fn update_tx_key(&mut self, request_peer: bool) -> io::Result<()> {
        self.seal_record(HANDSHAKE, |out| {
            out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, u8::from(request_peer)])
        })?;
        let next = self.rekey.next_tx().map_err(tls_error)?;
        self.tx = Keys::new(next)?;
        Ok(())
    }

    /// Seals up to `WRITE_CHUNK` bytes of `bufs` into records; returns how many.
    fn seal_from(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_CHUNK);
        let (mut slice, mut offset, mut taken) = (0, 0, 0);
        while taken < total {
            let n = (total - taken).min(MAX_PLAINTEXT);
            self.seal(APPLICATION_DATA, |out| {
                let mut left = n;
                while left > 0 {
                    let b = &bufs[slice][offset..];
                    let k = b.len().min(left);
                    out.extend_from_slice(&b[..k]);
                    left -= k;
                    offset += k;
                    if offset == bufs[slice].len() {
                        slice += 1;
                        offset = 0;
                    }
                }
            })?;
            taken += n;
        }
        Ok(taken)
    }

    /// Whether a whole record waits at `start`; its length (header included) if so.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let have = &self.buf[self.start..self.end];
        if have.len() < HEADER_LEN {
            return Ok(None);
        }
        if have[0] != APPLICATION_DATA {
            return Err(invalid(format!(
                "the peer sent a TLS record of type {} after the handshake (only application data \
                 is allowed)",
                have[0]
            )));
        }
        let len = u16::from_be_bytes([have[3], have[4]]) as usize;
        if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!("the peer sent a TLS record of {len} bytes")));
        }
        Ok((have.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
    }

    /// Opens the record of `len` bytes at `start` in place and acts on what it holds.
    fn open(&mut self, len: usize) -> io::Result<()> {
        let at = self.start;
        let header: [u8; HEADER_LEN] = self.buf[at..at + HEADER_LEN].try_into().expect("five bytes");
        let nonce = self.rx.next_nonce()?;
        let opened = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.buf[at + HEADER_LEN..at + len])
            .map_err(|_| invalid("a TLS record from the peer failed authentication (bad_record_mac)"))?;
        let Some(type_at) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("a TLS record from the peer holds no content type"));
        };
        if type_at > MAX_PLAINTEXT {
            return Err(invalid("a TLS record from the peer holds more than 2^14 bytes"));
        }
        let content_type = opened[type_at];
        let body = at + HEADER_LEN..at + HEADER_LEN + type_at;
        self.start += len;
        // RFC 8446 §5.1: a handshake message split over records has no other record between.
        if !self.handshake.is_empty() && content_type != HANDSHAKE {
            return Err(invalid("the peer interleaved a record with a split handshake message"));
        }
        match content_type {
            APPLICATION_DATA => self.plain = body,
            ALERT => {
                let alert = &self.buf[body];
                if alert.len() == 2 && alert[1] == CLOSE_NOTIFY {
                    self.read_closed = true;
                } else {
                    return Err(invalid(format!("the peer sent TLS alert {alert:?}")));
                }
            }
            HANDSHAKE => self.take_handshake(body)?,
            other => return Err(invalid(format!("the peer sent a TLS record of inner type {other}"))),
        }
        Ok(())
    }

    /// Handshake messages after the handshake: tickets are dropped, key updates applied.
    fn take_handshake(&mut self, body: Range<usize>) -> io::Result<()> {
        if self.handshake.len() + body.len() > MAX_HANDSHAKE_BYTES {
            return Err(invalid("the peer sent a handshake message too large"));
        }
        self.handshake.extend_from_slice(&self.buf[body]);
        loop {
            let m = &self.handshake;
            if m.len() < 4 {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, m[1], m[2], m[3]]) as usize;
            if 4 + len > MAX_HANDSHAKE_BYTES {
                return Err(invalid("the peer sent a handshake message too large"));
            }
            if m.len() < 4 + len {
                return Ok(());
            }
            match m[0] {
                NEW_SESSION_TICKET => {}
                KEY_UPDATE => {
                    let request = match &m[4..4 + len] {
                        [0] => false,
                        [1] => true,
                        _ => return Err(invalid("the peer sent a malformed KeyUpdate")),
                    };
                    // RFC 8446 §5.1: a key change ends its record.
                    if m.len() != 4 + len {
                        return Err(invalid("the peer sent a KeyUpdate that does not end its record"));
                    }
                    self.rx = Keys::new(self.rekey.next_rx().map_err(tls_error)?)?;
                    self.key_update_due |= request;
                }
                other => {
                    return Err(invalid(format!(
                        "the peer sent handshake message {other} after the handshake"
                    )))
                }
            }
            self.handshake.drain(..4 + len);
        }
    }

    /// The length of the record at `start` (header included), or of its header while that is
    /// incomplete.
    fn next_len(&self) -> usize {
        let have = &self.buf[self.start..self.end];
        if have.len() < HEADER_LEN {
            HEADER_LEN
        } else {
            HEADER_LEN + u16::from_be_bytes([have[3], have[4]]) as usize
        }
    }

    /// Reads more bytes into `buf`, with room for the next whole record at least.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        S: AsyncRead + Unpin,
    {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let record = self.next_len();
        let cramped = self.buf.len() - self.start < record || (self.busy && self.buf.len() - self.end < BUSY_READ / 2);
        if self.start > 0 && cramped {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let size = if self.busy {
            BUSY_READ + MAX_RECORD
        } else {
            QUIET_READ.max(record)
        };
        if self.buf.len() < size {
            self.buf.resize(size, 0);
        }
        let room = self.buf.len() - self.end;
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            let message = if self.start == self.end {
                "the peer closed the connection without a close_notify"
            } else {
                "the connection closed inside a TLS record"
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, message)));
        }
        self.busy |= n == room;
        self.end += n;
        Poll::Ready(Ok(()))
    }

    /// Writes every sealed record.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        S: AsyncWrite + Unpin,
    {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals the key update the peer asked for, if one is due.
    fn answer_key_update(&mut self) -> io::Result<()> {
        if self.key_update_due {
            self.key_update_due = false;
            self.update_tx_key(false)?;
        }
        Ok(())
    }

    /// Sets where the sending key is next updated (tests of key updates).
    #[cfg(test)]
    fn rekey_every(&mut self, records: u64) {
        self.rekey_at = self.tx.seq + records;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sealed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.early.is_empty() {
                let n = out.remaining().min(this.early.len());
                out.put_slice(&this.early[..n]);
                this.early.advance(n);
                return Poll::Ready(Ok(()));
            }
            if !this.plain.is_empty() {
                let n = out.remaining().min(this.plain.len());
                out.put_slice(&this.buf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.whole_record()? {
                Some(len) => this.open(len)?,
                None => ready!(this.poll_fill(cx))?,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sealed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection was closed",
            )));
        }
        this.answer_key_update()?;
        let n = this.seal_from(bufs)?;
        // Written at once if the socket takes it; what it does not take, the next call or a
        // flush writes.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.answer_key_update()?;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_drain(cx))?;
            this.seal(ALERT, |out| out.extend_from_slice(&[ALERT_WARNING, CLOSE_NOTIFY]))?;
            this.close_sent = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use crate::transport::tls::PeerTls;
    use tokio::io::{duplex, DuplexStream};

    fn node(ca: &Ca, id: u64) -> PeerTls {
        let n = ca.issue_node(id, &[], &[], 1).expect("issue");
        PeerTls::from_pem(&n.ca_pem, &n.cert_pem, &n.key_pem, "c", id).expect("material")
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("herald-peer").expect("name")
    }

    /// Bytes that tell where they were cut: byte i is i * 7 + seed.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
    }

    /// Writes `data` in writes of varying sizes (a vectored one among them), then flushes.
    async fn send<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) {
        let mut at = 0;
        let mut step = 1;
        while at < data.len() {
            let n = step.min(data.len() - at);
            if step % 3 == 0 && n > 1 {
                let (a, b) = data[at..at + n].split_at(n / 2);
                let mut slices = [io::IoSlice::new(a), io::IoSlice::new(b)];
                w.write_all_vectored_compat(&mut slices).await;
            } else {
                w.write_all(&data[at..at + n]).await.expect("write");
            }
            at += n;
            step = step * 5 % 70_001 + 1;
        }
        w.flush().await.expect("flush");
    }

    trait WriteVectoredCompat {
        async fn write_all_vectored_compat(&mut self, slices: &mut [io::IoSlice<'_>]);
    }

    impl<W: AsyncWrite + Unpin> WriteVectoredCompat for W {
        async fn write_all_vectored_compat(&mut self, slices: &mut [io::IoSlice<'_>]) {
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let n = self.write_vectored(slices).await.expect("vectored write");
                assert!(n > 0);
                io::IoSlice::advance_slices(&mut slices, n);
            }
        }
    }

    async fn receive<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        r.read_exact(&mut got).await.expect("read");
        got
    }

    async fn pair_of_ours() -> (Sealed<DuplexStream>, Sealed<DuplexStream>) {
        let ca = Ca::generate("c").unwrap();
        let (client, _) = node(&ca, 1).configs();
        let (_, server) = node(&ca, 2).configs();
        let (a, b) = duplex(64 * 1024);
        let (a, b) = tokio::join!(connect(client, name(), a), accept(server, b));
        (a.expect("client"), b.expect("server"))
    }

    #[tokio::test]
    async fn our_records_and_rustls_records_are_the_same_tls_both_ways() {
        let ca = Ca::generate("c").unwrap();
        let (client, _) = node(&ca, 1).configs();
        let (_, server) = node(&ca, 2).configs();
        // A server like an older node's: rustls's record layer, session tickets sent after the
        // handshake (which this side must skip).
        let mut ticketing = (*server).clone();
        ticketing.send_tls13_tickets = 2;
        let (a, b) = duplex(64 * 1024);
        let (ours, theirs) = tokio::join!(
            connect(client.clone(), name(), a),
            tokio_rustls::TlsAcceptor::from(Arc::new(ticketing)).accept(b)
        );
        let (mut ours, mut theirs) = (ours.expect("ours"), theirs.expect("rustls"));
        assert_eq!(
            crate::transport::tls::identity_of(ours.peer_certificates()).map(|i| i.node),
            Some(2)
        );
        let (up, down) = (pattern(300_000, 1), pattern(200_000, 2));
        let ((), got) = tokio::join!(send(&mut ours, &up), receive(&mut theirs, up.len()));
        assert!(got == up, "rustls reads what this side sealed");
        let ((), got) = tokio::join!(send(&mut theirs, &down), receive(&mut ours, down.len()));
        assert!(got == down, "this side opens what rustls sealed");

        // Key updates: rustls's, then ours every three records.
        theirs.get_mut().1.refresh_traffic_keys().expect("rustls key update");
        let ((), got) = tokio::join!(send(&mut theirs, &down), receive(&mut ours, down.len()));
        assert!(got == down, "read across the peer's key update");
        let before = ours.tx.iv;
        ours.rekey_every(3);
        let ((), got) = tokio::join!(send(&mut ours, &up), receive(&mut theirs, up.len()));
        assert!(got == up, "rustls reads across this side's key updates");
        assert_ne!(before, ours.tx.iv, "the sending key changed");

        // close_notify, both ways.
        ours.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.expect("a clean end for rustls");
        assert!(rest.is_empty());
        theirs.shutdown().await.expect("rustls shutdown");
        assert_eq!(ours.read(&mut [0; 16]).await.expect("a clean end"), 0);

        // And the other way round: rustls dials, this side accepts.
        let (a, b) = duplex(64 * 1024);
        let (theirs, ours) = tokio::join!(
            tokio_rustls::TlsConnector::from(client).connect(name(), a),
            accept(server, b)
        );
        let (mut theirs, mut ours) = (theirs.expect("rustls"), ours.expect("ours"));
        let ((), got) = tokio::join!(send(&mut theirs, &up), receive(&mut ours, up.len()));
        assert!(got == up);
        let ((), got) = tokio::join!(send(&mut ours, &down), receive(&mut theirs, down.len()));
        assert!(got == down);
    }

    #[tokio::test]
    async fn a_key_update_the_peer_requests_is_answered_and_both_keep_talking() {
        let (mut a, mut b) = pair_of_ours().await;
        let (a_rx, b_tx) = (a.rx.iv, b.tx.iv);
        a.update_tx_key(true).expect("request");
        a.flush().await.expect("flush");
        let (data, back) = (pattern(50_000, 3), pattern(40_000, 4));
        let ((), got) = tokio::join!(send(&mut a, &data), receive(&mut b, data.len()));
        assert!(got == data);
        assert!(b.key_update_due, "the request is noted");
        let ((), got) = tokio::join!(send(&mut b, &back), receive(&mut a, back.len()));
        assert!(got == back, "read under b's answered key update");
        assert!(!b.key_update_due);
        assert_ne!(b.tx.iv, b_tx, "b updated its sending key");
        assert_ne!(a.rx.iv, a_rx, "a follows it");
    }

    /// A record this side did not seal, written straight to the socket under `b`.
    async fn refused(raw: &[u8]) -> io::Error {
        let (mut a, mut b) = pair_of_ours().await;
        a.get_mut().write_all(raw).await.expect("raw write");
        drop(a);
        b.read(&mut [0; 64]).await.expect_err("refused")
    }

    #[tokio::test]
    async fn records_that_are_forged_mistyped_oversized_or_cut_off_end_the_connection() {
        let mut forged = vec![APPLICATION_DATA, 3, 3, 0, 40];
        forged.extend(pattern(40, 9));
        let e = refused(&forged).await;
        assert!(e.to_string().contains("bad_record_mac"), "{e}");

        let e = refused(&[HANDSHAKE, 3, 3, 0, 20]).await;
        assert!(e.to_string().contains("type 22"), "{e}");

        let too_long = (MAX_CIPHERTEXT + 1) as u16;
        let [hi, lo] = too_long.to_be_bytes();
        let e = refused(&[APPLICATION_DATA, 3, 3, hi, lo]).await;
        assert!(e.to_string().contains("bytes"), "{e}");

        let e = refused(&[APPLICATION_DATA, 3, 3, 0, 100, 1, 2, 3]).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("inside a TLS record"), "{e}");
    }

    #[tokio::test]
    async fn a_record_replayed_or_reordered_fails_to_open() {
        // Two records sealed by `a`, delivered to `b` in the wrong order.
        let (mut a, mut b) = pair_of_ours().await;
        a.seal(APPLICATION_DATA, |out| out.extend_from_slice(b"first")).unwrap();
        let first = std::mem::take(&mut a.out);
        a.seal(APPLICATION_DATA, |out| out.extend_from_slice(b"second"))
            .unwrap();
        let second = std::mem::take(&mut a.out);
        a.get_mut().write_all(&second).await.unwrap();
        a.get_mut().write_all(&first).await.unwrap();
        let e = b.read(&mut [0; 64]).await.expect_err("out of order");
        assert!(e.to_string().contains("bad_record_mac"), "{e}");

        // In order they open; the first one again does not.
        let (mut a, mut b) = pair_of_ours().await;
        a.seal(APPLICATION_DATA, |out| out.extend_from_slice(b"first")).unwrap();
        let first = a.out.clone();
        a.flush().await.unwrap();
        assert_eq!(&receive(&mut b, 5).await, b"first");
        a.get_mut().write_all(&first).await.unwrap();
        let e = b.read(&mut [0; 64]).await.expect_err("replayed");
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
    }

    /// Records as (inner content type, plaintext).
    type Records<'a> = &'a [(u8, &'a [u8])];

    /// What `b` makes of records `a` seals with the session's keys.
    async fn opened(records: Records<'_>) -> io::Result<Vec<u8>> {
        let (mut a, mut b) = pair_of_ours().await;
        for (content_type, body) in records {
            a.seal_record(*content_type, |out| out.extend_from_slice(body)).unwrap();
        }
        a.flush().await.unwrap();
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn messages_a_peer_may_not_send_after_the_handshake_end_the_connection() {
        let ticket_part: &[u8] = &[NEW_SESSION_TICKET, 0, 0, 10, 1, 2];
        let cases: [(Records, &str); 5] = [
            (&[(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0, 99])], "does not end its record"),
            (&[(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 2])], "malformed KeyUpdate"),
            (&[(HANDSHAKE, &[1, 0, 0, 0])], "handshake message 1"),
            (&[(HANDSHAKE, ticket_part), (APPLICATION_DATA, b"x")], "interleaved"),
            (&[(ALERT, &[2, 40])], "alert"),
        ];
        for (records, why) in cases {
            let e = opened(records).await.expect_err(why);
            assert!(e.to_string().contains(why), "{e} (expected {why})");
        }
        // What may come: data, a whole ticket (skipped), then close_notify (the end).
        let ticket: &[u8] = &[NEW_SESSION_TICKET, 0, 0, 2, 7, 7];
        let got = opened(&[
            (APPLICATION_DATA, b"one"),
            (HANDSHAKE, ticket),
            (APPLICATION_DATA, b"two"),
            (ALERT, &[ALERT_WARNING, CLOSE_NOTIFY]),
            (APPLICATION_DATA, b"after the end"),
        ])
        .await
        .expect("a clean end");
        assert_eq!(got, b"onetwo");
    }

    fn any_records() -> impl proptest::strategy::Strategy<Value = Vec<(u8, Vec<u8>)>> {
        use proptest::prelude::*;
        let inner = prop_oneof![Just(APPLICATION_DATA), Just(HANDSHAKE), Just(ALERT), any::<u8>()];
        proptest::collection::vec((inner, proptest::collection::vec(any::<u8>(), 0..40)), 0..8)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Whatever a peer seals (any inner type, any body: handshake fragments, alerts, key
        /// updates) and whatever bytes follow, the reader neither panics nor hands out more than
        /// the application data sealed before the first thing it refuses, in order, and all of it.
        #[test]
        fn any_records_and_garbage_give_the_data_before_them_and_nothing_else(
            records in any_records(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (got, sent) = rt.block_on(async {
                let (mut a, mut b) = pair_of_ours().await;
                let mut sent = Vec::new();
                for (content_type, body) in &records {
                    a.seal_record(*content_type, |out| out.extend_from_slice(body)).unwrap();
                    if *content_type == APPLICATION_DATA {
                        sent.extend_from_slice(body);
                    }
                }
                a.flush().await.unwrap();
                a.get_mut().write_all(&tail).await.unwrap();
                drop(a);
                let mut got = Vec::new();
                let mut chunk = [0u8; 7];
                while let Ok(n) = b.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                }
                (got, sent)
            });
            // The model: data up to the first record that is not application data. An alert or
            // an unknown inner type ends what is read there exactly; a handshake record may be a
            // ticket (skipped, more data follows) or not (refused), so after one only a prefix of
            // the rest may come.
            let mut expected = Vec::new();
            let mut exact = true;
            for (content_type, body) in &records {
                match *content_type {
                    APPLICATION_DATA => expected.extend_from_slice(body),
                    HANDSHAKE => {
                        exact = false;
                        break;
                    }
                    _ => break,
                }
            }
            if exact {
                proptest::prop_assert_eq!(&got, &expected);
            } else {
                proptest::prop_assert!(got.starts_with(&expected) && sent.starts_with(&got));
            }
        }
    }

    #[tokio::test]
    async fn an_exhausted_sequence_number_refuses_to_write_and_leaks_no_plaintext() {
        let (mut a, mut b) = pair_of_ours().await;
        a.rekey_at = u64::MAX;
        a.tx.seq = u64::MAX;
        let secret = b"never in the clear";
        let e = a.write_all(secret).await.expect_err("no nonce left");
        assert!(e.to_string().contains("exhausted"), "{e}");
        assert!(a.out.is_empty(), "nothing left to drain");
        let _ = a.shutdown().await;
        drop(a);
        let mut raw = Vec::new();
        let _ = b.get_mut().read_to_end(&mut raw).await;
        assert!(!raw.windows(secret.len()).any(|w| w == secret), "plaintext on the wire");
    }

    #[tokio::test]
    async fn a_quiet_connection_reads_small_and_a_busy_one_reads_ahead() {
        let (mut a, mut b) = pair_of_ours().await;
        let small = pattern(100, 5);
        let ((), got) = tokio::join!(send(&mut a, &small), receive(&mut b, small.len()));
        assert!(got == small);
        assert!(
            !b.busy && b.buf.len() <= MAX_RECORD,
            "{} bytes for a quiet connection",
            b.buf.len()
        );
        let big = pattern(1 << 20, 6);
        let ((), got) = tokio::join!(send(&mut a, &big), receive(&mut b, big.len()));
        assert!(got == big);
        assert!(b.busy && b.buf.len() >= BUSY_READ, "{}", b.buf.len());
    }
}
