//! `--host` / `VIREO_HOST`: where vireod listens, for the `vm` and `job` commands.
//!
//! `unix:PATH` (the socket; its file mode is the authentication) or `https://HOST:PORT`
//! (vireod's TCP listener: TLS plus a bearer token). The value is parsed when a command needs
//! the daemon, not by clap, so a stray `VIREO_HOST` never breaks `vireo disk` or `vireo run`,
//! which work without a daemon.

use std::fmt;
use std::path::PathBuf;

use crate::exit::CliError;

/// vireod's default socket: `<state-dir>/vireod.sock` with the default state directory.
pub use crate::global_args::DEFAULT_HOST;

/// A parsed `--host`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// vireod's Unix socket; the file's permissions are the authentication.
    Unix(PathBuf),
    /// vireod's TLS listener: `host:port`, and the host alone (the certificate's name).
    Tls { authority: String, name: String },
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
        if let Some(rest) = text.strip_prefix("https://") {
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            let parsed = authority.rsplit_once(':').filter(|(h, p)| {
                !h.is_empty() && !authority.contains('/') && p.parse::<u16>().is_ok()
            });
            let Some((host, _)) = parsed else {
                return Err(CliError::bad_input(format!(
                    "--host {text:?}: write https://HOST:PORT, e.g. https://127.0.0.1:8443"
                )));
            };
            let name = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            return Ok(Host::Tls {
                authority: authority.to_string(),
                name,
            });
        }
        if text.starts_with("http://") || text.starts_with("tcp:") {
            return Err(CliError::bad_input(format!(
                "--host {text}: vireod serves TCP only with TLS; write https://HOST:PORT"
            )));
        }
        Err(CliError::bad_input(format!(
            "--host {text:?} is not an address vireo knows; write unix:PATH (e.g. \
             {DEFAULT_HOST}) or https://HOST:PORT"
        )))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Unix(path) => write!(f, "unix:{}", path.display()),
            Host::Tls { authority, .. } => write!(f, "https://{authority}"),
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
    fn https_parses_and_plain_tcp_and_garbage_are_bad_input() {
        let host = Host::parse("https://h.example:8443/").unwrap();
        assert_eq!(
            host,
            Host::Tls {
                authority: "h.example:8443".into(),
                name: "h.example".into()
            }
        );
        assert_eq!(host.to_string(), "https://h.example:8443");
        for bad in [
            "https://h",
            "https://:1",
            "https://h:99999",
            "https://h:1/x",
        ] {
            let e = Host::parse(bad).unwrap_err();
            assert!(e.message.contains("HOST:PORT"), "{bad}: {e}");
        }
        let e = Host::parse("http://h:8443").unwrap_err();
        assert_eq!(e.status, crate::exit::BAD_INPUT);
        assert!(e.message.contains("only with TLS"), "{e}");
        for bad in ["", "unix:", "/var/lib/vireo/vireod.sock", "ssh://h"] {
            let e = Host::parse(bad).unwrap_err();
            assert_eq!(e.status, crate::exit::BAD_INPUT, "{bad}");
            assert!(e.message.contains("unix:PATH"), "{bad}: {e}");
        }
    }
}
