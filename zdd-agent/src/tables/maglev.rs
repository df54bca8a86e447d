//! Maglev consistent lookup table (Eisenbud et al., NSDI 2016), weighted.
//!
//! Each backend walks its own permutation of the `MAGLEV_SIZE` slots (offset and skip from
//! a hash of its stable key) and claims free slots in turns; a backend claims a turn each
//! time its accumulated weight reaches the largest weight, so shares follow weights.
//! Consequences the data path relies on: the same backend set always gives the same table
//! (a flow whose entry was lost lands on the same backend), and a change of one of N
//! backends moves about 1/N of the slots.

use zdd_common::MAGLEV_SIZE;

pub const SIZE: usize = MAGLEV_SIZE as usize;

/// One backend as the builder sees it.
#[derive(Clone, Debug)]
pub struct Member {
    /// Backend id written into the table.
    pub id: u16,
    /// Stable identity (name and address): decides the permutation.
    pub key: String,
    /// Relative weight; 0 takes no slot.
    pub weight: u32,
}

fn hash64(bytes: &[u8], seed: u64) -> u64 {
    // FNV-1a, then a 64-bit finaliser: stable across builds and Rust versions.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Builds the table. None when no member has a weight above zero.
pub fn build(members: &[Member]) -> Option<Vec<u16>> {
    let mut ms: Vec<&Member> = members.iter().filter(|m| m.weight > 0).collect();
    if ms.is_empty() {
        return None;
    }
    // Order by key so the table does not depend on config order.
    ms.sort_by(|a, b| a.key.cmp(&b.key));
    let m = SIZE as u64;
    let perm: Vec<(u64, u64)> = ms
        .iter()
        .map(|b| {
            let offset = hash64(b.key.as_bytes(), 0x6d61_676c) % m;
            let skip = hash64(b.key.as_bytes(), 0x736b_6970) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_w = ms.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let mut next = vec![0u64; ms.len()];
    let mut credit = vec![0u64; ms.len()];
    let mut table: Vec<Option<u16>> = vec![None; SIZE];
    let mut filled = 0usize;
    while filled < SIZE {
        for (i, b) in ms.iter().enumerate() {
            credit[i] += b.weight as u64;
            if credit[i] < max_w {
                continue;
            }
            credit[i] -= max_w;
            let (offset, skip) = perm[i];
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[c].is_none() {
                    table[c] = Some(b.id);
                    break;
                }
            }
            filled += 1;
            if filled == SIZE {
                break;
            }
        }
    }
    Some(table.into_iter().map(|e| e.unwrap_or_default()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize, weight: impl Fn(usize) -> u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: i as u16,
                key: format!("b{i}@10.0.2.{i}:8080"),
                weight: weight(i),
            })
            .collect()
    }

    fn shares(t: &[u16], n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        for &e in t {
            c[e as usize] += 1;
        }
        c.into_iter().map(|x| x as f64 / t.len() as f64).collect()
    }

    #[test]
    fn equal_weights_equal_shares() {
        for n in [1, 2, 3, 7, 16] {
            let t = build(&members(n, |_| 100)).unwrap();
            for s in shares(&t, n) {
                assert!((s - 1.0 / n as f64).abs() < 0.01, "n={n} share {s}");
            }
        }
    }

    #[test]
    fn shares_follow_weights() {
        let ms = members(4, |i| [100, 50, 25, 25][i]);
        let t = build(&ms).unwrap();
        let want = [0.5, 0.25, 0.125, 0.125];
        for (s, w) in shares(&t, 4).into_iter().zip(want) {
            assert!((s - w).abs() < 0.01, "share {s} want {w}");
        }
    }

    #[test]
    fn zero_weight_takes_nothing_and_all_zero_is_none() {
        let t = build(&members(3, |i| if i == 1 { 0 } else { 10 })).unwrap();
        assert!(t.iter().all(|&e| e != 1));
        assert!(build(&members(3, |_| 0)).is_none());
    }

    #[test]
    fn deterministic_and_order_independent() {
        let ms = members(5, |_| 1);
        let mut rev = ms.clone();
        rev.reverse();
        assert_eq!(build(&ms), build(&rev));
    }

    #[test]
    fn removing_one_of_n_moves_about_its_share() {
        for n in [3usize, 5, 10] {
            let all = members(n, |_| 1);
            let a = build(&all).unwrap();
            let fewer: Vec<Member> = all.iter().filter(|m| m.id != 1).cloned().collect();
            let b = build(&fewer).unwrap();
            // Slots of backends other than the removed one that changed owner.
            let moved =
                a.iter().zip(&b).filter(|(x, y)| **x != 1 && x != y).count() as f64 / SIZE as f64;
            assert!(
                moved <= 1.0 / n as f64 + 0.01,
                "n={n}: {moved} of others moved"
            );
        }
    }
}

/// Randomized properties over many backend sets (fixed seeds, so failures reproduce).
#[cfg(test)]
mod properties {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next() % (hi - lo + 1)
        }
    }

    fn random_set(rng: &mut Rng, n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: i as u16,
                key: format!(
                    "be{}-{}@10.1.{}.{}:80",
                    i,
                    rng.next() % 1000,
                    i / 250,
                    i % 250
                ),
                weight: rng.range(1, 100) as u32,
            })
            .collect()
    }

    fn counts(t: &[u16], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in t {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn every_backend_gets_its_weight_share_within_one_percent() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..25 {
            let n = rng.range(1, 24) as usize;
            let ms = random_set(&mut rng, n);
            let total: u32 = ms.iter().map(|m| m.weight).sum();
            let t = build(&ms).unwrap();
            for (m, c) in ms.iter().zip(counts(&t, n)) {
                let want = m.weight as f64 / total as f64;
                let got = c as f64 / SIZE as f64;
                assert!(
                    (got - want).abs() <= 0.01,
                    "n={n} {}: {got:.4} vs {want:.4}",
                    m.key
                );
            }
        }
    }

    #[test]
    fn changing_one_of_n_moves_at_most_about_one_nth() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20 {
            let n = rng.range(2, 20) as usize;
            let mut ms = random_set(&mut rng, n);
            for m in &mut ms {
                m.weight = 100;
            }
            let a = build(&ms).unwrap();
            // Remove one: besides its own slots, others move at most about 1/N + 1%.
            let gone = rng.range(0, n as u64 - 1) as u16;
            let fewer: Vec<Member> = ms.iter().filter(|m| m.id != gone).cloned().collect();
            let b = build(&fewer).unwrap();
            let moved = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| **x != gone && x != y)
                .count();
            let bound = 1.0 / n as f64 + 0.01;
            assert!(
                (moved as f64 / SIZE as f64) <= bound,
                "remove: n={n} moved {moved}"
            );
            // Add one: it takes about 1/(N+1), and only that much changes owner.
            let mut more = ms.clone();
            more.push(Member {
                id: n as u16,
                key: format!("new-{n}@10.9.9.9:80"),
                weight: 100,
            });
            let c = build(&more).unwrap();
            let changed = a.iter().zip(&c).filter(|(x, y)| x != y).count() as f64 / SIZE as f64;
            assert!(
                changed <= 1.0 / (n as f64 + 1.0) + 0.01,
                "add: n={n} changed {changed}"
            );
        }
    }
}
