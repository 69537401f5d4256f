//! End-to-end: boot the probe under QEMU microvm (KVM) and exercise the COM1 protocol.
//! Needs /dev/kvm and qemu-system-x86_64 (vireo-testkit: a recorded skip without them, a failure
//! under CI).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vireo_probe_image::console::{decode_hex, encode_hex, field};
use vireo_probe_image::pattern;
use vireo_probe_image::qemu::{
    debug_exit_status, find_qemu, NetBackend, QemuProbe, QemuProbeConfig,
};
use vireo_probe_image::ProbeError;

const BOOT: Duration = Duration::from_secs(60);
const CMD: Duration = Duration::from_secs(60);

fn qemu_or_skip() -> Option<PathBuf> {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Kvm, Need::QemuSystem]) {
        return None;
    }
    Some(find_qemu().expect("qemu-system-x86_64 runs but is not a file on PATH"))
}

fn boot(cfg: &QemuProbeConfig) -> QemuProbe {
    let mut vm = cfg.spawn().expect("spawn qemu");
    vm.console
        .wait_ready(BOOT)
        .expect("probe prints PROBE READY");
    vm
}

fn ok(vm: &mut QemuProbe, cmd: &str) -> String {
    match vm.console.command(cmd, CMD) {
        Ok(answer) => answer,
        Err(e) => panic!("{cmd}: {e}"),
    }
}

fn err(vm: &mut QemuProbe, cmd: &str) -> String {
    match vm.console.command(cmd, CMD) {
        Err(ProbeError::Err(text)) => text,
        other => panic!("{cmd}: expected ERR, got {other:?}"),
    }
}

