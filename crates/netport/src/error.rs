use std::io;

/// Why a frame could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("port is full; frame not queued")]
    Full,
    #[error("frame of {len} bytes does not fit the {cap}-byte buffer")]
    TooLong { len: usize, cap: usize },
    #[error("the other end of the port is gone")]
    Disconnected,
    #[error("I/O error on port: {0}")]
    Io(#[from] io::Error),
}
