//! Internet checksums: incremental updates (RFC 1624: HC' = ~(~HC + ~m + m')) for rewrites,
//! and sums from scratch for the ICMP errors the program builds itself.
//! Words are taken as they lie in memory; the ones' complement sum does not care about byte
//! order as long as checksum and data are read the same way.

/// Sum to add for a 16-bit word changing from `old` to `new`.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u64 {
    (!old) as u64 + new as u64
}

/// Sum to add for a 32-bit word changing from `old` to `new`.
#[inline(always)]
pub fn diff32(old: u32, new: u32) -> u64 {
    let o = !old;
    (o & 0xffff) as u64 + (o >> 16) as u64 + (new & 0xffff) as u64 + (new >> 16) as u64
}

/// Sum to add for an address changing (one word for IPv4, four with `v6`).
#[inline(always)]
pub fn diff_addr(old: &[u32; 4], new: &[u32; 4], v6: bool) -> u64 {
    let mut d = diff32(old[0], new[0]);
    if v6 {
        d += diff32(old[1], new[1]) + diff32(old[2], new[2]) + diff32(old[3], new[3]);
    }
    d
}

/// Applies `diff` to checksum `csum`.
#[inline(always)]
pub fn apply(csum: u16, diff: u64) -> u16 {
    let mut s = (!csum) as u64 + diff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The checksum of data whose words sum to `sum`: the ones' complement of the folded sum.
#[inline(always)]
pub fn finish(sum: u64) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