fn sparse_disk(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn kvm_qemu_boot_info_and_poweroff_status() {
    let Some(qemu) = qemu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = sparse_disk(dir.path(), "a.img", 4 << 20);
    let b = sparse_disk(dir.path(), "b.img", 8 << 20);
    let cfg = QemuProbeConfig::new(&qemu, 128)
        .disk(&a, false)
        .disk(&b, false);
    let mut vm = boot(&cfg);
    assert_eq!(ok(&mut vm, "PING"), "OK PONG");
    assert_eq!(ok(&mut vm, "INFO"), "OK mem_mib=128 disks=2 nics=0 cpus=1");
    // Disk i is the i-th -drive/-device pair.
    assert_eq!(
        ok(&mut vm, "DISK 0 INFO"),
        "OK sectors=8192 ro=0 blk_size=512"
    );
    assert_eq!(
        ok(&mut vm, "DISK 1 INFO"),
        "OK sectors=16384 ro=0 blk_size=512"
    );
    assert_eq!(ok(&mut vm, "CPUS"), "OK online=1");
    let tsc = ok(&mut vm, "TSC");
    let khz: u64 = field(&tsc, "khz").unwrap().parse().unwrap();
    assert!(khz > 100_000, "{tsc}");
    assert!(err(&mut vm, "FROB").starts_with("unknown"));
    assert_eq!(err(&mut vm, "DISK 2 INFO"), "no such disk");
    assert_eq!(err(&mut vm, "DISK 0 WRITE 0 x 1"), "bad number");
    assert_eq!(ok(&mut vm, "POWEROFF 5"), "OK");
    let status = vm
        .wait_exit(Duration::from_secs(30))
        .unwrap()
        .expect("QEMU exits after POWEROFF");
    assert_eq!(status.code(), Some((5 << 1) | 1));
    assert_eq!(debug_exit_status(status), Some(5));
}

#[test]
fn kvm_qemu_devices_found_by_scanning_slots() {
    let Some(qemu) = qemu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = sparse_disk(dir.path(), "a.img", 2 << 20);
    let b = sparse_disk(dir.path(), "b.img", 3 << 20);
    let mut cfg = QemuProbeConfig::new(&qemu, 64)
        .disk(&a, false)
        .disk(&b, true);
    // Without the virtio_mmio.device= entries QEMU would add, the probe scans microvm's slots.
    cfg.machine.push_str(",auto-kernel-cmdline=off");
    let mut vm = boot(&cfg);
    assert_eq!(ok(&mut vm, "INFO"), "OK mem_mib=64 disks=2 nics=0 cpus=1");
    assert_eq!(
        ok(&mut vm, "DISK 0 INFO"),
        "OK sectors=4096 ro=0 blk_size=512"
    );
    assert_eq!(
        ok(&mut vm, "DISK 1 INFO"),
        "OK sectors=6144 ro=1 blk_size=512"
    );
}

#[test]
fn kvm_qemu_devices_listed_on_the_command_line() {
    let Some(qemu) = qemu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = sparse_disk(dir.path(), "a.img", 2 << 20);
    let b = sparse_disk(dir.path(), "b.img", 3 << 20);
    let mut cfg = QemuProbeConfig::new(&qemu, 64)
        .disk(&a, false)
        .disk(&b, false);
    cfg.machine.push_str(",auto-kernel-cmdline=off");
    // Only the second device's slot (QEMU fills its 8 ACPI-less slots from the top: 7, then 6) is listed, so
    // the probe must use exactly that one and not scan.
    cfg.cmdline = Some("quiet virtio_mmio.device=0x200@0xfeb00c00:11 other=1".into());
    let mut vm = boot(&cfg);
    assert_eq!(ok(&mut vm, "INFO"), "OK mem_mib=64 disks=1 nics=0 cpus=1");
    assert_eq!(
        ok(&mut vm, "DISK 0 INFO"),
        "OK sectors=6144 ro=0 blk_size=512"
    );
}

#[test]
fn kvm_qemu_disk_pattern_roundtrip() {
    let Some(qemu) = qemu_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rw = sparse_disk(dir.path(), "rw.img", 16 << 20);
    let ro = sparse_disk(dir.path(), "ro.img", 1 << 20);
    let mut ro_content = vec![0u8; 1 << 20];
    pattern::fill(&mut ro_content, 77, 0);
    write_at(&ro, 0, &ro_content);
    let mut cfg = QemuProbeConfig::new(&qemu, 64)
        .disk(&rw, false)
        .disk(&ro, true);
    cfg.disks[0].serial = Some("probe-disk-0".into());
    let mut vm = boot(&cfg);

    assert_eq!(ok(&mut vm, "DISK 0 ID"), "OK id=probe-disk-0");
    // Guest writes: 5000 sectors from LBA 8 take more requests than the probe keeps in flight.
    let (lba, count, seed) = (8u64, 5000u64, 0x1234u64);
    assert_eq!(
        ok(&mut vm, &format!("DISK 0 WRITE {lba} {count} {seed:#x}")),
        "OK"
    );
    assert_eq!(ok(&mut vm, "DISK 0 FLUSH"), "OK");
    let data = read_at(&rw, lba * 512, (count * 512) as usize);
    assert_eq!(pattern::verify(&data, seed, lba * 512), None);
    assert!(
        read_at(&rw, 0, 4096).iter().all(|&b| b == 0),
        "sectors before the range untouched"
    );
    assert!(
        read_at(&rw, (lba + count) * 512, 4096)
            .iter()
            .all(|&b| b == 0),
        "sectors after untouched"
    );
    assert_eq!(
        ok(&mut vm, &format!("DISK 0 VERIFY {lba} {count} {seed}")),
        "OK"
    );

    // Host writes, guest verifies.
    let (lba, count, seed) = (10_000u64, 2_500u64, 99u64);
    let mut buf = vec![0u8; (count * 512) as usize];
    pattern::fill(&mut buf, seed, lba * 512);
    write_at(&rw, lba * 512, &buf);
    assert_eq!(
        ok(&mut vm, &format!("DISK 0 VERIFY {lba} {count} {seed}")),
        "OK"
    );
    assert_eq!(
        err(&mut vm, &format!("DISK 0 VERIFY {lba} {count} 98")),
        format!("mismatch offset={}", lba * 512)
    );
    let bad = lba * 512 + 700_001;
    write_at(&rw, bad, &[!pattern::byte_at(seed, bad)]);
    assert_eq!(
        err(&mut vm, &format!("DISK 0 VERIFY {lba} {count} {seed}")),
        format!("mismatch offset={bad}")
    );

    assert_eq!(err(&mut vm, "DISK 0 VERIFY 32760 16 1"), "range");
    assert_eq!(ok(&mut vm, "DISK 0 VERIFY 32760 0 1"), "OK");

    // Read-only disk: reads work, writes are refused by the device.
    assert_eq!(ok(&mut vm, "DISK 1 VERIFY 0 2048 77"), "OK");
    assert!(err(&mut vm, "DISK 1 WRITE 0 8 1").starts_with("status="));
    assert_eq!(read_at(&ro, 0, 1 << 20), ro_content);
}

#[test]
fn kvm_qemu_memory_commands() {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut vm = boot(&QemuProbeConfig::new(&qemu, 64));
    assert_eq!(ok(&mut vm, "MEM FILL 8 16 5"), "OK");
    assert_eq!(ok(&mut vm, "MEM VERIFY 8 16 5"), "OK");
    assert_eq!(
        err(&mut vm, "MEM VERIFY 8 16 6"),
        format!("mismatch offset={}", 8 << 20)
    );
    let mut expected = vec![0u8; 1 << 20];
    pattern::fill(&mut expected, 5, 9 << 20);
    let sum = ok(&mut vm, "MEM SUM 9 1");
    assert_eq!(sum, format!("OK sum={:016x}", pattern::fnv1a64(&expected)));
    assert_eq!(err(&mut vm, "MEM FILL 0 1 1"), "range");
    assert_eq!(err(&mut vm, "MEM FILL 7 2 1"), "range");
    assert_eq!(err(&mut vm, "MEM FILL 60 8 1"), "range");
    assert_eq!(ok(&mut vm, "MEM FILL 56 8 1"), "OK");
}

#[test]
fn kvm_qemu_dirty_workload_runs_while_serving_commands() {
    let Some(qemu) = qemu_or_skip() else { return };
    let mut vm = boot(&QemuProbeConfig::new(&qemu, 64));
    assert_eq!(err(&mut vm, "DIRTY STOP"), "not running");
    assert_eq!(ok(&mut vm, "DIRTY START 16 8 0"), "OK");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ok(&mut vm, "PING"), "OK PONG");
    let stop = ok(&mut vm, "DIRTY STOP");
    let passes: u64 = field(&stop, "passes").unwrap().parse().unwrap();
    let pages: u64 = field(&stop, "pages").unwrap().parse().unwrap();
    assert!(passes > 0, "{stop}");
    assert!(pages >= passes * 2048, "{stop}");
    // Throttled run: it still makes progress and stops cleanly.
    assert_eq!(ok(&mut vm, "DIRTY START 16 4 50"), "OK");
    std::thread::sleep(Duration::from_millis(200));
    let stop = ok(&mut vm, "DIRTY STOP");
    assert!(
        field(&stop, "pages").unwrap().parse::<u64>().unwrap() > 0,
        "{stop}"
    );
    assert_eq!(err(&mut vm, "DIRTY START 4 8 0"), "range");
}

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn mac_of(vm: &mut QemuProbe) -> [u8; 6] {
    let answer = ok(vm, "NET 0 MAC");
    let text = field(&answer, "mac").unwrap();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend((0..200u32).map(|i| (i as u8).wrapping_mul(tag)));
    f
}

