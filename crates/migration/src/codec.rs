//! Per-batch compression. lz4 is cheap enough to keep up with a 10 Gbit/s link on one core;
//! zstd (level 1) saves more on slow links. The receiver always knows the decompressed size
//! from the batch header, so decompression is bounded and a hostile stream cannot make it
//! allocate more than one batch.

use crate::MigrationError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    None = 0,
    Lz4 = 1,
    Zstd = 2,
}

/// zstd's fastest level: migration wants throughput, not the last few percent.
const ZSTD_LEVEL: i32 = 1;

impl Codec {
    pub fn from_u8(v: u8) -> Result<Codec, MigrationError> {
        match v {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Lz4),
            2 => Ok(Codec::Zstd),
            other => Err(MigrationError::UnknownCodec(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => data.to_vec(),
            Codec::Lz4 => lz4_flex::block::compress(data),
            // Compressing an in-memory buffer only fails on allocation failure; fall back to
            // sending it raw would need another codec byte, so treat it as fatal like any OOM.
            Codec::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL)
                .unwrap_or_else(|e| panic!("zstd failed on an in-memory buffer: {e}")),
        }
    }

    /// Decompresses exactly `len` bytes; anything else is an error.
    pub fn decompress(self, data: &[u8], len: usize) -> Result<Vec<u8>, MigrationError> {
        let out = match self {
            Codec::None => data.to_vec(),
            Codec::Lz4 => lz4_flex::block::decompress(data, len)
                .map_err(|e| MigrationError::Decompress(e.to_string()))?,
            Codec::Zstd => zstd::bulk::decompress(data, len)
                .map_err(|e| MigrationError::Decompress(e.to_string()))?,
        };
        if out.len() != len {
            return Err(MigrationError::Decompress(format!(
                "{} bytes where the batch announced {len}",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// Reusable compression state for one stream: the output buffers and zstd's contexts are
/// made once and kept, so a batch costs no allocation (a zstd context is a few hundred KiB
/// to set up; making one per batch showed up in profiles).
#[derive(Default)]
pub struct Coder {
    zc: Option<zstd::bulk::Compressor<'static>>,
    zd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Coder {
    /// Compresses `data` with `codec` into `out` (replacing its contents). `Codec::None`
    /// leaves `out` empty: the caller sends `data` as it is.
    pub fn compress_into(&mut self, codec: Codec, data: &[u8], out: &mut Vec<u8>) {
        out.clear();
        match codec {
            Codec::None => {}
            Codec::Lz4 => {
                out.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
                // The output is sized by lz4's own bound, so this cannot run out of room.
                let n = lz4_flex::block::compress_into(data, out)
                    .unwrap_or_else(|e| panic!("lz4 into a buffer of its own bound: {e}"));
                out.truncate(n);
            }
            Codec::Zstd => {
                out.reserve(zstd::zstd_safe::compress_bound(data.len()));
                let zc = self.zc.get_or_insert_with(|| {
                    zstd::bulk::Compressor::new(ZSTD_LEVEL)
                        .unwrap_or_else(|e| panic!("zstd context: {e}"))
                });
                // As for `compress`: only an allocation failure can make this fail.
                zc.compress_to_buffer(data, out)
                    .unwrap_or_else(|e| panic!("zstd failed on an in-memory buffer: {e}"));
            }
        }
    }

    /// Decompresses exactly `len` bytes of `data` into `out` (replacing its contents).
    pub fn decompress_into(
        &mut self,
        codec: Codec,
        data: &[u8],
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), MigrationError> {
        out.clear();
        let n = match codec {
            Codec::None => {
                out.extend_from_slice(data);
                data.len()
            }
            Codec::Lz4 => {
                out.resize(len, 0);
                lz4_flex::block::decompress_into(data, out)
                    .map_err(|e| MigrationError::Decompress(e.to_string()))?
            }
            Codec::Zstd => {
                out.reserve(len);
                let zd = match &mut self.zd {
                    Some(d) => d,
                    None => self.zd.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| MigrationError::Decompress(e.to_string()))?,
                    ),
                };
                // The Vec's capacity bounds the output (`reserve` may give more: checked below).
                zd.decompress_to_buffer(data, out)
                    .map_err(|e| MigrationError::Decompress(e.to_string()))?
            }
        };
        if n != len {
            return Err(MigrationError::Decompress(format!(
                "{n} bytes where the batch announced {len}"
            )));
        }
        out.truncate(n);
        Ok(())
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd),
            other => Err(format!(
                "unknown compression {other:?}: use none, lz4 or zstd"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_checks_the_length() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let z = c.compress(&data);
            assert_eq!(c.decompress(&z, data.len()).unwrap(), data, "{}", c.name());
            assert!(c.decompress(&z, data.len() - 1).is_err(), "{}", c.name());
        }
    }

    #[test]
    fn the_reusable_coder_round_trips_and_checks_the_length() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut c = Coder::default();
        let (mut z, mut back) = (Vec::new(), Vec::new());
        for codec in [Codec::Lz4, Codec::Zstd, Codec::Lz4, Codec::Zstd] {
            c.compress_into(codec, &data, &mut z);
            assert!(z.len() < data.len() / 4, "{}", codec.name());
            c.decompress_into(codec, &z, data.len(), &mut back).unwrap();
            assert_eq!(back, data, "{}", codec.name());
            assert!(c
                .decompress_into(codec, &z, data.len() - 1, &mut back)
                .is_err());
            assert!(c
                .decompress_into(codec, &[0xff; 64], 4096, &mut back)
                .is_err());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for c in [Codec::Lz4, Codec::Zstd] {
            assert!(c.decompress(&[0xff; 64], 4096).is_err());
        }
        assert!(Codec::from_u8(9).is_err());
    }
}
