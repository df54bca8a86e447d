//! The contract between the XDP program and the agent: map names, keys, values and
//! constants. Both sides import these types; nothing here is re-declared elsewhere.
//!
//! Every type is `#[repr(C)]` with explicit padding fields (always written as zero), because
//! BPF compares every byte of a hash key, padding included.
//!
//! Byte order: addresses and ports are kept exactly as they appear on the wire (network
//! order), stored in the host integer types unchanged, so the data path never swaps bytes.
#![no_std]

pub mod hash;

/// Version of the map layout below. Pinned maps live under a directory named after it, so
/// an agent never adopts maps whose layout it does not understand.
pub const LAYOUT_VERSION: u32 = 4;

/// Map names, as declared in the XDP program and pinned under bpffs.
pub mod map_names {
    pub const SERVICES: &str = "ZDD_SERVICES";
    pub const BACKENDS: &str = "ZDD_BACKENDS";
    pub const SELECT: &str = "ZDD_SELECT";
    pub const MAGLEV: &str = "ZDD_MAGLEV";
    pub const PINS: &str = "ZDD_PINS";
    pub const SERVICE_STATE: &str = "ZDD_SERVICE_STATE";
    pub const FLOWS: &str = "ZDD_FLOWS";
    pub const REPLIES: &str = "ZDD_REPLIES";
    pub const NEXTHOP: &str = "ZDD_NEXTHOP";
    pub const PORTS: &str = "ZDD_PORTS";
    pub const CONFIG: &str = "ZDD_CONFIG";
    pub const GLOBAL_STATS: &str = "ZDD_GLOBAL_STATS";
    pub const SERVICE_STATS: &str = "ZDD_SERVICE_STATS";
    pub const BACKEND_STATS: &str = "ZDD_BACKEND_STATS";
    pub const RECORDS: &str = "ZDD_RECORDS";
    pub const REPLY_HOPS: &str = "ZDD_REPLY_HOPS";
    pub const HOP_EPOCH: &str = "ZDD_HOP_EPOCH";
    pub const PASSIVE_STATS: &str = "ZDD_PASSIVE_STATS";
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "zdd_xdp";
/// Name of the benchmark floor program (MAC swap, XDP_TX), in the benchmark's own object
/// (`zdd-bench.bpf.o`), never in the production one.
pub const FLOOR_PROGRAM_NAME: &str = "zdd_floor";
/// Name of the benchmark calibration program (the floor plus one flow-table insert), in the
/// benchmark's own object.
pub const INSERT_PROBE_PROGRAM_NAME: &str = "zdd_insert_probe";

pub const MAX_SERVICES: u32 = 256;
/// Backend ids are `u16` in the Maglev tables.
pub const MAX_BACKENDS: u32 = 4096;
/// Groups per service (blue, green, canary, ...).
pub const MAX_GROUPS: usize = 8;
/// The split is resolved in buckets of 0.01%.
pub const SPLIT_BUCKETS: u32 = 10_000;
/// Maglev table size: prime, so every backend's permutation visits every slot.
pub const MAGLEV_SIZE: u32 = 65_537;
/// Maglev tables in the pool (one per group per selection slot in use).
pub const MAX_MAGLEV_TABLES: u32 = 128;
/// Entries of the `PINS` map: both selection slots of a service hold their pins while a
/// change is applied, so a config may use half of them.
pub const MAX_PINS: u32 = 4096;
/// Default flow-table capacity; the agent may change it at load time.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
/// Each service has two selection slots: the active one and the one being rewritten.
pub const SLOTS: u32 = 2;

/// Marks an unused entry in `Selection::tables`.
pub const NO_TABLE: u32 = u32::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IP address of either family: IPv4 lives in `w[0]`, the rest zero.
pub type Addr = [u32; 4];

/// Key of `SERVICES`: a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VipKey {
    pub addr: Addr,
    /// Network order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `Service::flags`
pub mod service_flags {
    /// Direct server return: rewrite only the MAC; the backend holds the VIP itself.
    pub const DSR: u32 = 1 << 0;
    /// Select by source address only, so every connection of a client lands together.
    pub const AFFINITY_CLIENT: u32 = 1 << 1;
    /// The service has cohort pins: consult `PINS` before the split.
    pub const HAS_PINS: u32 = 1 << 2;
}

/// Value of `SERVICES`. Replaced as a whole (a hash-map update is atomic for readers), which
/// is how a new selection slot is switched in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into the per-service arrays (`SELECT`, `SERVICE_STATS`).
    pub id: u32,
    pub flags: u32,
    /// Active selection slot, 0 or 1.
    pub slot: u32,
    /// Same as `ServiceState::generation` of this id (copied into new flow entries).
    pub generation: u32,
}

