//! The filter sample: drops frames of listed EtherTypes from chosen ports (e.g. keep guests off
//! IPv6 or LLDP), and vetoes port changes that would make a filtered port a trunk, since this
//! filter only reads untagged EtherTypes.

use crate::config::VlanConfig;
use crate::extension::{Extension, ExtensionKind, FilterVerdict, FrameContext, PortChange};

pub struct EtherTypeFilter {
    name: String,
    /// Ports (by name) the filter applies to; empty means all.
    ports: Vec<String>,
    blocked: Vec<u16>,
    pub dropped: u64,
}

impl EtherTypeFilter {
    pub fn new(name: &str, ports: &[&str], blocked: &[u16]) -> Self {
        EtherTypeFilter {
            name: name.to_string(),
            ports: ports.iter().map(|p| p.to_string()).collect(),
            blocked: blocked.to_vec(),
            dropped: 0,
        }
    }

    fn applies(&self, port: &str) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p == port)
    }
}

impl Extension for EtherTypeFilter {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ExtensionKind {
        ExtensionKind::Filter
    }
    fn filter(&mut self, ctx: &FrameContext<'_>, _frame: &mut Vec<u8>) -> FilterVerdict {
        if self.applies(ctx.ingress_name) && self.blocked.contains(&ctx.summary.ethertype) {
            self.dropped += 1;
            FilterVerdict::Drop
        } else {
            FilterVerdict::Pass
        }
    }
    fn check_port_change(&self, change: PortChange<'_>) -> Result<(), String> {
        let new = match change {
            PortChange::Add(n) | PortChange::Update { new: n, .. } => n,
            PortChange::Remove(_) => return Ok(()),
        };
        if !self.ports.is_empty()
            && self.applies(&new.name)
            && matches!(new.vlan, VlanConfig::Trunk { .. })
        {
            return Err(format!(
                "{}: port {} is filtered and cannot become a trunk",
                self.name, new.name
            ));
        }
        Ok(())
    }
}
