//! KVM's state structures stored as their exact bytes.
//!
//! Why bytes and not fields: these structures *are* the kernel's ABI (`struct kvm_sregs` and
//! friends): their layout never changes for a given name, and KVM fills in and checks every
//! field itself. Copying them field by field would add hundreds of lines that can only go
//! wrong; the size is checked on load, so a truncated or foreign blob is an error. In the file
//! each blob is a lowercase hex string.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A KVM ABI structure that is plain bytes.
///
/// # Safety
/// Implementors must have no implicit padding (every byte of a value is initialized) and
/// accept every bit pattern (only integers, arrays and unions of those).
pub unsafe trait KvmAbi: 'static {
    /// Size fixed by the kernel ABI, checked at compile time below.
    const ABI_SIZE: usize;
}

macro_rules! kvm_abi {
    ($($t:ident = $size:literal),* $(,)?) => {$(
        // SAFETY: the kernel's uAPI structures spell their padding out as fields (they must
        // be the same for 32- and 64-bit callers), hold only integers and integer unions, and
        // kvm-bindings derives zerocopy's IntoBytes/FromBytes for each of them (which refuses
        // implicit padding). The size assertion ties the type to the ABI size.
        unsafe impl KvmAbi for kvm_bindings::$t {
            const ABI_SIZE: usize = $size;
        }
        const _: () = assert!(std::mem::size_of::<kvm_bindings::$t>() == $size);
    )*};
}

kvm_abi!(
    kvm_regs = 144,
    kvm_sregs = 312,
    kvm_fpu = 416,
    kvm_xsave = 4096,
    kvm_xcrs = 392,
    kvm_lapic_state = 1024,
    kvm_vcpu_events = 64,
    kvm_debugregs = 128,
    kvm_irqchip = 520,
    kvm_pit_state2 = 112,
    kvm_clock_data = 48,
);

/// A KVM structure in a state file.
pub struct Blob<T: KvmAbi>(pub T);

impl<T: KvmAbi> Clone for Blob<T> {
    // Some of them (kvm_xsave) are not Clone in kvm-bindings; their bytes are the value.
    fn clone(&self) -> Self {
        Blob::from_bytes(self.bytes()).expect("a blob's own bytes have its size")
    }
}

impl<T: KvmAbi> Blob<T> {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `KvmAbi` guarantees every byte of `T` is initialized; the slice borrows self.
        unsafe { std::slice::from_raw_parts((&self.0 as *const T).cast::<u8>(), T::ABI_SIZE) }
    }

    /// `None` unless `bytes` is exactly one `T`.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != T::ABI_SIZE {
            return None;
        }
        // SAFETY: the length matches and `KvmAbi` guarantees every bit pattern is a valid `T`;
        // read_unaligned copes with the Vec's alignment.
        Some(Blob(unsafe {
            std::ptr::read_unaligned(bytes.as_ptr().cast::<T>())
        }))
    }
}

impl<T: KvmAbi> PartialEq for Blob<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl<T: KvmAbi> Eq for Blob<T> {}

impl<T: KvmAbi> std::fmt::Debug for Blob<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        write!(f, "{name}({} bytes)", T::ABI_SIZE)
    }
}

impl<T: KvmAbi> Serialize for Blob<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(self.bytes()))
    }
}

impl<'de, T: KvmAbi> Deserialize<'de> for Blob<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = unhex(&text).ok_or_else(|| serde::de::Error::custom("not a hex string"))?;
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        Blob::from_bytes(&bytes).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{name} is {} bytes, the file has {}",
                T::ABI_SIZE,
                bytes.len()
            ))
        })
    }
}

// By table, not `write!("{:02x}")`: the state of a migration's switch-over is encoded and
// decoded while the guest is paused, and the formatter's per-byte cost (~25 ns) made the
// ~10 KiB of vCPU blobs take ~0.3 ms on each side.
const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    #[test]
    fn blobs_round_trip_and_refuse_the_wrong_size() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0x10_0000,
            rflags: 0x202,
            ..Default::default()
        };
        let text = serde_json::to_string(&Blob(regs)).unwrap();
        let back: Blob<kvm_regs> = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0.rax, regs.rax);
        assert_eq!(back.0.rip, regs.rip);
        assert_eq!(back, Blob(regs));
        // A kvm_regs blob is not a kvm_sregs.
        let e = serde_json::from_str::<Blob<kvm_sregs>>(&text).unwrap_err();
        assert!(e.to_string().contains("kvm_sregs is 312 bytes"), "{e}");
        assert!(serde_json::from_str::<Blob<kvm_regs>>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Blob<kvm_regs>>("\"abc\"").is_err());
    }

    #[test]
    fn hex_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&all)).unwrap(), all);
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00ABff").unwrap(), [0, 0xab, 0xff]);
        assert_eq!(unhex("é1"), None);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("+f"), None);
    }
}
