//! vireod's side of the worker protocol (`vireo_api::worker`): one JSON line out, one back, on
//! `<vm-dir>/worker.sock`. Every call is bounded in time so a hung worker cannot hang a request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::timeout;
use uuid::Uuid;
use vireo_api::worker::{WorkerOp, WorkerReply, WorkerRequest, WorkerStatus};

/// Per request (connect, write, read).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A reply line may carry the whole console ring (≤ 16 MiB) in base64.
const MAX_REPLY_BYTES: u64 = 24 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WorkerCallError {
    #[error("cannot reach the worker at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("worker at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("worker at {} did not answer within {}s", path.display(), CALL_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
    #[error("worker at {} answered nonsense: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    #[error("worker refused: {0}")]
    Refused(String),
}

pub struct WorkerConn {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl WorkerConn {
    pub async fn connect(path: &Path) -> Result<WorkerConn, WorkerCallError> {
        let connect = timeout(CALL_TIMEOUT, UnixStream::connect(path)).await;
        let stream = match connect {
            Err(_) => return Err(WorkerCallError::Timeout { path: path.into() }),
            Ok(r) => r.map_err(|source| WorkerCallError::Connect {
                path: path.into(),
                source,
            })?,
        };
        let (r, w) = stream.into_split();
        Ok(WorkerConn {
            path: path.into(),
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends `op`; a worker's `Error` reply is `Refused`.
    pub async fn call(&mut self, op: WorkerOp) -> Result<WorkerReply, WorkerCallError> {
        self.call_within(op, CALL_TIMEOUT).await
    }

    /// [`Self::call`] for an operation that takes long (a checkpoint writes guest memory):
    /// the reply may take up to `limit`.
    pub async fn call_within(
        &mut self,
        op: WorkerOp,
        limit: Duration,
    ) -> Result<WorkerReply, WorkerCallError> {
        let path = self.path.clone();
        let io = |source| WorkerCallError::Io {
            path: path.clone(),
            source,
        };
        let line = request_line(op);
        let exchange = async {
            self.writer.write_all(&line).await.map_err(io)?;
            let mut reply = String::new();
            let n = (&mut self.reader)
                .take(MAX_REPLY_BYTES)
                .read_line(&mut reply)
                .await
                .map_err(io)?;
            Ok::<_, WorkerCallError>((n, reply))
        };
        let (n, reply) = timeout(limit, exchange)
            .await
            .map_err(|_| WorkerCallError::Timeout { path: path.clone() })??;
        if n == 0 || !reply.ends_with('\n') {
            return Err(WorkerCallError::Protocol {
                path,
                detail: "the connection closed before a full reply".into(),
            });
        }
        parse_reply(&path, reply.as_bytes())
    }

    /// `Hello`: the VM id and pid the worker says it has.
    pub async fn hello(&mut self) -> Result<(Uuid, u32), WorkerCallError> {
        match self.call(WorkerOp::Hello).await? {
            WorkerReply::Hello { vm_id, pid, .. } => Ok((vm_id, pid)),
            other => Err(self.unexpected("hello", &other)),
        }
    }

    pub async fn status(&mut self) -> Result<WorkerStatus, WorkerCallError> {
        match self.call(WorkerOp::Status).await? {
            WorkerReply::Status(s) => Ok(s),
            other => Err(self.unexpected("status", &other)),
        }
    }

    pub fn unexpected(&self, asked: &str, got: &WorkerReply) -> WorkerCallError {
        WorkerCallError::Protocol {
            path: self.path.clone(),
            detail: format!("asked {asked}, got {got:?}"),
        }
    }
}

/// A connection kept across one loop's polls of a worker, opened again after any failure
/// (a call that timed out may leave its reply in the pipe). A connection per poll made the
/// worker start a thread for each — every 10 ms of a migration, beside the guest's vCPU and
/// the migration's own threads on the same host CPUs.
#[derive(Default)]
pub struct KeptConn(Option<WorkerConn>);

impl KeptConn {
    pub async fn call(
        &mut self,
        sock: &Path,
        op: WorkerOp,
    ) -> Result<WorkerReply, WorkerCallError> {
        let conn = match &mut self.0 {
            Some(c) => c,
            None => self.0.insert(WorkerConn::connect(sock).await?),
        };
        let reply = conn.call(op).await;
        if reply.is_err() {
            self.0 = None;
        }
        reply
    }
}

/// One request on a fresh connection.
pub async fn call_once(sock: &Path, op: WorkerOp) -> Result<WorkerReply, WorkerCallError> {
    WorkerConn::connect(sock).await?.call(op).await
}

/// `Save` asking the worker to hand over its disks' locked files: the reply
/// (`DisksHandedOver`, or `Ok` from a worker that has none to give) and the files that came
/// with it, in the reply's order. Blocking socket work on a blocking thread: the descriptors
/// arrive with the reply's bytes (SCM_RIGHTS), which tokio's reads would drop.
pub async fn save_handing_over(
    sock: &Path,
    limit: Duration,
) -> Result<(WorkerReply, Vec<std::fs::File>), WorkerCallError> {
    let path = sock.to_path_buf();
    let exchange = tokio::task::spawn_blocking(move || save_exchange(&path, limit));
    match exchange.await {
        Ok(r) => r,
        Err(e) => Err(WorkerCallError::Io {
            path: sock.into(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

fn save_exchange(
    path: &Path,
    limit: Duration,
) -> Result<(WorkerReply, Vec<std::fs::File>), WorkerCallError> {
    use std::io::Write;
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
        WorkerCallError::Connect {
            path: path.into(),
            source,
        }
    })?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            WorkerCallError::Timeout { path: path.into() }
        }
        _ => WorkerCallError::Io {
            path: path.into(),
            source,
        },
    };
    stream.set_read_timeout(Some(limit)).map_err(io)?;
    stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
    let op = WorkerOp::Save {
        dir: None,
        hand_over_disks: true,
    };
    (&stream).write_all(&request_line(op)).map_err(io)?;
    let (reply, files) =
        vireo_block::handover::recv_line_with_files(&stream, MAX_REPLY_BYTES as usize)
            .map_err(io)?;
    Ok((parse_reply(path, &reply)?, files))
}

/// One request as the worker reads it: a JSON line.
fn request_line(op: WorkerOp) -> Vec<u8> {
    // Our own request types always serialize; a failure would be a bug in them.
    let mut line = serde_json::to_vec(&WorkerRequest::new(op)).expect("requests serialize");
    line.push(b'\n');
    line
}

/// A worker's reply line; its `Error` reply is `Refused`.
fn parse_reply(path: &Path, reply: &[u8]) -> Result<WorkerReply, WorkerCallError> {
    match serde_json::from_slice(reply) {
        Ok(WorkerReply::Error { message }) => Err(WorkerCallError::Refused(message)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(WorkerCallError::Protocol {
            path: path.into(),
            detail: e.to_string(),
        }),
    }
}
