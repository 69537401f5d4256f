//! The COM1 line protocol from the host side: send a command line, wait for the one `OK`/`ERR`
//! answer. A background thread reads the probe's output so every wait has a reliable timeout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// The line the probe prints once it is ready for commands.
pub const READY_LINE: &str = "PROBE READY";
const PANIC_PREFIX: &str = "PROBE PANIC";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe answered `ERR <text>`; holds `<text>`.
    #[error("probe answered ERR {0}")]
    Err(String),
    #[error("no answer to {what:?} within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("the probe's output ended (VM exited?)")]
    Eof,
    #[error("the probe panicked: {0}")]
    Panic(String),
    #[error("console I/O: {0}")]
    Io(#[from] io::Error),
}

enum Event {
    Line(String),
    Eof,
    Failed(io::Error),
}

/// A probe console over any byte stream pair (a child's stdout/stdin, a pty, a socket...).
pub struct ProbeConsole {
    writer: Box<dyn Write + Send>,
    events: Receiver<Event>,
    /// Every line received that was not an answer (firmware noise, diagnostics), in order.
    pub other_lines: Vec<String>,
    ended: bool,
}

impl ProbeConsole {
    pub fn new<R, W>(reader: R, writer: W) -> Self
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (tx, events) = mpsc::channel();
        thread::Builder::new()
            .name("probe-console".into())
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut raw = Vec::new();
                loop {
                    raw.clear();
                    let event = match reader.read_until(b'\n', &mut raw) {
                        Ok(0) => Event::Eof,
                        Ok(_) => Event::Line(clean_line(&raw)),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => Event::Failed(e),
                    };
                    let last = !matches!(event, Event::Line(_));
                    if tx.send(event).is_err() || last {
                        return;
                    }
                }
            })
            .expect("spawn the console reader thread");
        ProbeConsole {
            writer: Box::new(writer),
            events,
            other_lines: Vec::new(),
            ended: false,
        }
    }

    /// Waits for `PROBE READY` (which may follow firmware output on the same line).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), ProbeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline, "PROBE READY")?;
            if line.ends_with(READY_LINE) {
                return Ok(());
            }
            self.other_lines.push(line);
        }
    }

    /// Sends one command line and returns its `OK...` answer line; an `ERR ...` answer becomes
    /// [`ProbeError::Err`].
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String, ProbeError> {
        self.send_line(line)?;
        self.answer_to(line, timeout)
    }

    /// Waits for the next `OK`/`ERR` answer, for a command sent earlier with [`Self::send_line`]
    /// (e.g. a `NET RECV` that must be pending while another VM sends).
    pub fn answer(&mut self, timeout: Duration) -> Result<String, ProbeError> {
        self.answer_to("an answer", timeout)
    }

    fn answer_to(&mut self, what: &str, timeout: Duration) -> Result<String, ProbeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.next_line(deadline, what)?;
            match parse_answer(&answer) {
                Some(Ok(())) => return Ok(answer),
                Some(Err(text)) => return Err(ProbeError::Err(text.to_string())),
                None => self.other_lines.push(answer),
            }
        }
    }

    /// Writes `line` and a newline without waiting for anything.
    pub fn send_line(&mut self, line: &str) -> Result<(), ProbeError> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.writer.flush()?;
        Ok(())
    }

    /// The next line of output, whatever it is.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String, ProbeError> {
        self.next_line(Instant::now() + timeout, "a line")
    }

    fn next_line(&mut self, deadline: Instant, what: &str) -> Result<String, ProbeError> {
        if self.ended {
            return Err(ProbeError::Eof);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(wait) {
            Ok(Event::Line(line)) if line.starts_with(PANIC_PREFIX) => Err(ProbeError::Panic(line)),
            Ok(Event::Line(line)) => Ok(line),
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                Err(ProbeError::Eof)
            }
            Ok(Event::Failed(e)) => {
                self.ended = true;
                Err(ProbeError::Io(e))
            }
            Err(RecvTimeoutError::Timeout) => Err(ProbeError::Timeout {
                what: what.to_string(),
                timeout: wait,
            }),
        }
    }
}

/// Strips the line end and terminal escape sequences firmware may print.
fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI sequences: ESC [ parameters final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// `Some(Ok)` for an `OK` answer, `Some(Err(text))` for `ERR text`, None for any other line.
pub fn parse_answer(line: &str) -> Option<Result<(), &str>> {
    if line == "OK" || line.starts_with("OK ") {
        Some(Ok(()))
    } else if line == "ERR" {
        Some(Err(""))
    } else {
        line.strip_prefix("ERR ").map(Err)
    }
}

/// The value of `key=value` in an answer line such as `OK sectors=2048 ro=0`.
pub fn field<'a>(answer: &'a str, key: &str) -> Option<&'a str> {
    answer
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Decodes the hex frame of a `NET <i> RECV` answer.
pub fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Lowercase hex, as `NET <i> SEND` expects.
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn console(output: &str) -> ProbeConsole {
        ProbeConsole::new(Cursor::new(output.as_bytes().to_vec()), io::sink())
    }

    #[test]
    fn ready_after_firmware_noise_on_the_same_line() {
        let mut c =
            console("\u{1b}[2J\u{1b}[0mSeaBIOS\r\nBooting from ROM..PROBE READY\r\nOK PONG\n");
        c.wait_ready(Duration::from_secs(5)).unwrap();
        assert_eq!(c.other_lines, vec!["SeaBIOS".to_string()]);
        assert_eq!(
            c.command("PING", Duration::from_secs(5)).unwrap(),
            "OK PONG"
        );
    }

    #[test]
    fn err_answers_and_noise_lines() {
        let mut c = console("PROBE READY\nprobe: something\nERR mismatch offset=4096\nOK\n");
        c.wait_ready(Duration::from_secs(5)).unwrap();
        match c.command("DISK 0 VERIFY 0 8 1", Duration::from_secs(5)) {
            Err(ProbeError::Err(text)) => assert_eq!(text, "mismatch offset=4096"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(c.other_lines, vec!["probe: something".to_string()]);
        assert_eq!(c.command("X", Duration::from_secs(5)).unwrap(), "OK");
        assert!(matches!(
            c.command("X", Duration::from_secs(5)),
            Err(ProbeError::Eof)
        ));
    }

    #[test]
    fn timeout_when_no_answer_comes() {
        let (reader, _keep_open) = {
            let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
            (r, w)
        };
        let mut c = ProbeConsole::new(reader, io::sink());
        let err = c.command("PING", Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn panic_line_is_reported() {
        let mut c = console("PROBE READY\nPROBE PANIC: oops\n");
        c.wait_ready(Duration::from_secs(5)).unwrap();
        assert!(matches!(
            c.command("PING", Duration::from_secs(5)),
            Err(ProbeError::Panic(_))
        ));
    }

    #[test]
    fn answer_parsing_helpers() {
        assert_eq!(parse_answer("OK"), Some(Ok(())));
        assert_eq!(parse_answer("OKAY"), None);
        assert_eq!(parse_answer("ERR range"), Some(Err("range")));
        assert_eq!(field("OK sectors=2048 ro=0 blk_size=512", "ro"), Some("0"));
        assert_eq!(field("OK sectors=2048", "sector"), None);
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(encode_hex(&[0xab, 1]), "ab01");
    }
}
