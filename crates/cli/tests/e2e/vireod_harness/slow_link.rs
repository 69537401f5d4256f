//! A TCP forwarder held to a rate, for a fault that must strike while bytes move between the
//! vireods (a quick migration's saved state crosses loopback in a fraction of a second): each
//! direction of each connection is paced to `bytes_per_s`, and the bytes forwarded are
//! counted, so a test can wait until a transfer is under way.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub struct SlowLink {
    pub addr: SocketAddr,
    passed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SlowLink {
    pub fn start(to: SocketAddr, bytes_per_s: u64) -> SlowLink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let passed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (passed.clone(), stop.clone());
        thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                    continue;
                };
                let (p1, p2) = (p.clone(), p.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || pump(client, server, bytes_per_s, &p1));
                thread::spawn(move || pump(s2, c2, bytes_per_s, &p2));
            }
        });
        SlowLink { addr, passed, stop }
    }

    /// Bytes forwarded so far, both directions, all connections.
    pub fn passed(&self) -> u64 {
        self.passed.load(Ordering::SeqCst)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` in chunks of 16 KiB, sleeping so the average stays at the rate.
fn pump(mut from: TcpStream, mut to: TcpStream, bytes_per_s: u64, passed: &AtomicU64) {
    let _ = from.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 16 << 10];
    let t0 = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        passed.fetch_add(n as u64, Ordering::SeqCst);
        let due = Duration::from_secs_f64(sent as f64 / bytes_per_s as f64);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            thread::sleep(wait);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
