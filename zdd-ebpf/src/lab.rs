//! The lab's own object (`zdd-lab.bpf.o`), for tests only, never loaded by the agent.
//!
//! - `zdd_lab_pass`: XDP_PASS. A veth flushes the frames an XDP program sends back with
//!   XDP_TX to its peer only when the peer has an XDP program of its own (GRO alone lets them
//!   wait in the peer's ring until something else wakes it); a real NIC has no such
//!   condition. The lab attaches this one to a client's veth end when a test needs zdd's
//!   XDP_TX answers (its ICMP errors) to arrive at once.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn zdd_lab_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
