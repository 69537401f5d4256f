//! The forwarding sample: a static destination-MAC → port-name table (what an SDN controller
//! would program), falling back to the learning table for unknown MACs. It vetoes removing a
//! port its table still points at.

use std::collections::HashMap;

use crate::extension::{Extension, ExtensionKind, FrameContext, PortChange};
use crate::frame::Mac;
use crate::PortId;

pub struct StaticForwarding {
    name: String,
    /// MAC → (port name, port id); ids are resolved by the caller that owns the switch.
    entries: HashMap<Mac, (String, PortId)>,
    pub hits: u64,
}

impl StaticForwarding {
    pub fn new(name: &str) -> Self {
        StaticForwarding {
            name: name.to_string(),
            entries: HashMap::new(),
            hits: 0,
        }
    }

    pub fn add(&mut self, mac: Mac, port_name: &str, port: PortId) {
        self.entries.insert(mac, (port_name.to_string(), port));
    }
}

impl Extension for StaticForwarding {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ExtensionKind {
        ExtensionKind::Forwarding
    }
    fn forward(&mut self, ctx: &FrameContext<'_>, _frame: &[u8], out: &mut Vec<PortId>) -> bool {
        match self.entries.get(&ctx.summary.dst) {
            Some((_, p)) => {
                self.hits += 1;
                out.push(*p);
                true
            }
            None => false,
        }
    }
    fn check_port_change(&self, change: PortChange<'_>) -> Result<(), String> {
        if let PortChange::Remove(p) = change {
            if self.entries.values().any(|(n, _)| *n == p.name) {
                return Err(format!(
                    "{}: static entries still point at port {}",
                    self.name, p.name
                ));
            }
        }
        Ok(())
    }
}
