//! Chaining: which stages run on their upstream's threads, with no queue between them (as
//! Flink chains operators).
//!
//! # The rule
//!
//! A stage `D` is chained to its upstream `U` when all of these hold ([`decide`], a pure
//! function of the facts below, tested exhaustively here):
//!
//! 1. chaining is on: for the pipeline ([`Pipeline::chaining`](crate::Pipeline::chaining),
//!    on by default; the environment variable `MINIGUN_NO_CHAIN` turns it off for every
//!    pipeline of the process) and for both stages
//!    ([`StageRef::chain`](crate::StageRef::chain));
//! 2. `U` is a processor or a custom stage and `D` a processor, consumer or custom stage
//!    (producers are not chained: their code runs for as long as it likes between two
//!    emits, and a chained stage only runs inside an emit, so what it was handed would wait
//!    for the producer's next emit; accumulators batch on their own thread);
//! 3. the edge `U -> D` is `U`'s only output and `D`'s only input: no other static edge
//!    out of `U` or into `D`, no route declared by `U`, no route or dead-letter edge into
//!    `D`, and neither is a member of a routing loop (a loop's termination counts items in
//!    its members' queues);
//! 4. both run in-process on the same number of threads: both `inline`, or both
//!    `threads(n)` with the same `n` (each of `U`'s workers then owns an instance of `D`,
//!    as Flink requires equal parallelism);
//! 5. neither keeps input order across several threads (`threads(n)` collecting in order);
//! 6. `D` has no capacity of its own (a capacity set on a stage asks for its queue).
//!
//! Chains follow: if `D` is chained to `U` and `E` to `D`, all three run on `U`'s threads.
//!
//! # What it changes, and what it keeps
//!
//! A chained stage no longer overlaps with its upstream on another thread: the two share
//! the upstream's threads, and `U`'s emits reach `D` at `U`'s flushes (see `exec::local`).
//! Everything else keeps its meaning: `D`'s items in and out, failures (with its own stage
//! name and item indices), retries, dead letters, latency (`U`'s excludes the time spent in
//! `D`), hooks, `finish` (once per instance, when the upstream worker ends), cancellation
//! on abort; its queue length and high-water mark are 0 (it has no queue) and the report's
//! [`StageReport::chained_to`](crate::StageReport::chained_to) names `U`.

use crate::exec::Exec;
use crate::stage::StageKind;

/// What the rule looks at for one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    pub(crate) kind: StageKind,
    /// In-process workers: 1 for `inline`, `n` for `threads(n)`; `None` for the executors
    /// that cross a process.
    pub(crate) threads: Option<usize>,
    /// Keeps input order across its workers.
    pub(crate) in_order: bool,
    /// Has a capacity of its own.
    pub(crate) own_capacity: bool,
    /// Chaining turned off for this stage.
    pub(crate) opted_out: bool,
    /// Member of a routing loop.
    pub(crate) in_loop: bool,
    /// Declares routes to other stages.
    pub(crate) routes_out: bool,
    /// Fed by a route or a dead-letter edge.
    pub(crate) side_in: bool,
}

impl Facts {
    /// The in-process worker count of an executor.
    pub(crate) fn threads_of(exec: &Exec) -> Option<usize> {
        match exec {
            Exec::Inline => Some(1),
            Exec::Threads(n) => Some((*n).max(1)),
            _ => None,
        }
    }
}

/// For each stage, the upstream it is chained to (`None`: it keeps its queue and threads),
/// given every stage's facts and the static edges of the graph.
pub(crate) fn decide(on: bool, facts: &[Facts], edges: &[(usize, usize)]) -> Vec<Option<usize>> {
    let mut to = vec![None; facts.len()];
    if !on {
        return to;
    }
    let outs = |u: usize| edges.iter().filter(|&&(a, _)| a == u).count();
    let ins = |v: usize| edges.iter().filter(|&&(_, b)| b == v).count();
    for &(u, v) in edges {
        let (a, b) = (&facts[u], &facts[v]);
        let kinds = matches!(a.kind, StageKind::Processor | StageKind::Custom)
            && matches!(
                b.kind,
                StageKind::Processor | StageKind::Consumer | StageKind::Custom
            );
        let only_edge = u != v && outs(u) == 1 && ins(v) == 1 && !a.routes_out && !b.side_in;
        let threads = match (a.threads, b.threads) {
            (Some(n), Some(m)) => n == m,
            _ => false,
        };
        let ordered = |f: &Facts| f.in_order && f.threads.is_some_and(|n| n > 1);
        if kinds
            && only_edge
            && threads
            && !a.in_loop
            && !b.in_loop
            && !ordered(a)
            && !ordered(b)
            && !b.own_capacity
            && !a.opted_out
            && !b.opted_out
        {
            to[v] = Some(u);
        }
    }
    to
}

