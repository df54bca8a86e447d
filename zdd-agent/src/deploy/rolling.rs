//! The rolling update's pure parts: the batch size and the batches.

use crate::state::ServiceSpec;

/// `"2"` (backends per batch) or `"25%"` (of `total`, rounded up, at least 1).
pub fn batch_size(spec: &str, total: usize) -> Result<usize, String> {
    let s = spec.trim();
    let n = if let Some(p) = s.strip_suffix('%') {
        let pct: f64 = p.trim().parse().map_err(|_| {
            format!("--batch {spec:?}: a number of backends (2) or a percentage (25%)")
        })?;
        if !pct.is_finite() || pct <= 0.0 || pct > 100.0 {
            return Err(format!(
                "--batch {spec:?}: a percentage above 0 and at most 100"
            ));
        }
        ((total as f64 * pct / 100.0).ceil() as usize).max(1)
    } else {
        let n: usize = s.parse().map_err(|_| {
            format!("--batch {spec:?}: a number of backends (2) or a percentage (25%)")
        })?;
        if n == 0 {
            return Err("--batch 0: at least one backend per batch".into());
        }
        n
    };
    Ok(n.min(total.max(1)))
}

/// The service's backends in batches of `size`, in the config's order.
pub fn batches(spec: &ServiceSpec, size: usize) -> Vec<Vec<String>> {
    spec.backends
        .chunks(size.max(1))
        .map(|c| c.iter().map(|b| b.name.clone()).collect())
        .collect()
}

/// Groups that get new flows (a share or a pin) and would have no backend taking them while
/// `batch` is drained (backends already drained, at weight 0, or in `unavailable` count as
/// not taking them).
pub fn starved_groups(
    spec: &ServiceSpec,
    batch: &[String],
    unavailable: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for g in spec.groups() {
        let share = spec.split.iter().any(|(x, b)| *x == g && *b > 0);
        let pinned = spec.pins.iter().any(|p| p.group == g);
        if !(share || pinned) {
            continue;
        }
        let left = spec.backends.iter().any(|b| {
            b.group == g && b.weight > 0 && !batch.contains(&b.name) && !unavailable(&b.name)
        });
        if !left {
            out.push(g);
        }
    }
    out
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
        assert_eq!(batch_size("1", 4), Ok(1));
        assert_eq!(batch_size("25%", 4), Ok(1));
        assert_eq!(batch_size("30%", 4), Ok(2));
        assert_eq!(batch_size("9", 4), Ok(4));
        assert!(batch_size("0", 4).is_err());
        assert!(batch_size("0%", 4).is_err());
        assert!(
            batch_size("x", 4)
                .unwrap_err()
                .contains("a number of backends")
        );
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
        assert!(starved_groups(&s, &b[0], &|_| false).is_empty());
        // blue-4 down: draining the first batch would leave blue nothing.
        assert_eq!(starved_groups(&s, &b[0], &|n| n == "blue-4"), vec!["blue"]);
        let all = batches(&s, 4);
        assert_eq!(starved_groups(&s, &all[0], &|_| false), vec!["blue"]);
    }
}
