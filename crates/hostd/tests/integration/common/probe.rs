//! The probe guest through vireod (the real worker): waiting for it and its console.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vireo_probe_image::ProbeConsole;

use super::daemon::Vireod;

/// Boot, console answers: generous, the machine is shared.
pub const CONSOLE_LIMIT: Duration = Duration::from_secs(60);

/// Polls the console log until it shows `PROBE READY`.
pub fn wait_ready(d: &Vireod, vm: &str) {
    let start = Instant::now();
    loop {
        let r = d.get(&format!("/v1/vms/{vm}/console/log"));
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        if String::from_utf8_lossy(&r.body).contains("PROBE READY") {
            return;
        }
        assert!(
            start.elapsed() < CONSOLE_LIMIT,
            "{vm}: no PROBE READY: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The console through vireod's upgrade, as a probe console.
pub fn console(d: &Vireod, vm: &str) -> ProbeConsole {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(CONSOLE_LIMIT)).unwrap();
    let req = format!(
        "GET /v1/vms/{vm}/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: vireo-console\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed in the head: {head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    ProbeConsole::new(s.try_clone().unwrap(), s)
}
