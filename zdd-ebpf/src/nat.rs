//! Step 5: rewrite. nat changes one address and one port (destination towards the backend,
//! source on the way back) and patches the checksums incrementally; the TTL is a router's.

use aya_ebpf::programs::XdpContext;
use zdd_common::{Addr, FAMILY_V6, PROTO_TCP};

use crate::{
    csum,
    parse::{Packet, load16, ptr_at},
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy)]
pub enum End {
    Src,
    Dst,
}

#[inline(always)]
fn store16(p: *mut u8, v: u16) {
    // SAFETY: callers hold a bounds-checked pointer with room for 2 bytes.
    unsafe { (p as *mut u16).write_unaligned(v) }
}

#[inline(always)]
fn store32(p: *mut u8, v: u32) {
    // SAFETY: as above, 4 bytes.
    unsafe { (p as *mut u32).write_unaligned(v) }
}

/// Replaces the address and port of `end` with `addr`:`port` (wire order). None if the frame
/// is shorter than its headers said (it was parsed, so this does not happen in practice).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, end: End, addr: &Addr, port: u16) -> Option<()> {
    let v6 = pkt.family == FAMILY_V6;
    let (addr_off, port_off) = match (end, v6) {
        (End::Src, false) => (12, 0),
        (End::Dst, false) => (16, 2),
        (End::Src, true) => (8, 0),
        (End::Dst, true) => (24, 2),
    };
    let old = if matches!(end, End::Src) {
        &pkt.src
    } else {
        &pkt.dst
    };
    let old_port = if matches!(end, End::Src) {
        pkt.sport
    } else {
        pkt.dport
    };
    let addr_diff = csum::diff_addr(old, addr, v6);

    // L4 checksum covers the pseudo-header (addresses) and the port.
    let (csum_off, tcp) = if pkt.proto == PROTO_TCP {
        (16, true)
    } else {
        (6, false)
    };
    let l4 = ptr_at(ctx, pkt.l4, csum_off + 2)?;
    let cp = unsafe { l4.add(csum_off) };
    let old_csum = load16(cp);
    // IPv4 UDP may carry no checksum (0): leave it so.
    if tcp || v6 || old_csum != 0 {
        let mut c = csum::apply(old_csum, addr_diff + csum::diff16(old_port, port));
        if !tcp && c == 0 {
            c = 0xffff;
        }
        store16(cp, c);
    }
    store16(unsafe { l4.add(port_off) }, port);

    if v6 {
        let ip = ptr_at(ctx, pkt.l3, 40)?;
        let a = unsafe { ip.add(addr_off) };
        store32(a, addr[0]);
        store32(unsafe { a.add(4) }, addr[1]);
        store32(unsafe { a.add(8) }, addr[2]);
        store32(unsafe { a.add(12) }, addr[3]);
    } else {
        let ip = ptr_at(ctx, pkt.l3, 20)?;
        let hc = unsafe { ip.add(10) };
        store16(hc, csum::apply(load16(hc), addr_diff));
        store32(unsafe { ip.add(addr_off) }, addr[0]);
    }
    Some(())
}

/// The TTL / hop limit, or None if the header is gone.
#[inline(always)]
pub fn ttl(ctx: &XdpContext, pkt: &Packet) -> Option<u8> {
    let off = if pkt.family == FAMILY_V6 { 7 } else { 8 };
    let p = ptr_at(ctx, pkt.l3, off + 1)?;
    // SAFETY: bounds checked above.
    Some(unsafe { *p.add(off) })
}

/// Decrements the TTL / hop limit, as any router on the path does.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) {
    if pkt.family == FAMILY_V6 {
        if let Some(p) = ptr_at(ctx, pkt.l3, 8) {
            unsafe { *p.add(7) = (*p.add(7)).wrapping_sub(1) };
        }
    } else if let Some(p) = ptr_at(ctx, pkt.l3, 20) {
        // TTL shares a 16-bit word with the protocol; patch the header checksum by it.
        let w = unsafe { p.add(8) };
        let old = load16(w);
        unsafe { *w = (*w).wrapping_sub(1) };
        let hc = unsafe { p.add(10) };
        store16(hc, csum::apply(load16(hc), csum::diff16(old, load16(w))));
    }
}
