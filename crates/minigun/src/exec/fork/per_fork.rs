//! How many items a cow_fork child is given: a fixed `items_per_fork`, or the automatic
//! setting, which shares a fork's cost over as many items as it takes to make that cost a
//! small part of a child's life.
//!
//! The automatic setting measures, per child, its **overhead** (from the fork call to the
//! reaped exit, minus the time its items ran, as seen from the parent: the fork itself, the
//! child's start and exit) and the **time per item**, both as running averages, and gives the
//! next child `ceil(OVERHEAD_SHARE⁻¹ · overhead / item time)` items, within `1..=max`.
//! Children start with one item each until a first child has been measured. It never waits
//! for items that are not ready.
//!
//! What more items per child change is stated in
//! [`Exec::items_per_fork_auto`](crate::Exec::items_per_fork_auto): the stage instance and `after_fork` hooks are per child;
//! when a child dies, the item it was running fails and the ones after it run again in a new
//! child, their attempt not counted.

use std::time::Duration;

/// A fork's overhead is held to about this share of a child's life.
const OVERHEAD_SHARE: f64 = 0.1;

/// Weight of the newest measurement in the running averages.
const NEWEST: f64 = 0.25;

#[derive(Debug, Clone)]
pub(super) struct PerFork {
    /// The fixed count, or the automatic setting's bound.
    max: usize,
    auto: bool,
    /// Running averages, in nanoseconds (`None` until measured).
    overhead: Option<f64>,
    item: Option<f64>,
}

impl PerFork {
    pub(super) fn new(items_per_fork: usize, auto: bool) -> PerFork {
        PerFork {
            max: items_per_fork.max(1),
            auto,
            overhead: None,
            item: None,
        }
    }

    /// Items for the next child.
    pub(super) fn size(&self) -> usize {
        if !self.auto {
            return self.max;
        }
        match (self.overhead, self.item) {
            (Some(o), Some(i)) => {
                let n = (o / (OVERHEAD_SHARE * i.max(1.0))).ceil();
                (n.min(self.max as f64) as usize).clamp(1, self.max)
            }
            _ => 1,
        }
    }

    /// A child's measurements: its whole life, and the time each of its finished items ran.
    pub(super) fn measured(&mut self, life: Duration, items: &[u64]) {
        if !self.auto || items.is_empty() {
            return;
        }
        let busy: u64 = items.iter().sum();
        let overhead = (life.as_nanos() as u64).saturating_sub(busy) as f64;
        let per_item = busy as f64 / items.len() as f64;
        let mix = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + NEWEST * (new - o)));
        self.overhead = mix(self.overhead, overhead);
        self.item = mix(self.item, per_item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_count_never_changes() {
        let mut p = PerFork::new(4, false);
        p.measured(Duration::from_millis(10), &[1, 1]);
        assert_eq!(p.size(), 4);
        assert_eq!(PerFork::new(0, false).size(), 1, "at least one item");
    }

    #[test]
    fn automatic_starts_at_one_and_follows_the_measurements_within_its_bound() {
        let mut p = PerFork::new(64, true);
        assert_eq!(p.size(), 1, "unmeasured");
        // Cheap items: a 1 ms fork against 10 us items wants 1,000; the bound holds.
        p.measured(Duration::from_micros(1_020), &[10_000, 10_000]);
        assert_eq!(p.size(), 64);
        // Items as long as ten forks: one item per child is enough.
        let mut slow = PerFork::new(64, true);
        slow.measured(Duration::from_millis(11), &[10_000_000]);
        assert_eq!(slow.size(), 1);
        // In between: overhead 1 ms, items 2 ms -> 5 items keep the fork at 10 %.
        let mut mid = PerFork::new(64, true);
        mid.measured(Duration::from_millis(5), &[2_000_000, 2_000_000]);
        assert_eq!(mid.size(), 5);
    }

    #[test]
    fn children_without_finished_items_teach_nothing() {
        let mut p = PerFork::new(8, true);
        p.measured(Duration::from_millis(3), &[]);
        assert_eq!(p.size(), 1);
    }
}
