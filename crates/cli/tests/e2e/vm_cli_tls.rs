//! vireod over TCP with TLS and a bearer token, end to end: certificates made here with rcgen,
//! vireod listening on 127.0.0.1 only, `vireo --host https://...` and a raw TLS client for
//! what the CLI never sends (no token, a wrong one, plain HTTP).
//!
//! vireod and vireo-vm are found beside `vireo` (see vm_cli_vireod.rs); without them the test
//! is a recorded skip (a failure under CI).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio_rustls::rustls;
use vireo_api::Vm;

const VIREO: &str = env!("CARGO_BIN_EXE_vireo");
const TOKEN: &str = "c2VjcmV0LXRva2VuLWZvci10ZXN0cw";

fn daemon_binaries() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(VIREO).parent().unwrap();
    let (vireod, worker) = (dir.join("vireod"), dir.join("vireo-vm"));
    if vireod.is_file() && worker.is_file() {
        return Some((vireod, worker));
    }
    vireo_testkit::skip(&format!(
        "vireod and vireo-vm built in {} (cargo build --release -p vireo-hostd -p vireo-worker)",
        dir.display()
    ));
    None
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A free port on 127.0.0.1 (bound, read, released; vireod binds it right after), never one
/// already handed to another test of this binary: they run in parallel, and two vireods given
/// the same port would leave one test talking to the other's daemon.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

struct Daemon {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    cert: PathBuf,
    token_file: PathBuf,
    child: Child,
}

