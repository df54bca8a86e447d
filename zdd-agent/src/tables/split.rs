//! The split table: `SPLIT_BUCKETS` buckets (0.01% each), each owned by one group index.
//!
//! Built incrementally from the previous table: a group that shrinks gives up exactly the
//! buckets it no longer needs, and only groups that grow receive them. So as a canary grows
//! (5% → 25% → 100%) no bucket ever moves from the new group back to the old one, and a
//! change of split moves the minimum number of buckets.

use std::collections::BTreeMap;

use zdd_common::SPLIT_BUCKETS;

pub const BUCKETS: usize = SPLIT_BUCKETS as usize;
/// A bucket owned by no group (only during building).
const FREE: u8 = u8::MAX;

/// The split table for `split` (group name → buckets) given the group indices in `groups`
/// and the table in force, `prev` (None for a new service). Buckets of indices that are
/// not in `groups` (removed groups, or ones an adopting agent could not name) are released.
pub fn plan(
    prev: Option<&[u8]>,
    groups: &BTreeMap<String, u8>,
    split: &[(String, u32)],
) -> Result<Vec<u8>, String> {
    let width = groups.values().map(|&i| i as usize + 1).max().unwrap_or(1);
    let mut targets = vec![0u32; width];
    for (g, share) in split {
        let i = groups
            .get(g)
            .ok_or_else(|| format!("split names group {g:?}, which has no index"))?;
        targets[*i as usize] = *share;
    }
    build(prev, &targets)
}

/// `targets[g]` = buckets group index `g` must own; they must sum to `BUCKETS`.
/// `prev` is the table in force (None on first build).
pub fn build(prev: Option<&[u8]>, targets: &[u32]) -> Result<Vec<u8>, String> {
    let total: u64 = targets.iter().map(|&t| t as u64).sum();
    if total != BUCKETS as u64 {
        return Err(format!(
            "split shares cover {total} of {BUCKETS} buckets: they must add up to 100%"
        ));
    }
    let mut table = match prev {
        Some(p) if p.len() == BUCKETS => p
            .iter()
            .map(|&g| {
                if (g as usize) < targets.len() {
                    g
                } else {
                    FREE
                }
            })
            .collect::<Vec<u8>>(),
        _ => vec![FREE; BUCKETS],
    };
    let mut have = vec![0u32; targets.len()];
    for &g in &table {
        if g != FREE {
            have[g as usize] += 1;
        }
    }
    // Shrinking groups release their highest-numbered buckets (any fixed rule would do: the
    // hash spreads flows uniformly over buckets).
    for i in (0..BUCKETS).rev() {
        let g = table[i];
        if g != FREE && have[g as usize] > targets[g as usize] {
            have[g as usize] -= 1;
            table[i] = FREE;
        }
    }
    // Growing groups take free buckets in order.
    let mut g = 0usize;
    for slot in table.iter_mut().filter(|s| **s == FREE) {
        while have[g] >= targets[g] {
            g += 1;
        }
        *slot = g as u8;
        have[g] += 1;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(t: &[u8], n: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for &g in t {
            c[g as usize] += 1;
        }
        c
    }

    #[test]
    fn exact_shares_from_scratch() {
        let t = build(None, &[9_500, 500]).unwrap();
        assert_eq!(counts(&t, 2), vec![9_500, 500]);
        let t = build(None, &[3_333, 3_333, 3_334]).unwrap();
        assert_eq!(counts(&t, 3), vec![3_333, 3_333, 3_334]);
    }

    #[test]
    fn canary_growth_is_monotonic_and_minimal() {
        // blue = 0, green = 1; green grows through the usual canary steps and back.
        let steps = [0u32, 1, 500, 2_500, 5_000, 9_999, 10_000];
        let mut prev = build(None, &[10_000, 0]).unwrap();
        for w in steps.windows(2) {
            let next = build(Some(&prev), &[10_000 - w[1], w[1]]).unwrap();
            let moved = prev.iter().zip(&next).filter(|(a, b)| a != b).count() as u32;
            assert_eq!(moved, w[1] - w[0], "only the needed buckets move");
            for (a, b) in prev.iter().zip(&next) {
                assert!(!(*a == 1 && *b == 0), "a green bucket went back to blue");
            }
            prev = next;
        }
    }

    #[test]
    fn multi_group_shift_only_moves_between_changed_groups() {
        let a = build(None, &[5_000, 3_000, 2_000]).unwrap();
        // Group 2 grows at group 0's expense; group 1 must not move at all.
        let b = build(Some(&a), &[4_000, 3_000, 3_000]).unwrap();
        for (x, y) in a.iter().zip(&b) {
            if x != y {
                assert_eq!((*x, *y), (0, 2));
            }
        }
        assert_eq!(counts(&b, 3), vec![4_000, 3_000, 3_000]);
    }

    #[test]
    fn removed_group_buckets_are_reassigned() {
        let a = build(None, &[5_000, 5_000, 0]).unwrap();
        // Group index 1 disappears (targets shorter): its buckets go to the others.
        let b = build(Some(&a), &[10_000]).unwrap();
        assert!(b.iter().all(|&g| g == 0));
    }

    #[test]
    fn targets_must_sum_to_all_buckets() {
        let e = build(None, &[5_000, 4_999]).unwrap_err();
        assert!(e.contains("9999 of 10000"), "{e}");
    }
}

/// Randomized properties over canary sequences (fixed seed).
#[cfg(test)]
mod properties {
    use super::*;

    #[test]
    fn any_growing_sequence_is_monotonic_and_exact() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50 {
            // Random increasing shares for the new group (index 1), the old one (0) shrinks.
            let mut steps: Vec<u32> = (0..6).map(|_| (next() % 10_001) as u32).collect();
            steps.sort();
            let mut prev = build(None, &[10_000, 0]).unwrap();
            for s in steps {
                let t = build(Some(&prev), &[10_000 - s, s]).unwrap();
                assert_eq!(t.iter().filter(|&&g| g == 1).count() as u32, s);
                assert!(
                    prev.iter().zip(&t).all(|(a, b)| !(*a == 1 && *b == 0)),
                    "a bucket went back to the old group"
                );
                prev = t;
            }
        }
    }
}
