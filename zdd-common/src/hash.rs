//! The flow hash and the two index functions, shared so that userspace (tests, the benchmark)
//! can predict exactly what the data path picks.
//!
//! Murmur3's 32-bit block mix over the words that matter, then its finaliser. Indices use
//! multiply-shift instead of `%`: the verifier can bound the result, and it is cheaper.

use crate::{Addr, FAMILY_V4, MAGLEV_SIZE, SPLIT_BUCKETS};

const SEED: u32 = 0x5a44_4431; // "ZDD1"

#[inline(always)]
fn block(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
pub fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn addr(h: u32, a: &Addr, family: u8) -> u32 {
    if family == FAMILY_V4 {
        block(h, a[0])
    } else {
        block(block(block(block(h, a[0]), a[1]), a[2]), a[3])
    }
}

/// Hash of a 5-tuple (`flow` affinity). Ports as on the wire.
#[inline(always)]
pub fn flow_hash(src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8, family: u8) -> u32 {
    let h = addr(addr(SEED, src, family), dst, family);
    let h = block(h, (sport as u32) << 16 | dport as u32);
    fmix(block(h, proto as u32 | (family as u32) << 8))
}

/// Hash of a source address alone (`client` affinity).
#[inline(always)]
pub fn client_hash(src: &Addr, family: u8) -> u32 {
    fmix(block(addr(SEED, src, family), family as u32))
}

/// Split bucket of a hash, in `0..SPLIT_BUCKETS`.
#[inline(always)]
pub fn split_bucket(h: u32) -> u32 {
    ((h as u64 * SPLIT_BUCKETS as u64) >> 32) as u32
}

/// Maglev slot of a hash, in `0..MAGLEV_SIZE`; re-mixed so it is independent of the bucket.
#[inline(always)]
pub fn maglev_slot(h: u32) -> u32 {
    ((fmix(h ^ 0x9e37_79b9) as u64 * MAGLEV_SIZE as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FAMILY_V6;

    #[test]
    fn indices_stay_in_range_at_the_extremes() {
        for h in [0u32, 1, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
            assert!(split_bucket(h) < SPLIT_BUCKETS);
            assert!(maglev_slot(h) < MAGLEV_SIZE);
        }
    }

    #[test]
    fn buckets_are_uniform() {
        let mut counts = [0u32; 100];
        let n = 200_000u32;
        for i in 0..n {
            let a = [0x0a00_0001u32.wrapping_add(i), 0, 0, 0];
            let h = flow_hash(&a, &[0x0a00_0064, 0, 0, 0], 1234, 80, 6, FAMILY_V4);
            counts[(split_bucket(h) / 100) as usize] += 1;
        }
        let expect = n / 100;
        for c in counts {
            assert!(
                c.abs_diff(expect) < expect / 10,
                "bucket count {c} vs {expect}"
            );
        }
    }

    #[test]
    fn ports_and_family_change_the_hash() {
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8];
        let base = flow_hash(&a, &b, 1, 2, 6, FAMILY_V6);
        assert_ne!(base, flow_hash(&a, &b, 2, 1, 6, FAMILY_V6), "ports swapped");
        assert_ne!(
            base,
            flow_hash(&a, &b, 1, 3, 6, FAMILY_V6),
            "destination port"
        );
        assert_ne!(base, flow_hash(&a, &b, 1, 2, 17, FAMILY_V6), "protocol");
        assert_ne!(
            client_hash(&a, FAMILY_V6),
            client_hash(&b, FAMILY_V6),
            "address"
        );

        // The family: an IPv4 address sits in the first word, the rest zero, so 10.0.0.1 and
        // the IPv6 address 0a00:0001:: are the same four words. They must not share a hash
        // (nor a split bucket by construction), in either hash.
        let v4 = [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0];
        let vip = [u32::from_ne_bytes([10, 0, 100, 1]), 0, 0, 0];
        for (sport, dport, proto) in [(40000, 80, 6), (53, 53, 17), (1, 2, 6)] {
            assert_ne!(
                flow_hash(&v4, &vip, sport, dport, proto, FAMILY_V4),
                flow_hash(&v4, &vip, sport, dport, proto, FAMILY_V6),
                "flow hash of {sport}->{dport}/{proto} is the same for both families"
            );
        }
        assert_ne!(
            client_hash(&v4, FAMILY_V4),
            client_hash(&v4, FAMILY_V6),
            "client hash is the same for both families"
        );
        // And the family word itself is mixed in, beyond which address words are read: two
        // family values that read the same words (both not IPv4) hash apart.
        assert_ne!(
            flow_hash(&a, &b, 1, 2, 6, FAMILY_V6),
            flow_hash(&a, &b, 1, 2, 6, FAMILY_V6 + 1)
        );
        assert_ne!(client_hash(&a, FAMILY_V6), client_hash(&a, FAMILY_V6 + 1));
    }
}
