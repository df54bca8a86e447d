//! The benchmark's own object (`zdd-bench.bpf.o`), built beside the production one and never
//! loaded by the agent: `cargo xtask bench datapath` loads it next to the data path and
//! measures against it.
//!
//! - `zdd_floor`: swaps the Ethernet addresses and returns XDP_TX, the floor every ratio is
//!   taken against, built by the same toolchain as the real program.
//! - `zdd_insert_probe`: the floor plus one flow-table insert of a random flow: the kernel's
//!   own cost of recording a flow. Its `ZDD_FLOWS` is declared as the data path's and pinned
//!   by name, so loaded with the data path's pin directory it inserts into the same table.
#![no_std]
#![no_main]
// Map keys and values are passed by reference, as in the data path (the helpers take
// pointers; a by-value argument would only add a stack copy).
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::LruHashMap,
    programs::XdpContext,
};
use zdd_common::{DEFAULT_FLOW_TABLE_SIZE, FAMILY_V4, FlowEntry, FlowKey, PROTO_TCP};

/// The data path's flow table (same name, type, key and value: adopted from its pin).
#[map]
static ZDD_FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

#[xdp]
pub fn zdd_floor(ctx: XdpContext) -> u32 {
    swap_macs(&ctx)
}

#[xdp]
pub fn zdd_insert_probe(ctx: XdpContext) -> u32 {
    let verdict = swap_macs(&ctx);
    // SAFETY: plain helper call without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let key = FlowKey {
        src: [r, 0, 0, 0],
        dst: [0x0100_000a, 0, 0, 0],
        sport: 1024,
        dport: 80,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let _ = ZDD_FLOWS.insert(&key, &FlowEntry::default(), 0);
    verdict
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> u32 {
    let eth = ctx.data();
    if eth + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = eth as *mut u8;
    // SAFETY: the 12 bytes of both MACs were checked against data_end above; `tmp` is ours.
    unsafe {
        let mut tmp = [0u8; 6];
        core::ptr::copy_nonoverlapping(eth, tmp.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(eth.add(6), eth, 6);
        core::ptr::copy_nonoverlapping(tmp.as_ptr(), eth.add(6), 6);
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
