//! `vireo vm console`: the VM's COM1, both ways, over an HTTP Upgrade (`Upgrade:
//! vireo-console`, answered 101; then raw bytes), or `--log`: the ring of recent output.
//!
//! Two ways to use it:
//! - **A terminal** (stdin is a tty): raw mode (`console/terminal.rs`), every key to the guest;
//!   Ctrl-] detaches. The terminal is restored on every way out.
//! - **Pipes**: stdin → guest, guest → stdout. When stdin ends, vireo keeps printing what the
//!   guest still answers until it has been quiet for [`DRAIN_QUIET`] (at most [`DRAIN_MAX`]),
//!   so `echo INFO | vireo vm console NAME` prints the answer and exits.
//!
//! Either way `--timeout SECS` ends it, and so does the daemon closing the connection (the VM
//! stopped, or another client attached). All these ends exit 0; a VM that is not running is the daemon's 409 (exit 1).
//! SIGTERM, SIGINT (not from the keyboard: raw mode sends Ctrl-C to the guest) and SIGHUP end
//! the session too, terminal restored, with 143, 130 and 1.

mod terminal;

use std::error::Error;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api_client::Client;
use crate::exit::{self, CliError};
use crate::output::emit;

/// After stdin's end: the guest's answer counts as complete once it has been quiet this long.
pub const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// After stdin's end: the longest vireo keeps printing a guest that never goes quiet.
pub const DRAIN_MAX: Duration = Duration::from_secs(5);
/// Ctrl-] (GS), as telnet and virsh use it.
const DETACH_KEY: u8 = 0x1d;

#[derive(Args, Debug)]
pub struct ConsoleArgs {
    /// The VM's name or id.
    pub vm: String,
    /// Print the console's recent output (the ring vireod keeps, `--console-ring` bytes) and
    /// exit.
    #[arg(long)]
    pub log: bool,
    /// Detach after SECS seconds.
    #[arg(long, value_name = "SECS", conflicts_with = "log")]
    pub timeout: Option<u64>,
}

/// Why the console session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Stdin ended and the guest went quiet.
    InputDone,
    Timeout,
    /// Ctrl-] on a terminal.
    Detached,
    /// The daemon closed the connection: the VM stopped (or another client attached: vireod
    /// serves one console client at a time).
    Closed,
    /// Whoever read stdout went away (`| head -1`): nothing more is wanted.
    OutputGone,
    /// vireo got this signal (`execute` only; `pump` never returns it), and exits with this
    /// status.
    Signal(&'static str, u8),
}