impl Daemon {
    fn start() -> Option<Daemon> {
        let (vireod, worker) = daemon_binaries()?;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path(), "server");
        let token_file = dir.path().join("token");
        private_file(&token_file, &format!("{TOKEN}\n"));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(vireod)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--worker-bin")
            .arg(worker)
            .arg("--listen")
            .arg(format!("unix:{}", dir.path().join("v.sock").display()))
            .arg("--listen")
            .arg(format!("tcp:{addr}"))
            .args(["--tls-cert", cert.to_str().unwrap()])
            .args(["--tls-key", key.to_str().unwrap()])
            .args(["--token-file", token_file.to_str().unwrap()])
            .arg("--storage-root")
            .arg(dir.path())
            .arg("--storage-root")
            .arg(vireo_probe_image::probe_elf().parent().unwrap())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vireod.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut child = child;
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "vireod did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Listening, and ours: a vireod that could not bind its port has exited.
        let log = dir.path().join("vireod.log");
        assert!(
            child.try_wait().unwrap().is_none(),
            "vireod exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(Daemon {
            dir,
            addr,
            cert,
            token_file,
            child,
        })
    }

    fn host(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn vireo(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(VIREO);
        cmd.args(["--host", &self.host()])
            .args(["--ca-cert", self.cert.to_str().unwrap()])
            .args(["--token-file", self.token_file.to_str().unwrap()])
            .args(args)
            .env_remove("VIREO_HOST")
            .env_remove("VIREO_TOKEN_FILE")
            .env_remove("VIREO_CA_CERT")
            .stdin(Stdio::null());
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = run(self.vireo(args));
        assert!(out.status.success(), "vireo {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn vms(&self) -> Vec<Vm> {
        serde_json::from_str(&self.ok(&["vm", "list", "--output", "json"])).unwrap()
    }

    /// One raw request over TLS (trusting the test's certificate); the status line and body.
    fn raw(&self, request: &str) -> (u16, String) {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&self.cert).unwrap();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        // vireod closes the connection after a 401; other answers carry Connection: close.
        let _ = tls.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for vm in self.vms_quiet() {
            let _ = run(self.vireo(&["vm", "turn-off", &vm]));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn vms_quiet(&self) -> Vec<String> {
        let out = run(self.vireo(&["vm", "list", "--output", "json"]));
        let vms: Vec<Vm> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        vms.into_iter().map(|v| v.spec.name).collect()
    }
}

/// Runs a command, killed and failed after 60 s.
fn run(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{cmd:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn probe_kernel() -> &'static str {
    vireo_probe_image::probe_elf().to_str().unwrap()
}

#[test]
fn create_and_list_over_tls_with_the_token() {
    let Some(d) = Daemon::start() else { return };
    d.ok(&[
        "vm",
        "create",
        "web",
        "--kernel",
        probe_kernel(),
        "--memory",
        "32M",
    ]);
    let list = d.ok(&["vm", "list"]);
    assert!(list.lines().any(|l| l.starts_with("web ")), "{list}");
    assert_eq!(d.vms().len(), 1);
    // The same daemon on its Unix socket sees the same inventory.
    let out = run({
        let mut c = Command::new(VIREO);
        c.args([
            "--host",
            &format!("unix:{}", d.dir.path().join("v.sock").display()),
        ])
        .args(["vm", "list", "--output", "json"])
        .env_remove("VIREO_HOST");
        c
    });
    let vms: Vec<Vm> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vms[0].spec.name, "web");
}

#[test]
fn missing_or_wrong_token_is_401_and_changes_nothing() {
    let Some(d) = Daemon::start() else { return };
    d.ok(&["vm", "create", "web", "--kernel", probe_kernel()]);
    let before = d.vms();
    let body = format!(
        r#"{{"version":1,"name":"intruder","vcpus":1,"memory_bytes":33554432,"kernel":"{}"}}"#,
        probe_kernel()
    );
    let auths = [
        "",
        "Authorization: Bearer wrong\r\n",
        "Authorization: Basic abc\r\n",
    ];
    for auth in auths {
        let requests = [
            format!("GET /v1/vms HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
            format!(
                "POST /v1/vms HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
            format!(
                "POST /v1/vms/web/rename HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 15\r\n\
                 Connection: close\r\n\r\n{{\"name\":\"evil\"}}"
            ),
            format!(
                "GET /v1/vms/web/console HTTP/1.1\r\nHost: x\r\n{auth}Connection: Upgrade\r\n\
                 Upgrade: vireo-console\r\n\r\n"
            ),
        ];
        for req in &requests {
            let (status, body) = d.raw(req);
            assert_eq!(status, 401, "{req}: {body}");
            let err: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(err["code"], "unauthorized", "{body}");
        }
    }
    assert_eq!(d.vms(), before);
    // The right token through the same raw client works (the test would pass vacuously if
    // every raw request failed).
    let (status, _) = d.raw(&format!(
        "GET /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(status, 200);

    // The CLI with a wrong token file: exit 1, one line naming the file.
    let wrong = d.dir.path().join("wrong-token");
    private_file(&wrong, "not-it\n");
    let out = run({
        let mut c = d.vireo(&["vm", "list"]);
        c.args(["--token-file", wrong.to_str().unwrap()]);
        c
    });
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "vireod refused the token from {}",
            wrong.display()
        )),
        "{err}"
    );
}

#[test]
fn plain_http_bad_certificate_and_unreachable_fail_with_one_line() {
    let Some(d) = Daemon::start() else { return };
    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let mut tcp = TcpStream::connect(d.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // Another CA than the server's: the handshake fails.
    let (other, _) = make_cert(d.dir.path(), "other");
    let out = run({
        let mut c = d.vireo(&["vm", "list"]);
        c.args(["--ca-cert", other.to_str().unwrap()]);
        c
    });
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("TLS handshake") && err.contains("--ca-cert"),
        "{err}"
    );

    // Nobody listening.
    let out = run({
        let mut c = d.vireo(&["vm", "list"]);
        c.args(["--host", &format!("https://127.0.0.1:{}", free_port())]);
        c
    });
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach vireod at https://127.0.0.1:"),
        "{err}"
    );

    // No token file at all: bad input.
    let out = run({
        let mut c = Command::new(VIREO);
        c.args(["--host", &d.host(), "vm", "list"])
            .env_remove("VIREO_TOKEN_FILE")
            .env_remove("VIREO_HOST");
        c
    });
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--token-file"), "{err}");
}

#[test]
fn startup_refuses_unsafe_or_incomplete_tls_settings() {
    let Some((vireod, worker)) = daemon_binaries() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path(), "server");
    let token = dir.path().join("token");
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let vireod_with = |extra: &[&str]| {
        let mut c = Command::new(&vireod);
        c.arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--worker-bin")
            .arg(&worker)
            .arg("--listen")
            .arg(format!("unix:{}", dir.path().join("v.sock").display()))
            .args(["--listen", &addr])
            .args(extra)
            .stdin(Stdio::null());
        run(c)
    };
    let c = cert.to_str().unwrap();
    let k = key.to_str().unwrap();
    let t = token.to_str().unwrap();
    let refuse = |extra: &[&str], expect: &str| {
        let out = vireod_with(extra);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(expect), "{extra:?}: {err}");
    };
    std::fs::write(&token, "tok\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    refuse(
        &["--tls-cert", c, "--tls-key", k, "--token-file", t],
        "chmod 600",
    );
    private_file(&token, "\n");
    refuse(
        &["--tls-cert", c, "--tls-key", k, "--token-file", t],
        "is empty",
    );
    private_file(&token, "tok\n");
    refuse(&["--tls-key", k, "--token-file", t], "needs --tls-cert");
    refuse(&["--tls-cert", c, "--tls-key", k], "--token-file");
    let missing = dir.path().join("missing.pem");
    refuse(
        &[
            "--tls-cert",
            missing.to_str().unwrap(),
            "--tls-key",
            k,
            "--token-file",
            t,
        ],
        "missing.pem",
    );
    // Nothing was started: the socket never appeared.
    assert!(!dir.path().join("v.sock").exists());
}

/// `vm console` is an HTTP upgrade; over TLS it must carry the stream both ways.
#[test]
fn console_over_tls() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    d.ok(&[
        "vm",
        "create",
        "p",
        "--kernel",
        probe_kernel(),
        "--memory",
        "32M",
        "--shutdown-line",
        "POWEROFF",
    ]);
    d.ok(&["vm", "start", "p"]);
    let mut child = d
        .vireo(&["vm", "console", "p"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"PING\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("no answer to PING within 20 s");
        if line.starts_with("OK") || line.starts_with("ERR") {
            break line;
        }
    };
    assert_eq!(answer, "OK PONG");
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("vireo vm console did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(child.wait().unwrap().success());
}
