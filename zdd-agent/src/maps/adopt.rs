//! Adoption: what an agent finds in the maps a predecessor pinned, read back so that the
//! first apply carries on exactly where the predecessor was. Ids, generations, the split
//! table in force and the group indices (from the members of each group's Maglev table)
//! all come from the maps themselves, so they are right however the predecessor ended
//! (SIGKILL between any two writes included).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData},
};
use zdd_common::{
    Backend, MaglevTable, NO_TABLE, PinKey, PortFlags, ReplyTarget, SLOTS, Selection, Service,
    ServiceState, VipKey, backend_flags, map_names as n,
};

use super::{
    DataplaneError, map_err, open,
    plan::{Applied, StaleService},
};
use crate::state::socket_addr_of;

/// Reads what a previous agent left in the pinned maps.
pub(super) fn read(ebpf: &Ebpf) -> Result<Applied, DataplaneError> {
    let mut a = Applied::default();

    let backends: Array<&MapData, Backend> = open(ebpf, n::BACKENDS)?;
    let mut all_backends: BTreeMap<u16, Backend> = BTreeMap::new();
    for (id, b) in backends.iter().enumerate() {
        let b = b.map_err(map_err(n::BACKENDS, "read"))?;
        let Ok(id) = u16::try_from(id) else { break };
        if b.generation != 0 {
            a.generations.insert(id, b.generation);
        }
        if b.flags & backend_flags::LIVE != 0 {
            a.stale_backends.insert(id, b);
        }
        all_backends.insert(id, b);
    }

    let services: HashMap<&MapData, VipKey, Service> = open(ebpf, n::SERVICES)?;
    let select: Array<&MapData, Selection> = open(ebpf, n::SELECT)?;
    let maglev: Array<&MapData, MaglevTable> = open(ebpf, n::MAGLEV)?;
    for kv in services.iter() {
        let (key, value) = kv.map_err(map_err(n::SERVICES, "read"))?;
        if key.port == 0 && key.proto == 0 {
            a.markers.insert(key);
            continue;
        }
        let sel = select
            .get(&(value.id * SLOTS + value.slot), 0)
            .map_err(map_err(n::SELECT, "read"))?;
        let mut members: BTreeMap<u8, Vec<SocketAddr>> = BTreeMap::new();
        let mut tables = Vec::new();
        for (gi, &tid) in sel.tables.iter().enumerate() {
            if tid == NO_TABLE {
                continue;
            }
            tables.push(tid);
            let t = maglev.get(&tid, 0).map_err(map_err(n::MAGLEV, "read"))?;
            let ids: BTreeSet<u16> = t.entries.iter().copied().collect();
            let addrs = ids
                .iter()
                .filter_map(|id| all_backends.get(id))
                .map(|b| socket_addr_of(&b.addr, b.port, b.family))
                .collect();
            members.insert(gi as u8, addrs);
        }
        a.stale_services.push(StaleService {
            key,
            value,
            buckets: sel.buckets.to_vec(),
            tables,
            members,
        });
    }

    let states: Array<&MapData, ServiceState> = open(ebpf, n::SERVICE_STATE)?;
    for (id, st) in states.iter().enumerate() {
        let st = st.map_err(map_err(n::SERVICE_STATE, "read"))?;
        if st.generation != 0 {
            a.service_generations.insert(id as u32, st.generation);
        }
    }
    let replies: HashMap<&MapData, VipKey, ReplyTarget> = open(ebpf, n::REPLIES)?;
    for kv in replies.iter() {
        let (k, v) = kv.map_err(map_err(n::REPLIES, "read"))?;
        a.replies.insert(k, v);
    }
    let pins: LpmTrie<&MapData, PinKey, u32> = open(ebpf, n::PINS)?;
    for k in pins.keys() {
        let k = k.map_err(map_err(n::PINS, "read"))?;
        a.stale_pins.push((k.prefix_len(), k.data()));
    }
    let ports: Array<&MapData, PortFlags> = open(ebpf, n::PORTS)?;
    for (p, f) in ports.iter().enumerate() {
        let f = f.map_err(map_err(n::PORTS, "read"))?;
        if f.flags != 0 {
            a.ports.insert(p as u16, f.flags);
        }
    }
    Ok(a)
}
