//! What can go wrong starting the switch or changing its ports, typed; each message is one
//! line naming the offending file, port or interface.

use std::path::PathBuf;

use vireo_vswitch::host::HostPortError;
use vireo_vswitch::SwitchError;

#[derive(Debug, thiserror::Error)]
pub enum SwitchdError {
    #[error("reading the launch file {}: {source}", .path.display())]
    LaunchRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the launch file {} is not a valid SwitchLaunch: {source}", .path.display())]
    LaunchJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "the launch file's config lists {0} port(s); ports belong in \"ports\" with their attachment"
    )]
    LaunchConfigPorts(usize),
    #[error("switch: {0}")]
    Switch(#[from] SwitchError),
    #[error("the switch's host ports: {0}")]
    HostPorts(#[from] HostPortError),
    #[error("starting the switch runtime: {0}")]
    Runtime(std::io::Error),
    #[error("socket {}: {source}", .path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {}: a file that is not a socket is in the way", .path.display())]
    SocketInTheWay { path: PathBuf },
    #[error("socket {} is in use by another process", .path.display())]
    SocketInUse { path: PathBuf },
    #[error("socket {} is already port {port:?}'s", .path.display())]
    SocketTaken { path: PathBuf, port: String },
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        source: std::io::Error,
    },
    #[error("interface {name} is already attached (port {port:?})")]
    InterfaceTaken { name: String, port: String },
    #[error("port {port:?}: {source}")]
    Team {
        port: String,
        source: vireo_vswitch::team::TeamError,
    },
    #[error("no port named {0:?}")]
    NoSuchPort(String),
    #[error("port {0:?} comes with the switch's kind and cannot be removed")]
    ImpliedPort(String),
    #[error("starting the control socket's thread: {0}")]
    Thread(std::io::Error),
    #[error("installing the signal handlers: {0}")]
    Signals(std::io::Error),
}
