//! What can go wrong talking to vireod, and the exit status each failure gets.
//!
//! The daemon's `ApiError` code says whether the input was at fault: 400, 404 and 422 mean the
//! request was wrong and nothing changed (exit 2, like any bad argument); 409 (a state that
//! forbids it, a name taken) and everything else mean the operation was refused or failed
//! (exit 1). Not reaching the daemon at all is a failure too (1), with the way out in the line.

use std::fmt;

use vireo_api::ApiError;

use crate::exit::{CliError, BAD_INPUT, FAILED};

/// Deliberately not a `std::error::Error`: `?` would then box it as a plain error and lose
/// its exit status. It converts to [`CliError`] (and so to `Box<dyn Error>`) instead.
#[derive(Debug)]
pub enum ClientError {
    Unreachable {
        host: String,
        source: std::io::Error,
    },
    /// The daemon answered with its error shape.
    Api {
        status: u16,
        error: ApiError,
    },
    /// An error status without the API's error body: something else holds the socket.
    Status {
        host: String,
        status: u16,
        body: String,
    },
    /// A success status with a body that is not what the route documents.
    Unexpected {
        host: String,
        what: String,
    },
    /// The TLS handshake failed (most often: a certificate vireo does not trust).
    Tls {
        host: String,
        what: String,
    },
    /// 401: vireod did not accept the bearer token.
    Refused {
        host: String,
        token_file: std::path::PathBuf,
    },
    /// The connection broke or HTTP itself failed.
    Connection {
        host: String,
        what: String,
    },
    Timeout {
        host: String,
        secs: u64,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unreachable { host, source } => write!(
                f,
                "cannot reach vireod at {host}: {source} (is vireod running? start it with \
                 `vireod --state-dir DIR`)"
            ),
            ClientError::Api { error, .. } => f.write_str(&error.message),
            ClientError::Status { host, status, body } => write!(
                f,
                "{host} answered HTTP {status} with {body:?}, not vireod's error shape; is that \
                 vireod's socket?"
            ),
            ClientError::Unexpected { host, what } => {
                write!(
                    f,
                    "{host} answered {what}; is vireod the same version as vireo?"
                )
            }
            ClientError::Tls { host, what } => write!(
                f,
                "the TLS handshake with vireod at {host} failed: {what} (for a self-signed \
                 certificate pass --ca-cert FILE or set VIREO_CA_CERT)"
            ),
            ClientError::Refused { host, token_file } => write!(
                f,
                "vireod refused the token from {} ({host} answered 401); copy vireod's \
                 --token-file there",
                token_file.display()
            ),
            ClientError::Connection { host, what } => {
                write!(f, "talking to vireod at {host}: {what}")
            }
            ClientError::Timeout { host, secs } => {
                write!(
                    f,
                    "vireod at {host} did not answer within {secs} s; see its log"
                )
            }
        }
    }
}

impl ClientError {
    /// The exit status (see the module doc).
    pub fn exit_status(&self) -> u8 {
        let status = match self {
            ClientError::Api { status, .. } | ClientError::Status { status, .. } => *status,
            _ => return FAILED,
        };
        match status {
            400 | 404 | 422 => BAD_INPUT,
            _ => FAILED,
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        CliError {
            status: e.exit_status(),
            message: e.to_string(),
        }
    }
}

impl From<ClientError> for Box<dyn std::error::Error> {
    fn from(e: ClientError) -> Self {
        Box::new(CliError::from(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_api::ApiErrorCode;

    fn api(code: ApiErrorCode) -> ClientError {
        ClientError::Api {
            status: code.http_status(),
            error: ApiError::new(code, "VM \"web\": it went wrong"),
        }
    }

    #[test]
    fn statuses_follow_the_api_code() {
        assert_eq!(api(ApiErrorCode::BadRequest).exit_status(), 2);
        assert_eq!(api(ApiErrorCode::NotFound).exit_status(), 2);
        assert_eq!(api(ApiErrorCode::Invalid).exit_status(), 2);
        assert_eq!(api(ApiErrorCode::Conflict).exit_status(), 1);
        assert_eq!(api(ApiErrorCode::Unauthorized).exit_status(), 1);
        assert_eq!(api(ApiErrorCode::Internal).exit_status(), 1);
        let odd = ClientError::Status {
            host: "unix:/s".into(),
            status: 404,
            body: "nope".into(),
        };
        assert_eq!(odd.exit_status(), 2);
        let gone = ClientError::Unreachable {
            host: "unix:/s".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(gone.exit_status(), 1);
    }

    #[test]
    fn the_line_is_the_daemons_message_or_names_the_host() {
        let cli = CliError::from(api(ApiErrorCode::Conflict));
        assert_eq!(cli.message, "VM \"web\": it went wrong");
        let gone = ClientError::Unreachable {
            host: "unix:/run/x.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let line = gone.to_string();
        assert!(
            line.starts_with("cannot reach vireod at unix:/run/x.sock: "),
            "{line}"
        );
        assert!(
            line.ends_with("start it with `vireod --state-dir DIR`)"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
