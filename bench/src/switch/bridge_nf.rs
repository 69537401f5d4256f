//! The Linux bridge's netfilter hooks (br_netfilter's `bridge-nf-call-{iptables,ip6tables,
//! arptables}`). Where they are on (this machine's default), every bridged frame also passes
//! through iptables, which our fast path never does; the benchmark therefore measures the bridge
//! both ways and compares against its better figure. [`HooksOff`] turns them off for one run and
//! puts back what was there when dropped, on error and panic too.

use std::path::{Path, PathBuf};

/// Where the knobs live when br_netfilter is loaded.
pub const SYSCTL_DIR: &str = "/proc/sys/net/bridge";
const KNOBS: [&str; 3] = [
    "bridge-nf-call-iptables",
    "bridge-nf-call-ip6tables",
    "bridge-nf-call-arptables",
];

/// The hooks' settings under `dir`, e.g. `iptables=1 ip6tables=1 arptables=1`; None when no
/// knob exists (br_netfilter not loaded: bridged frames skip netfilter already).
pub fn describe(dir: &Path) -> Option<String> {
    let parts: Vec<String> = KNOBS
        .iter()
        .filter_map(|k| {
            let v = std::fs::read_to_string(dir.join(k)).ok()?;
            Some(format!(
                "{}={}",
                k.trim_start_matches("bridge-nf-call-"),
                v.trim()
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The hooks turned off until this is dropped; then each knob it changed gets its old value back.
pub struct HooksOff {
    saved: Vec<(PathBuf, String)>,
}

impl HooksOff {
    /// Turns off every hook knob under `dir` that is on. On an error, the knobs already changed
    /// are restored (by the drop of the partly built guard) before it is returned.
    pub fn new(dir: &Path) -> Result<HooksOff, String> {
        let mut off = HooksOff { saved: Vec::new() };
        for k in KNOBS {
            let path = dir.join(k);
            let Ok(old) = std::fs::read_to_string(&path) else {
                continue;
            };
            let old = old.trim().to_string();
            if old == "0" {
                continue;
            }
            std::fs::write(&path, "0").map_err(|e| format!("{}: {e}", path.display()))?;
            off.saved.push((path, old));
        }
        Ok(off)
    }
}

impl Drop for HooksOff {
    fn drop(&mut self) {
        for (path, old) in self.saved.iter().rev() {
            if let Err(e) = std::fs::write(path, old) {
                eprintln!(
                    "could not restore {} to {old}: {e}; set it back by hand",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(dir: &Path, values: [&str; 3]) {
        for (k, v) in KNOBS.iter().zip(values) {
            std::fs::write(dir.join(k), format!("{v}\n")).unwrap();
        }
    }

    fn read(dir: &Path) -> Vec<String> {
        KNOBS
            .iter()
            .map(|k| {
                std::fs::read_to_string(dir.join(k))
                    .unwrap()
                    .trim()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn hooks_are_off_while_held_and_restored_after() {
        let dir = tempfile::tempdir().unwrap();
        knobs(dir.path(), ["1", "1", "0"]);
        assert_eq!(
            describe(dir.path()).as_deref(),
            Some("iptables=1 ip6tables=1 arptables=0")
        );
        let off = HooksOff::new(dir.path()).unwrap();
        assert_eq!(read(dir.path()), ["0", "0", "0"]);
        drop(off);
        assert_eq!(read(dir.path()), ["1", "1", "0"]);
    }

    #[test]
    fn a_failure_part_way_restores_what_was_changed() {
        let dir = tempfile::tempdir().unwrap();
        knobs(dir.path(), ["1", "1", "1"]);
        // The third knob reads as on but cannot be written (not even by root): /proc/version.
        let third = dir.path().join(KNOBS[2]);
        std::fs::remove_file(&third).unwrap();
        std::os::unix::fs::symlink("/proc/version", &third).unwrap();
        assert!(HooksOff::new(dir.path()).is_err());
        for k in &KNOBS[..2] {
            let v = std::fs::read_to_string(dir.path().join(k)).unwrap();
            assert_eq!(v.trim(), "1", "{k} not restored");
        }
    }

    #[test]
    fn without_br_netfilter_there_is_nothing_to_turn_off() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(describe(dir.path()), None);
        drop(HooksOff::new(dir.path()).unwrap());
    }
}