pub fn execute(client: &Client, args: ConsoleArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&args.vm)?;
    let vm = &args.vm;
    if args.log {
        let ring = client.get_bytes(&format!("{path}/console/log"))?;
        emit(ring)?;
        return Ok(ExitCode::SUCCESS);
    }
    let interactive = std::io::stdin().is_terminal();
    let timeout = args.timeout.map(Duration::from_secs);
    let end = client.block_on(async {
        let stream = client
            .upgrade(&format!("{path}/console"), "vireo-console")
            .await?;
        // A signal must not end vireo with the terminal still raw: it ends the session instead.
        let watch =
            |kind| signal(kind).map_err(|e| CliError::failed(format!("cannot watch signals: {e}")));
        let (mut term, mut int, mut hup) = (
            watch(SignalKind::terminate())?,
            watch(SignalKind::interrupt())?,
            watch(SignalKind::hangup())?,
        );
        let _raw = match interactive {
            true => Some(terminal::RawMode::enter(std::io::stdin()).map_err(|e| {
                CliError::failed(format!("cannot put the terminal in raw mode: {e}"))
            })?),
            false => None,
        };
        if interactive {
            eprintln!("vireo: connected to VM {vm}'s console; Ctrl-] detaches");
        }
        let mut out = std::io::stdout();
        tokio::select! {
            end = pump(stream, stdin_chunks(), &mut out, interactive, timeout) => {
                end.map_err(|e| CliError::failed(format!("console of VM {vm}: {e}")))
            }
            _ = term.recv() => Ok(End::Signal("SIGTERM", exit::TERMINATED)),
            _ = int.recv() => Ok(End::Signal("SIGINT", exit::INTERRUPTED)),
            _ = hup.recv() => Ok(End::Signal("SIGHUP", exit::FAILED)),
        }
        // `_raw` drops here: the terminal is back before any message below.
    })?;
    match end {
        End::Detached => eprintln!("\nvireo: detached from VM {vm}'s console"),
        End::Closed => eprintln!(
            "\nvireo: vireod closed VM {vm}'s console (the VM stopped, or another client attached)"
        ),
        End::Timeout if interactive => eprintln!("\nvireo: console --timeout reached"),
        End::Timeout | End::InputDone | End::OutputGone => {}
        End::Signal(name, status) => {
            return Err(CliError {
                status,
                message: format!("{name}: left VM {vm}'s console (the VM runs on)"),
            }
            .into())
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Stdin in chunks, read by a plain thread (a blocking read cannot be cancelled; the thread
/// simply ends with the process). The channel closes at stdin's end.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });
    rx
}

/// Copies `input` to the guest and the guest to `out` until one of the ends in [`End`].
/// `detach_key`: Ctrl-] in the input ends the session (a terminal; pipes pass every byte).
pub async fn pump<S: AsyncRead + AsyncWrite>(
    stream: S,
    mut input: mpsc::Receiver<Vec<u8>>,
    out: &mut impl Write,
    detach_key: bool,
    timeout: Option<Duration>,
) -> std::io::Result<End> {
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut input_open = true;
    // Set at stdin's end: (quiet deadline, hard deadline).
    let mut drain: Option<(Instant, Instant)> = None;
    let mut buf = vec![0u8; 8192];
    loop {
        let wake = match (deadline, drain.map(|(quiet, max)| quiet.min(max))) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            read = from_guest.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    return Ok(End::Closed);
                }
                match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        return Ok(End::OutputGone)
                    }
                    other => other?,
                }
                if let Some((quiet, _)) = &mut drain {
                    *quiet = Instant::now() + DRAIN_QUIET;
                }
            }
            chunk = input.recv(), if input_open => match chunk {
                Some(bytes) => {
                    let detach_at = bytes.iter().position(|&b| detach_key && b == DETACH_KEY);
                    let send = &bytes[..detach_at.unwrap_or(bytes.len())];
                    to_guest.write_all(send).await?;
                    to_guest.flush().await?;
                    if detach_at.is_some() {
                        return Ok(End::Detached);
                    }
                }
                None => {
                    input_open = false;
                    let now = Instant::now();
                    drain = Some((now + DRAIN_QUIET, now + DRAIN_MAX));
                }
            },
            () = sleep_until(wake), if wake.is_some() => {
                let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
                return Ok(if timed_out { End::Timeout } else { End::InputDone });
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A guest that answers each line in upper case, after `delay`.
    fn guest(delay: Duration) -> tokio::io::DuplexStream {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                let n = match theirs.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                tokio::time::sleep(delay).await;
                let answer = buf[..n].to_ascii_uppercase();
                if theirs.write_all(&answer).await.is_err() {
                    return;
                }
            }
        });
        ours
    }

    #[test]
    fn pipes_end_after_the_answer_drains() {
        rt().block_on(async {
            let (tx, rx) = mpsc::channel(4);
            tx.send(b"info\n".to_vec()).await.unwrap();
            drop(tx);
            let mut out = Vec::new();
            let started = Instant::now();
            // The answer comes 300 ms after stdin ended: within the quiet window, so it is kept.
            let end = pump(guest(Duration::from_millis(300)), rx, &mut out, false, None)
                .await
                .unwrap();
            assert_eq!(end, End::InputDone);
            assert_eq!(out, b"INFO\n");
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(800) && took < DRAIN_MAX,
                "{took:?}"
            );
        });
    }

    #[test]
    fn detach_key_only_on_a_terminal() {
        rt().block_on(async {
            let (tx, rx) = mpsc::channel(4);
            tx.send(b"ab\x1dcd".to_vec()).await.unwrap();
            let (ours, mut theirs) = tokio::io::duplex(64);
            let end = pump(ours, rx, &mut Vec::new(), true, None).await.unwrap();
            assert_eq!(end, End::Detached);
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ab", "nothing after Ctrl-] reaches the guest");
            drop(tx);

            // Pipes carry the byte like any other.
            let (tx, rx) = mpsc::channel(4);
            tx.send(b"ab\x1dcd".to_vec()).await.unwrap();
            drop(tx);
            let (ours, mut theirs) = tokio::io::duplex(64);
            let end = pump(ours, rx, &mut Vec::new(), false, None).await.unwrap();
            assert_eq!(end, End::InputDone);
            let mut got = vec![0u8; 5];
            theirs.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"ab\x1dcd");
        });
    }

    /// stdout whose reader went away.
    struct Gone;

    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_went_away_ends_the_session_quietly() {
        rt().block_on(async {
            let (_tx, rx) = mpsc::channel::<Vec<u8>>(4);
            let (ours, mut theirs) = tokio::io::duplex(64);
            theirs.write_all(b"line\n").await.unwrap();
            let end = pump(ours, rx, &mut Gone, false, None).await.unwrap();
            assert_eq!(end, End::OutputGone);
        });
    }

    #[test]
    fn timeout_and_close() {
        rt().block_on(async {
            // Stdin stays open and the guest is silent: only --timeout ends it.
            let (_tx, rx) = mpsc::channel::<Vec<u8>>(4);
            let (ours, _theirs) = tokio::io::duplex(64);
            let started = Instant::now();
            let end = pump(
                ours,
                rx,
                &mut Vec::new(),
                false,
                Some(Duration::from_millis(200)),
            )
            .await
            .unwrap();
            assert_eq!(end, End::Timeout);
            assert!(started.elapsed() >= Duration::from_millis(200));

            // The daemon hangs up (VM stopped) after a last line: printed, then Closed.
            let (_tx, rx) = mpsc::channel::<Vec<u8>>(4);
            let (ours, mut theirs) = tokio::io::duplex(64);
            theirs.write_all(b"bye\n").await.unwrap();
            drop(theirs);
            let mut out = Vec::new();
            let end = pump(ours, rx, &mut out, false, None).await.unwrap();
            assert_eq!((end, out.as_slice()), (End::Closed, &b"bye\n"[..]));
        });
    }
}
