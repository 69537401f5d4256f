//! The transport half of the JSON-lines control sockets that vireod drives its children with
//! (`worker.sock`, `switch.sock`): an accept loop with a thread per connection, and a line
//! reader with a length bound, so a client that never sends a newline cannot make the child
//! buffer without end. What a line means is the caller's business.
#![forbid(unsafe_code)]

use std::io::{BufRead, Read};
use std::os::unix::net::{UnixListener, UnixStream};

/// Accepts on `listener` on a thread named `name`; each connection is handed to `serve` on a
/// thread of its own, so a slow client does not hold up the others.
pub fn start(
    listener: UnixListener,
    name: &str,
    serve: impl Fn(UnixStream) + Clone + Send + 'static,
) -> std::io::Result<()> {
    let conn_name = format!("{name}-conn");
    let sock = format!("{name}.sock");
    std::thread::Builder::new()
        .name(format!("{name}-sock"))
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let serve = serve.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name(conn_name.clone())
                    .spawn(move || serve(conn))
                {
                    tracing::warn!("{sock}: cannot serve a connection: {e}");
                }
            }
        })
        .map(|_| ())
}

/// One line read by [`read_line`].
pub type Line = Result<Vec<u8>, TooLong>;

/// A line was longer than the bound; it was read to its end and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// Reads one line of at most `max` bytes, without its newline: `Ok(None)` at the end of the
/// stream, `Some(Err(TooLong))` for a longer line (read to its end, a bounded piece at a time,
/// and dropped, so the next line is read whole).
pub fn read_line(input: &mut impl BufRead, max: usize) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let n = input
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(Ok(line)));
    }
    if line.len() <= max {
        // The stream ended without a newline: take the last line as it is.
        return Ok(Some(Ok(line)));
    }
    loop {
        line.clear();
        let n = input
            .by_ref()
            .take(max as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 || line.last() == Some(&b'\n') {
            return Ok(Some(Err(TooLong)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Write};

    #[test]
    fn long_lines_are_refused_and_skipped_whole() {
        let max = 16;
        let mut text = vec![b'x'; max * 3];
        text.extend_from_slice(b"\n{\"a\":1}\nlast");
        let mut input = &text[..];
        assert_eq!(read_line(&mut input, max).unwrap(), Some(Err(TooLong)));
        assert_eq!(
            read_line(&mut input, max).unwrap(),
            Some(Ok(b"{\"a\":1}".to_vec()))
        );
        assert_eq!(
            read_line(&mut input, max).unwrap(),
            Some(Ok(b"last".to_vec()))
        );
        assert_eq!(read_line(&mut input, max).unwrap(), None);
    }

    #[test]
    fn a_line_of_exactly_the_bound_is_taken() {
        let mut text = vec![b'y'; 8];
        text.push(b'\n');
        let mut input = &text[..];
        assert_eq!(read_line(&mut input, 8).unwrap(), Some(Ok(vec![b'y'; 8])));
    }

    #[test]
    fn each_connection_is_served_on_its_own() {
        let dir = std::env::temp_dir().join(format!("linesock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("echo.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        start(listener, "echo", |conn: UnixStream| {
            let mut out = conn.try_clone().unwrap();
            let mut input = BufReader::new(conn);
            while let Ok(Some(Ok(line))) = read_line(&mut input, 64) {
                out.write_all(&line).unwrap();
                out.write_all(b"\n").unwrap();
            }
        })
        .unwrap();
        // The first client stays connected and idle while the second is answered.
        let _idle = UnixStream::connect(&path).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"ping\n").unwrap();
        let mut answer = String::new();
        BufReader::new(&c).read_line(&mut answer).unwrap();
        assert_eq!(answer, "ping\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
