//! A migration stream's TLS 1.3 records, sealed and opened by the stream itself in buffers it
//! keeps, after rustls did the handshake (rustls' kernel-connection API, the one kTLS uses:
//! rustls keeps the secrets and derives the next ones on a key update; this side only
//! protects records, RFC 8446 §5.2).
//!
//! Why: through rustls' own buffered connection every received record was copied twice more
//! than needed (from the read-ahead buffer into rustls' deframer, and once decrypted into a
//! fresh allocation), and every sent record was a fresh allocation. Here a record is opened
//! in place in the read-ahead buffer and handed out from there, and records are sealed into
//! one send buffer reused from write to write (docs/migration-performance.md, "Session 37").
//!
//! What goes on the wire is standard TLS 1.3: a peer using rustls' ordinary connection reads
//! and writes the same records. Limits kept: a key is used for at most its cipher's
//! confidentiality limit of records, then replaced with a `KeyUpdate` (a peer's `KeyUpdate`
//! is followed, and answered when it asks; a session ticket is kept as rustls keeps it); a
//! `close_notify` ends the stream cleanly, any other alert or message is an error.

use std::io::{self, BufRead, IoSlice, Read, Write};
use std::net::TcpStream;
use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use tokio_rustls::rustls::client::UnbufferedClientConnection;
use tokio_rustls::rustls::kernel::KernelConnection;
use tokio_rustls::rustls::server::UnbufferedServerConnection;
use tokio_rustls::rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use tokio_rustls::rustls::{self, CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets};

/// Plaintext in one record at most (RFC 8446 §5.1).
const MAX_PLAIN: usize = 1 << 14;
/// A record's ciphertext at most, with its content type byte and tag (RFC 8446 §5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
/// Bytes read from the socket at a time. rustls read the socket 4 KiB at a time, a `recv` per
/// page under a page stream; the records are opened where they land.
const READ_AHEAD: usize = 1 << 20;
/// Plaintext sealed per write at most: a 1 MiB run of pages with its batch's header and
/// entries in one `write` to the socket.
const MAX_WRITE: usize = (1 << 20) + (64 << 10);
/// Records left under a key's confidentiality limit when it is replaced.
const REKEY_MARGIN: u64 = 1 << 10;

/// The words rustls used for a connection that ended without `close_notify` (the migration's
/// errors name it as such: `error.rs`).
const UNEXPECTED_EOF: &str = "peer closed connection without sending TLS close_notify";

/// What the stream needs of rustls' kernel connection: the next secrets on a key update, and
/// a session ticket the server sends after the handshake kept (a client's only).
trait Rekey: Send {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error>;
}

macro_rules! rekey_for {
    ($data:ty, $ticket:expr) => {
        impl Rekey for KernelConnection<$data> {
            fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
                self.update_tx_secret()
            }
            fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
                self.update_rx_secret()
            }
            fn ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error> {
                $ticket(self, payload)
            }
        }
    };
}

rekey_for!(
    rustls::client::ClientConnectionData,
    |c: &mut KernelConnection<_>, p: &[u8]| c.handle_new_session_ticket(p)
);
rekey_for!(
    rustls::server::ServerConnectionData,
    |_: &mut KernelConnection<_>, _: &[u8]| Err(rustls::Error::General(
        "a client sent a session ticket".into()
    ))
);

/// One direction's key: records are numbered from `seq`, each nonce the IV XOR its number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Direction> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("the negotiated cipher is not one this host seals")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("the negotiated key does not fit its cipher"))?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("the negotiated IV is not 12 bytes"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce; the number moves on.
    fn nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("TLS record layer: {why}"),
    )
}

fn header(len: usize) -> [u8; HEADER] {
    let l = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, l[0], l[1]]
}

/// A TLS 1.3 stream over TCP whose records this side seals and opens. Blocking; the socket's
/// timeouts bound every read and write.
pub struct RecordStream {
    tcp: TcpStream,
    rekey: Box<dyn Rekey>,
    suite: CipherSuite,
    /// Records under one key at most before the key is replaced.
    limit: u64,
    tx: Direction,
    rx: Direction,
    /// Bytes read from the socket: `[rstart, rend)` not yet opened; `plain` the part of an
    /// opened record not yet consumed (always before `rstart`).
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    plain: Range<usize>,
    peer_closed: bool,
    /// Records sealed for the socket, reused from write to write.
    wbuf: Vec<u8>,
}

impl RecordStream {
    /// The TCP socket (to shut it down from another thread, or set its timeouts).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The cipher suite the handshake chose.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Replaces the sending key after `records` records instead of at the cipher's limit
    /// (tests: a key update within a few records).
    #[doc(hidden)]
    pub fn rekey_after(&mut self, records: u64) {
        self.limit = records;
    }

