//! Where the backends' replies go: via the edge host (the lab's default, needed by every path
//! whose replies the edge translates back) or via the lab's return router (dsr: replies bypass
//! the edge, as on a real network). [`ViaRouter`] points every backend at the router and back
//! at the edge when dropped. Plus the link counters that show which way the frames went.

use anyhow::{Context, Result, ensure};
use zdd_tests::{Lab, Node};

/// While alive, every backend routes the client network via the return router.
pub struct ViaRouter<'a> {
    lab: &'a Lab,
}

impl<'a> ViaRouter<'a> {
    pub fn new(lab: &'a Lab) -> Result<ViaRouter<'a>> {
        // The guard exists first: a half-made switch is undone too.
        let me = ViaRouter { lab };
        lab.route_clients_via_router(true)
            .context("routing the backends' replies via the return router")?;
        Ok(me)
    }
}

impl Drop for ViaRouter<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.lab.route_clients_via_router(false) {
            eprintln!("zdd-bench: routing the backends' replies via the edge again: {e:#}");
        }
    }
}

/// Errors unless every backend's replies to the client go the expected way.
pub fn expect_return_via_router(lab: &Lab, via_router: bool) -> Result<()> {
    for b in lab.backends() {
        let now = lab.clients_routed_via_router(&b.name)?;
        ensure!(
            now == via_router,
            "{} routes replies to the client via the {}, expected via the {}",
            b.name,
            if now { "return router" } else { "edge" },
            if via_router { "return router" } else { "edge" },
        );
    }
    Ok(())
}

/// Frames received by the interface (from `/proc/net/dev` in the node's namespace).
pub fn rx_frames(lab: &Lab, node: Node, iface: &str) -> Result<u64> {
    let out = lab.exec(node, &["cat", "/proc/net/dev"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == iface).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
        })
        .with_context(|| format!("no {iface} in /proc/net/dev of {}", lab.ns_name(node)))
}

/// Frames the edge host got from the backends' side, and frames the return router got from it.
#[derive(Debug, Clone, Copy)]
pub struct ReturnFrames {
    pub edge: u64,
    pub router: u64,
}

impl ReturnFrames {
    pub fn read(lab: &Lab) -> Result<ReturnFrames> {
        Ok(ReturnFrames {
            edge: rx_frames(lab, Node::Edge, lab.edge_backend_iface())?,
            router: rx_frames(lab, Node::Router, "eth0")?,
        })
    }

    pub fn since(self, before: ReturnFrames) -> ReturnFrames {
        ReturnFrames {
            edge: self.edge - before.edge,
            router: self.router - before.router,
        }
    }
}
