//! A VM as the API shows it (`GET /vms/{id}`): its normalized spec, identity, state and times.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::VmIdentity;
use crate::spec::VmSpec;
use crate::state::VmState;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub spec: VmSpec,
    pub identity: VmIdentity,
    /// Flattened: `"state": "critical", "reason": "..."` beside the other fields.
    #[serde(flatten)]
    pub state: VmState,
    /// Unix time, milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl Vm {
    pub fn id(&self) -> Uuid {
        self.identity.id
    }
}
