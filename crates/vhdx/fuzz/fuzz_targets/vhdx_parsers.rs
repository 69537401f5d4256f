//! The pure VHDX structure parsers on arbitrary bytes: the first byte picks the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_vhdx::format::{header, locator, log, metadata, region};
use vireo_vhdx::Guid;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            let _ = header::parse_file_identifier(rest);
        }
        1 => {
            let _ = header::Header::parse(rest);
        }
        2 => {
            if let Ok(t) = region::RegionTable::parse(rest) {
                let _ = t.validate(1 << 30, (1 << 20, 1 << 20));
            }
        }
        3 => {
            if let Ok(m) = metadata::Metadata::parse(rest.to_vec()) {
                let _ = m.params();
            }
        }
        4 => {
            let _ = locator::ParentLocator::parse(rest);
        }
        _ => {
            // The log parser takes the log GUID from the first 16 bytes.
            if rest.len() >= 16 {
                let guid = Guid::from_slice(&rest[..16]);
                let _ = log::active_sequence(&rest[16..], guid);
            }
        }
    }
});
