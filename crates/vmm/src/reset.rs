//! What a host-initiated reset puts back: the state every vCPU, the in-kernel irqchip and the
//! PIT had just before the first KVM_RUN (captured in `Vm::new`), and guest RAM as the loader
//! left it (wiped, then loaded again from the kernel file).

use kvm_bindings::{
    kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// Paravirtual MSRs that make KVM write into guest memory (kvmclock, steal time, async page
/// faults, PV EOI). After a reset the new boot's memory is not where the old guest pointed
/// them, so they are switched off as a power cycle would.
const PV_MSRS: [u32; 5] = [
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x12,        // MSR_KVM_SYSTEM_TIME (old)
];

/// One vCPU's state before its first KVM_RUN.
pub struct VcpuBootState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
}

impl VcpuBootState {
    pub fn capture(vcpu: &VcpuFd) -> Result<Self> {
        Ok(VcpuBootState {
            regs: vcpu.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(VmmError::kvm("KVM_GET_FPU"))?,
            lapic: vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(VmmError::kvm("KVM_GET_MP_STATE"))?,
        })
    }

    /// Puts the vCPU back (called on the vCPU's own thread, outside KVM_RUN). Pending events
    /// (an exception or NMI being delivered) are dropped; MSRs other than the boot ones and
    /// the paravirtual ones keep what the guest wrote, and the TSC keeps counting.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_vcpu_events(&kvm_vcpu_events::default())
            .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu)
            .map_err(VmmError::kvm("KVM_SET_FPU"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(VmmError::kvm("KVM_SET_LAPIC"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
        crate::vcpu::set_msrs(vcpu);
        for index in PV_MSRS {
            let entry = kvm_bindings::kvm_msr_entry {
                index,
                data: 0,
                ..Default::default()
            };
            // A host without the MSR has nothing running behind it either.
            if let Ok(m) = Msrs::from_entries(&[entry]) {
                let _ = vcpu.set_msrs(&m);
            }
        }
        Ok(())
    }
}

/// The VM-wide interrupt hardware before the first KVM_RUN.
pub struct VmBootState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl VmBootState {
    pub fn capture(vm: &VmFd) -> Result<Self> {
        let mut chips = Vec::new();
        for id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(VmmError::kvm("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
        let pit = vm.get_pit2().map_err(VmmError::kvm("KVM_GET_PIT2"))?;
        Ok(VmBootState { chips, pit })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        for chip in &self.chips {
            vm.set_irqchip(chip)
                .map_err(VmmError::kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(VmmError::kvm("KVM_SET_PIT2"))
    }
}

/// Zeroes all of guest RAM by dropping the memfd's pages (the host gets the memory back, as
/// after a power cycle; KVM's mappings follow through the MMU notifiers).
pub fn wipe_ram(ram: &GuestRam) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let len = libc::off_t::try_from(ram.size)
        .map_err(|_| VmmError::MemoryAlloc(format!("guest RAM of {} bytes", ram.size)))?;
    // SAFETY: plain fallocate(2) on our own memfd; KEEP_SIZE leaves its length as it is.
    let rc = unsafe {
        libc::fallocate(
            ram.memfd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
    };
    if rc != 0 {
        return Err(VmmError::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn wiping_ram_zeroes_what_the_guest_wrote() {
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.memory
            .write_obj(0x1234_5678_u64, GuestAddress(0x20_0000))
            .unwrap();
        wipe_ram(&ram).unwrap();
        let v: u64 = ram.memory.read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(v, 0);
        // Still usable afterwards.
        ram.memory.write_obj(5u64, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 5);
    }
}
