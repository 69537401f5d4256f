//! A switch port: its configuration compiled for the pipeline, its rate limiters and meters.

use crate::acl::PortAcl;
use crate::config::{Direction, MirrorRole, PortConfig, PortRole, PvlanDomain};
use crate::guard::PortGuard;
use crate::meter::PortMeters;
use crate::rate::TokenBucket;
use crate::vlan::{compile_port, PortVlan, VlanError};

#[derive(Debug)]
pub struct Port {
    pub cfg: PortConfig,
    pub vlan: PortVlan,
    pub guard: PortGuard,
    pub acl: PortAcl,
    pub rate_in: Option<TokenBucket>,
    pub rate_out: Option<TokenBucket>,
    pub storm: Option<TokenBucket>,
    pub mirror_in: bool,
    pub mirror_out: bool,
    pub mirror_dest: bool,
    pub meters: PortMeters,
}

impl Port {
    pub fn compile(cfg: PortConfig, domains: &[PvlanDomain]) -> Result<Port, VlanError> {
        let vlan = compile_port(&cfg, domains)?;
        let (mirror_in, mirror_out) = match cfg.mirror {
            MirrorRole::Source(d) => (d.covers(Direction::Ingress), d.covers(Direction::Egress)),
            _ => (false, false),
        };
        Ok(Port {
            vlan,
            guard: PortGuard::compile(cfg.role, &cfg.macs, &cfg.guard),
            acl: PortAcl::compile(&cfg.acls),
            rate_in: cfg
                .qos
                .max_ingress
                .map(|r| TokenBucket::for_bits(r.bits_per_sec, r.burst_bytes)),
            // On an uplink, max_egress is the link rate the runtime shapes to (queueing, so the
            // minimum-bandwidth weights decide who gets it) instead of a policer.
            rate_out: cfg
                .qos
                .max_egress
                .filter(|_| cfg.role != PortRole::Uplink)
                .map(|r| TokenBucket::for_bits(r.bits_per_sec, r.burst_bytes)),
            storm: cfg
                .storm_limit_pps
                .map(|pps| TokenBucket::new(pps as u64, pps.max(1) as u64)),
            mirror_in,
            mirror_out,
            mirror_dest: cfg.mirror == MirrorRole::Destination,
            meters: PortMeters::new(cfg.acls.len()),
            cfg,
        })
    }

    /// Takes a new configuration, keeping meters (ACL counters are kept by rule name).
    pub fn reconfigure(
        &mut self,
        cfg: PortConfig,
        domains: &[PvlanDomain],
    ) -> Result<(), VlanError> {
        let mut next = Port::compile(cfg, domains)?;
        let old = std::mem::take(&mut self.meters);
        next.meters.ingress = old.ingress;
        next.meters.egress = old.egress;
        next.meters.drops = old.drops;
        for (i, r) in next.cfg.acls.iter().enumerate() {
            if let Some(j) = self.cfg.acls.iter().position(|o| o.name == r.name) {
                next.meters.acl[i] = old.acl.get(j).copied().unwrap_or_default();
            }
        }
        *self = next;
        Ok(())
    }
}
