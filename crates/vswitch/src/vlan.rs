//! VLAN and private-VLAN membership compiled into bitmaps: what VLAN a frame entering a port
//! belongs to, and whether a frame of a VLAN may leave through a port. Private VLANs reduce
//! to the same two questions: an isolated port transmits into its isolated VLAN and receives
//! only the primary; a community port transmits into its community VLAN and receives the
//! primary and that community; a promiscuous port transmits into the primary and receives all
//! of the domain. Trunks carry the secondary VLAN ids unchanged, so the rules hold across
//! switches (as on physical PVLAN trunks).

use crate::config::{PortConfig, PvlanDomain, PvlanMode, VlanConfig};
use crate::frame::FrameSummary;
use crate::meter::DropReason;

/// A set of VLAN ids 0..4096.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet([u64; 64]);

impl Default for VlanSet {
    fn default() -> Self {
        VlanSet([0; 64])
    }
}

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries((0..4096u16).filter(|v| self.contains(*v)))
            .finish()
    }
}

impl VlanSet {
    pub fn insert(&mut self, vid: u16) {
        let v = (vid & 0xfff) as usize;
        self.0[v >> 6] |= 1 << (v & 63);
    }
    #[inline]
    pub fn contains(&self, vid: u16) -> bool {
        let v = (vid & 0xfff) as usize;
        self.0[v >> 6] & (1 << (v & 63)) != 0
    }
}

