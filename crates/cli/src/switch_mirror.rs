//! `vireo switch mirror SWITCH`: the uplink's part in port mirroring, and on a switch with an
//! overlay whether its copies show the tunnel packets or the customer frames in them
//! (`PUT /v1/switches/{sw}/uplink/mirror`).

use clap::{Args, ValueEnum};
use vireo_api::switch::UplinkMirror;
use vireo_netconfig::{Direction, MirrorLayer, MirrorRole};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Role {
    /// Copies of the uplink's traffic (--direction) go to every destination port.
    Source,
    /// The uplink receives the copies.
    Destination,
    /// No part in mirroring.
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DirectionArg {
    Ingress,
    Egress,
    Both,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Layer {
    /// The tunnel packets as on the provider wire (VXLAN/NVGRE headers with the VSID).
    Outer,
    /// The customer frames inside them, as the VMs' port policies see them.
    Inner,
}

#[derive(Args)]
pub struct MirrorArgs {
    /// The switch's name or id (it must have an uplink: external, or --team).
    pub switch: String,
    #[arg(long, value_enum)]
    pub role: Role,
    /// What a source copies (received by the uplink, sent by it, or both).
    #[arg(long, value_enum, default_value = "both")]
    pub direction: DirectionArg,
    /// On a switch with an overlay: what the copies show (default outer).
    #[arg(long, value_enum)]
    pub overlay: Option<Layer>,
}

impl MirrorArgs {
    pub fn mirror(&self) -> UplinkMirror {
        let direction = match self.direction {
            DirectionArg::Ingress => Direction::Ingress,
            DirectionArg::Egress => Direction::Egress,
            DirectionArg::Both => Direction::Both,
        };
        UplinkMirror {
            role: match self.role {
                Role::Source => MirrorRole::Source(direction),
                Role::Destination => MirrorRole::Destination,
                Role::None => MirrorRole::None,
            },
            overlay: match self.overlay {
                Some(Layer::Inner) => MirrorLayer::Inner,
                Some(Layer::Outer) | None => MirrorLayer::Outer,
            },
        }
    }

    /// What `vireo switch mirror` prints once vireod took it.
    pub fn done_text(&self, m: &UplinkMirror) -> String {
        format!(
            "the uplink of switch {} is {}{}\n",
            self.switch,
            role_text(m.role),
            layer_text(m, self.overlay.is_some())
        )
    }
}

/// What a source's copies show; the default (outer) only when the user named it.
fn layer_text(m: &UplinkMirror, say_outer: bool) -> &'static str {
    match (m.role, m.overlay) {
        (MirrorRole::Source(_), MirrorLayer::Inner) => ", copies show the customer frames",
        (MirrorRole::Source(_), MirrorLayer::Outer) if say_outer => {
            ", copies show the tunnel packets"
        }
        _ => "",
    }
}

fn role_text(role: MirrorRole) -> String {
    match role {
        MirrorRole::Source(d) => format!("a mirror source ({d:?})").to_lowercase(),
        MirrorRole::Destination => "a mirror destination".into(),
        MirrorRole::None => "out of mirroring".into(),
    }
}

/// The `uplink mirror:` line of `vireo switch show`; empty when the uplink is not mirrored.
pub fn show_line(m: Option<&UplinkMirror>) -> String {
    match m {
        None
        | Some(UplinkMirror {
            role: MirrorRole::None,
            ..
        }) => String::new(),
        Some(m) => format!(
            "uplink mirror: {}{}\n",
            role_text(m.role),
            layer_text(m, false)
        ),
    }
}