    fn new(
        tcp: TcpStream,
        secrets: ExtractedSecrets,
        rekey: Box<dyn Rekey>,
        suite: rustls::SupportedCipherSuite,
        leftover: &[u8],
    ) -> io::Result<RecordStream> {
        let limit = suite
            .tls13()
            .map(|s| s.common.confidentiality_limit)
            .unwrap_or(u64::MAX)
            .saturating_sub(REKEY_MARGIN)
            .max(1);
        let mut rbuf = vec![0u8; READ_AHEAD + MAX_CIPHER + HEADER];
        rbuf[..leftover.len()].copy_from_slice(leftover);
        Ok(RecordStream {
            tcp,
            rekey,
            suite: suite.suite(),
            limit,
            tx: Direction::new(secrets.tx.0, secrets.tx.1)?,
            rx: Direction::new(secrets.rx.0, secrets.rx.1)?,
            rbuf,
            rstart: 0,
            rend: leftover.len(),
            plain: 0..0,
            peer_closed: false,
            wbuf: Vec::new(),
        })
    }

    /// Appends one sealed record of `ty` holding the bytes `fill` writes into the send buffer.
    fn seal(&mut self, ty: u8, len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        if self.tx.seq >= self.limit {
            self.update_tx_key()?;
        }
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&header(len + 1 + TAG));
        fill(&mut self.wbuf);
        debug_assert_eq!(self.wbuf.len(), start + HEADER + len);
        self.wbuf.push(ty);
        let nonce = self.tx.nonce();
        let (hdr, body) = self.wbuf[start..].split_at_mut(HEADER);
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*hdr), body)
            .map_err(|_| invalid("sealing a record failed"))?;
        self.wbuf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Tells the peer the sending key changes (a `KeyUpdate` under the old key), then seals
    /// with the next one.
    fn update_tx_key(&mut self) -> io::Result<()> {
        // The KeyUpdate itself goes under the old key: lift the limit for that one record.
        let limit = std::mem::replace(&mut self.limit, u64::MAX);
        let sealed = self.seal(HANDSHAKE, 5, |b| {
            b.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0])
        });
        self.limit = limit;
        sealed?;
        let (seq, secrets) = self.rekey.next_tx().map_err(io::Error::other)?;
        self.tx = Direction::new(seq, secrets)?;
        Ok(())
    }

    fn flush_sealed(&mut self) -> io::Result<()> {
        let r = self.tcp.write_all(&self.wbuf);
        self.wbuf.clear();
        r
    }

    /// Reads until one whole record is buffered; its length.
    fn buffered_record(&mut self) -> io::Result<usize> {
        loop {
            let have = self.rend - self.rstart;
            if have >= HEADER {
                let h = &self.rbuf[self.rstart..self.rstart + HEADER];
                let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
                if h[0] != APPLICATION_DATA || h[1] != 3 || h[2] != 3 {
                    return Err(invalid(&format!(
                        "a record of type {} version {}.{} where only protected records come",
                        h[0], h[1], h[2]
                    )));
                }
                if !(TAG + 1..=MAX_CIPHER).contains(&len) {
                    return Err(invalid(&format!("a record of {len} bytes")));
                }
                if have >= HEADER + len {
                    return Ok(len);
                }
            }
            self.read_more()?;
        }
    }

    fn read_more(&mut self) -> io::Result<()> {
        if self.rstart == self.rend {
            (self.rstart, self.rend) = (0, 0);
        } else if self.rbuf.len() - self.rend < MAX_CIPHER + HEADER {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        loop {
            match self.tcp.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, UNEXPECTED_EOF)),
                Ok(n) => {
                    self.rend += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the next record in place: application data becomes `plain`; a key update, an
    /// alert or anything else is dealt with here.
    fn open_next(&mut self) -> io::Result<()> {
        let len = self.buffered_record()?;
        let at = self.rstart;
        self.rstart += HEADER + len;
        let mut hdr = [0u8; HEADER];
        hdr.copy_from_slice(&self.rbuf[at..at + HEADER]);
        let nonce = self.rx.nonce();
        let body = &mut self.rbuf[at + HEADER..at + HEADER + len];
        let opened = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(hdr), body)
            .map_err(|_| invalid("a record failed its authentication (corrupted or forged)"))?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("a record with no content type"));
        };
        let ty = opened[end];
        let content = at + HEADER..at + HEADER + end;
        match ty {
            APPLICATION_DATA => self.plain = content,
            ALERT => {
                let a = &self.rbuf[content];
                if a.len() == 2 && a[1] == 0 {
                    self.peer_closed = true;
                } else {
                    return Err(invalid(&format!("the peer sent alert {a:?}")));
                }
            }
            HANDSHAKE => {
                // Rare and small (a key update, a session ticket): copied out of the buffer.
                let msgs = self.rbuf[content].to_vec();
                self.handshake_messages(&msgs)?;
            }
            other => return Err(invalid(&format!("a record of content type {other}"))),
        }
        Ok(())
    }

    /// The handshake messages of one record: each whole in it (rustls sends them so).
    fn handshake_messages(&mut self, mut m: &[u8]) -> io::Result<()> {
        while !m.is_empty() {
            if m.len() < 4 {
                return Err(invalid("a handshake message cut short"));
            }
            let len = u32::from_be_bytes([0, m[1], m[2], m[3]]) as usize;
            let Some(body) = m.get(4..4 + len) else {
                return Err(invalid("a handshake message split across records"));
            };
            match (m[0], body) {
                (KEY_UPDATE, &[requested @ (0 | 1)]) => {
                    let (seq, secrets) = self.rekey.next_rx().map_err(io::Error::other)?;
                    self.rx = Direction::new(seq, secrets)?;
                    if requested == 1 {
                        self.update_tx_key()?;
                        self.flush_sealed()?;
                    }
                }
                (NEW_SESSION_TICKET, _) => self.rekey.ticket(body).map_err(tls_error)?,
                (ty, _) => return Err(invalid(&format!("unexpected handshake message {ty}"))),
            }
            m = &m[4 + len..];
        }
        Ok(())
    }
}

