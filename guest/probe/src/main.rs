//! Vireo's probe guest: reaches CPL3 in a few instructions (boot.rs), finds its devices, prints
//! `PROBE READY` on COM1 and then answers the line protocol of docs/probe-protocol.md.

#![no_std]
#![no_main]

mod arch;
mod arena;
mod bench;
mod boot;
mod bootinfo;
mod builtins;
mod commands;
mod dirty;
mod memory;
mod parse;
mod pattern;
mod reply;
mod rescan;
mod serial;
mod status;
mod time;
mod virtio;

use core::fmt::Write;

use bootinfo::{BootInfo, MmioDevice, MMIO_DEVICES_MAX};
use commands::{After, Probe, MAX_NICS};
use serial::{Com1, Line, LineReader};
use virtio::mmio::{self, Transport};

/// QEMU microvm's virtio-mmio slots, scanned when the command line lists no device.
const MICROVM_MMIO_BASE: u64 = 0xfeb0_0000;
const MICROVM_MMIO_STRIDE: u64 = 0x200;
const MICROVM_MMIO_SLOTS: u64 = 24;
/// While idle, wait this many TSC ticks between COM1 polls so an idle probe does not keep the
/// VMM busy with back-to-back exits.
const IDLE_POLL_TICKS: u64 = 20_000;
/// While the dirty workload runs, poll COM1 at most this often.
const DIRTY_POLL_TICKS: u64 = 200_000;

static mut LINE_READER: LineReader = LineReader::new();

#[no_mangle]
pub extern "C" fn probe_bsp_main(start_info: u32) -> ! {
    let mut com = Com1::init();
    let info = BootInfo::read(start_info);
    status::init_by_bsp();
    if !info.valid_start_info {
        com.write(b"probe: no PVH start_info (bad magic); no memory map\n");
    }
    let mut probe = Probe::new(com, info);
    discover(&mut probe);
    // The leading newline ends whatever firmware output (e.g. SeaBIOS) left on the line.
    probe.com.write(b"\nPROBE READY\n");
    serve(&mut probe)
}

fn discover(probe: &mut Probe) {
    let mut listed = [MmioDevice::default(); MMIO_DEVICES_MAX];
    let mut count = bootinfo::mmio_devices_from_cmdline(probe.info.cmdline(), &mut listed);
    if count == 0 {
        // QEMU plugs the first -device into the highest slot, so scanning downwards finds
        // devices in command-line order.
        for i in (0..MICROVM_MMIO_SLOTS).rev() {
            listed[count] = MmioDevice {
                base: MICROVM_MMIO_BASE + i * MICROVM_MMIO_STRIDE,
            };
            count += 1;
        }
    }
    for dev in &listed[..count] {
        probe.slots.push(dev.base);
    }
    let mut msg = reply::Reply::new();
    probe.scan_disks(&mut msg);
    for dev in &listed[..count] {
        let t = Transport { base: dev.base };
        match Transport::probe(dev.base) {
            mmio::Probe::Empty => {}
            mmio::Probe::Legacy(id) => {
                let _ = writeln!(
                    msg,
                    "probe: legacy virtio-mmio device type {id} at {:#x} ignored",
                    dev.base
                );
            }
            mmio::Probe::Device(mmio::DEVICE_NET) if probe.nic_count < MAX_NICS => {
                match virtio::net::Net::new(t) {
                    Some(n) => {
                        probe.nics[probe.nic_count] = Some(n);
                        probe.nic_count += 1;
                    }
                    None => {
                        let _ = writeln!(
                            msg,
                            "probe: virtio-net at {:#x} failed to initialise",
                            dev.base
                        );
                    }
                }
            }
            mmio::Probe::Device(_) => {}
        }
    }
    probe.com.write(msg.as_bytes());
}

fn serve(probe: &mut Probe) -> ! {
    // SAFETY: only the BSP runs this loop, and it is the only user of LINE_READER.
    let reader = unsafe { &mut *core::ptr::addr_of_mut!(LINE_READER) };
    let mut last_poll = 0u64;
    loop {
        if let Some(dirty) = probe.dirty.as_mut() {
            dirty.step();
            if arch::rdtsc().wrapping_sub(last_poll) < DIRTY_POLL_TICKS {
                continue;
            }
        }
        last_poll = arch::rdtsc();
        // Drain what COM1 has before doing anything else.
        let mut got_any = false;
        while let Some(b) = probe.com.try_read() {
            got_any = true;
            let after = match reader.push(b) {
                None => continue,
                Some(Line::TooLong) => probe.handle(b"\x00too long"),
                Some(Line::Text(line)) => probe.handle(line),
            };
            if let After::PowerOff(status) = after {
                arch::power_off(status);
            }
        }
        if !got_any && probe.dirty.is_none() {
            let t = arch::rdtsc();
            while arch::rdtsc().wrapping_sub(t) < IDLE_POLL_TICKS {
                core::hint::spin_loop();
            }
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut com = Com1::init();
    let mut msg = reply::Reply::new();
    let _ = writeln!(msg, "PROBE PANIC: {info}");
    com.write(msg.as_bytes());
    arch::power_off(0x7f)
}
