//! Minimum bandwidth as relative weights: a deficit-round-robin scheduler in front of a
//! congested egress port (the uplink). Each source port has a queue; when the uplink can send,
//! backlogged sources get bytes in proportion to their weights, and an idle source's share goes
//! to the others (weights are floors under congestion, not caps).

use std::collections::VecDeque;

use crate::PortId;

const QUANTUM_BYTES: u64 = 1514;

#[derive(Debug)]
struct Flow {
    source: PortId,
    weight: u32,
    deficit: u64,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
}

/// A weighted fair queue of frames waiting for one egress port.
#[derive(Debug)]
pub struct WeightedFairQueue {
    flows: Vec<Flow>,
    /// Frames each source may have waiting; more are tail-dropped.
    max_queue: usize,
    next: usize,
    pub dropped: u64,
}

impl WeightedFairQueue {
    pub fn new(max_queue_per_source: usize) -> Self {
        WeightedFairQueue {
            flows: Vec::new(),
            max_queue: max_queue_per_source,
            next: 0,
            dropped: 0,
        }
    }

    pub fn set_weight(&mut self, source: PortId, weight: u32) {
        let w = weight.max(1);
        match self.flows.iter_mut().find(|f| f.source == source) {
            Some(f) => f.weight = w,
            None => self.flows.push(Flow {
                source,
                weight: w,
                deficit: 0,
                queue: VecDeque::new(),
                queued_bytes: 0,
            }),
        }
    }

    /// Queues a frame from `source`; false (and counted) when that source's queue is full.
    pub fn enqueue(&mut self, source: PortId, frame: Vec<u8>) -> bool {
        if !self.flows.iter().any(|f| f.source == source) {
            self.set_weight(source, 1);
        }
        let max = self.max_queue;
        let f = self
            .flows
            .iter_mut()
            .find(|f| f.source == source)
            .expect("flow just ensured");
        if f.queue.len() >= max {
            self.dropped += 1;
            return false;
        }
        f.queued_bytes += frame.len();
        f.queue.push_back(frame);
        true
    }

    /// Puts back a frame `dequeue` returned but the port could not take, restoring its credit.
    pub fn push_front(&mut self, source: PortId, frame: Vec<u8>) {
        if let Some(f) = self.flows.iter_mut().find(|f| f.source == source) {
            f.deficit += frame.len() as u64;
            f.queued_bytes += frame.len();
            f.queue.push_front(frame);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.flows.iter().all(|f| f.queue.is_empty())
    }

    pub fn queued_bytes(&self, source: PortId) -> usize {
        self.flows
            .iter()
            .find(|f| f.source == source)
            .map_or(0, |f| f.queued_bytes)
    }

    /// Next frame to send, in weighted deficit-round-robin order.
    pub fn dequeue(&mut self) -> Option<(PortId, Vec<u8>)> {
        if self.is_empty() {
            return None;
        }
        let n = self.flows.len();
        // Bounded: every full round adds a quantum to each backlogged flow, and a quantum is at
        // least one maximal frame, so within two rounds some flow can send.
        for _ in 0..(2 * n + 2) * 8 {
            let i = self.next % n;
            let f = &mut self.flows[i];
            if let Some(len) = f.queue.front().map(|fr| fr.len() as u64) {
                if f.deficit >= len {
                    f.deficit -= len;
                    let fr = f.queue.pop_front().expect("front exists");
                    f.queued_bytes -= fr.len();
                    if f.queue.is_empty() {
                        f.deficit = 0;
                        self.next = i + 1;
                    }
                    return Some((f.source, fr));
                }
                f.deficit += QUANTUM_BYTES * f.weight as u64;
            } else {
                f.deficit = 0;
            }
            self.next = i + 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlogged_sources_share_by_weight_and_idle_share_is_reused() {
        let mut q = WeightedFairQueue::new(10_000);
        q.set_weight(PortId(1), 3);
        q.set_weight(PortId(2), 1);
        for _ in 0..4000 {
            q.enqueue(PortId(1), vec![0; 1000]);
            q.enqueue(PortId(2), vec![0; 1000]);
        }
        let mut sent = [0u64; 3];
        // The uplink "capacity" for this interval: 4000 frames.
        for _ in 0..4000 {
            let (src, f) = q.dequeue().unwrap();
            sent[src.0 as usize] += f.len() as u64;
        }
        let ratio = sent[1] as f64 / sent[2] as f64;
        assert!((2.8..3.2).contains(&ratio), "3:1 weights gave {ratio}");
        // Source 1 drains; source 2 then gets the whole link.
        let mut rest = [0u64; 3];
        while let Some((src, f)) = q.dequeue() {
            rest[src.0 as usize] += f.len() as u64;
        }
        assert_eq!(rest[1] + sent[1], 4_000_000);
        assert_eq!(rest[2] + sent[2], 4_000_000);
        assert!(q.is_empty());
    }
}
