#!/usr/bin/python3
"""An LACP partner built on scapy's own LACPDU dissector/builder (scapy.contrib.lacp): a third
party's reading of the 802.1AX wire format, since this kernel has no bonding or team driver.

Runs in the far-end namespace on the given interfaces. Per interface it sends a LACPDU every
second (fast rate) with its actor info and the partner info last heard; it reports in sync,
collecting and distributing once the other side's LACPDU names us as its partner. Control by
files in --dir (checked every 50 ms):  silence-<if>  stop sending on <if> (partner timeout);
system2  switch to another system id (a partner changing identity);  garbage-<if>  send
malformed LACPDUs once;  stop  exit. Every LACPDU received is logged as one line to --log:
  <if> actor_system=<mac> actor_port=<n> actor_state=<int> partner_system=<mac>
The script ends by itself after --duration seconds.
"""
import argparse
import os
import select
import time

from scapy.contrib.lacp import LACP, SlowProtocol
from scapy.layers.l2 import Ether
from scapy.arch.linux import L2Socket

ap = argparse.ArgumentParser()
ap.add_argument("--ifaces", required=True)
ap.add_argument("--dir", required=True)
ap.add_argument("--log", required=True)
ap.add_argument("--duration", type=float, default=60)
args = ap.parse_args()

SYSTEMS = ["02:aa:00:00:00:01", "02:bb:00:00:00:02"]
ACT, TMO, AGG, SYN, COL, DIS = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ifaces = args.ifaces.split(",")
socks = {i: L2Socket(iface=i, filter="ether proto 0x8809") for i in ifaces}
heard = {i: None for i in ifaces}  # the other side's actor fields, as last received
next_tx = {i: 0.0 for i in ifaces}
log = open(args.log, "a", buffering=1)


def flag(name):
    return os.path.exists(os.path.join(args.dir, name))


def pdu(i, port):
    system = SYSTEMS[1] if flag("system2") else SYSTEMS[0]
    h = heard[i]
    state = ACT | TMO | AGG
    if h is not None:
        # The other side lists us as its partner: we are in sync and aggregate.
        state |= SYN | COL | DIS if h["partner_system"] == system else 0
    p = LACP(
        actor_system_priority=100, actor_system=system, actor_key=9,
        actor_port_priority=1, actor_port_number=port, actor_state=state,
    )
    if h is not None:
        p.partner_system_priority = h["actor_system_priority"]
        p.partner_system = h["actor_system"]
        p.partner_key = h["actor_key"]
        p.partner_port_priority = h["actor_port_priority"]
        p.partner_port_number = h["actor_port_number"]
        p.partner_state = h["actor_state"]
    return Ether(dst="01:80:c2:00:00:02", src=system) / SlowProtocol() / p


end = time.monotonic() + args.duration
while time.monotonic() < end and not flag("stop"):
    now = time.monotonic()
    for n, i in enumerate(ifaces):
        if flag("garbage-" + i):
            os.remove(os.path.join(args.dir, "garbage-" + i))
            good = bytes(pdu(i, n + 1))
            bad = [good[:40], good[:123], good[:16] + b"\x01\x13" + good[18:],
                   good[:14] + b"\x01\x00" + good[16:], good[:72] + b"\x07\x07" + good[74:]]
            for b in bad:
                socks[i].send(Ether(b))
            log.write(f"{i} garbage_sent={len(bad)}\n")
        if now >= next_tx[i] and not flag("silence-" + i):
            socks[i].send(pdu(i, n + 1))
            next_tx[i] = now + 1.0
    r, _, _ = select.select(list(socks.values()), [], [], 0.05)
    for s in r:
        i = next(k for k, v in socks.items() if v is s)
        pkt = s.recv()
        if pkt is None or LACP not in pkt:
            continue
        l = pkt[LACP]
        first = heard[i] is None
        heard[i] = {f: l.getfieldval(f) for f in (
            "actor_system_priority", "actor_system", "actor_key", "actor_port_priority",
            "actor_port_number", "actor_state", "partner_system")}
        log.write(f"{i} actor_system={l.actor_system} actor_port={l.actor_port_number} "
                  f"actor_state={l.actor_state} partner_system={l.partner_system}\n")
        if first:
            next_tx[i] = 0.0  # answer a new partner at once
