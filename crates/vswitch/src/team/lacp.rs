//! The per-member LACP machines of IEEE 802.1AX, reduced to what a single aggregator needs and
//! driven by an explicit clock (`now` in ns) so they are tested without sockets:
//! receive (current → expired → defaulted on timeouts), periodic transmission (fast/slow by the
//! partner's timeout bit), selection (the team attaches members whose partner is the
//! aggregator's partner system and key) and mux with independent control (collecting once the
//! partner is in sync, distributing once the partner collects).

use super::lacpdu::{state, LacpInfo, Lacpdu};

const SEC: u64 = 1_000_000_000;
pub const FAST_PERIOD_NS: u64 = SEC;
pub const SLOW_PERIOD_NS: u64 = 30 * SEC;

/// What the receive machine knows about the partner.
pub use vireo_netconfig::LacpRxState as RxState;

#[derive(Debug)]
pub struct LacpMember {
    pub actor: LacpInfo,
    pub partner: LacpInfo,
    pub rx: RxState,
    /// Deadline of the receive state (current_while_timer).
    current_until: u64,
    next_tx: u64,
    /// Something changed that the partner should hear at once (NTT).
    ntt: bool,
    /// The partner's last LACPDU agreed with our actor information.
    partner_agrees: bool,
    /// Chosen by selection (same partner system/key as the aggregator).
    pub selected: bool,
    pub pdus_rx: u64,
    pub pdus_tx: u64,
    pub partner_changes: u64,
    pub timeouts: u64,
}

impl LacpMember {
    pub fn new(actor: LacpInfo) -> Self {
        LacpMember {
            actor,
            partner: LacpInfo::default(),
            rx: RxState::Defaulted,
            current_until: 0,
            next_tx: 0,
            ntt: true,
            partner_agrees: false,
            selected: false,
            pdus_rx: 0,
            pdus_tx: 0,
            partner_changes: 0,
            timeouts: 0,
        }
    }

    fn short_timeout(&self) -> bool {
        self.actor.state & state::TIMEOUT != 0
    }

    /// Our timeout for the partner: 3 of the periods we asked for.
    fn timeout_ns(&self) -> u64 {
        3 * if self.short_timeout() {
            FAST_PERIOD_NS
        } else {
            SLOW_PERIOD_NS
        }
    }

    /// The receive machine on a LACPDU.
    pub fn on_pdu(&mut self, pdu: &Lacpdu, now: u64) {
        self.pdus_rx += 1;
        if self.rx != RxState::Defaulted && !pdu.actor.same_system(&self.partner) {
            // A partner that changes identity is a new partner: detach until re-selected.
            self.partner_changes += 1;
            self.selected = false;
        }
        if pdu.actor.port != self.partner.port || pdu.actor.state != self.partner.state {
            self.ntt = true;
        }
        self.partner = pdu.actor;
        let p = &pdu.partner;
        // The partner agrees when it echoes our identity and aggregation bit.
        let agrees = p.same_system(&self.actor)
            && p.port == self.actor.port
            && p.port_priority == self.actor.port_priority
            && (p.state & state::AGGREGATION) == (self.actor.state & state::AGGREGATION);
        if agrees != self.partner_agrees || (p.state & 0x3f) != (self.actor.state & 0x3f) {
            self.ntt = true;
        }
        self.partner_agrees = agrees;
        self.rx = RxState::Current;
        self.current_until = now + self.timeout_ns();
    }

    /// Timers; call often (every few ms). Returns true when the member lost its partner.
    pub fn tick(&mut self, now: u64) -> bool {
        if self.rx == RxState::Defaulted || now < self.current_until {
            return false;
        }
        self.timeouts += 1;
        self.ntt = true;
        match self.rx {
            RxState::Current => {
                // Expired: the partner is assumed to want fast LACPDUs, and out of sync.
                self.rx = RxState::Expired;
                self.partner.state = (self.partner.state | state::TIMEOUT) & !state::SYNC;
                self.current_until = now + 3 * FAST_PERIOD_NS;
                false
            }
            _ => {
                self.rx = RxState::Defaulted;
                self.partner = LacpInfo::default();
                self.partner_agrees = false;
                self.selected = false;
                true
            }
        }
    }

    /// Partner usable for aggregation (fresh or just expired, not defaulted).
    pub fn has_partner(&self) -> bool {
        self.rx != RxState::Defaulted && self.partner.state & state::AGGREGATION != 0
    }

    /// The mux machine: sets our sync/collecting/distributing bits from selection and the
    /// partner's state. Independent control: collect when the partner is in sync with us,
    /// distribute when it collects too.
    pub fn update_mux(&mut self) {
        let before = self.actor.state;
        let attached = self.selected && self.partner_agrees && self.rx == RxState::Current;
        let p = self.partner.state;
        let collecting = attached && p & state::SYNC != 0;
        let distributing = collecting && p & state::COLLECTING != 0;
        let mut s = self.actor.state
            & !(state::SYNC
                | state::COLLECTING
                | state::DISTRIBUTING
                | state::DEFAULTED
                | state::EXPIRED);
        if attached {
            s |= state::SYNC;
        }
        if collecting {
            s |= state::COLLECTING;
        }
        if distributing {
            s |= state::DISTRIBUTING;
        }
        match self.rx {
            RxState::Defaulted => s |= state::DEFAULTED,
            RxState::Expired => s |= state::EXPIRED,
            RxState::Current => {}
        }
        self.actor.state = s;
        if s != before {
            self.ntt = true;
        }
    }

    pub fn collecting(&self) -> bool {
        self.actor.state & state::COLLECTING != 0
    }

    pub fn distributing(&self) -> bool {
        self.actor.state & state::DISTRIBUTING != 0
    }

