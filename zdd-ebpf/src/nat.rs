//! The **rewrite** step (nat): one address and one port change (the destination towards the
//! backend, the source on the way back) and the checksums are patched incrementally; the TTL
//! is a router's.

use aya_ebpf::programs::XdpContext;
use zdd_common::{Addr, FAMILY_V6, PROTO_TCP};

use crate::{
    csum,
    parse::{
        DPORT, IPV4_HLEN, IPV6_HLEN, Ip, Packet, SPORT, TCP_CSUM, UDP_CSUM, load8, load16, ptr_at,
        store_addr, store8, store16, v4, v6,
    },
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum End {
    Src,
    Dst,
}

/// Replaces the address and port of `end` with `addr`:`port` (wire order). None if the frame
/// is shorter than its headers said (it was parsed, so this does not happen in practice).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, end: End, addr: &Addr, port: u16) -> Option<()> {
    let ip = &pkt.ip;
    let v6 = ip.family == FAMILY_V6;
    let (addr_off, port_off) = match (end, v6) {
        (End::Src, false) => (v4::SRC, SPORT),
        (End::Dst, false) => (v4::DST, DPORT),
        (End::Src, true) => (v6::SRC, SPORT),
        (End::Dst, true) => (v6::DST, DPORT),
    };
    let (old, old_port) = match end {
        End::Src => (&ip.src, pkt.sport),
        End::Dst => (&ip.dst, pkt.dport),
    };
    let addr_diff = csum::diff_addr(old, addr, v6);

    // L4 checksum covers the pseudo-header (addresses) and the port.
    let (csum_off, tcp) = if ip.proto == PROTO_TCP {
        (TCP_CSUM, true)
    } else {
        (UDP_CSUM, false)
    };
    let l4 = ptr_at(ctx, pkt.l4, csum_off + 2)?;
    // SAFETY: the checksum and both ports lie within the `csum_off + 2` bytes checked above.
    unsafe {
        let cp = l4.add(csum_off);
        let old_csum = load16(cp);
        // IPv4 UDP may carry no checksum (0): leave it so.
        if tcp || v6 || old_csum != 0 {
            let mut c = csum::apply(old_csum, addr_diff + csum::diff16(old_port, port));
            if !tcp && c == 0 {
                c = 0xffff;
            }
            store16(cp, c);
        }
        store16(l4.add(port_off), port);
    }

    if v6 {
        let p = ptr_at(ctx, ip.l3, IPV6_HLEN)?;
        // SAFETY: source and destination lie within the IPV6_HLEN bytes checked above.
        unsafe { store_addr(p.add(addr_off), addr, true) };
    } else {
        let p = ptr_at(ctx, ip.l3, IPV4_HLEN)?;
        // SAFETY: checksum, source and destination lie within the IPV4_HLEN bytes checked above.
        unsafe {
            let hc = p.add(v4::CSUM);
            store16(hc, csum::apply(load16(hc), addr_diff));
            store_addr(p.add(addr_off), addr, false);
        }
    }
    Some(())
}

/// The TTL / hop limit, or None if the header is gone.
#[inline(always)]
pub fn ttl(ctx: &XdpContext, ip: &Ip) -> Option<u8> {
    let off = if ip.family == FAMILY_V6 {
        v6::HOP_LIMIT
    } else {
        v4::TTL
    };
    let p = ptr_at(ctx, ip.l3, off + 1)?;
    // SAFETY: bounds checked above.
    Some(unsafe { load8(p.add(off)) })
}

/// Decrements the TTL / hop limit, as any router on the path does.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, ip: &Ip) {
    if ip.family == FAMILY_V6 {
        if let Some(p) = ptr_at(ctx, ip.l3, v6::HOP_LIMIT + 1) {
            // SAFETY: the hop limit is the last of the bytes checked above.
            unsafe {
                let h = p.add(v6::HOP_LIMIT);
                store8(h, load8(h).wrapping_sub(1));
            }
        }
    } else if let Some(p) = ptr_at(ctx, ip.l3, IPV4_HLEN) {
        // SAFETY: TTL, protocol and checksum lie within the IPV4_HLEN bytes checked above.
        unsafe {
            // TTL shares a 16-bit word with the protocol; patch the header checksum by it.
            let w = p.add(v4::TTL);
            let old = load16(w);
            store8(w, load8(w).wrapping_sub(1));
            let hc = p.add(v4::CSUM);
            store16(hc, csum::apply(load16(hc), csum::diff16(old, load16(w))));
        }
    }
}
