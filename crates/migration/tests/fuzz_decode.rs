//! Whatever arrives on a migration stream, the receiver answers with an error or applies
//! pages inside guest RAM — never a panic, never a write outside RAM.

use proptest::prelude::*;
use vireo_migration::pages;
use vireo_migration::preamble::Preamble;
use vireo_migration::receiver::Receiver;
use vireo_migration::record::{encode_record, read_record, Kind, Transport};
use vireo_migration::sender::{Compression, Sender};
use vireo_migration::{Codec, PAGE_SIZE};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        let _ = read_record(&mut bytes.as_slice());
        let _ = pages::decode(&bytes, 1 << 20);
        let _ = Preamble::read(&mut bytes.as_slice());
    }

    #[test]
    fn mutated_valid_streams_never_panic_or_write_outside_ram(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)],
    ) {
        let page = [0x5au8; PAGE_SIZE];
        let body = pages::encode([(0u64, &page[..]), (0x2000, &[0u8; PAGE_SIZE][..]), (0x3000, &page[..])]).unwrap();
        let mut wire = Vec::new();
        Preamble::new(uuid::Uuid::nil(), 0, 1).write(&mut wire).unwrap();
        wire.extend(encode_record(Kind::Pages, codec, &body).unwrap());
        wire.extend(encode_record(Kind::Done, Codec::None, &[]).unwrap());
        for (at, x) in flips {
            let i = at % wire.len();
            wire[i] ^= x | 1;
        }
        // Vec<u8>'s GuestRam indexes the buffer: a page outside it would panic.
        let mut ram = vec![0u8; 0x4000];
        let mut r = wire.as_slice();
        if let Ok(mut rx) = Receiver::start(&mut r, None, Transport::Plain) {
            let _ = rx.run(&mut r, &mut ram);
        }
    }

    /// Without a CRC (an authenticated stream), corrupted payloads reach decompression and
    /// the batch decoder: they must still be refused, never panic or write outside RAM.
    #[test]
    fn mutated_streams_without_page_crcs_never_panic_or_write_outside_ram(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)],
    ) {
        let page = [0x5au8; PAGE_SIZE];
        let mut tx = Sender::start(
            Vec::new(),
            Preamble::new(uuid::Uuid::nil(), 0, 1),
            Compression::Fixed(codec),
            Transport::Authenticated,
        )
        .unwrap();
        tx.send_pages([(0u64, &page[..]), (0x2000, &[0u8; PAGE_SIZE][..]), (0x3000, &page[..])]).unwrap();
        let (mut wire, _) = tx.done().unwrap();
        for (at, x) in flips {
            let i = at % wire.len();
            wire[i] ^= x | 1;
        }
        let mut ram = vec![0u8; 0x4000];
        let mut r = wire.as_slice();
        if let Ok(mut rx) = Receiver::start(&mut r, None, Transport::Authenticated) {
            let _ = rx.run(&mut r, &mut ram);
        }
        // The same stream read as TLS is (buffered, page data straight into RAM), in chunks
        // that end mid-page.
        let mut ram = vec![0u8; 0x4000];
        let mut r = std::io::BufReader::with_capacity(3000, wire.as_slice());
        if let Ok(mut rx) = Receiver::start(&mut r, None, Transport::Authenticated) {
            let _ = rx.run_buffered(&mut r, &mut ram);
        }
    }

    #[test]
    fn any_page_set_round_trips(gpas in proptest::collection::btree_set(0u64..512, 0..64), fill in any::<u8>()) {
        let data: Vec<(u64, Vec<u8>)> = gpas.iter().map(|&g| (g * PAGE_SIZE as u64, vec![if g % 3 == 0 { 0 } else { fill }; PAGE_SIZE])).collect();
        let body = pages::encode(data.iter().map(|(g, d)| (*g, d.as_slice()))).unwrap();
        let back = pages::decode(&body, 512 * PAGE_SIZE as u64).unwrap();
        prop_assert_eq!(back.len(), data.len());
        for ((g, d), (bg, bd)) in data.iter().zip(back) {
            prop_assert_eq!(*g, bg);
            match bd {
                None => prop_assert!(d.iter().all(|&b| b == 0)),
                Some(p) => prop_assert_eq!(p, d.as_slice()),
            }
        }
    }
}
