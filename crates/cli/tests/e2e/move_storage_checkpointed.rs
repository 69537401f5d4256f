//! `vireo vm move-storage` of a VM with checkpoints, through vireod. Before the tree moved
//! with the disks, a move copied only the VM's running chain and deleted its old files: the
//! checkpoints' frozen files (the base disk the first checkpoint froze among them) were gone,
//! the records named files that no longer existed and `checkpoint apply` failed. Now an off
//! VM's whole tree moves: the list is unchanged, every file of the tree is in the destination
//! and checks clean, nothing is left in the old places, and applying each checkpoint gives
//! back its disk data exactly. `--flatten` is refused with one line naming the way out. `vm rm`
//! afterwards leaves no `vireo-checkpoints-<id>/` folder behind. A running VM's move:
//! `move_storage_checkpointed_live.rs`.

use std::path::Path;

use crate::vireod_harness;
use vireo_vhdx::{CreateOptions, OpenOptions, Vhdx};
use vireod_harness::tree::{all_check_clean, files_in_use, vhdx_on_disk};
use vireod_harness::Daemon;

const MIB: u64 = 1 << 20;

/// The move is refused with one line containing each of `words`, and nothing is left in the
/// destination.
fn assert_move_refused(d: &Daemon, vm: &str, extra: &[&str], words: &[&str], to: &Path) {
    let mut args = vec!["vm", "move-storage", vm, "--to", to.to_str().unwrap()];
    args.extend(extra);
    let (code, line) = d.fails(&args);
    eprintln!("move-storage {extra:?} of a checkpointed VM: {line}");
    assert_eq!(code, 1, "{line}");
    for w in words {
        assert!(line.contains(w), "the error should say {w:?}: {line}");
    }
    let left: Vec<_> = std::fs::read_dir(to)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the refused move left {left:?}");
}

fn write_all(path: &Path, byte: u8) {
    let v = Vhdx::open(path, &OpenOptions::default()).unwrap();
    v.write(&vec![byte; MIB as usize], MIB).unwrap();
    v.flush().unwrap();
}

fn read_byte(path: &Path) -> u8 {
    let v = Vhdx::open(path, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    v.read(&mut buf, MIB).unwrap();
    assert!(
        buf.iter().all(|&b| b == buf[0]),
        "torn data in {}",
        path.display()
    );
    buf[0]
}

#[test]
fn an_off_vm_moves_its_whole_checkpoint_tree() {
    let Some(d) = Daemon::start() else { return };
    let base = d.dir.path().join("base.vhdx");
    let opts = CreateOptions {
        size: 8 * MIB,
        block_size: MIB as u32,
        ..Default::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    write_all(&base, 1);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm",
        "create",
        "c",
        "--kernel",
        &kernel,
        "--disk",
        "base.vhdx",
    ]);
    // A tree with a branch: first → second on one line, then first applied and a third
    // taken beside second, so a frozen file off the VM's running chain must move too.
    d.ok(&["checkpoint", "create", "c", "first"]);
    write_all(&d.vm("c").spec.disks[0].path, 2);
    d.ok(&["checkpoint", "create", "c", "second"]);
    d.ok(&["checkpoint", "apply", "c", "first"]);
    write_all(&d.vm("c").spec.disks[0].path, 4);
    d.ok(&["checkpoint", "create", "c", "third"]);
    write_all(&d.vm("c").spec.disks[0].path, 3);
    let (tree, files) = (d.ok(&["checkpoint", "list", "c"]), files_in_use(&d, "c"));
    assert_eq!(
        files,
        vhdx_on_disk(d.dir.path()),
        "the tree before the move"
    );
    assert_eq!(files.len(), 4, "{files:?}");

    let to = d.dir.path().join("moved");
    assert_move_refused(
        &d,
        "c",
        &["--flatten"],
        &["--flatten", "checkpoint rm"],
        &to,
    );
    assert_eq!(files_in_use(&d, "c"), files);

    let out = d.ok(&["vm", "move-storage", "c", "--to", to.to_str().unwrap()]);
    assert!(out.contains("moved the disks of VM c"), "{out}");
    let to = std::fs::canonicalize(&to).unwrap();
    assert_eq!(d.ok(&["checkpoint", "list", "c"]), tree, "the tree changed");
    let moved = files_in_use(&d, "c");
    assert_eq!(moved.len(), files.len(), "{moved:?}");
    assert!(moved.iter().all(|f| f.starts_with(&to)), "{moved:?}");
    assert!(moved.contains(&to.join("base.vhdx")), "{moved:?}");
    // Every VHDX left anywhere is one the tree names: nothing stays behind in the old places.
    assert_eq!(vhdx_on_disk(d.dir.path()), moved, "files left behind");
    assert!(!base.exists());
    all_check_clean(&d, &moved);
    assert_eq!(read_byte(&d.vm("c").spec.disks[0].path), 3);

    for (cp, byte) in [("second", 2), ("first", 1), ("third", 4)] {
        d.ok(&["checkpoint", "apply", "c", cp]);
        assert_eq!(
            read_byte(&d.vm("c").spec.disks[0].path),
            byte,
            "after applying {cp}"
        );
    }
    // The files vireod made are still its own in their new folder: the apply deleted the
    // VM's discarded top there, and a delete removes a frozen file nobody needs any more.
    assert_eq!(vhdx_on_disk(d.dir.path()), files_in_use(&d, "c"));
    d.ok(&["checkpoint", "rm", "c", "second"]);
    assert_eq!(vhdx_on_disk(d.dir.path()), files_in_use(&d, "c"));
    all_check_clean(&d, &files_in_use(&d, "c"));
    d.ok(&["checkpoint", "apply", "c", "first"]);
    assert_eq!(read_byte(&d.vm("c").spec.disks[0].path), 1);

    // Removing the VM removes vireod's own files in the move's folder too (they used to stay
    // behind: only the VM's folder went); the user's base disk stays.
    let ours = to.join(format!("vireo-checkpoints-{}", d.vm("c").id()));
    assert!(ours.is_dir());
    d.ok(&["vm", "rm", "c"]);
    assert!(!ours.exists(), "{} left behind", ours.display());
    assert_eq!(vhdx_on_disk(d.dir.path()), vec![to.join("base.vhdx")]);
}
