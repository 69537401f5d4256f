//! vCPU setup (registers for the boot protocol, CPUID, MSRs, LAPIC) and the per-vCPU run loop.
//!
//! Stopping: the main thread sets the exit reason and sends [`kick_signal`] to each vCPU thread.
//! The handler sets `immediate_exit` in that thread's `kvm_run`, so a signal arriving just before
//! KVM_RUN is not lost: KVM_RUN returns EINTR at once and the loop sees the exit reason.

use std::cell::Cell;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_run, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::layout::{GDT_ADDR, IDT_ADDR, PML4_ADDR};
use crate::boot::BootEntry;
use crate::devices::Bus;
use crate::error::{Result, VmmError};
use crate::exit::{ExitState, VmExit};
use crate::lifecycle::{Job, JobOutput, RunControl};
use crate::reset::VcpuBootState;
use crate::state::VcpuState;

/// "VIRE": tells a PVH guest it was started as an application processor (probe convention).
pub const AP_MAGIC: u64 = 0x5649_5245;
const BOOT_STACK: u64 = 0x8ff0;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn set_data_segments(sregs: &mut kvm_sregs, data: kvm_segment) {
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// Puts vCPU `index` of `count` in the state `entry` prescribes.
pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    count: u32,
    entry: BootEntry,
    supported_cpuid: &CpuId,
) -> Result<()> {
    let what = |w: &'static str| VmmError::kvm(w);
    let mut cpuid = supported_cpuid.clone();
    crate::cpuid::patch(&mut cpuid, index, count);
    vcpu.set_cpuid2(&cpuid).map_err(what("KVM_SET_CPUID2"))?;
    set_msrs(vcpu);
    set_lint(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(what("KVM_SET_FPU"))?;

    let is_ap = index != 0;
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            let mut sregs = vcpu.get_sregs().map_err(what("KVM_GET_SREGS"))?;
            sregs.cs = segment(0x10, 0xb, false);
            set_data_segments(&mut sregs, segment(0x18, 0x3, false));
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            vcpu.set_sregs(&sregs).map_err(what("KVM_SET_SREGS"))?;
            let regs = kvm_regs {
                rip: entry,
                rbx: start_info,
                rdi: AP_MAGIC,
                rsi: u64::from(index),
                rflags: 0x2,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(what("KVM_SET_REGS"))?;
            if is_ap {
                // Vireo starts APs directly at the PVH entry; no INIT/SIPI dance.
                vcpu.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(what("KVM_SET_MP_STATE"))?;
            }
        }
        BootEntry::Linux64 { entry, boot_params } => {
            if is_ap {
                // Linux brings its APs up itself with INIT/SIPI.
                return Ok(());
            }
            let mut sregs = vcpu.get_sregs().map_err(what("KVM_GET_SREGS"))?;
            sregs.cs = segment(0x10, 0xb, true);
            set_data_segments(&mut sregs, segment(0x18, 0x3, false));
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (crate::boot::paging::GDT.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            vcpu.set_sregs(&sregs).map_err(what("KVM_SET_SREGS"))?;
            let regs = kvm_regs {
                rip: entry,
                rsi: boot_params,
                rsp: BOOT_STACK,
                rbp: BOOT_STACK,
                rflags: 0x2,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(what("KVM_SET_REGS"))?;
        }
    }
    Ok(())
}

/// Sensible power-on MSR values. KVM-PVM and older hosts refuse some MSRs; that is not fatal.
pub(crate) fn set_msrs(vcpu: &VcpuFd) {
    let entries = [
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WRITEBACK,
            ..Default::default()
        },
    ];
    for e in entries {
        let ok = Msrs::from_entries(&[e])
            .ok()
            .and_then(|m| vcpu.set_msrs(&m).ok())
            == Some(1);
        if !ok {
            tracing::debug!("MSR {:#x} not settable on this host", e.index);
        }
    }
}

/// LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as firmware would leave them.
fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?;
    let mut patch = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    patch(APIC_LVT0, APIC_MODE_EXTINT);
    patch(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(VmmError::kvm("KVM_SET_LAPIC"))
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: one volatile store into this thread's kvm_run page.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's mapped kvm_run, valid while the vCPU thread runs
        // (cleared before the VcpuFd is dropped); immediate_exit is a plain u8 field.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Io(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// Everything a vCPU thread shares with the rest of the VM.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    /// Pause/resume/reset requests.
    pub control: Arc<RunControl>,
    /// What a reset puts back; `Err` (why) when it could not be captured.
    pub boot: std::result::Result<VcpuBootState, String>,
}

/// [`Job::Load`] on vCPU `index`'s own thread.
fn load_saved(
    vcpu: &VcpuFd,
    index: usize,
    load: &crate::lifecycle::LoadJob,
) -> std::result::Result<JobOutput, String> {
    let saved = load
        .vcpus
        .get(index)
        .ok_or_else(|| format!("vCPU {index}: the saved state has no such vCPU"))?;
    let refused = saved
        .restore(vcpu, load.down_ns)
        .map_err(|e| format!("vCPU {index}: {e}"))?;
    if !refused.is_empty() {
        tracing::warn!(
            "vCPU {index}: KVM refused to load MSRs {refused:#x?}; they keep their current value"
        );
    }
    Ok(JobOutput::Done)
}

/// Runs vCPU `index` until the VM has an exit reason. The caller has counted the thread in
/// (`RunControl::vcpu_started`); it counts itself out when it ends.
pub fn run(mut vcpu: VcpuFd, index: usize, ctx: VcpuContext) {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    tracing::debug!("vCPU {index} running");
    let mut exits = ExitCounts::default();
    // A kick may have come before the pointer was published; the checks below cover it,
    // because a request is always recorded before its kick is sent.
    loop {
        if ctx.exit.is_set() {
            break;
        }
        if ctx.control.pause_requested() {
            if let Err(reason) = complete_pending_io(&mut vcpu, &ctx) {
                ctx.exit
                    .set(VmExit::Error(format!("vCPU {index}: {reason}")));
                continue;
            }
            // A kick that arrives from here on is for a later request, which the checks
            // above see on the way out of the park.
            vcpu.set_kvm_immediate_exit(0);
            // Tells a guest using kvmclock that the host stopped it, so its soft-lockup
            // watchdog does not take the pause for a hung CPU (EINVAL without kvmclock).
            let _ = vcpu.kvmclock_ctrl();
            ctx.control.park(|job| match (job, &ctx.boot) {
                (Job::Reset, Ok(boot)) => boot
                    .restore(&vcpu)
                    .map(|()| JobOutput::Done)
                    .map_err(|e| format!("vCPU {index}: {e}")),
                (Job::Reset, Err(why)) => Err(format!("vCPU {index}: {why}")),
                (Job::Save, _) => VcpuState::capture(&vcpu, index as u32)
                    .map(|s| JobOutput::Saved(Box::new(s)))
                    .map_err(|e| format!("vCPU {index}: {e}")),
                (Job::Load(load), _) => load_saved(&vcpu, index, &load),
            });
            continue;
        }
        crate::state::trace::vcpu_entering();
        let outcome = match vcpu.run() {
            Ok(exit) => {
                exits.count(&exit);
                handle_exit(exit, &ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Ok(())
            }
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        if let Err(mut reason) = outcome {
            reason.push_str(&internal_error_detail(&mut vcpu));
            let rip = vcpu
                .get_regs()
                .map(|r| format!("{:#x}", r.rip))
                .unwrap_or_else(|_| "unknown".into());
            ctx.exit.set(VmExit::Error(format!(
                "vCPU {index}: {reason} at RIP {rip}"
            )));
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    ctx.control.vcpu_ended();
    tracing::debug!("vCPU {index} stopped; exits: {exits}");
}

/// Finishes the I/O exit handled last before the vCPU parks. KVM completes a port or MMIO
/// access only on the next KVM_RUN (an IN's value goes into the guest's register and RIP moves
/// past the instruction there). State captured before that has the guest execute the access
/// again after a restore or migration: the COM1 byte popped for an IN is lost (a console
/// command line arrived one character short on the destination), an OUT is repeated. KVM_RUN
/// with `immediate_exit` set completes the access and returns EINTR without running guest
/// code; a string access may need more than one exit to complete, so loop until EINTR.
fn complete_pending_io(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> std::result::Result<(), String> {
    /// A `rep ins/outs` of a whole page of bytes, one exit each, and then some: a bound, so a
    /// broken guest cannot keep the pause from happening.
    const MAX_EXITS: u32 = 8192;
    vcpu.set_kvm_immediate_exit(1);
    let mut exits = 0;
    let outcome = loop {
        match vcpu.run() {
            Ok(_) if exits == MAX_EXITS => {
                break Err(format!(
                    "the last I/O did not complete in {MAX_EXITS} exits"
                ))
            }
            Ok(exit) => {
                exits += 1;
                handle_exit(exit, ctx)?
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break Ok(()),
            Err(e) => break Err(format!("KVM_RUN to complete the last I/O failed: {e}")),
        }
    };
    vcpu.set_kvm_immediate_exit(0);
    outcome
}

/// How often each kind of exit brought a vCPU back to us, for the log line at its end.
#[derive(Default)]
struct ExitCounts {
    io: u64,
    mmio: u64,
    hlt: u64,
    other: u64,
}

impl ExitCounts {
    fn count(&mut self, exit: &VcpuExit) {
        match exit {
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => self.io += 1,
            VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => self.mmio += 1,
            VcpuExit::Hlt => self.hlt += 1,
            _ => self.other += 1,
        }
    }
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} port I/O, {} MMIO, {} HLT, {} other",
            self.io, self.mmio, self.hlt, self.other
        )
    }
}

/// For KVM_EXIT_INTERNAL_ERROR: the suberror, named, and KVM's extra data words.
fn internal_error_detail(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return String::new();
    }
    // SAFETY: exit_reason says the `internal` member of the exit union is the valid one.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let name = match internal.suberror {
        1 => "instruction emulation failed",
        2 => "exception while delivering an exception",
        3 => "event delivery failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    format!(
        ", suberror {} ({name}), data [{}]",
        internal.suberror,
        data.join(" ")
    )
}

fn handle_exit(exit: VcpuExit, ctx: &VcpuContext) -> std::result::Result<(), String> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => return Err("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::FailEntry(reason, cpu) => {
            return Err(format!(
                "VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, host cpu {cpu})"
            ))
        }
        VcpuExit::InternalError => {
            return Err(
                "KVM internal error (KVM_EXIT_INTERNAL_ERROR; an instruction KVM cannot emulate?)"
                    .into(),
            )
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => ctx.exit.set(VmExit::PowerOff(0)),
            KVM_SYSTEM_EVENT_RESET => ctx.exit.set(VmExit::Reset),
            other => return Err(format!("system event {other}")),
        },
        other => return Err(format!("unexpected exit {other:?}")),
    }
    Ok(())
}
