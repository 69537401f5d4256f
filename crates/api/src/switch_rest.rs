//! Switches as `GET /v1/switches[/{sw}]` shows them: the stored spec, the switch process, and
//! its ports as the process reports them (`crate::switch`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::switch::{PortReport, SwitchSpec};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchInfo {
    pub id: Uuid,
    pub spec: SwitchSpec,
    /// Unix time, milliseconds.
    pub created_at: i64,
    pub process: SwitchProcessInfo,
    /// The VM NICs on the switch: which VM and NIC each `<vm-id>/<nic>` port stands for.
    pub nics: Vec<SwitchNic>,
    /// The host interfaces added as ports (`POST /switches/{sw}/ports`), as stored.
    pub interface_ports: Vec<vireo_netconfig::PortConfig>,
    /// Every port as the switch process reports it now (empty in a list, or when the process
    /// does not answer).
    #[serde(default)]
    pub ports: Vec<PortReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchProcessInfo {
    /// The process answers on its control socket.
    pub running: bool,
    pub pid: Option<u32>,
    /// Times vireod has restarted it after it died (since vireod started).
    pub restarts: u32,
    /// Why it is not running, when it is not.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchNic {
    pub vm: String,
    pub vm_id: Uuid,
    pub nic: String,
    /// The port's name on the switch.
    pub port: String,
}
