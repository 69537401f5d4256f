//! Mutual TLS between two "hosts" on loopback: trusted pairs talk; a host that is not trusted
//! (on either side) is refused during the handshake, before the server reads any data.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use tokio_rustls::rustls::{self, ClientConnection, ServerConnection, StreamOwned};
use vireo_migration::hostauth::{
    client_config, peer_name, server_config, HostIdentity, TrustStore,
};

fn host(name: &str) -> (tempfile::TempDir, HostIdentity) {
    let dir = tempfile::tempdir().unwrap();
    let id = HostIdentity::load_or_create(dir.path(), name).unwrap();
    (dir, id)
}

fn trusting(ids: &[&HostIdentity]) -> TrustStore {
    let mut t = TrustStore::new();
    for (i, id) in ids.iter().enumerate() {
        t.trust(id.fingerprint(), &format!("host{i}"));
    }
    t
}

/// Server on loopback that reads what the client sends; returns (client result, what the
/// server read or its error).
fn exchange(
    server: (&HostIdentity, TrustStore),
    client: (&HostIdentity, TrustStore),
) -> (Result<(), String>, Result<Vec<u8>, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(server.0, &server.1).unwrap();
    let srv = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = ServerConnection::new(scfg).unwrap();
        let mut s = StreamOwned::new(conn, tcp);
        let mut buf = vec![0u8; 8];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        s.write_all(b"ok").map_err(|e| e.to_string())?;
        s.flush().map_err(|e| e.to_string())?;
        Ok(buf)
    });
    let ccfg = client_config(client.0, &client.1).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = StreamOwned::new(ClientConnection::new(ccfg, peer_name()).unwrap(), tcp);
    let client = (|| {
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
        }
        // Every byte of guest RAM goes through this cipher: the cheaper AES-128-GCM.
        let suite = s.conn.negotiated_cipher_suite().map(|c| c.suite());
        if suite != Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256) {
            return Err(format!("negotiated {suite:?}, not AES-128-GCM"));
        }
        s.write_all(b"vm pages").map_err(|e| e.to_string())?;
        s.flush().map_err(|e| e.to_string())?;
        // TLS 1.3 reports a refused client certificate only after the client's flight: read
        // the server's answer to see it.
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).map_err(|e| e.to_string())?;
        (&ok == b"ok")
            .then_some(())
            .ok_or_else(|| "wrong answer".to_string())
    })();
    drop(s);
    (client, srv.join().unwrap())
}

#[test]
fn trusted_hosts_talk() {
    let (_a_dir, a) = host("a.example");
    let (_b_dir, b) = host("b.example");
    let (c, s) = exchange((&a, trusting(&[&b])), (&b, trusting(&[&a])));
    assert_eq!(s.unwrap(), b"vm pages");
    c.unwrap();
}

#[test]
fn an_untrusted_client_is_refused_before_any_data() {
    let (_a_dir, a) = host("a.example");
    let (_b_dir, b) = host("b.example");
    let (_m_dir, mallory) = host("mallory.example");
    // The server trusts only b; mallory trusts the server.
    let (c, s) = exchange((&a, trusting(&[&b])), (&mallory, trusting(&[&a])));
    let e = s.unwrap_err();
    assert!(
        e.contains("certificate") || e.contains("Certificate"),
        "{e}"
    );
    assert!(c.is_err(), "the client hears it was refused");
}

#[test]
fn a_client_refuses_an_untrusted_server() {
    let (_a_dir, a) = host("a.example");
    let (_b_dir, b) = host("b.example");
    let (_m_dir, mallory) = host("mallory.example");
    // mallory poses as the destination and trusts b; b trusts only a.
    let (c, s) = exchange((&mallory, trusting(&[&b])), (&b, trusting(&[&a])));
    assert!(c.unwrap_err().contains("ertificate"));
    assert!(
        s.is_err() || s.unwrap().is_empty(),
        "no data reached the untrusted server"
    );
}

#[test]
fn identity_is_made_once_kept_private_and_trust_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let a = HostIdentity::load_or_create(dir.path(), "a").unwrap();
    let again = HostIdentity::load_or_create(dir.path(), "a").unwrap();
    assert_eq!(
        a.fingerprint(),
        again.fingerprint(),
        "made once, then loaded"
    );
    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("host.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = HostIdentity::load_or_create(dir.path(), "a").err().unwrap();
    assert!(e.to_string().contains("chmod 600"), "{e}");

    let trust = dir.path().join("trusted-hosts");
    std::fs::write(
        &trust,
        format!("# peers\n\n{} b.example\n", a.fingerprint()),
    )
    .unwrap();
    let t = TrustStore::load(&trust).unwrap();
    assert_eq!(t.name_of(&a.fingerprint()), Some("b.example"));
    std::fs::write(&trust, "sha256:12 x\n").unwrap();
    let e = TrustStore::load(&trust).unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
    assert!(TrustStore::load(&dir.path().join("none"))
        .unwrap()
        .name_of(&a.fingerprint())
        .is_none());
}

/// A page batch is written as its header and its pages (`Sender::send_run_from`,
/// `send_scattered`): the stream must take all the slices in one call, or every page becomes
/// a TLS record and a `writev` of its own (rustls' `StreamOwned` writes the first slice only).
#[test]
fn a_migration_stream_takes_every_slice_of_a_vectored_write() {
    use std::io::IoSlice;
    use vireo_migration::hostauth::{accept, connect};
    let (_a_dir, a) = host("a.example");
    let (_b_dir, b) = host("b.example");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(&a, &trusting(&[&b])).unwrap();
    let t = Duration::from_secs(10);
    let srv = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s = accept(tcp, scfg, t).unwrap();
        let mut got = vec![0u8; 3 * 4096 + 16];
        s.read_exact(&mut got).unwrap();
        got
    });
    let mut c = connect(addr, client_config(&b, &trusting(&[&a])).unwrap(), t).unwrap();
    let head = [7u8; 16];
    let pages: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 4096]).collect();
    let mut slices = vec![IoSlice::new(&head)];
    slices.extend(pages.iter().map(|p| IoSlice::new(p)));
    assert_eq!(c.write_vectored(&slices).unwrap(), 16 + 3 * 4096);
    c.flush().unwrap();
    let got = srv.join().unwrap();
    assert_eq!(got[..16], head);
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(&got[16 + i * 4096..16 + (i + 1) * 4096], &p[..]);
    }
}
