//! Measures QEMU microvm boot time of the probe: process spawn until `PROBE READY`, then
//! `POWEROFF`. Usage: `cargo run -p vireo-probe-image --release --example boot_time [runs]`.
//! Prints median/min/max per firmware (qboot, QEMU's default SeaBIOS).

use std::time::{Duration, Instant};

use vireo_probe_image::qemu::{find_qemu, QemuProbeConfig};

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let Some(qemu) = find_qemu() else {
        eprintln!("qemu-system-x86_64 not found");
        std::process::exit(2);
    };
    for (name, qboot) in [("qboot", true), ("seabios", false)] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let mut cfg = QemuProbeConfig::new(&qemu, 256);
            if !qboot {
                // SeaBIOS starts the kernel through the linuxboot/pvh option ROMs.
                cfg.firmware = None;
                cfg.machine = cfg.machine.replace("x-option-roms=off,", "");
            }
            let start = Instant::now();
            let mut vm = cfg.spawn().expect("spawn qemu");
            vm.console
                .wait_ready(Duration::from_secs(30))
                .expect("probe ready");
            times.push(start.elapsed());
            vm.console
                .command("POWEROFF", Duration::from_secs(10))
                .expect("poweroff");
            vm.wait_exit(Duration::from_secs(10)).expect("wait");
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{name}: spawn -> PROBE READY median {:.1} ms, min {:.1} ms, max {:.1} ms ({runs} runs)",
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(times[times.len() - 1])
        );
    }
}
