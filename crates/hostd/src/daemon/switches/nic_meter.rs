//! Metering of a VM's NICs, the arithmetic: readings of the NICs' switch ports (`PortMeters`,
//! counters since that switch process started or last reset its meters) added to the period's
//! per-NIC totals while metering is enabled, like `meter.rs` does for the worker's counters.
//! The last reading of each NIC is kept with the switch process's pid, so a vireod restart
//! loses nothing, and a restarted switch process (new pid) or a meter reset (counters went
//! down) counts from zero.
//!
//! Directions: the switch's "in" is what the port sent into it — the VM transmitting, the
//! NIC's `bytes_out` — and its "out" is what it delivered to the VM, the NIC's `bytes_in`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vireo_api::switch::{AclMeter, PortMeters};
use vireo_api::NicUsage;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicMeters {
    /// The period's totals, per NIC in the order first seen.
    pub totals: Vec<NicUsage>,
    /// The last reading of each NIC (by name), counted or not.
    pub last: BTreeMap<String, NicReading>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicReading {
    /// The switch process that counted it.
    pub pid: u32,
    pub meters: PortMeters,
}

fn grow(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

fn dropped(m: &PortMeters) -> u64 {
    m.drops.values().sum()
}

impl NicMeters {
    /// Takes NIC `nic`'s port reading `m` from switch process `pid`.
    pub fn record(&mut self, enabled: bool, nic: &str, pid: u32, m: PortMeters) {
        if enabled {
            let zero = PortMeters::default();
            let before = match self.last.get(nic) {
                Some(l)
                    if l.pid == pid
                        && m.packets_in >= l.meters.packets_in
                        && m.packets_out >= l.meters.packets_out =>
                {
                    &l.meters
                }
                _ => &zero,
            };
            let t = match self.totals.iter().position(|t| t.name == nic) {
                Some(i) => &mut self.totals[i],
                None => {
                    self.totals.push(NicUsage {
                        name: nic.to_owned(),
                        bytes_in: 0,
                        bytes_out: 0,
                        packets_in: 0,
                        packets_out: 0,
                        dropped: 0,
                        acl: BTreeMap::new(),
                    });
                    self.totals.last_mut().expect("just pushed")
                }
            };
            t.bytes_out += grow(m.bytes_in, before.bytes_in);
            t.packets_out += grow(m.packets_in, before.packets_in);
            t.bytes_in += grow(m.bytes_out, before.bytes_out);
            t.packets_in += grow(m.packets_out, before.packets_out);
            t.dropped += grow(dropped(&m), dropped(before));
            for (rule, a) in &m.acl {
                let b = before.acl.get(rule).copied().unwrap_or_default();
                let e = t.acl.entry(rule.clone()).or_insert(AclMeter::default());
                e.packets += grow(a.packets, b.packets);
                e.bytes += grow(a.bytes, b.bytes);
            }
        }
        self.last
            .insert(nic.to_owned(), NicReading { pid, meters: m });
    }

    /// Ends the period (the last readings stay the baseline).
    pub fn reset(&mut self) {
        self.totals.clear();
    }

    pub fn report(&self) -> Vec<NicUsage> {
        self.totals.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters(pin: u64, bin: u64, pout: u64, bout: u64) -> PortMeters {
        PortMeters {
            packets_in: pin,
            bytes_in: bin,
            packets_out: pout,
            bytes_out: bout,
            ..PortMeters::default()
        }
    }

    #[test]
    fn counts_growth_while_enabled_across_switch_restarts_and_resets() {
        let mut n = NicMeters::default();
        // Before enabling: only the baseline.
        n.record(false, "nic0", 10, meters(5, 500, 1, 100));
        assert!(n.report().is_empty());
        n.record(true, "nic0", 10, meters(7, 700, 4, 400));
        let r = &n.report()[0];
        // Switch "in" (the VM sent) is the NIC's "out".
        assert_eq!(
            (r.packets_out, r.bytes_out, r.packets_in, r.bytes_in),
            (2, 200, 3, 300)
        );
        // A new switch process: its counters start from zero.
        n.record(true, "nic0", 11, meters(1, 60, 0, 0));
        assert_eq!(n.report()[0].bytes_out, 260);
        // Counters that went down (ResetMeters): count from zero.
        let mut m = meters(2, 120, 0, 0);
        m.drops.insert("vlan".into(), 3);
        m.acl.insert(
            "web".into(),
            AclMeter {
                packets: 1,
                bytes: 60,
            },
        );
        n.record(true, "nic0", 11, m.clone());
        assert_eq!(n.report()[0].bytes_out, 320);
        assert_eq!(n.report()[0].dropped, 3);
        assert_eq!(n.report()[0].acl["web"].bytes, 60);
        n.record(false, "nic0", 11, meters(9, 999, 9, 999));
        assert_eq!(n.report()[0].bytes_out, 320, "disabled: not counted");
        n.reset();
        assert!(n.report().is_empty());
        n.record(true, "nic0", 11, meters(10, 1099, 9, 999));
        assert_eq!(n.report()[0].bytes_out, 100);
    }
}
