//! `--host` / `VIREO_HOST`: where vireod listens, for the `vm` and `job` commands.
//!
//! Only `unix:PATH` is served today. The value is parsed when a command needs the daemon, not
//! by clap, so a stray `VIREO_HOST` never breaks `vireo disk` or `vireo run`, which work
//! without a daemon.

use std::fmt;
use std::path::PathBuf;

use crate::exit::CliError;

/// vireod's default socket: `<state-dir>/vireod.sock` with the default state directory.
pub const DEFAULT_HOST: &str = "unix:/var/lib/vireo/vireod.sock";

/// A parsed `--host`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// vireod's Unix socket; the file's permissions are the authentication.
    Unix(PathBuf),
}

impl Host {
    pub fn parse(text: &str) -> Result<Host, CliError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(CliError::bad_input(format!(
                    "--host {text:?}: the socket path is missing; write unix:PATH, e.g. {DEFAULT_HOST}"
                )));
            }
            return Ok(Host::Unix(PathBuf::from(path)));
        }
        let remote = ["https://", "http://", "tcp:"]
            .iter()
            .any(|p| text.starts_with(p));
        if remote {
            return Err(CliError::bad_input(format!(
                "--host {text}: vireod over TCP/TLS is not built yet; use its Unix socket, \
                 --host unix:PATH (default {DEFAULT_HOST})"
            )));
        }
        Err(CliError::bad_input(format!(
            "--host {text:?} is not an address vireo knows; write unix:PATH, e.g. {DEFAULT_HOST}"
        )))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_paths_parse_and_print_back() {
        let host = Host::parse("unix:/run/v.sock").unwrap();
        assert_eq!(host, Host::Unix("/run/v.sock".into()));
        assert_eq!(host.to_string(), "unix:/run/v.sock");
        assert_eq!(Host::parse(DEFAULT_HOST).unwrap().to_string(), DEFAULT_HOST);
    }

    #[test]
    fn tcp_is_refused_as_not_built_and_garbage_as_bad_input() {
        let e = Host::parse("https://h:8443").unwrap_err();
        assert_eq!(e.status, crate::exit::BAD_INPUT);
        assert!(e.message.contains("TCP/TLS is not built yet"), "{e}");
        assert!(e.message.contains("https://h:8443"), "{e}");
        for bad in ["", "unix:", "/var/lib/vireo/vireod.sock", "ssh://h"] {
            let e = Host::parse(bad).unwrap_err();
            assert_eq!(e.status, crate::exit::BAD_INPUT, "{bad}");
            assert!(e.message.contains("unix:PATH"), "{bad}: {e}");
        }
    }
}
