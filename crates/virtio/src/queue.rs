//! The device side of a split virtqueue's service loop, shared by every device: take all
//! available chains, then decide (with EVENT_IDX when negotiated) whether the driver wants an
//! interrupt.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _};

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
    let mut empty_look = false;
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
            // The driver added chains while we were re-enabling notifications (it was told
            // not to kick for them, so they must be served now).
            Ok(true) if again_after_enable(popped, &mut empty_look) => continue,
            Ok(_) => return (used, false),
            Err(e) => {
                tracing::warn!("virtqueue: cannot enable notifications: {e}");
                return (used, false);
            }
        }
    }
}

/// Whether a serve pass looks at the ring again after `enable_notification` reported chains.
/// Yes after a look that popped chains. After an empty look once more: the driver may have
/// published its chain between that look and the re-enable, while kicks were off, and nothing
/// else would wake the device for it. A second empty look in a row means the ring itself is
/// bad (e.g. an avail index beyond the queue size): stop rather than spin; the next kick tries
/// again.
pub(crate) fn again_after_enable(popped: bool, empty_look: &mut bool) -> bool {
    if popped {
        *empty_look = false;
        return true;
    }
    !std::mem::replace(empty_look, true)
}

/// The ring operations of a batched serve pass ([`serve_in_batches`]); a trait so that races
/// with the driver can be replayed against a scripted ring in tests.
pub(crate) trait BatchRing {
    type Chain;
    /// Asks the driver not to kick ([`suppress_kicks`]).
    fn suppress(&mut self) -> Result<(), virtio_queue::Error>;
    /// The next available chain, if any.
    fn pop(&mut self) -> Option<Self::Chain>;
    /// Asks for kicks again; true when chains are (still) available.
    fn enable(&mut self) -> Result<bool, virtio_queue::Error>;
}

/// A real split virtqueue as a [`BatchRing`].
pub(crate) struct QueueRing<'q, 'm> {
    pub queue: &'q mut Queue,
    pub mem: &'m GuestMemory,
}

impl<'m> BatchRing for QueueRing<'_, 'm> {
    type Chain = DescriptorChain<&'m GuestMemory>;
    fn suppress(&mut self) -> Result<(), virtio_queue::Error> {
        suppress_kicks(self.queue, self.mem)
    }
    fn pop(&mut self) -> Option<Self::Chain> {
        self.queue.pop_descriptor_chain(self.mem)
    }
    fn enable(&mut self) -> Result<bool, virtio_queue::Error> {
        self.queue.enable_notification(self.mem)
    }
}

