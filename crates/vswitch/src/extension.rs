//! The extension interface (Hyper-V's capture / filter / forwarding extensions). Extensions are
//! registered per switch and run in registration order after the ingress policies: every
//! capture extension sees the frame, then filters may drop or rewrite it, then the single
//! forwarding extension (if any) may choose destinations instead of the learning table.
//! VLAN/PVLAN isolation and egress policies still apply to whatever a forwarding extension
//! chooses, so an extension cannot break tenant isolation. Any extension may veto a port
//! configuration change.

use crate::config::PortConfig;
use crate::frame::FrameSummary;
use crate::PortId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtensionKind {
    /// Sees frames, cannot change them.
    Capture,
    /// May drop or modify frames.
    Filter,
    /// Decides destinations; at most one per switch.
    Forwarding,
}

/// What an extension knows about the frame in front of it.
#[derive(Clone, Copy, Debug)]
pub struct FrameContext<'a> {
    pub ingress: PortId,
    pub ingress_name: &'a str,
    /// The VLAN the frame belongs to inside the switch.
    pub vid: u16,
    pub summary: &'a FrameSummary,
    /// Pipeline clock, nanoseconds.
    pub now: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterVerdict {
    Pass,
    Drop,
    /// The extension rewrote the frame; the switch parses it again.
    Modified,
}

/// A port configuration change an extension is asked to approve.
#[derive(Clone, Copy, Debug)]
pub enum PortChange<'a> {
    Add(&'a PortConfig),
    Update {
        old: &'a PortConfig,
        new: &'a PortConfig,
    },
    Remove(&'a PortConfig),
}

pub trait Extension: Send {
    fn name(&self) -> &str;
    fn kind(&self) -> ExtensionKind;

    /// Capture extensions: observe a frame accepted by the ingress policies.
    fn capture(&mut self, _ctx: &FrameContext<'_>, _frame: &[u8]) {}

    /// Filter extensions: drop, pass, or modify (in place) a frame.
    fn filter(&mut self, _ctx: &FrameContext<'_>, _frame: &mut Vec<u8>) -> FilterVerdict {
        FilterVerdict::Pass
    }

    /// Forwarding extension: push destinations into `out` and return true, or return false to
    /// leave the decision to the learning table.
    fn forward(&mut self, _ctx: &FrameContext<'_>, _frame: &[u8], _out: &mut Vec<PortId>) -> bool {
        false
    }

    /// Approve (Ok) or veto (Err with the reason) a port change before it takes effect.
    fn check_port_change(&self, _change: PortChange<'_>) -> Result<(), String> {
        Ok(())
    }
}
