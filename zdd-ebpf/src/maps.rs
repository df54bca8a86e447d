//! Every map of the program. All are pinned by name so a restarted or upgraded agent adopts
//! them (the agent chooses a pin directory per `LAYOUT_VERSION`).

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use zdd_common::{
    Backend, Config, Counters, DEFAULT_FLOW_TABLE_SIZE, FlowEntry, FlowKey, MAX_BACKENDS,
    MAX_MAGLEV_TABLES, MAX_SERVICES, MaglevTable, NextHop, PassiveCounters, PinKey, PortFlags,
    REPLY_HOP_SLOTS, RecordWindow, ReplyHop, ReplyTarget, SLOTS, STAT_COUNT, Selection, Service,
    ServiceState, VipKey,
};

/// VIP (and, with port 0 and protocol 0, a VIP address) → service.
#[map]
pub static ZDD_SERVICES: HashMap<VipKey, Service> = HashMap::pinned(MAX_SERVICES * 2, 0);

#[map]
pub static ZDD_BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

#[map]
pub static ZDD_SELECT: Array<Selection> = Array::pinned(MAX_SERVICES * SLOTS, 0);

#[map]
pub static ZDD_MAGLEV: Array<MaglevTable> = Array::pinned(MAX_MAGLEV_TABLES, 0);

/// Cohort pins: (service, slot, family, source prefix) → group index.
#[map]
pub static ZDD_PINS: LpmTrie<PinKey, u32> = LpmTrie::pinned(4096, 0);

/// Service id → generation and forwarding mode, for established flows.
#[map]
pub static ZDD_SERVICE_STATE: Array<ServiceState> = Array::pinned(MAX_SERVICES, 0);

/// One LRU shared by all CPUs (measured no slower here than per-CPU LRU lists, and every CPU
/// can use the whole table).
#[map]
pub static ZDD_FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

/// nat backend (address, port, protocol) → the VIP its replies are translated back to.
#[map]
pub static ZDD_REPLIES: HashMap<VipKey, ReplyTarget> = HashMap::pinned(MAX_BACKENDS, 0);

#[map]
pub static ZDD_NEXTHOP: Array<NextHop> = Array::pinned(MAX_BACKENDS, 0);

#[map]
pub static ZDD_PORTS: Array<PortFlags> = Array::pinned(65_536, 0);

#[map]
pub static ZDD_CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
pub static ZDD_GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[map]
pub static ZDD_SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map]
pub static ZDD_BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Per CPU, by backend id: handshake attempts, answers and resets (the passive health
/// signals), apart from `ZDD_BACKEND_STATS` so that an established packet never touches them.
#[map]
pub static ZDD_PASSIVE_STATS: PerCpuArray<PassiveCounters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Per CPU: the window of the new-flow record limit (`record`).
#[map]
pub static ZDD_RECORDS: PerCpuArray<RecordWindow> = PerCpuArray::pinned(1, 0);

/// Per CPU: next hops towards clients, for nat replies (a direct-mapped cache by client hash;
/// per CPU, so a slot is never written by two CPUs at once).
#[map]
pub static ZDD_REPLY_HOPS: PerCpuArray<ReplyHop> = PerCpuArray::pinned(REPLY_HOP_SLOTS, 0);

/// `bpf_ktime_get_coarse_ns` of the last route or neighbour change the agent saw: reply next
/// hops resolved before it are stale.
#[map]
pub static ZDD_HOP_EPOCH: Array<u64> = Array::pinned(1, 0);

/// Per CPU: the parameter block of `bpf_fib_lookup` (`forward::fib`), scratch space that would
/// not fit the stack. Not pinned: nothing in it outlives one lookup.
#[map]
pub static ZDD_FIB_SCRATCH: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);
