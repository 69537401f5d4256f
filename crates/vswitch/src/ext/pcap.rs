//! The capture sample: writes every frame it sees to a classic pcap file (LINKTYPE_ETHERNET),
//! readable by `tcpdump -r` and Wireshark.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::extension::{Extension, ExtensionKind, FrameContext};

/// Frames are truncated to this many bytes in the file (pcap "snaplen").
const SNAPLEN: u32 = 65535;

/// A pcap file writer.
pub struct PcapWriter<W: Write> {
    out: W,
    pub frames: u64,
}

impl PcapWriter<BufWriter<File>> {
    pub fn create(path: &Path) -> io::Result<Self> {
        PcapWriter::new(BufWriter::new(File::create(path)?))
    }
}

impl<W: Write> PcapWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?; // magic, microsecond timestamps
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?; // thiszone
        out.write_all(&0u32.to_le_bytes())?; // sigfigs
        out.write_all(&SNAPLEN.to_le_bytes())?;
        out.write_all(&1u32.to_le_bytes())?; // LINKTYPE_ETHERNET
        Ok(PcapWriter { out, frames: 0 })
    }

    /// Appends one frame stamped `unix_ns` nanoseconds since the epoch.
    pub fn write_frame(&mut self, unix_ns: u64, frame: &[u8]) -> io::Result<()> {
        let incl = frame.len().min(SNAPLEN as usize);
        self.out
            .write_all(&((unix_ns / 1_000_000_000) as u32).to_le_bytes())?;
        self.out
            .write_all(&((unix_ns % 1_000_000_000 / 1000) as u32).to_le_bytes())?;
        self.out.write_all(&(incl as u32).to_le_bytes())?;
        self.out.write_all(&(frame.len() as u32).to_le_bytes())?;
        self.out.write_all(&frame[..incl])?;
        self.frames += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Capture extension writing accepted ingress frames to a pcap file. Write errors stop the
/// capture (counted in `errors`) rather than disturbing the switch.
pub struct PcapCapture {
    name: String,
    writer: Option<PcapWriter<BufWriter<File>>>,
    pub errors: u64,
}

impl PcapCapture {
    pub fn create(name: &str, path: &Path) -> io::Result<Self> {
        Ok(PcapCapture {
            name: name.to_string(),
            writer: Some(PcapWriter::create(path)?),
            errors: 0,
        })
    }

    pub fn frames(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.frames)
    }
}

impl Drop for PcapCapture {
    fn drop(&mut self) {
        if let Some(w) = &mut self.writer {
            let _ = w.flush();
        }
    }
}

impl Extension for PcapCapture {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> ExtensionKind {
        ExtensionKind::Capture
    }
    fn capture(&mut self, _ctx: &FrameContext<'_>, frame: &[u8]) {
        if let Some(w) = &mut self.writer {
            // Flush per frame: captures are for diagnosis, and a reader may open the file live.
            if w.write_frame(unix_now_ns(), frame)
                .and_then(|_| w.flush())
                .is_err()
            {
                self.errors += 1;
                self.writer = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_layout() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        w.write_frame(1_500_000_000_123_456_789, &[1, 2, 3])
            .unwrap();
        let b = w.into_inner();
        assert_eq!(b.len(), 24 + 16 + 3);
        assert_eq!(&b[0..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(
            u32::from_le_bytes(b[24..28].try_into().unwrap()),
            1_500_000_000
        );
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 123_456);
        assert_eq!(&b[40..], &[1, 2, 3]);
    }
}
