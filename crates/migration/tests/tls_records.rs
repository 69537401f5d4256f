//! The migration streams' own TLS record layer (`tls_records`) against itself and against
//! rustls' ordinary connection on the other end: the bytes arrive whole and in order, keys are
//! replaced past their limit on both sides, a `close_notify` is a clean end, and a cut
//! connection or a changed byte is an error, never data.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use tokio_rustls::rustls::{ClientConnection, ServerConnection, StreamOwned};
use vireo_migration::hostauth::{
    accept, client_config, connect, peer_name, server_config, HostIdentity, TrustStore,
};

const T: Duration = Duration::from_secs(10);

struct Hosts {
    _dirs: [tempfile::TempDir; 2],
    a: HostIdentity,
    b: HostIdentity,
}

fn hosts() -> Hosts {
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let a = HostIdentity::load_or_create(da.path(), "a.example").unwrap();
    let b = HostIdentity::load_or_create(db.path(), "b.example").unwrap();
    Hosts {
        _dirs: [da, db],
        a,
        b,
    }
}

fn trusting(id: &HostIdentity) -> TrustStore {
    let mut t = TrustStore::new();
    t.trust(id.fingerprint(), "peer");
    t
}

/// Bytes that differ from position to position (a slip or a repeat shows).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn read_all_of(r: &mut impl Read, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    r.read_exact(&mut got).unwrap();
    got
}

#[test]
fn both_ends_ours_carry_megabytes_both_ways_through_key_updates() {
    let h = hosts();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(&h.a, &trusting(&h.b)).unwrap();
    let up = pattern(3 << 20, 1);
    let down = pattern(200_000, 2);
    let (up2, down2) = (up.clone(), down.clone());
    let srv = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s = accept(tcp, scfg, T).unwrap();
        s.rekey_after(5);
        // Read through BufRead as the page receiver does.
        let mut got = Vec::new();
        while got.len() < up2.len() {
            let chunk = s.fill_buf().unwrap();
            assert!(!chunk.is_empty(), "the stream ended early");
            let n = chunk.len().min(up2.len() - got.len());
            got.extend_from_slice(&chunk[..n]);
            s.consume(n);
        }
        assert!(got == up2, "the server read other bytes than were sent");
        s.write_all(&down2).unwrap();
    });
    let mut c = connect(addr, client_config(&h.b, &trusting(&h.a)).unwrap(), T).unwrap();
    c.rekey_after(7);
    for part in up.chunks(100_003) {
        c.write_all(part).unwrap();
    }
    assert!(read_all_of(&mut c, down.len()) == down);
    srv.join().unwrap();
}

#[test]
fn rustls_as_the_server_reads_what_ours_seals_and_answers_in_its_own_records() {
    let h = hosts();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(&h.a, &trusting(&h.b)).unwrap();
    let up = pattern(1 << 20, 3);
    let up2 = up.clone();
    let srv = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        let mut s = StreamOwned::new(ServerConnection::new(scfg).unwrap(), tcp);
        assert!(read_all_of(&mut s, up2.len()) == up2);
        s.write_all(b"answer").unwrap();
        s.conn.send_close_notify();
        s.flush().unwrap();
    });
    let mut c = connect(addr, client_config(&h.b, &trusting(&h.a)).unwrap(), T).unwrap();
    // Past the key's limit several times: rustls must follow each KeyUpdate.
    c.rekey_after(4);
    c.write_all(&up).unwrap();
    assert_eq!(read_all_of(&mut c, 6), b"answer");
    // rustls' close_notify is a clean end: no error, no more bytes.
    assert!(c.fill_buf().unwrap().is_empty());
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    srv.join().unwrap();
}

#[test]
fn ours_as_the_server_reads_rustls_records_and_follows_its_key_update() {
    let h = hosts();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(&h.a, &trusting(&h.b)).unwrap();
    let ccfg = client_config(&h.b, &trusting(&h.a)).unwrap();
    let up = pattern(600_000, 4);
    let up2 = up.clone();
    let cli = thread::spawn(move || {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        let mut s = StreamOwned::new(ClientConnection::new(ccfg, peer_name()).unwrap(), tcp);
        s.write_all(&up2[..300_000]).unwrap();
        s.flush().unwrap();
        // A KeyUpdate asking the other side to update too.
        s.conn.refresh_traffic_keys().unwrap();
        s.write_all(&up2[300_000..]).unwrap();
        s.flush().unwrap();
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"ok");
    });
    let (tcp, _) = listener.accept().unwrap();
    let mut s = accept(tcp, scfg, T).unwrap();
    assert!(read_all_of(&mut s, up.len()) == up);
    s.write_all(b"ok").unwrap();
    cli.join().unwrap();
}

/// One end as a raw socket in the middle: it forwards the client's bytes, changing one of
/// them at `flip` (or cutting the connection there when `None`).
fn through_a_bad_middle(flip: Option<usize>) -> std::io::Error {
    let h = hosts();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let middle = TcpListener::bind("127.0.0.1:0").unwrap();
    let maddr = middle.local_addr().unwrap();
    let scfg = server_config(&h.a, &trusting(&h.b)).unwrap();
    let srv = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s = accept(tcp, scfg, T).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut sink) {
                Ok(0) => panic!("a clean end where the connection was cut or forged"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    });
    let fwd = thread::spawn(move || {
        let (from, _) = middle.accept().unwrap();
        let to = TcpStream::connect(addr).unwrap();
        let (mut from_r, mut to_w) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        let (mut to_r, mut from_w) = (to, from);
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut to_r, &mut from_w);
        });
        let mut seen = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        // The handshake goes through whole; past it, the fault.
        let at = 8_000 + flip.unwrap_or(0);
        loop {
            let n = match from_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen + n > at {
                if flip.is_some() {
                    buf[at - seen] ^= 0x40;
                    let _ = to_w.write_all(&buf[..n]);
                    let _ = std::io::copy(&mut from_r, &mut to_w);
                } else {
                    let _ = to_w.write_all(&buf[..at - seen]);
                }
                break;
            }
            to_w.write_all(&buf[..n]).unwrap();
            seen += n;
        }
        let _ = to_w.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    let sent = thread::spawn(move || {
        let Ok(mut c) = connect(maddr, client_config(&h.b, &trusting(&h.a)).unwrap(), T) else {
            return;
        };
        let data = pattern(1 << 20, 5);
        let _ = c.write_all(&data);
    });
    let e = srv.join().unwrap();
    let _ = sent.join();
    fwd.join().unwrap();
    e
}

#[test]
fn a_changed_byte_fails_the_record_and_a_cut_is_not_an_end() {
    let forged = through_a_bad_middle(Some(20_000));
    assert_eq!(forged.kind(), std::io::ErrorKind::InvalidData, "{forged}");
    let cut = through_a_bad_middle(None);
    assert_eq!(cut.kind(), std::io::ErrorKind::UnexpectedEof, "{cut}");
    assert!(cut.to_string().contains("close_notify"), "{cut}");
}
