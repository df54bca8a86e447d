//! Rollbacks that are safe for capacity: each group's healthy capacity while it has all new
//! flows, and a warning when new flows return to a group that has less now.

use super::*;

impl Control {
    /// Remembers each group's healthy capacity while it has all new flows.
    pub(super) fn track_capacity(&mut self) {
        let mut updates = Vec::new();
        for s in &self.live.services {
            for (g, b) in &s.spec.split {
                if *b == zdd_common::SPLIT_BUCKETS {
                    let cap = self.healthy_capacity(&s.spec.name, g);
                    if cap > 0 && s.full_capacity.get(g) != Some(&cap) {
                        updates.push((s.spec.name.clone(), g.clone(), cap));
                    }
                }
            }
        }
        if updates.is_empty() {
            return;
        }
        for (svc, g, cap) in updates {
            if let Some(s) = self.live.services.iter_mut().find(|s| s.spec.name == svc) {
                s.full_capacity.insert(g, cap);
            }
        }
        let _ = self.save();
    }

    /// After new flows moved back to a group (rollback, abort, switch): warns when its
    /// healthy capacity now is below what it had when it last took all new flows, scaled to
    /// its share now. Returns the warning.
    pub(crate) fn check_capacity(
        &mut self,
        service: &str,
        before: &std::collections::BTreeMap<String, u32>,
    ) -> Option<String> {
        let s = self.live.service(service).ok()?.clone();
        let mut warnings = Vec::new();
        for (g, share) in &s.spec.split {
            let was = before.get(g).copied().unwrap_or(0);
            if *share <= was {
                continue;
            }
            let Some(full) = s.full_capacity.get(g).copied() else {
                continue;
            };
            let need = (full as u64 * *share as u64 / zdd_common::SPLIT_BUCKETS as u64) as u32;
            let have = self.healthy_capacity(service, g);
            if have < need {
                warnings.push(format!(
                    "{service}: group {g} now takes {}% of new flows with a healthy capacity of {have} (weights of healthy backends), below the {need} it had for that share when it last served all of them: it may be overloaded; add or restore backends in {g}",
                    *share as f64 / 100.0
                ));
            }
        }
        if warnings.is_empty() {
            return None;
        }
        let m = warnings.join("; ");
        log::warn!("{m}");
        self.record_deploy("capacity_warning", service, m.clone(), Value::Null);
        self.alert(
            "ZddRollbackCapacity",
            true,
            &[
                ("service", service),
                ("severity", "warning"),
                ("reason", "capacity"),
            ],
            m.clone(),
            Some(now_ms() + 3_600_000),
        );
        Some(m)
    }
}
