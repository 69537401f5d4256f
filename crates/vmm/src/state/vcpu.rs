//! One vCPU's state: read on the vCPU's own thread while it is parked (its fd belongs to that
//! thread), written into a new vCPU before its first KVM_RUN.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::kvm_blob::Blob;
use super::StateError;

/// The TSC; carried separately because restore moves it on by the time the VM was down
/// (docs/vm-state.md, "Time").
pub const MSR_IA32_TSC: u32 = 0x10;
/// KVM_GET_MSRS/KVM_SET_MSRS take at most this many entries per call.
const MSR_BATCH: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (its KVM id and APIC id).
    pub id: u32,
    pub regs: Blob<kvm_regs>,
    pub sregs: Blob<kvm_sregs>,
    /// Always saved; what restore uses when there is no XSAVE area.
    pub fpu: Blob<kvm_fpu>,
    /// The full FPU/SSE/AVX state when KVM gives it (KVM_GET_XSAVE); `None` where it refuses.
    pub xsave: Option<Blob<kvm_xsave>>,
    /// XCR0 when KVM gives it (KVM_GET_XCRS).
    pub xcrs: Option<Blob<kvm_xcrs>>,
    pub debugregs: Option<Blob<kvm_debugregs>>,
    pub lapic: Blob<kvm_lapic_state>,
    /// Pending exceptions, interrupts, NMIs, SMIs and the interrupt shadow.
    pub events: Blob<kvm_vcpu_events>,
    pub mp_state: u32,
    /// Every MSR on KVM's list that this vCPU let us read, `(index, value)`, the TSC included.
    pub msrs: MsrValues,
    /// The guest TSC rate, to move the TSC on by the time the VM was down.
    pub tsc_khz: Option<u32>,
}

/// The MSRs KVM says a VMM should save (KVM_GET_MSR_INDEX_LIST), asked once per process.
fn msr_index_list() -> Result<&'static [u32], StateError> {
    static LIST: OnceLock<Result<Vec<u32>, String>> = OnceLock::new();
    let list = LIST.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
        kvm.get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))
    });
    list.as_deref().map_err(|e| StateError::Kvm(e.clone()))
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm(format!("{what}: {e}"))
}

/// `(index, value)` pairs, in KVM's list order.
type MsrValues = Vec<(u32, u64)>;

/// Reads the MSRs in `indices` that the vCPU lets us read. KVM_GET_MSRS stops at the first
/// one it refuses and returns how many it read; that one is skipped and the rest tried.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(MsrValues, Vec<u32>), StateError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut refused = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Kvm(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        read.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < batch.len() {
            refused.push(batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok((read, refused))
}

/// Writes `msrs`; returns the indices KVM refused (it stops at the first refusal).
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<Vec<u32>, StateError> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Kvm(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&m).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < batch.len() {
            refused.push(batch[n].0);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(refused)
}

impl VcpuState {
    /// Reads vCPU `id`'s complete state. Call on its thread, outside KVM_RUN.
    pub fn capture(vcpu: &VcpuFd, id: u32) -> Result<VcpuState, StateError> {
        // Events first: KVM completes a half-injected event into them and they must match the
        // registers read after.
        let events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let (msrs, refused) = read_msrs(vcpu, msr_index_list()?)?;
        if !refused.is_empty() {
            tracing::debug!("vCPU {id}: KVM lists but does not return MSRs {refused:#x?}");
        }
        Ok(VcpuState {
            id,
            regs: Blob(vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?),
            sregs: Blob(vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?),
            fpu: Blob(vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?),
            // Optional pieces: a host (KVM-PVM) may refuse them; FPU/SSE is then in `fpu`.
            xsave: vcpu.get_xsave().ok().map(Blob),
            xcrs: vcpu.get_xcrs().ok().map(Blob),
            debugregs: vcpu.get_debug_regs().ok().map(Blob),
            lapic: Blob(vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?),
            events: Blob(events),
            mp_state: vcpu
                .get_mp_state()
                .map_err(kvm_err("KVM_GET_MP_STATE"))?
                .mp_state,
            msrs,
            tsc_khz: vcpu.get_tsc_khz().ok().filter(|&k| k > 0),
        })
    }

    /// Loads the state into a vCPU that has not run yet (its CPUID is already set). `down_ns`
    /// is how long the VM was down; the TSC moves on by that much (docs/vm-state.md, "Time").
    /// Returns the MSRs KVM refused, which the caller reports.
    pub fn restore(&self, vcpu: &VcpuFd, down_ns: u64) -> Result<Vec<u32>, StateError> {
        // Special registers first (mode, paging, APIC base), then what depends on them.
        vcpu.set_sregs(&self.sregs.0)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs.0)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        match &self.xsave {
            // SAFETY: a plain kvm_xsave of the legacy 4 KiB size, which KVM_SET_XSAVE reads
            // whole; no trailing dynamic area is involved.
            Some(x) => unsafe { vcpu.set_xsave(&x.0) }.map_err(kvm_err("KVM_SET_XSAVE"))?,
            None => vcpu.set_fpu(&self.fpu.0).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(&x.0).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &self.debugregs {
            vcpu.set_debug_regs(&d.0)
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        vcpu.set_lapic(&self.lapic.0)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        let msrs: Vec<(u32, u64)> = self
            .msrs
            .iter()
            .map(|&(index, value)| match (index, self.tsc_khz) {
                (MSR_IA32_TSC, Some(khz)) => {
                    let ticks = u128::from(down_ns) * u128::from(khz) / 1_000_000;
                    (index, value.wrapping_add(ticks as u64))
                }
                _ => (index, value),
            })
            .collect();
        let refused = write_msrs(vcpu, &msrs)?;
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        // Last: a pending exception or interrupt is checked against the state set above.
        vcpu.set_vcpu_events(&self.events.0)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(refused)
    }
}
