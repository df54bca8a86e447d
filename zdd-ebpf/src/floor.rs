//! The benchmark floor: swaps the Ethernet addresses and returns XDP_TX. Built by the same
//! toolchain as the real program, so `cargo xtask bench datapath` can report ratios to it.
//! Not loaded by the agent.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::parse::ptr_at;

#[xdp]
pub fn zdd_floor(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at(&ctx, 0, 12) else {
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