/// Serves the ring in batches of at most `max` chains with kicks suppressed: `run` gets each
/// batch (and the ring, to return the chains to the used ring) and says how many it used.
/// When a look finds the ring empty after chains were served, `idle(ring, used)` may wait for
/// more with kicks still off (a poll) and say whether chains came: then the pass goes on
/// without the driver ever having been asked to kick; otherwise kicks are re-enabled as below.
/// `stop` is asked before each look; when it says yes the pass ends with kicks still off and
/// the second value true (the caller decides what comes next and must serve again before it
/// waits for a kick). Otherwise kicks are re-enabled at the end and the ring looked at once
/// more, so no chain is left that the driver was told not to kick for.
pub(crate) fn serve_in_batches<R: BatchRing>(
    ring: &mut R,
    max: usize,
    mut stop: impl FnMut() -> bool,
    mut run: impl FnMut(&mut R, &mut Vec<R::Chain>) -> usize,
    mut idle: impl FnMut(&mut R, usize) -> bool,
) -> (usize, bool) {
    let mut used = 0;
    let mut batch = Vec::with_capacity(max);
    let mut empty_look = false;
    loop {
        if let Err(e) = ring.suppress() {
            tracing::warn!("virtqueue: cannot disable notifications: {e}");
            return (used, false);
        }
        let mut popped = false;
        // After a poll that saw chains, an empty look means a bad ring, not a quiet driver:
        // no second poll then (it would spin on the same avail index).
        let mut after_poll = false;
        loop {
            if stop() {
                return (used, true);
            }
            batch.clear();
            while batch.len() < max {
                let Some(chain) = ring.pop() else { break };
                batch.push(chain);
            }
            if batch.is_empty() {
                if popped && !after_poll && idle(ring, used) {
                    after_poll = true;
                    continue;
                }
                break;
            }
            popped = true;
            after_poll = false;
            used += run(ring, &mut batch);
        }
        match ring.enable() {
            Ok(true) if again_after_enable(popped, &mut empty_look) => continue,
            Ok(_) => return (used, false),
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

/// Whether the driver has published chains the device has not taken yet.
pub(crate) fn avail_waiting(queue: &Queue, mem: &GuestMemory) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Looks at the avail ring between two calls of `keep_polling` in [`spin_for_avail`]. The
/// question is a clock read (~230 cycles here, as much as the rest of a look): asking it every
/// look delayed the sight of a QD 1 driver's next request by that much each time.
const LOOKS_PER_CHECK: u32 = 32;

/// Spins until the driver publishes a chain the device has not taken (true) or `keep_polling`,
/// asked every [`LOOKS_PER_CHECK`] looks, says stop (false). Kicks are whatever the caller
/// left them.
pub(crate) fn spin_for_avail(
    queue: &Queue,
    mem: &GuestMemory,
    mut keep_polling: impl FnMut() -> bool,
) -> bool {
    let next = queue.next_avail();
    // Resolved once, so a look is one load instead of a walk over guest memory's regions.
    let idx = GuestAddress(queue.avail_ring())
        .checked_add(2)
        .and_then(|at| mem.get_slice(at, 2).ok());
    let look = || match idx.as_ref().map(|s| s.load::<u16>(0, Ordering::Acquire)) {
        Some(Ok(i)) => u16::from_le(i) != next,
        _ => avail_waiting(queue, mem),
    };
    loop {
        for _ in 0..LOOKS_PER_CHECK {
            if look() {
                return true;
            }
            std::hint::spin_loop();
        }
        if !keep_polling() {
            return false;
        }
    }
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
    keep_polling: impl FnMut() -> bool,
) -> bool {
    if let Err(e) = suppress_kicks(queue, mem) {
        tracing::warn!("virtqueue: cannot disable notifications: {e}");
        return false;
    }
    if spin_for_avail(queue, mem, keep_polling) {
        return true;
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

    /// A ring driven by a scripted driver: `publish_at_look[n]` chains are published right
    /// after the device's n-th look at the ring (pop) came back empty. The driver kicks for a
    /// chain only when kicks are on, as a driver honouring avail_event does.
    struct ScriptedRing {
        published: u32,
        next: u32,
        kicks_on: bool,
        kicked_for: Vec<u32>,
        empty_looks: usize,
        publish_at_look: Vec<u32>,
        /// A bad ring: always claims chains, never yields one.
        broken: bool,
        enables: usize,
    }

    impl ScriptedRing {
        fn new(initial: u32, publish_at_look: Vec<u32>) -> Self {
            ScriptedRing {
                published: initial,
                next: 0,
                kicks_on: true,
                kicked_for: Vec::new(),
                empty_looks: 0,
                publish_at_look,
                broken: false,
                enables: 0,
            }
        }
    }

    impl BatchRing for ScriptedRing {
        type Chain = u32;
        fn suppress(&mut self) -> Result<(), virtio_queue::Error> {
            self.kicks_on = false;
            Ok(())
        }
        fn pop(&mut self) -> Option<u32> {
            if self.next < self.published && !self.broken {
                self.next += 1;
                return Some(self.next - 1);
            }
            let n = self
                .publish_at_look
                .get(self.empty_looks)
                .copied()
                .unwrap_or(0);
            self.empty_looks += 1;
            for _ in 0..n {
                if self.kicks_on {
                    self.kicked_for.push(self.published);
                }
                self.published += 1;
            }
            None
        }
        fn enable(&mut self) -> Result<bool, virtio_queue::Error> {
            self.kicks_on = true;
            self.enables += 1;
            assert!(self.enables < 100, "a serve pass spins on the ring");
            Ok(self.broken || self.next < self.published)
        }
    }

    /// Serves `ring` once; returns the chains served.
    fn serve_scripted(ring: &mut ScriptedRing) -> Vec<u32> {
        let mut served = Vec::new();
        let (used, held) = serve_in_batches(
            ring,
            4,
            || false,
            |_, batch| {
                let n = batch.len();
                served.append(batch);
                n
            },
            |_, _| false,
        );
        assert!(!held);
        let _ = used;
        served
    }

    #[test]
    fn a_chain_published_between_an_empty_look_and_the_re_enable_is_served() {
        // The lost wakeup behind the probe's `ERR timeout`: a pass woken by a stale kick finds
        // the ring empty, the driver publishes while kicks are still off (so it does not
        // kick), and the pass must not end without looking again.
        for (initial, script) in [(0, vec![1]), (3, vec![1]), (5, vec![0, 2]), (0, vec![1, 1])] {
            let mut ring = ScriptedRing::new(initial, script.clone());
            let served = serve_scripted(&mut ring);
            for chain in 0..ring.published {
                assert!(
                    served.contains(&chain) || ring.kicked_for.contains(&chain),
                    "initial {initial}, script {script:?}: chain {chain} neither served nor kicked for"
                );
            }
            assert!(ring.kicks_on, "a finished pass leaves kicks on");
        }
    }

    #[test]
    fn chains_published_while_the_pass_polls_are_served_without_a_kick() {
        // A QD 1 driver: one chain, then each next one while the device polls after it.
        let mut ring = ScriptedRing::new(1, Vec::new());
        let mut served = Vec::new();
        let mut polls = 0;
        let (used, held) = serve_in_batches(
            &mut ring,
            4,
            || false,
            |_, batch| {
                let n = batch.len();
                served.append(batch);
                n
            },
            |ring, _| {
                polls += 1;
                if polls > 5 {
                    return false;
                }
                assert!(!ring.kicks_on, "kicks stay off while the pass polls");
                ring.published += 1;
                true
            },
        );
        assert_eq!((used, held), (6, false));
        assert_eq!(served, (0..6).collect::<Vec<_>>());
        assert!(ring.kicked_for.is_empty(), "{:?}", ring.kicked_for);
        assert!(ring.kicks_on, "a finished pass leaves kicks on");
    }

    #[test]
    fn a_poll_that_claims_chains_on_a_bad_ring_does_not_spin() {
        let mut ring = ScriptedRing::new(1, Vec::new());
        let mut polls = 0;
        let (used, _) = serve_in_batches(
            &mut ring,
            4,
            || false,
            |_, batch| {
                let n = batch.len();
                batch.clear();
                n
            },
            |ring, _| {
                polls += 1;
                assert!(
                    polls < 100,
                    "the pass spins on a poll that finds nothing to pop"
                );
                ring.broken = true;
                true
            },
        );
        assert_eq!(used, 1);
        assert!(ring.enables <= 3, "{} re-enables", ring.enables);
    }

    #[test]
    fn a_bad_ring_ends_the_pass_instead_of_spinning() {
        let mut ring = ScriptedRing::new(0, Vec::new());
        ring.broken = true;
        assert!(serve_scripted(&mut ring).is_empty());
        assert!(ring.enables <= 2, "{} re-enables", ring.enables);
    }

    #[test]
    fn a_stop_request_ends_the_pass_with_kicks_off() {
        let mut ring = ScriptedRing::new(10, Vec::new());
        let mut looks = 0;
        let (used, held) = serve_in_batches(
            &mut ring,
            4,
            || {
                looks += 1;
                looks > 2
            },
            |_, batch| {
                let n = batch.len();
                batch.clear();
                n
            },
            |_, _| false,
        );
        assert_eq!((used, held), (8, true));
        assert!(
            !ring.kicks_on,
            "the caller must serve again before waiting for a kick"
        );
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
    fn spinning_sees_a_published_chain_and_asks_whether_to_go_on_only_between_rounds() {
        let (mem, q) = setup(true);
        let mut asked = 0;
        assert!(!spin_for_avail(&q, &mem, || {
            asked += 1;
            asked < 3
        }));
        assert_eq!(asked, 3, "an empty ring spins until told to stop");
        publish(&mem, 0);
        assert!(spin_for_avail(&q, &mem, || panic!(
            "asked with a chain waiting"
        )));
        let mut q = q;
        q.set_next_avail(1);
        let mut asked = 0;
        assert!(spin_for_avail(&q, &mem, || {
            asked += 1;
            publish(&mem, 1);
            true
        }));
        assert_eq!(asked, 1, "the chain is seen in the round after it came");
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
