//! A memcpy that survives SIGBUS, for copies through a shared file mapping (`mapped.rs`).
//!
//! Touching a page of a `MAP_SHARED` file mapping the kernel cannot back (past the end of the
//! file, a hole with no space to allocate, a page whose read fails) raises SIGBUS. Instead of
//! asking the kernel to fault every range in ahead (`MADV_POPULATE_*`, a system call per
//! request), the copy is one `rep movsb` at a known address, and a SIGBUS handler that finds
//! the interrupted instruction pointer on it moves it to a fixup that returns failure, the way
//! the kernel's exception tables recover from faults in `copy_from_user`. Any other SIGBUS is
//! passed to the handler that was installed before ours (Rust's stack-overflow handler, or the
//! default action, which kills the process as it always did).
//!
//! Only SIGBUS is caught: the copies never write a `PROT_READ` mapping (writes to a read-only
//! image are refused before any copy) and never touch an address outside the mapping (ranges
//! are checked under its lock), so a SIGSEGV in one is a bug that should kill the process.

use std::cell::UnsafeCell;
use std::sync::OnceLock;

// `rep movsb` (ERMS/FSRM make it the fast copy for these sizes) is the only instruction that
// touches the mapping; a fault restarts nothing and leaves RIP on it, with RSI/RDI/RCX showing
// the progress made. DF is clear on entry (System V ABI). Returns 0 when every byte was copied,
// 1 when the handler redirected a faulting copy to the fixup (some bytes may have been copied).
core::arch::global_asm!(
    ".pushsection .text.vireo_guarded_copy,\"ax\",@progbits",
    ".p2align 4",
    ".globl vireo_guarded_copy",
    ".hidden vireo_guarded_copy",
    ".type vireo_guarded_copy,@function",
    "vireo_guarded_copy:",
    "    mov rcx, rdx",
    ".globl vireo_guarded_copy_may_fault",
    ".hidden vireo_guarded_copy_may_fault",
    "vireo_guarded_copy_may_fault:",
    "    rep movsb",
    ".globl vireo_guarded_copy_may_fault_end",
    ".hidden vireo_guarded_copy_may_fault_end",
    "vireo_guarded_copy_may_fault_end:",
    "    xor eax, eax",
    "    ret",
    ".globl vireo_guarded_copy_fixup",
    ".hidden vireo_guarded_copy_fixup",
    "vireo_guarded_copy_fixup:",
    "    mov eax, 1",
    "    ret",
    ".size vireo_guarded_copy, . - vireo_guarded_copy",
    ".popsection",
);

extern "C" {
    fn vireo_guarded_copy(dst: *mut u8, src: *const u8, len: usize) -> u64;
    // Labels, not data: only their addresses are used.
    static vireo_guarded_copy_may_fault: u8;
    static vireo_guarded_copy_may_fault_end: u8;
    static vireo_guarded_copy_fixup: u8;
}

/// The action that was installed for SIGBUS before ours, read by the handler. Written once,
/// before our handler is installed, and never again, so the handler's reads race with nothing.
struct Previous(UnsafeCell<libc::sigaction>);
// SAFETY: written only inside `install`'s `OnceLock` initialiser before the handler that reads
// it exists; read-only afterwards.
unsafe impl Sync for Previous {}

static PREVIOUS: Previous = Previous(UnsafeCell::new(
    // SAFETY: sigaction is plain data; all zeroes is SIG_DFL with no flags.
    unsafe { std::mem::zeroed() },
));

/// Installs the SIGBUS handler once per process; false when that failed, and then
/// [`copy`] must not be used (a fault would kill the process).
pub(crate) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| match install_handler() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGBUS handler; disk I/O uses preadv/pwritev");
            false
        }
    })
}

fn install_handler() -> std::io::Result<()> {
    // SAFETY: sigaction with a valid out pointer; PREVIOUS is not read yet (no handler of
    // ours is installed before the second call below).
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), PREVIOUS.0.get()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zeroed sigaction is valid; filled in below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigbus as *const () as usize;
    // SA_ONSTACK: a thread that faults with its stack nearly used up still gets to ours, as
    // Rust's own handler expects for stack overflows.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: a valid sigset pointer.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: a valid action whose handler only does async-signal-safe things.
    if unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies `len` bytes from `src` to `dst`; false when a page could not be faulted in (SIGBUS),
/// in which case any prefix of the range may have been copied.
///
/// # Safety
/// [`install`] returned true; `src..src+len` and `dst..dst+len` lie in mappings that stay
/// mapped for the whole copy (readable and writable respectively) and do not overlap. A page
/// of them may be a file page the kernel fails to back: that is what this copy survives.
pub(crate) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> bool {
    // SAFETY: the caller's contract; the routine touches nothing but the two ranges.
    unsafe { vireo_guarded_copy(dst, src, len) == 0 }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler; its saved registers
    // are what the thread resumes with when the handler returns.
    let rip = unsafe { &mut (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] };
    // Only the labels' addresses are taken, never their bytes.
    let (start, end, fixup) = (
        std::ptr::addr_of!(vireo_guarded_copy_may_fault) as i64,
        std::ptr::addr_of!(vireo_guarded_copy_may_fault_end) as i64,
        std::ptr::addr_of!(vireo_guarded_copy_fixup) as i64,
    );
    if (start..end).contains(rip) {
        *rip = fixup;
        return;
    }
    // SAFETY: PREVIOUS was written before this handler was installed and is read-only now.
    let prev = unsafe { &*PREVIOUS.0.get() };
    match prev.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => {
            // Back to the default action: returning re-runs the faulting instruction, whose
            // SIGBUS then kills the process as if we had never been installed. (An ignored
            // SIGBUS from a fault cannot be ignored; the kernel kills the process anyway.)
            // SAFETY: zeroed sigaction is SIG_DFL; sigaction is async-signal-safe.
            unsafe {
                let dfl: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        handler if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: an SA_SIGINFO handler has this signature; it gets what we were given.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(sig, info, ctx);
        }
        handler => {
            // SAFETY: a plain handler takes the signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            f(sig);
        }
    }
}

#[cfg(test)]
mod tests;
