//! Property tests: random write/discard/resize/flush/reopen sequences on dynamic and
//! differencing disks must always read exactly like a plain in-memory byte vector.
mod common;
use common::*;
use proptest::prelude::*;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const START: u64 = 6 * MIB;
const MAX: u64 = 12 * MIB;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Discard { off: u64, len: u64 },
    Resize { size: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..MAX, 1..3 * MIB, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (0..MAX, 1..3 * MIB).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (1..=MAX / 512).prop_map(|s| Op::Resize { size: s * 512 }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn run(ops: Vec<Op>, differencing: bool) {
    let dir = tmpdir();
    let mut model = vec![0u8; START as usize];
    let path = if differencing {
        let base = dir.path().join("base.vhdx");
        let b = Vhdx::create(&base, &opts(START, MIB as u32, DiskType::Dynamic)).unwrap();
        let data = pattern(START as usize, 77);
        b.write(&data, 0).unwrap();
        b.discard(2 * MIB, MIB).unwrap();
        drop(b);
        model = data;
        model[2 * MIB as usize..3 * MIB as usize].fill(0);
        let p = dir.path().join("child.vhdx");
        drop(
            Vhdx::create(
                &p,
                &CreateOptions {
                    disk_type: DiskType::Differencing,
                    parent: Some(base),
                    block_size: MIB as u32,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        p
    } else {
        let p = dir.path().join("d.vhdx");
        drop(Vhdx::create(&p, &opts(START, MIB as u32, DiskType::Dynamic)).unwrap());
        p
    };
    let mut d = Vhdx::open(&path, &OpenOptions::default()).unwrap();
    for op in ops {
        let size = model.len() as u64;
        match op {
            Op::Write { off, len, seed } => {
                let off = off % size;
                let len = len.min(size - off);
                let data = pattern(len as usize, seed);
                d.write(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Discard { off, len } => {
                let off = off % size;
                let len = len.min(size - off);
                d.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Resize { size: new } => {
                d.resize(new, true).unwrap();
                model.resize(new as usize, 0);
            }
            Op::Flush => d.flush().unwrap(),
            Op::Reopen => {
                drop(d);
                d = Vhdx::open(&path, &OpenOptions::default()).unwrap();
            }
        }
        assert_eq!(d.virtual_size(), model.len() as u64);
        let got = read(&d, 0, model.len());
        if got != model {
            let first = got.iter().zip(&model).position(|(a, b)| a != b).unwrap();
            panic!("mismatch at byte {first}");
        }
    }
    drop(d);
    let report = Vhdx::check(&path, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_model(ops in proptest::collection::vec(op(), 1..14)) {
        run(ops, false);
    }

    #[test]
    fn differencing_matches_model(ops in proptest::collection::vec(op(), 1..14)) {
        run(ops, true);
    }
}