#[test]
fn kvm_qemu_net_between_two_vms() {
    let Some(qemu) = qemu_or_skip() else { return };
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let mac_a = [0x02, 0x56, 0x49, 0, 0, 0x0a];
    let mac_b = [0x02, 0x56, 0x49, 0, 0, 0x0b];
    let cfg_a = QemuProbeConfig::new(&qemu, 64).nic(
        NetBackend::Dgram {
            local: pa,
            remote: pb,
        },
        Some(mac_a),
    );
    let cfg_b = QemuProbeConfig::new(&qemu, 64).nic(
        NetBackend::Dgram {
            local: pb,
            remote: pa,
        },
        Some(mac_b),
    );
    let mut a = boot(&cfg_a);
    let mut b = boot(&cfg_b);
    assert_eq!(mac_of(&mut a), mac_a);
    assert_eq!(mac_of(&mut b), mac_b);
    assert_eq!(err(&mut a, "NET 0 RECV 100"), "timeout");

    // SEND on one VM, RECV on the other.
    let f = frame(mac_b, mac_a, 3);
    b.console.send_line("NET 0 RECV 20000").unwrap();
    assert_eq!(ok(&mut a, &format!("NET 0 SEND {}", encode_hex(&f))), "OK");
    let got = b.console.answer(CMD).unwrap();
    assert_eq!(decode_hex(got.strip_prefix("OK ").unwrap()).unwrap(), f);

    // ECHO: b sends each frame back with the MACs swapped.
    b.console.send_line("NET 0 ECHO 2 20000").unwrap();
    for tag in [5u8, 7] {
        let f = frame(mac_b, mac_a, tag);
        assert_eq!(ok(&mut a, &format!("NET 0 SEND {}", encode_hex(&f))), "OK");
        let got = ok(&mut a, "NET 0 RECV 20000");
        let mut want = frame(mac_a, mac_b, tag);
        want[12..].copy_from_slice(&f[12..]);
        assert_eq!(decode_hex(got.strip_prefix("OK ").unwrap()).unwrap(), want);
    }
    assert_eq!(b.console.answer(CMD).unwrap(), "OK echoed=2");
    assert_eq!(err(&mut a, "NET 0 SEND 0"), "bad frame");
    assert_eq!(err(&mut a, "NET 1 MAC"), "no such nic");
}
