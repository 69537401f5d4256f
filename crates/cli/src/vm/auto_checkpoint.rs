//! `--auto-checkpoint on|off` and `--auto-checkpoint-keep N` of `vm create` and `vm set`: the
//! VM's automatic checkpoints (docs/checkpoints.md, "Automatic checkpoints").

use clap::ValueEnum;
use vireo_api::AutoCheckpoint;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The options over what the VM has; `None` leaves that part as it is.
pub fn apply(mut setting: AutoCheckpoint, on: Option<OnOff>, keep: Option<u32>) -> AutoCheckpoint {
    if let Some(on) = on {
        setting.enabled = on == OnOff::On;
    }
    if let Some(keep) = keep {
        setting.keep = keep;
    }
    setting
}

/// As `vm show` prints it.
pub fn text(setting: &AutoCheckpoint) -> String {
    if setting.enabled {
        format!(
            "automatic on, before risky operations (the newest {} kept)",
            setting.keep
        )
    } else {
        "automatic off".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_change_only_what_they_name() {
        let base = AutoCheckpoint::default();
        assert!(!base.enabled && base.keep == 3);
        let on = apply(base.clone(), Some(OnOff::On), None);
        assert!(on.enabled && on.keep == 3);
        let kept = apply(on.clone(), None, Some(5));
        assert!(kept.enabled && kept.keep == 5);
        assert!(!apply(kept, Some(OnOff::Off), None).enabled);
        assert_eq!(text(&base), "automatic off");
        assert_eq!(
            text(&on),
            "automatic on, before risky operations (the newest 3 kept)"
        );
    }
}