/// Whether chaining is on for this process (`MINIGUN_NO_CHAIN` unset).
pub(crate) fn enabled_by_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MINIGUN_NO_CHAIN").is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(kind: StageKind, threads: Option<usize>) -> Facts {
        Facts {
            kind,
            threads,
            in_order: false,
            own_capacity: false,
            opted_out: false,
            in_loop: false,
            routes_out: false,
            side_in: false,
        }
    }

    fn processor() -> Facts {
        stage(StageKind::Processor, Some(1))
    }

    /// A chain of stages, each feeding the next.
    fn line(facts: &[Facts]) -> Vec<Option<usize>> {
        let edges: Vec<_> = (1..facts.len()).map(|v| (v - 1, v)).collect();
        decide(true, facts, &edges)
    }

    #[test]
    fn a_line_of_inline_processors_chains_behind_its_producer() {
        let facts = [
            stage(StageKind::Producer, Some(1)),
            processor(),
            processor(),
            stage(StageKind::Consumer, Some(1)),
        ];
        assert_eq!(line(&facts), vec![None, None, Some(1), Some(2)]);
        let edges = [(0, 1), (1, 2), (2, 3)];
        assert_eq!(
            decide(false, &facts, &edges),
            vec![None; 4],
            "the off switch"
        );
    }

    #[test]
    fn every_pair_of_kinds() {
        use StageKind::*;
        let kinds = [Producer, Processor, Accumulator, Consumer, Custom];
        for u in kinds {
            for d in kinds {
                let got = line(&[stage(u, Some(1)), stage(d, Some(1))])[1];
                let want =
                    matches!(u, Processor | Custom) && matches!(d, Processor | Consumer | Custom);
                assert_eq!(got.is_some(), want, "{u:?} -> {d:?}");
            }
        }
    }

    #[test]
    fn only_the_same_in_process_thread_count_chains() {
        let counts = [Some(1), Some(2), Some(4), None];
        for a in counts {
            for b in counts {
                let got = line(&[
                    stage(StageKind::Processor, a),
                    stage(StageKind::Processor, b),
                ])[1];
                assert_eq!(got.is_some(), a.is_some() && a == b, "{a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn each_fact_of_either_stage_that_forbids_it() {
        type Set = fn(&mut Facts);
        let forbid: [(&str, Set, bool, bool); 6] = [
            // (fact, set it, forbids on the upstream, forbids on the downstream)
            ("own capacity", |f| f.own_capacity = true, false, true),
            ("opted out", |f| f.opted_out = true, true, true),
            ("loop member", |f| f.in_loop = true, true, true),
            ("routes out", |f| f.routes_out = true, true, false),
            (
                "route or dead letters in",
                |f| f.side_in = true,
                false,
                true,
            ),
            ("ordered", |f| f.in_order = true, false, false),
        ];
        for (what, set, up, down) in forbid {
            let mut a = [processor(), processor()];
            set(&mut a[0]);
            assert_eq!(line(&a)[1].is_none(), up, "{what} on the upstream");
            let mut b = [processor(), processor()];
            set(&mut b[1]);
            assert_eq!(line(&b)[1].is_none(), down, "{what} on the downstream");
        }
    }

    #[test]
    fn order_across_threads_forbids_it_inline_order_does_not() {
        for n in [1, 3] {
            for side in 0..2 {
                let mut f = [
                    stage(StageKind::Processor, Some(n)),
                    stage(StageKind::Processor, Some(n)),
                ];
                f[side].in_order = true;
                assert_eq!(line(&f)[1].is_some(), n == 1, "threads {n}, side {side}");
            }
        }
    }

    #[test]
    fn fan_out_and_fan_in_keep_their_queues() {
        let p = processor();
        // 0 -> 1, 0 -> 2: fan-out.
        assert_eq!(decide(true, &[p; 3], &[(0, 1), (0, 2)]), vec![None; 3]);
        // 0 -> 2, 1 -> 2: fan-in.
        assert_eq!(decide(true, &[p; 3], &[(0, 2), (1, 2)]), vec![None; 3]);
        // A diamond: 0 -> 1 -> 3, 0 -> 2 -> 3: nothing has a single edge both ways.
        let diamond = [(0, 1), (0, 2), (1, 3), (2, 3)];
        assert_eq!(decide(true, &[p; 4], &diamond), vec![None; 4]);
        // After a fan-in, a single edge chains again: 0 -> 2, 1 -> 2, 2 -> 3.
        let edges = [(0, 2), (1, 2), (2, 3)];
        assert_eq!(
            decide(true, &[p; 4], &edges),
            vec![None, None, None, Some(2)]
        );
    }

    #[test]
    fn a_self_edge_never_chains() {
        assert_eq!(decide(true, &[processor()], &[(0, 0)]), vec![None]);
    }
}