/// A port's VLAN behaviour, precompiled.
#[derive(Clone, Debug)]
pub struct PortVlan {
    /// VLAN of untagged (or priority-tagged) frames entering; `None` drops them.
    pub untagged_vid: Option<u16>,
    /// Tagged frames accepted on ingress (trunks only).
    pub tagged_in: VlanSet,
    /// VLANs whose frames may leave through this port.
    pub rx: VlanSet,
    /// VLANs delivered untagged on egress (all of them on access/PVLAN ports).
    pub egress_untagged: VlanSet,
    pub is_access: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VlanError {
    #[error("VLAN id {0} is out of range 1..=4094")]
    BadVid(u16),
    #[error("no private VLAN domain with primary {0}")]
    NoDomain(u16),
    #[error("VLAN {secondary} is not a {mode:?} secondary of primary {primary}")]
    NotSecondary {
        primary: u16,
        secondary: u16,
        mode: PvlanMode,
    },
    #[error("private VLAN domains overlap on VLAN {0}")]
    Overlap(u16),
    #[error("VLAN {0} belongs to a private VLAN domain; attach through a private-VLAN port")]
    PrivateVid(u16),
}

fn check_vid(v: u16) -> Result<u16, VlanError> {
    if (1..=4094).contains(&v) {
        Ok(v)
    } else {
        Err(VlanError::BadVid(v))
    }
}

/// Checks that domains use valid and distinct VLAN ids; returns each VLAN's learning-table
/// id (a whole PVLAN domain shares its primary's table so replies find isolated hosts).
pub fn compile_domains(domains: &[PvlanDomain]) -> Result<Vec<u16>, VlanError> {
    let mut fid: Vec<u16> = (0..4096).collect();
    let mut used = VlanSet::default();
    for d in domains {
        let members = std::iter::once(d.primary)
            .chain(d.isolated)
            .chain(d.communities.iter().copied());
        for v in members {
            check_vid(v)?;
            if used.contains(v) {
                return Err(VlanError::Overlap(v));
            }
            used.insert(v);
            fid[v as usize] = d.primary;
        }
    }
    Ok(fid)
}

fn in_domain(domains: &[PvlanDomain], v: u16) -> bool {
    domains
        .iter()
        .any(|d| d.primary == v || d.isolated == Some(v) || d.communities.contains(&v))
}

pub fn compile_port(cfg: &PortConfig, domains: &[PvlanDomain]) -> Result<PortVlan, VlanError> {
    let mut pv = PortVlan {
        untagged_vid: None,
        tagged_in: VlanSet::default(),
        rx: VlanSet::default(),
        egress_untagged: VlanSet::default(),
        is_access: true,
    };
    match &cfg.vlan {
        VlanConfig::Access { vid } => {
            let v = check_vid(*vid)?;
            // A plain port inside a private VLAN would bypass the isolated/community rules.
            if in_domain(domains, v) {
                return Err(VlanError::PrivateVid(v));
            }
            pv.untagged_vid = Some(v);
            pv.rx.insert(v);
            pv.egress_untagged.insert(v);
        }
        VlanConfig::Trunk { allowed, native } => {
            pv.is_access = false;
            for v in allowed {
                let v = check_vid(*v)?;
                pv.tagged_in.insert(v);
                pv.rx.insert(v);
            }
            if let Some(n) = native {
                let n = check_vid(*n)?;
                if in_domain(domains, n) {
                    return Err(VlanError::PrivateVid(n));
                }
                pv.untagged_vid = Some(n);
                pv.rx.insert(n);
                pv.egress_untagged.insert(n);
            }
        }
        VlanConfig::Private {
            primary,
            secondary,
            mode,
        } => {
            let d = domains
                .iter()
                .find(|d| d.primary == *primary)
                .ok_or(VlanError::NoDomain(*primary))?;
            let bad = || VlanError::NotSecondary {
                primary: *primary,
                secondary: *secondary,
                mode: *mode,
            };
            let (tx, rx): (u16, Vec<u16>) = match mode {
                PvlanMode::Isolated => {
                    if d.isolated != Some(*secondary) {
                        return Err(bad());
                    }
                    (*secondary, vec![d.primary])
                }
                PvlanMode::Community => {
                    if !d.communities.contains(secondary) {
                        return Err(bad());
                    }
                    (*secondary, vec![d.primary, *secondary])
                }
                PvlanMode::Promiscuous => {
                    let all = std::iter::once(d.primary)
                        .chain(d.isolated)
                        .chain(d.communities.iter().copied());
                    (d.primary, all.collect())
                }
            };
            pv.untagged_vid = Some(tx);
            for v in rx {
                pv.rx.insert(v);
                pv.egress_untagged.insert(v);
            }
        }
    }
    Ok(pv)
}

/// Ingress stage for VLANs: the VLAN a frame belongs to inside the switch.
#[inline]
pub fn classify(pv: &PortVlan, s: &FrameSummary) -> Result<u16, DropReason> {
    if pv.is_access {
        // A priority tag (VID 0) is the only tag an access port accepts; a second tag behind
        // any tag is how VLAN hopping gets into a neighbour's VLAN.
        if s.tags >= 2 {
            return Err(DropReason::DoubleTagged);
        }
        if s.tags == 1 && s.vid != 0 {
            return Err(DropReason::VlanNotAllowed);
        }
        return pv.untagged_vid.ok_or(DropReason::VlanNotAllowed);
    }
    if s.tags == 0 || s.vid == 0 {
        return pv.untagged_vid.ok_or(DropReason::VlanNotAllowed);
    }
    if pv.tagged_in.contains(s.vid) {
        Ok(s.vid)
    } else {
        Err(DropReason::VlanNotAllowed)
    }
}

/// How the frame's outer tag must change on the way out of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagOp {
    /// Send the bytes as they are.
    Keep,
    /// Remove the outer tag.
    Untag,
    /// Add an outer tag (or rewrite the existing outer tag's VID) to this VLAN.
    Tag(u16),
}

/// Egress stage for VLANs: `None` when `vid` may not leave through this port.
#[inline]
pub fn egress_tag(pv: &PortVlan, vid: u16, s: &FrameSummary) -> Option<TagOp> {
    if !pv.rx.contains(vid) {
        return None;
    }
    let tagged_now = s.tags > 0;
    Some(if pv.egress_untagged.contains(vid) {
        if tagged_now {
            TagOp::Untag
        } else {
            TagOp::Keep
        }
    } else if tagged_now && s.vid == vid {
        TagOp::Keep
    } else {
        TagOp::Tag(vid)
    })
}
