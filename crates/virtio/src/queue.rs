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
            if add_used_logged(queue, mem, head, len) {
                used += 1;
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

/// Puts chain `head` on the used ring; false (logged) when it cannot be returned, e.g. a head
/// index past the queue: the caller skips it and serves the rest.
pub(crate) fn add_used_logged(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("virtqueue: cannot return chain {head}: {e}");
            false
        }
    }
}

/// Asks the driver not to kick while the device is looking at the ring anyway (serving or
/// polling). Without EVENT_IDX that is VRING_USED_F_NO_NOTIFY. With EVENT_IDX virtio-queue's
/// `disable_notification` leaves avail_event where the last enable put it, so the driver's
/// next publish still crosses it and kicks: a polled request then costs an exit all the same.
/// Setting avail_event just behind `next_avail` instead is an index the driver cannot cross
/// before the device has consumed past it, so it does not kick until `enable_notification`
/// asks again (what QEMU does while its iothread polls).
pub(crate) fn suppress_kicks(
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<(), virtio_queue::Error> {
    if !queue.event_idx_enabled() {
        return queue.disable_notification(mem);
    }
    let at = queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    mem.store(
        queue.next_avail().wrapping_sub(1).to_le(),
        GuestAddress(at),
        Ordering::Release,
    )
    .map_err(virtio_queue::Error::GuestMemory)
}

/// Watches the avail ring with the driver's notifications off, so a driver that queues its next
/// request soon after the last completion need not exit to kick. `keep_polling` is asked between
/// looks and bounds the poll. Returns true when chains are waiting (the caller serves them; its
/// serve pass re-enables notifications). When it returns false notifications are enabled again
/// and the ring was looked at once more after that, so a chain published while polling ended is
/// never left waiting for a kick the driver was told not to send.
pub(crate) fn poll_avail(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut keep_polling: impl FnMut() -> bool,
) -> bool {
    if let Err(e) = suppress_kicks(queue, mem) {
        tracing::warn!("virtqueue: cannot disable notifications: {e}");
        return false;
    }
    loop {
        let waiting = queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail());
        if waiting {
            return true;
        }
        if !keep_polling() {
            break;
        }
        std::hint::spin_loop();
    }
    match queue.enable_notification(mem) {
        Ok(more) => more,
        Err(e) => {
            tracing::warn!("virtqueue: cannot enable notifications: {e}");
            // Serving once more is harmless and re-tries the re-enable.
            true
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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::Address;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup(event_idx: bool) -> (GuestMemory, Queue) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        q.set_event_idx(event_idx);
        (mem, q)
    }

    /// The driver's side of publishing one more chain (head 0): ring slot, then the index.
    fn publish(mem: &GuestMemory, idx: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(idx % SIZE);
        mem.store(0u16, GuestAddress(slot), Ordering::Relaxed)
            .unwrap();
        mem.store(
            (idx + 1).to_le(),
            GuestAddress(AVAIL + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    fn used_flags(mem: &GuestMemory) -> u16 {
        u16::from_le(mem.load(GuestAddress(USED), Ordering::Acquire).unwrap())
    }

    fn avail_event(mem: &GuestMemory) -> u16 {
        let at = GuestAddress(USED).unchecked_add(4 + 8 * u64::from(SIZE));
        u16::from_le(mem.load(at, Ordering::Acquire).unwrap())
    }

    #[test]
    fn a_chain_published_as_polling_ends_is_served_not_lost() {
        for event_idx in [false, true] {
            let (mem, mut q) = setup(event_idx);
            let mut looks = 0;
            // The chain lands after the last look at the ring, just before the re-enable.
            let found = poll_avail(&mut q, &mem, || {
                looks += 1;
                if looks == 3 {
                    publish(&mem, 0);
                    return false;
                }
                true
            });
            assert!(
                found,
                "event_idx={event_idx}: chain published at the end was missed"
            );
        }
    }

    #[test]
    fn polling_sees_a_chain_with_notifications_off_and_re_enables_them_when_idle() {
        let (mem, mut q) = setup(false);
        let mut looks = 0;
        let found = poll_avail(&mut q, &mem, || {
            looks += 1;
            // While polling the driver is told not to kick.
            assert_ne!(used_flags(&mem) & VRING_USED_F_NO_NOTIFY as u16, 0);
            if looks == 2 {
                publish(&mem, 0);
            }
            looks < 100
        });
        assert!(found);
        assert_eq!(looks, 2, "the chain is seen at the next look");

        // Nothing new: the poll gives up and the driver must kick again.
        q.set_next_avail(1);
        let mut looks = 0;
        assert!(!poll_avail(&mut q, &mem, || {
            looks += 1;
            looks < 5
        }));
        assert_eq!(looks, 5);
        assert_eq!(used_flags(&mem) & VRING_USED_F_NO_NOTIFY as u16, 0);
    }

    #[test]
    fn with_event_idx_polling_keeps_the_driver_from_kicking() {
        let (mem, mut q) = setup(true);
        publish(&mem, 0);
        q.set_next_avail(1);
        let mut looks = 0;
        let found = poll_avail(&mut q, &mem, || {
            looks += 1;
            // vring_need_event for the driver's next publish (old 1, new 2) must say no.
            let (event, new, old) = (avail_event(&mem), 2u16, 1u16);
            assert!(new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old));
            if looks == 2 {
                publish(&mem, 1);
            }
            looks < 10
        });
        assert!(found);
    }

    #[test]
    fn with_event_idx_an_idle_poll_asks_for_a_kick_at_the_next_chain() {
        let (mem, mut q) = setup(true);
        publish(&mem, 0);
        q.set_next_avail(1);
        assert!(!poll_avail(&mut q, &mem, || false));
        assert_eq!(avail_event(&mem), 1);
    }
}
