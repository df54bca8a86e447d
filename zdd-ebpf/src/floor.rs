//! The benchmark floor: swaps the Ethernet addresses and returns XDP_TX. Built by the same
//! toolchain as the real program, so `cargo xtask bench datapath` can report ratios to it.
//! Not loaded by the agent.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::parse::ptr_at;

#[xdp]
pub fn zdd_floor(ctx: XdpContext) -> u32 {
    swap_macs(&ctx)
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at(ctx, 0, 12) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: 12 bytes checked above.
    unsafe {
        let mut tmp = [0u8; 6];
        core::ptr::copy_nonoverlapping(eth, tmp.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(eth.add(6), eth, 6);
        core::ptr::copy_nonoverlapping(tmp.as_ptr(), eth.add(6), 6);
    }
    xdp_action::XDP_TX
}

/// The floor plus one flow-table insert of a random flow: the kernel's own cost of
/// recording a flow, reported beside the new-flow rows so they can be read against it.
/// Not loaded by the agent.
#[xdp]
pub fn zdd_insert_probe(ctx: XdpContext) -> u32 {
    let verdict = swap_macs(&ctx);
    // SAFETY: plain helper call.
    let r = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() };
    let key = zdd_common::FlowKey {
        src: [r, 0, 0, 0],
        dst: [0x0100_000a, 0, 0, 0],
        sport: 1024,
        dport: 80,
        proto: zdd_common::PROTO_TCP,
        family: zdd_common::FAMILY_V4,
        _pad: [0; 2],
    };
    let entry = zdd_common::FlowEntry::default();
    let _ = crate::maps::ZDD_FLOWS.insert(&key, &entry, 0);
    verdict
}
