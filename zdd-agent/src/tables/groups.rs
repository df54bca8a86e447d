//! Group indices: the number by which the split table and the pins name a group.
//!
//! An index must never change while its group exists: the split table's buckets hold
//! indices, and a renumbering moves every client of the renumbered groups. So indices are
//! kept for the life of a group, new groups take the lowest free index, and an agent that
//! adopts a predecessor's maps reads the indices back from them ([`infer`]) rather than
//! numbering the groups afresh.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use zdd_common::MAX_GROUPS;

use crate::state::BackendSpec;

/// Indices for `names` (every group of a service): names in `keep` keep their index, the
/// others take the lowest free ones. Errors when more than `MAX_GROUPS` would be needed.
pub fn assign(
    names: &[String],
    keep: &BTreeMap<String, u8>,
) -> Result<BTreeMap<String, u8>, String> {
    let mut out: BTreeMap<String, u8> = keep
        .iter()
        .filter(|(g, _)| names.contains(g))
        .map(|(g, i)| (g.clone(), *i))
        .collect();
    for g in names {
        if out.contains_key(g) {
            continue;
        }
        let taken: BTreeSet<u8> = out.values().copied().collect();
        let free = (0..MAX_GROUPS as u8)
            .find(|i| !taken.contains(i))
            .ok_or_else(|| format!("more than {MAX_GROUPS} groups"))?;
        out.insert(g.clone(), free);
    }
    Ok(out)
}

/// Reads group indices back from what a predecessor left in the maps: `members[i]` are the
/// addresses of the backends in group index `i`'s Maglev table, and the config's backends
/// say which group each address belongs to. An index takes the group most of its members
/// belong to (ties: the name that sorts first); when two indices claim one group, the one
/// with more members of it keeps it (ties: the lower index). An index whose members match no
/// configured backend stays unnamed, so its buckets are given to the groups that need them.
///
/// Every group that owns split buckets has a table (a share above 0 needs a backend with a
/// weight above 0), so every bucket's owner can be read back this way.
pub fn infer(
    members: &BTreeMap<u8, Vec<SocketAddr>>,
    backends: &[BackendSpec],
) -> BTreeMap<String, u8> {
    let group_of: BTreeMap<SocketAddr, &str> = backends
        .iter()
        .map(|b| (b.addr, b.group.as_str()))
        .collect();
    // index → (votes, group)
    let mut claims: Vec<(u8, usize, &str)> = Vec::new();
    for (&index, addrs) in members {
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for a in addrs {
            if let Some(g) = group_of.get(a) {
                *votes.entry(g).or_default() += 1;
            }
        }
        // max_by_key keeps the last maximum; iterate in reverse so the first name wins.
        if let Some((g, n)) = votes.iter().rev().max_by_key(|(_, n)| **n) {
            claims.push((index, *n, g));
        }
    }
    let mut out: BTreeMap<String, u8> = BTreeMap::new();
    let mut best: BTreeMap<&str, (usize, u8)> = BTreeMap::new();
    for (index, n, g) in claims {
        match best.get(g) {
            Some(&(m, _)) if m >= n => {}
            _ => {
                best.insert(g, (n, index));
            }
        }
    }
    for (g, (_, index)) in best {
        out.insert(g.to_string(), index);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn be(name: &str, addr: &str, group: &str) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            addr: addr.parse().unwrap(),
            group: group.into(),
            weight: 100,
        }
    }

    #[test]
    fn kept_indices_stay_and_new_groups_take_the_lowest_free() {
        let first = assign(&names(&["stable"]), &BTreeMap::new()).unwrap();
        assert_eq!(first["stable"], 0);
        // "canary" sorts first but must not take "stable"'s index.
        let second = assign(&names(&["canary", "stable"]), &first).unwrap();
        assert_eq!(second["stable"], 0);
        assert_eq!(second["canary"], 1);
        // A removed group frees its index for the next new one.
        let third = assign(&names(&["canary"]), &second).unwrap();
        assert_eq!(third.len(), 1);
        let fourth = assign(&names(&["canary", "zeta"]), &third).unwrap();
        assert_eq!(fourth["zeta"], 0);
        assert_eq!(fourth["canary"], 1);
    }

    #[test]
    fn more_than_max_groups_is_an_error() {
        let many: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect();
        let e = assign(&many, &BTreeMap::new()).unwrap_err();
        assert!(e.contains("more than 8 groups"), "{e}");
    }

    #[test]
    fn indices_are_read_back_from_table_members() {
        let backends = [
            be("s1", "10.0.2.11:80", "stable"),
            be("s2", "10.0.2.12:80", "stable"),
            be("c1", "10.0.2.13:80", "canary"),
        ];
        let mut members = BTreeMap::new();
        members.insert(0, vec![backends[0].addr, backends[1].addr]);
        members.insert(1, vec![backends[2].addr]);
        let g = infer(&members, &backends);
        assert_eq!(g["stable"], 0);
        assert_eq!(g["canary"], 1);
    }

    #[test]
    fn conflicts_and_unknown_members_resolve_deterministically() {
        let backends = [
            be("s1", "10.0.2.11:80", "stable"),
            be("s2", "10.0.2.12:80", "stable"),
            be("c1", "10.0.2.13:80", "canary"),
        ];
        let mut members = BTreeMap::new();
        // Index 0 has one stable member, index 2 has two: index 2 keeps "stable".
        members.insert(0, vec![backends[0].addr]);
        members.insert(2, vec![backends[0].addr, backends[1].addr]);
        // Index 1's members are in no group of the config: unnamed.
        members.insert(1, vec!["10.9.9.9:80".parse().unwrap()]);
        // Index 3: a tie between canary and stable; "canary" sorts first.
        members.insert(3, vec![backends[2].addr, backends[1].addr]);
        let g = infer(&members, &backends);
        assert_eq!(g.get("stable"), Some(&2));
        assert_eq!(g.get("canary"), Some(&3));
        assert_eq!(g.len(), 2);
    }
}
