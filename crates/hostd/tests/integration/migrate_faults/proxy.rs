//! A TCP proxy for fault injection: forwards connections and cuts them (both directions, every
//! connection it carries) once `cut_after` bytes in all have passed, counting both directions.
//! `Target::Fixed` forwards to one address (the vireods' link); `Target::Named` reads the
//! address from the connection's first line `to ADDR` (the fake worker's stream, whose
//! destination is only known once the destination worker listens). A healing proxy
//! ([`Proxy::start_healing`]) cuts the connections it carries at that point once, and lets
//! later ones through: a network blip rather than a partition. [`Proxy::swallow_answers`]
//! loses what the far end says on a link that still looks alive to the near end, until the
//! near end speaks (an answer lost mid-way, found out only by the question after it).
//! [`Proxy::start_healing_down`] counts and cuts by the bytes coming back only (the far end's
//! answers, whose length does not vary with the near end's files): a point there lands in one
//! chosen message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Clone, Copy)]
pub enum Target {
    Fixed(SocketAddr),
    Named,
}

struct Shared {
    /// Bytes forwarded so far that count towards the cut: both directions, or only those
    /// coming back (`down_only`); all connections.
    passed: AtomicU64,
    down_only: bool,
    cut_after: AtomicU64,
    cut: AtomicBool,
    /// A cut happened (healing or not).
    fired: AtomicBool,
    /// After the cut, new connections pass (and are never cut).
    heals: bool,
    /// [`Proxy::swallow_answers`] was called and no cut came since.
    swallowing: AtomicBool,
    stop: AtomicBool,
    /// Every socket, so a cut ends all of them at once.
    socks: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(target: Target, cut_after: u64) -> Proxy {
        Self::start_with(target, cut_after, false, false)
    }

    /// Cuts what it carries after `cut_after` bytes, then carries new connections uncut.
    pub fn start_healing(target: Target, cut_after: u64) -> Proxy {
        Self::start_with(target, cut_after, true, false)
    }

    /// [`Proxy::start_healing`] counting only what comes back from the target: `passed` and
    /// the cut are in those bytes. Only the real workers' quick sweep uses it.
    #[allow(dead_code)]
    pub fn start_healing_down(target: Target, cut_after: u64) -> Proxy {
        Self::start_with(target, cut_after, true, true)
    }

    /// [`Proxy::start`] counting only what comes back from the target: a cut for good inside
    /// one chosen answer. Only the real workers' quick runs use it.
    #[allow(dead_code)]
    pub fn start_down(target: Target, cut_after: u64) -> Proxy {
        Self::start_with(target, cut_after, false, true)
    }

    fn start_with(target: Target, cut_after: u64, heals: bool, down_only: bool) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let shared = Arc::new(Shared {
            passed: AtomicU64::new(0),
            down_only,
            cut_after: AtomicU64::new(cut_after),
            cut: AtomicBool::new(false),
            fired: AtomicBool::new(false),
            heals,
            swallowing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            socks: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = c else { continue };
                let s = s.clone();
                thread::spawn(move || connect(s, c, target));
            }
        });
        Proxy { addr, shared }
    }

    pub fn passed(&self) -> u64 {
        self.shared.passed.load(Ordering::SeqCst)
    }

    /// Whether the link was cut (a point past what a run carried never cuts it). Only the
    /// real workers' quick sweep uses it (`crates/cli/tests/e2e/migrate_faults_real_modes.rs`).
    #[allow(dead_code)]
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Cuts every connection once `n` more bytes have passed from now (a point in a phase
    /// whose start is only seen as it happens, such as post-copy's). Only the real workers'
    /// post-copy runs use it (`crates/cli/tests/e2e/migrate_faults_postcopy.rs`).
    #[allow(dead_code)]
    pub fn cut_after_more(&self, n: u64) {
        if n == 0 {
            return self.cut_now();
        }
        let at = self.passed().saturating_add(n);
        self.shared.cut_after.store(at, Ordering::SeqCst);
    }

    /// From now on what the far end (the target) sends on the connections carried now is
    /// dropped, its close too, so the near end (the client) waits on a link that looks alive;
    /// the near end's next bytes then cut every connection (a healing proxy lets later ones
    /// through). The vireods' link is quiet between the offer's answer and the migration's
    /// end, so on it this loses the destination's word (`running`) and breaks the link as
    /// the source's next message (an `abort`) goes out, unanswered.
    pub fn swallow_answers(&self) {
        self.shared.swallowing.store(true, Ordering::SeqCst);
    }

    /// Cuts every connection now, and any later one at once (a healing proxy lets later ones
    /// through).
    pub fn cut_now(&self) {
        self.shared.cut_after.store(0, Ordering::SeqCst);
        cut(&self.shared);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for s in self.shared.socks.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn cut(s: &Shared) {
    let mut socks = s.socks.lock().unwrap();
    s.fired.store(true, Ordering::SeqCst);
    s.swallowing.store(false, Ordering::SeqCst);
    if s.heals {
        s.cut_after.store(u64::MAX, Ordering::SeqCst);
    } else {
        s.cut.store(true, Ordering::SeqCst);
    }
    for sock in socks.drain(..) {
        let _ = sock.shutdown(Shutdown::Both);
    }
}

fn connect(s: Arc<Shared>, client: TcpStream, target: Target) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let to = match target {
        Target::Fixed(a) => a,
        Target::Named => {
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                return;
            }
            match line.trim().strip_prefix("to ").and_then(|a| a.parse().ok()) {
                Some(a) => a,
                None => return,
            }
        }
    };
    let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = server.set_read_timeout(Some(Duration::from_secs(120)));
    {
        let mut socks = s.socks.lock().unwrap();
        socks.push(client.try_clone().unwrap());
        socks.push(server.try_clone().unwrap());
    }
    if s.cut.load(Ordering::SeqCst) || s.cut_after.load(Ordering::SeqCst) == 0 {
        cut(&s);
        return;
    }
    let (s2, server2, client2) = (s.clone(), server.try_clone().unwrap(), client);
    // What the reader buffered past the first line goes first.
    let up = thread::spawn(move || pump(&s2, reader, server2, Way::Up));
    pump(&s, server, client2, Way::Down);
    let _ = up.join();
}

/// Which way a pump copies: from the client to the target, or back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Up,
    Down,
}

/// Copies `from` to `to` until either ends or the byte budget is spent (then cuts all).
/// While swallowing, what comes down is dropped and what goes up cuts all.
fn pump(s: &Shared, mut from: impl Read, mut to: TcpStream, way: Way) {
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            // A close coming down while swallowing is kept from the client too.
            Ok(0) | Err(_) if way == Way::Down && s.swallowing.load(Ordering::SeqCst) => return,
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if s.swallowing.load(Ordering::SeqCst) {
            match way {
                Way::Down => continue,
                Way::Up => {
                    cut(s);
                    return;
                }
            }
        }
        if s.down_only && way == Way::Up {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        }
        let limit = s.cut_after.load(Ordering::SeqCst);
        let before = s.passed.fetch_add(n as u64, Ordering::SeqCst);
        let allowed = limit.saturating_sub(before).min(n as u64) as usize;
        if allowed > 0 && to.write_all(&buf[..allowed]).is_err() {
            break;
        }
        if allowed < n {
            s.passed.fetch_sub((n - allowed) as u64, Ordering::SeqCst);
            cut(s);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
