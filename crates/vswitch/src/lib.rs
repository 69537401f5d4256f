//! The extensible layer-2 virtual switch: a frame pipeline (ingress policies → extensions →
//! forwarding → egress policies → delivery), MAC learning, port policies, extensions and meters.
//!
//! The pipeline ([`Switch::process`]) does no I/O, so it is tested and benchmarked without
//! sockets; [`runtime::SwitchRuntime`] moves frames between [`vireo_netport::FramePort`]s
//! (channels, TAPs, AF_PACKET uplinks, later vhost-user VM NICs) and the pipeline.

pub mod acl;
pub mod announce;
pub mod config;
pub mod ext;
pub mod extension;
pub mod fastpath;
pub mod fragment;
pub mod frame;
pub mod guard;
pub mod host;
pub mod meter;
pub mod overlay;
pub mod port;
pub mod priority;
pub mod rate;
pub mod runtime;
pub mod source_guard;
pub mod switch;
pub mod table;
pub mod team;
pub mod uplink;
pub mod vhost_user;
pub mod vlan;
pub mod wfq;

pub use config::*;
pub use extension::{Extension, ExtensionKind, FilterVerdict, FrameContext, PortChange};
pub use meter::{Counter, DropReason};
pub use switch::{
    egress_policies, ingress_policies, render, Bytes, Delivery, Egress, PortStatus, Switch,
    SwitchError,
};
pub use vlan::TagOp;

/// A port's id within one switch.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PortId(pub u16);
