//! The rolling update's pure parts: the batch size and the batches.

use crate::state::ServiceSpec;

/// A rolling update's batch size, as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    /// Backends per batch (at least 1).
    Count(usize),
    /// A whole percentage of the service's backends, 1..=100, rounded up.
    Percent(u32),
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batch::Count(n) => write!(f, "{n}"),
            Batch::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Batch {
    /// `"2"` or `"25%"` (the CLI checks it so before sending, the agent again).
    pub fn parse(s: &str) -> Result<Batch, String> {
        let t = s.trim();
        let (num, pct) = match t.strip_suffix('%') {
            Some(n) => (n, true),
            None => (t, false),
        };
        let n = Some(num)
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok());
        match (n, pct) {
            (Some(n @ 1..=100), true) => Ok(Batch::Percent(n)),
            (Some(n @ 1..), false) => Ok(Batch::Count(n as usize)),
            _ => Err(format!(
                "{t:?}: a batch is a number of backends, at least 1 (`2`), or a whole \
                 percentage of the service's backends, 1% to 100% (`25%`)"
            )),
        }
    }

    /// Backends per batch out of `total` (at least 1, at most all).
    pub fn size(self, total: usize) -> usize {
        let n = match self {
            Batch::Count(n) => n,
            Batch::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.clamp(1, total.max(1))
    }
}

/// The service's backends in batches of `size`, in the config's order.
pub fn batches(spec: &ServiceSpec, size: usize) -> Vec<Vec<String>> {
    spec.backends
        .chunks(size.max(1))
        .map(|c| c.iter().map(|b| b.name.clone()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendSpec, CanarySpec, Forwarding, HealthKind, HealthSpec, Protocol};

    fn spec(n: usize) -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            vip: "10.0.100.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Nat,
            client_affinity: false,
            split: vec![("blue".into(), 10_000)],
            backends: (0..n)
                .map(|i| BackendSpec {
                    name: format!("blue-{}", i + 1),
                    addr: format!("10.0.2.{}:8080", 11 + i).parse().unwrap(),
                    group: "blue".into(),
                    weight: 100,
                })
                .collect(),
            pins: vec![],
            health: HealthSpec::defaults(HealthKind::None, Protocol::Tcp),
            cohorts: vec![],
            analysis: vec![],
            canary: CanarySpec::default(),
        }
    }

    #[test]
    fn batch_sizes() {
        let size = |s: &str, total| Batch::parse(s).map(|b| b.size(total));
        assert_eq!(size("1", 4), Ok(1));
        assert_eq!(size("25%", 4), Ok(1));
        assert_eq!(size("30%", 4), Ok(2));
        assert_eq!(size("9", 4), Ok(4));
        assert!(size("0", 4).is_err());
        assert!(size("0%", 4).is_err());
        assert!(size("x", 4).unwrap_err().contains("a number of backends"));
        assert_eq!(Batch::parse(" 25% ").unwrap().to_string(), "25%");
    }

    #[test]
    fn batches_and_starvation() {
        let s = spec(4);
        let b = batches(&s, 3);
        assert_eq!(
            b,
            vec![
                vec!["blue-1".to_string(), "blue-2".into(), "blue-3".into()],
                vec!["blue-4".to_string()]
            ]
        );
        assert!(s.groups_starved_without(&b[0], &|_| false).is_empty());
        // blue-4 down: draining the first batch would leave blue nothing.
        assert_eq!(
            s.groups_starved_without(&b[0], &|n| n == "blue-4"),
            vec!["blue"]
        );
        let all = batches(&s, 4);
        assert_eq!(s.groups_starved_without(&all[0], &|_| false), vec!["blue"]);
    }
}
