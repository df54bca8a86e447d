//! The baseline a user would otherwise pick: nftables DNAT on the edge host, a weight map over
//! the backends (numgen), conntrack translating the replies back. Dropping [`NftDnat`] deletes
//! the table (so conntrack's hooks go too and later paths run without it); deleting the lab's
//! namespaces would remove it anyway.

use std::net::SocketAddrV4;

use anyhow::{Context, Result, bail};
use zdd_tests::{Lab, Node};

const TABLE: &str = "zdd_bench";

pub struct NftDnat<'a> {
    lab: &'a Lab,
}

/// The ruleset: `shares` are `(backend, percent)` and must add up to 100.
pub fn ruleset(vip: SocketAddrV4, shares: &[(SocketAddrV4, u32)]) -> Result<String> {
    if shares.iter().map(|(_, s)| s).sum::<u32>() != 100 {
        bail!("nftables shares must add up to 100: {shares:?}");
    }
    let port = shares[0].0.port();
    if shares.iter().any(|(a, _)| a.port() != port) {
        bail!("one backend port for all backends: {shares:?}");
    }
    let mut elems = Vec::new();
    let mut from = 0;
    for (addr, share) in shares.iter().filter(|(_, s)| *s > 0) {
        let to = from + share - 1;
        elems.push(format!("{from}-{to} : {}", addr.ip()));
        from += share;
    }
    Ok(format!(
        "table ip {TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {} tcp dport {} dnat to numgen random mod 100 map {{ {} }} : {port}
    }}
}}
",
        vip.ip(),
        vip.port(),
        elems.join(", ")
    ))
}

impl<'a> NftDnat<'a> {
    pub fn load(lab: &'a Lab, rules: &str) -> Result<NftDnat<'a>> {
        let file = lab.log_dir().join("nft-dnat.nft");
        std::fs::write(&file, rules)?;
        let path = file.to_string_lossy().into_owned();
        lab.exec(Node::Edge, &["nft", "-f", &path])
            .with_context(|| format!("loading nftables rules:\n{rules}"))?;
        Ok(NftDnat { lab })
    }
}

impl Drop for NftDnat<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .lab
            .exec(Node::Edge, &["nft", "delete", "table", "ip", TABLE])
        {
            eprintln!("zdd-bench: removing the nftables table: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_0_to_99() {
        let b = |i: u8| SocketAddrV4::new([10, 0, 2, i].into(), 8080);
        let r = ruleset(
            "10.0.100.1:80".parse().unwrap(),
            &[(b(11), 25), (b(12), 25), (b(13), 0), (b(14), 50)],
        )
        .unwrap();
        assert!(
            r.contains("map { 0-24 : 10.0.2.11, 25-49 : 10.0.2.12, 50-99 : 10.0.2.14 } : 8080"),
            "{r}"
        );
        assert!(r.contains("ip daddr 10.0.100.1 tcp dport 80 dnat"), "{r}");
    }
}