/// `Backend::flags`
pub mod backend_flags {
    /// Set while the backend exists; flows to a cleared entry are re-selected.
    pub const LIVE: u8 = 1 << 0;
}

/// Value of `BACKENDS`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    /// Network order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
    /// Bumped whenever the id is given to another backend, so old flows notice.
    pub generation: u16,
    pub _pad: u16,
}

/// Value of `SELECT`, indexed by `service.id * SLOTS + slot`: everything a new flow needs
/// to pick a group and a backend. Written whole into the idle slot before the flip.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Selection {
    /// Maglev table id of each group index, or `NO_TABLE`.
    pub tables: [u32; MAX_GROUPS],
    /// Group index of each split bucket.
    pub buckets: [u8; SPLIT_BUCKETS as usize],
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            tables: [NO_TABLE; MAX_GROUPS],
            buckets: [0; SPLIT_BUCKETS as usize],
        }
    }
}

/// Value of `MAGLEV`, indexed by table id: backend id of each slot.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    pub entries: [u16; MAGLEV_SIZE as usize],
    pub _pad: u16,
}

/// Data part of the `PINS` LPM key: service, slot and family are matched whole (the first
/// 48 bits of every prefix), then `prefix` bits of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinKey {
    pub service: u32,
    pub slot: u8,
    pub family: u8,
    /// Address bytes in wire order (IPv4 in the first 4).
    pub addr: [u8; 16],
    pub _pad: [u8; 2],
}

/// Bits of a `PinKey` that precede the address.
pub const PIN_KEY_FIXED_BITS: u32 = 48;

/// Key of `FLOWS`: the forward direction, as the client sent it (a nat reply looks up the
/// same key, built from its destination and the `REPLIES` entry of its source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `FlowEntry::flags`
pub mod flow_flags {
    /// FIN seen from the client.
    pub const FIN_FWD: u8 = 1 << 0;
    /// FIN seen from the backend.
    pub const FIN_REV: u8 = 1 << 1;
    /// RST seen, or FIN in both directions: the entry lives only `closing_timeout` more.
    pub const CLOSING: u8 = 1 << 2;
}

/// Value of `FLOWS`: everything an established packet needs besides the backend itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    pub backend: u16,
    /// `Backend::generation` when the flow was pinned: a reused id does not inherit flows.
    pub backend_gen: u16,
    pub service: u16,
    /// `ServiceState::generation` (low 8 bits) when the flow was pinned.
    pub service_gen: u8,
    /// `flow_flags`.
    pub flags: u8,
    /// `bpf_ktime_get_coarse_ns` of the last packet (written at most once a second).
    pub last_seen: u64,
}

/// Value of `SERVICE_STATE`, indexed by service id: what an established flow checks, with
/// one array read, instead of looking its VIP up again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceState {
    /// 0 = no service with this id; bumped each time the id is given to a new service.
    pub generation: u32,
    /// `service_flags` (forwarding mode).
    pub flags: u32,
}

/// Value of `REPLIES`, keyed by a nat backend's address, port and protocol (a `VipKey` of
/// the backend): the VIP its answers are translated back to. A nat backend address:port
/// serves one VIP, so replies need no per-flow reverse entry: the forward flow entry
/// (looked up from the reply) proves the reply belongs to a flow zdd steered there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyTarget {
    pub vip: Addr,
    /// Network order.
    pub vport: u16,
    pub backend: u16,
    pub service: u32,
}

/// Value of `NEXTHOP`, indexed by backend id: a cached FIB result, refreshed by the data
/// path when older than `Config::nexthop_ttl_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub ifindex: u32,
    /// MTU of the route to the destination (`bpf_fib_lookup`'s `mtu_result`, host order): a
    /// larger frame is answered with ICMP instead of being forwarded. 0 = not known (kernels
    /// before 5.12 do not report it): no check.
    pub mtu: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Zero. Two fields, not `[u8; 6]`: the data path writes them with two plain stores
    /// instead of a `memset` call.
    pub _pad: u16,
    pub _pad2: u32,
    /// 0 = never resolved.
    pub resolved_at: u64,
}

/// Slots of the per-CPU reply next-hop cache (`REPLY_HOPS`), indexed by client hash.
pub const REPLY_HOP_SLOTS: u32 = 4096;

