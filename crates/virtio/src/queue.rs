//! The device side of a split virtqueue's service loop, shared by every device: take all
//! available chains, then decide (with EVENT_IDX when negotiated) whether the driver wants an
//! interrupt.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::{GuestMemory, VirtioInterrupt};

/// What a gated handler did with a chain.
pub(crate) enum Served {
    /// Executed; this many bytes were written into the chain.
    Used(u32),
    /// Not now (a rate limit): the chain goes back to the ring untouched, to be popped again.
    Defer,
}

/// Serves every chain the driver made available, including ones that arrive while notifications
/// are being re-enabled. `handle` returns the number of bytes it wrote into the chain. Returns how
/// many chains went to the used ring.
pub(crate) fn serve_queue<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    mut handle: impl FnMut(DescriptorChain<&'m GuestMemory>) -> u32,
) -> usize {
    serve_queue_gated(queue, mem, |chain| Served::Used(handle(chain))).0
}

/// [`serve_queue`] whose handler may defer a chain: then the chain is put back, serving stops
/// with notifications still disabled (the device comes back on its own timer, so the driver
/// need not kick) and the second value is true.
pub(crate) fn serve_queue_gated<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    mut handle: impl FnMut(DescriptorChain<&'m GuestMemory>) -> Served,
) -> (usize, bool) {
    let mut used = 0;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::warn!("virtqueue: cannot disable notifications: {e}");
            return (used, false);
        }
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            let len = match handle(chain) {
                Served::Used(len) => len,
                Served::Defer => {
                    queue.go_to_previous_position();
                    return (used, true);
                }
            };
            match queue.add_used(mem, head, len) {
                Ok(()) => used += 1,
                // A head index past the queue cannot be returned; skip it, serve the rest.
                Err(e) => tracing::warn!("virtqueue: cannot return chain {head}: {e}"),
            }
        }
        match queue.enable_notification(mem) {
            // The driver added chains while we were re-enabling notifications. When the last pass
            // popped nothing, the ring itself is bad (e.g. an avail index beyond the queue
            // size): stop rather than spin; the next kick tries again.
            Ok(true) if popped => continue,
            Ok(true) => return (used, false),
            Ok(false) => return (used, false),
            Err(e) => {
                tracing::warn!("virtqueue: cannot enable notifications: {e}");
                return (used, false);
            }
        }
    }
}

/// Interrupts the driver for queue `index` if chains were used and the driver asked for it.
pub(crate) fn notify_if_needed(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    used: usize,
) {
    if used == 0 {
        return;
    }
    // On a failure to read used_event or the flags, interrupting is the safe choice.
    if queue.needs_notification(mem).unwrap_or(true) && !driver_declined(queue, mem) {
        if let Err(e) = interrupt.notify_queue(index) {
            tracing::warn!("virtqueue {index}: cannot interrupt the driver: {e}");
        }
    }
}

/// Without EVENT_IDX, the driver may set VRING_AVAIL_F_NO_INTERRUPT to say it polls
/// (virtio-queue leaves honouring it to the device).
fn driver_declined(queue: &Queue, mem: &GuestMemory) -> bool {
    if queue.event_idx_enabled() {
        return false;
    }
    let flags: Result<u16, _> = mem.load(GuestAddress(queue.avail_ring()), Ordering::Acquire);
    flags.is_ok_and(|f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}
