//! vireod's side of the switch-process protocol (`vireo_api::switch`): one JSON line out, one
//! back, on a fresh connection to `<switch-dir>/switch.sock`, bounded in time so a hung switch
//! process cannot hang a request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::timeout;
use vireo_api::switch::{SwitchOp, SwitchReply, SwitchRequest};

pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A status of a switch with many ports and ACL meters stays far below this.
const MAX_REPLY_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SwitchCallError {
    #[error("cannot reach the switch process at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("switch process at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("switch process at {} did not answer within {}s", path.display(), CALL_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
    #[error("switch process at {} answered nonsense: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// The switch's own `Error` reply: the reason it refused.
    #[error("{0}")]
    Refused(String),
}

/// Sends `op`; the switch's `Error` reply is `Refused`.
pub async fn call(sock: &Path, op: SwitchOp) -> Result<SwitchReply, SwitchCallError> {
    let path = sock.to_path_buf();
    let io = |source| SwitchCallError::Io {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_vec(&SwitchRequest::new(op)).expect("requests serialize");
    line.push(b'\n');
    let exchange = async {
        let stream =
            UnixStream::connect(sock)
                .await
                .map_err(|source| SwitchCallError::Connect {
                    path: path.clone(),
                    source,
                })?;
        let (r, mut w) = stream.into_split();
        w.write_all(&line).await.map_err(io)?;
        let mut reply = String::new();
        let n = BufReader::new(r)
            .take(MAX_REPLY_BYTES)
            .read_line(&mut reply)
            .await
            .map_err(io)?;
        Ok::<_, SwitchCallError>((n, reply))
    };
    let (n, reply) = timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| SwitchCallError::Timeout { path: path.clone() })??;
    let protocol = |detail: String| SwitchCallError::Protocol {
        path: path.clone(),
        detail,
    };
    if n == 0 || !reply.ends_with('\n') {
        return Err(protocol("the connection closed before a full reply".into()));
    }
    match serde_json::from_str(&reply) {
        Ok(SwitchReply::Error { message }) => Err(SwitchCallError::Refused(message)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(protocol(e.to_string())),
    }
}