/// `REPLY_HOPS` slot: the next hop towards one client address, for nat replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyHop {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 7],
    pub hop: NextHop,
}

/// `PORTS` bits, indexed by port in host order: a cheap pre-filter that keeps traffic which
/// cannot belong to zdd at two array reads.
pub mod port_flags {
    /// Some VIP listens on this destination port.
    pub const VIP: u8 = 1 << 0;
    /// Some nat backend answers from this source port.
    pub const BACKEND: u8 = 1 << 1;
}

/// Value of `PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortFlags {
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// `CONFIG[0]`: data-path tunables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub layout_version: u32,
    /// New dsr flows recorded per CPU per second; above it they are forwarded unrecorded
    /// (0: no limit). nat flows are always recorded: their replies need the entry.
    pub record_limit: u32,
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    pub closing_ns: u64,
    pub nexthop_ttl_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        const S: u64 = 1_000_000_000;
        Config {
            layout_version: LAYOUT_VERSION,
            record_limit: DEFAULT_RECORD_LIMIT,
            tcp_idle_ns: 3600 * S,
            udp_idle_ns: 30 * S,
            closing_ns: 10 * S,
            nexthop_ttl_ns: S,
        }
    }
}

/// Default `Config::record_limit`: Katran's figure for the same guard (MAX_CONN_RATE).
pub const DEFAULT_RECORD_LIMIT: u32 = 125_000;

/// `RECORDS[0]`, per CPU: the one-second window of the new-flow record limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RecordWindow {
    /// `bpf_ktime_get_coarse_ns` when the window began.
    pub start_ns: u64,
    /// dsr flows recorded (or refused a record) in the window.
    pub count: u64,
}

/// Value of `SERVICE_STATS` (by service id) and `BACKEND_STATS` (by backend id), per CPU
/// (the agent sums them): frames of a client towards the service / backend that the program
/// took on (established or new flow, whatever the verdict that followed), their bytes
/// (whole frames, as received), and the flows among them that were selected anew. Replies
/// and ICMP errors are not counted here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Value of `PASSIVE_STATS`, by backend id, per CPU (the agent sums them): what the data path
/// sees of a backend's TCP handshakes, the passive health signals. Counted for every TCP
/// frame the program takes on, whatever the verdict that followed.
/// - `attempts`: client SYNs without ACK sent to the backend (a new connection, or a
///   retransmitted SYN): nat and dsr.
/// - `answered`: SYN-ACKs in the backend's replies, translated back to the client (a
///   retransmitted SYN-ACK counts again): nat only, dsr replies bypass the program.
/// - `resets`: RSTs in the backend's replies to a flow zdd steered there: nat only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassiveCounters {
    pub attempts: u64,
    pub answered: u64,
    pub resets: u64,
}

/// Index of `GLOBAL_STATS`: one counter per verdict and per reason. Each counts one thing;
/// the README's counter table says what, and which verdict goes with it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not for zdd: passed to the kernel untouched.
    Pass = 0,
    /// Sent on by the program (XDP_TX or XDP_REDIRECT) towards a backend: new and
    /// established flows, and ICMP errors for a backend.
    Forward = 1,
    /// Translated (nat) and handed to the kernel to forward: its next hop is not resolved yet
    /// (it resolves the neighbour), or it is an IPv4 datagram without DF larger than the next
    /// hop's MTU (it fragments it, `fragmented_by_kernel`).
    PassToKernel = 2,
    /// A reply of a nat flow translated back (source = the VIP again).
    Reverse = 3,
    /// Truncated or inconsistent headers: passed to the kernel untouched (it drops them).
    Malformed = 4,
    /// Fragment addressed to a VIP address (dropped).
    Fragment = 5,
    /// VIP without a usable backend (dropped).
    NoBackend = 6,
    /// Flow-table insert refused by the kernel; the flow is forwarded unrecorded.
    FlowTableFull = 7,
    /// FIB lookup failed for another reason than an unresolved neighbour (dropped).
    FibFailure = 8,
    /// TTL/hop limit expired on a nat frame: passed to the kernel untranslated (it answers
    /// with ICMP time exceeded).
    TtlExpired = 9,
    /// Backends selected for a packet without a flow-table entry (a new flow, or a later
    /// packet of an unrecorded one).
    NewFlow = 10,
    /// Established flows whose backend had gone, selected again.
    Reselected = 11,
    /// Frames dropped for any reason (the sum of the drop reasons).
    Drop = 12,
    /// ICMP errors about a VIP flow, translated (nat) and sent on.
    IcmpTranslated = 13,
    /// dsr: the backend's neighbour is not resolved yet (dropped; the agent resolves it).
    Unresolved = 14,
    /// New dsr flows forwarded without a flow-table entry: above the record limit.
    Unrecorded = 15,
    /// A frame the program had to change could not be (a helper refused, or the frame was
    /// shorter than the headers it parsed with): dropped.
    RewriteFailed = 16,
    /// A frame larger than the MTU towards its next hop (IPv4 with DF, or IPv6): answered by
    /// the program with ICMP fragmentation needed / packet too big, from the frame's
    /// destination (the VIP for a client's frame, the client for a nat reply), quoting the
    /// frame as it arrived, sent back out where it came in (XDP_TX). Not forwarded.
    TooBig = 17,
    /// An IPv4 nat datagram without DF larger than the MTU towards its next hop: translated
    /// and handed to the kernel, which fragments it (also counted in `pass_to_kernel`).
    FragmentedByKernel = 18,
    /// A frame larger than the MTU towards its next hop that can be neither answered nor
    /// fragmented: IPv4 without DF to a dsr backend, or an ICMP error (never answered with
    /// another): dropped.
    TooBigDropped = 19,
}