    /// Periodic/NTT transmission: the LACPDU to send now, if any. The period follows the
    /// partner's timeout bit (fast when it asks, or when there is no partner yet).
    pub fn poll_tx(&mut self, now: u64) -> Option<Lacpdu> {
        if !self.ntt && now < self.next_tx {
            return None;
        }
        let fast = self.rx == RxState::Defaulted || self.partner.state & state::TIMEOUT != 0;
        self.next_tx = now + if fast { FAST_PERIOD_NS } else { SLOW_PERIOD_NS };
        self.ntt = false;
        self.pdus_tx += 1;
        Some(Lacpdu {
            actor: self.actor,
            partner: self.partner,
            collector_max_delay: 0,
        })
    }
}

/// Selection over a team's members: the aggregator's partner is the partner of the first
/// member (in order) that has one; members whose partner is that same system and key are
/// selected, others (a cable to another switch, a partner that changed identity) are not.
pub fn select(members: &mut [&mut LacpMember]) {
    let agg = members.iter().find(|m| m.has_partner()).map(|m| m.partner);
    for m in members.iter_mut() {
        m.selected = match agg {
            Some(a) => m.has_partner() && m.partner.same_system(&a),
            None => false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(port: u16) -> LacpInfo {
        LacpInfo {
            system_priority: 32768,
            system: [2, 0, 0, 0, 0, 1],
            key: 1,
            port_priority: 255,
            port,
            state: state::ACTIVITY | state::TIMEOUT | state::AGGREGATION,
        }
    }

    /// A partner that echoes us and reports `pstate`.
    fn partner_pdu(m: &LacpMember, system: [u8; 6], pstate: u8) -> Lacpdu {
        Lacpdu {
            actor: LacpInfo {
                system_priority: 100,
                system,
                key: 9,
                port_priority: 1,
                port: 40 + m.actor.port,
                state: state::ACTIVITY | state::AGGREGATION | state::TIMEOUT | pstate,
            },
            partner: m.actor,
            collector_max_delay: 0,
        }
    }

    fn step(ms: &mut [LacpMember], now: u64) {
        for m in ms.iter_mut() {
            m.tick(now);
        }
        let mut refs: Vec<&mut LacpMember> = ms.iter_mut().collect();
        select(&mut refs);
        for m in ms.iter_mut() {
            m.update_mux();
        }
    }

    #[test]
    fn negotiates_collecting_distributing_then_times_out() {
        let mut ms = vec![LacpMember::new(actor(1)), LacpMember::new(actor(2))];
        let sys = [2, 0xaa, 0, 0, 0, 1];
        assert!(ms[0].poll_tx(0).is_some(), "first LACPDU at once");
        // Partner not yet in sync: we attach (sync) but do not collect.
        for m in ms.iter_mut() {
            let pdu = partner_pdu(m, sys, 0);
            m.on_pdu(&pdu, 0);
        }
        step(&mut ms, 0);
        assert!(ms
            .iter()
            .all(|m| m.actor.state & state::SYNC != 0 && !m.collecting()));
        for m in ms.iter_mut() {
            let pdu = partner_pdu(
                m,
                sys,
                state::SYNC | state::COLLECTING | state::DISTRIBUTING,
            );
            m.on_pdu(&pdu, 1);
        }
        step(&mut ms, 1);
        assert!(ms.iter().all(|m| m.collecting() && m.distributing()));
        // Member 1 keeps hearing LACPDUs, member 0 does not: expired after 3 s, defaulted after 6.
        let t = 3 * SEC + 10;
        let pdu = partner_pdu(
            &ms[1],
            sys,
            state::SYNC | state::COLLECTING | state::DISTRIBUTING,
        );
        ms[1].on_pdu(&pdu, t - 5);
        step(&mut ms, t);
        assert_eq!(ms[0].rx, RxState::Expired);
        assert!(!ms[0].distributing() && ms[1].distributing());
        let pdu = partner_pdu(
            &ms[1],
            sys,
            state::SYNC | state::COLLECTING | state::DISTRIBUTING,
        );
        ms[1].on_pdu(&pdu, 2 * t - 5);
        step(&mut ms, 2 * t);
        assert_eq!(ms[0].rx, RxState::Defaulted);
        assert!(ms[0].actor.state & state::DEFAULTED != 0);
        assert!(
            ms[1].distributing(),
            "the other member stays in the aggregate"
        );
    }

    #[test]
    fn partner_changing_system_is_counted_and_not_aggregated() {
        let mut ms = vec![LacpMember::new(actor(1)), LacpMember::new(actor(2))];
        let all = state::SYNC | state::COLLECTING | state::DISTRIBUTING;
        for m in ms.iter_mut() {
            let pdu = partner_pdu(m, [2, 0xaa, 0, 0, 0, 1], all);
            m.on_pdu(&pdu, 0);
        }
        step(&mut ms, 0);
        assert!(ms.iter().all(|m| m.distributing()));
        let pdu = partner_pdu(&ms[1], [2, 0xbb, 0, 0, 0, 1], all);
        ms[1].on_pdu(&pdu, 10);
        step(&mut ms, 10);
        assert_eq!(ms[1].partner_changes, 1);
        assert!(ms[0].distributing());
        assert!(
            !ms[1].selected && !ms[1].distributing(),
            "a second system is not aggregated"
        );
    }

    #[test]
    fn partner_not_echoing_us_keeps_member_out() {
        let mut ms = vec![LacpMember::new(actor(1))];
        let mut pdu = partner_pdu(
            &ms[0],
            [2, 0xaa, 0, 0, 0, 1],
            state::SYNC | state::COLLECTING,
        );
        pdu.partner.port = 99;
        ms[0].on_pdu(&pdu, 0);
        step(&mut ms, 0);
        assert!(!ms[0].collecting());
    }
}