impl BufRead for RecordStream {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.plain.is_empty() && !self.peer_closed {
            self.open_next()?;
        }
        Ok(&self.rbuf[self.plain.clone()])
    }

    fn consume(&mut self, amt: usize) {
        self.plain.start = (self.plain.start + amt).min(self.plain.end);
    }
}

impl Read for RecordStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let have = self.fill_buf()?;
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl Write for RecordStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Seals up to [`MAX_WRITE`] of the slices into records and writes them all to the socket
    /// before returning (nothing stays buffered between writes: `flush` has nothing to do).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_WRITE);
        let (mut slice, mut off, mut left) = (0usize, 0usize, total);
        while left > 0 {
            let n = left.min(MAX_PLAIN);
            self.seal(APPLICATION_DATA, n, |w| {
                let mut want = n;
                while want > 0 {
                    let s = &bufs[slice][off..];
                    let k = s.len().min(want);
                    w.extend_from_slice(&s[..k]);
                    want -= k;
                    off += k;
                    if off == bufs[slice].len() {
                        slice += 1;
                        off = 0;
                    }
                }
            })?;
            left -= n;
        }
        self.flush_sealed()?;
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake needs of rustls' two unbuffered connections (they share no trait).
trait Handshaking: Sized {
    type Data: Send + 'static;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self)
        -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

macro_rules! handshaking_for {
    ($conn:ty, $data:ty) => {
        impl Handshaking for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn into_kernel(
                self,
            ) -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
        }
    };
}

handshaking_for!(
    UnbufferedClientConnection,
    rustls::client::ClientConnectionData
);
handshaking_for!(
    UnbufferedServerConnection,
    rustls::server::ServerConnectionData
);

/// The length of the first whole record in `b`, if one is there.
fn first_record(b: &[u8]) -> Option<usize> {
    let len = usize::from(u16::from_be_bytes([*b.get(3)?, *b.get(4)?]));
    (b.len() >= HEADER + len).then_some(HEADER + len)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Drives rustls through the handshake, then takes the secrets. rustls is shown one record
/// more only when it asks for more: the peer's first application data may already be here
/// behind the last handshake record, and those records are this stream's to open.
fn handshake<C: Handshaking>(mut conn: C, mut tcp: TcpStream) -> io::Result<RecordStream>
where
    KernelConnection<C::Data>: Rekey,
{
    let mut inbuf: Vec<u8> = Vec::new();
    let mut shown = 0usize;
    let mut out = vec![0u8; 1 << 14];
    let mut out_len = 0usize;
    let mut chunk = vec![0u8; 1 << 14];
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut inbuf[..shown]);
        let mut done = false;
        let mut need_more = false;
        match state.map_err(tls_error)? {
            ConnectionState::EncodeTlsData(mut e) => loop {
                match e.encode(&mut out[out_len..]) {
                    Ok(n) => {
                        out_len += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => {
                        out.resize(out_len + s.required_size, 0);
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            },
            ConnectionState::TransmitTlsData(t) => {
                tcp.write_all(&out[..out_len])?;
                out_len = 0;
                t.done();
            }
            ConnectionState::BlockedHandshake => need_more = true,
            ConnectionState::WriteTraffic(_) => done = true,
            other => {
                return Err(invalid(&format!("{other:?} during the handshake")));
            }
        }
        inbuf.drain(..discard);
        shown -= discard;
        if done {
            if shown != 0 {
                return Err(invalid("handshake records left unread at its end"));
            }
            if out_len > 0 {
                tcp.write_all(&out[..out_len])?;
            }
            break;
        }
        if need_more {
            loop {
                if let Some(n) = first_record(&inbuf[shown..]) {
                    shown += n;
                    break;
                }
                let n = tcp.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
                inbuf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
    let suite = kernel.negotiated_cipher_suite();
    RecordStream::new(tcp, secrets, Box::new(kernel), suite, &inbuf[shown..])
}

/// The client end of a handshake on `tcp` (the caller set its timeouts).
pub fn client(
    tcp: TcpStream,
    cfg: std::sync::Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
) -> io::Result<RecordStream> {
    let conn = UnbufferedClientConnection::new(cfg, name).map_err(tls_error)?;
    handshake(conn, tcp)
}

/// The server end of a handshake on an accepted `tcp`.
pub fn server(
    tcp: TcpStream,
    cfg: std::sync::Arc<rustls::ServerConfig>,
) -> io::Result<RecordStream> {
    let conn = UnbufferedServerConnection::new(cfg).map_err(tls_error)?;
    handshake(conn, tcp)
}