pub const STAT_COUNT: u32 = 20;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Pass,
        Stat::Forward,
        Stat::PassToKernel,
        Stat::Reverse,
        Stat::Malformed,
        Stat::Fragment,
        Stat::NoBackend,
        Stat::FlowTableFull,
        Stat::FibFailure,
        Stat::TtlExpired,
        Stat::NewFlow,
        Stat::Reselected,
        Stat::Drop,
        Stat::IcmpTranslated,
        Stat::Unresolved,
        Stat::Unrecorded,
        Stat::RewriteFailed,
        Stat::TooBig,
        Stat::FragmentedByKernel,
        Stat::TooBigDropped,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Pass => "pass",
            Stat::Forward => "forward",
            Stat::PassToKernel => "pass_to_kernel",
            Stat::Reverse => "reverse",
            Stat::Malformed => "malformed",
            Stat::Fragment => "fragment",
            Stat::NoBackend => "no_backend",
            Stat::FlowTableFull => "flow_table_full",
            Stat::FibFailure => "fib_failure",
            Stat::TtlExpired => "ttl_expired",
            Stat::NewFlow => "new_flow",
            Stat::Reselected => "reselected",
            Stat::Drop => "drop",
            Stat::IcmpTranslated => "icmp_translated",
            Stat::Unresolved => "unresolved",
            Stat::Unrecorded => "unrecorded",
            Stat::RewriteFailed => "rewrite_failed",
            Stat::TooBig => "too_big",
            Stat::FragmentedByKernel => "fragmented_by_kernel",
            Stat::TooBigDropped => "too_big_dropped",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and no pointers.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Selection {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for PinKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for ServiceState {}
    unsafe impl aya::Pod for ReplyTarget {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for PortFlags {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for PassiveCounters {}
    unsafe impl aya::Pod for RecordWindow {}
    unsafe impl aya::Pod for ReplyHop {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // `GLOBAL_STATS` is indexed by the discriminant, and userspace reads `ALL` in order.
    #[test]
    fn every_stat_once_in_index_order_with_its_own_name() {
        assert_eq!(Stat::ALL.len(), STAT_COUNT as usize);
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
            for t in &Stat::ALL[..i] {
                assert_ne!(s.name(), t.name());
            }
        }
    }

    // Sizes are part of the layout: a change here is a LAYOUT_VERSION bump.
    #[test]
    fn layout_sizes_have_no_hidden_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<PinKey>(), 24);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowEntry>(), 16);
        assert_eq!(size_of::<ServiceState>(), 8);
        assert_eq!(size_of::<ReplyTarget>(), 24);
        assert_eq!(size_of::<NextHop>(), 32);
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<PassiveCounters>(), 24);
        assert_eq!(size_of::<RecordWindow>(), 16);
        assert_eq!(size_of::<ReplyHop>(), 56);
        assert_eq!(
            size_of::<Selection>(),
            4 * MAX_GROUPS + SPLIT_BUCKETS as usize
        );
        assert_eq!(size_of::<MaglevTable>(), 2 * MAGLEV_SIZE as usize + 2);
    }
}
