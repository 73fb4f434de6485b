//! W1 fork overhead: f(x) = 2x in one cow_fork child per item, against the raw
//! fork + pipe write + _exit + read + waitpid loop with the same number of children in flight
//! (in a process that has had a thread, as minigun's always has: see
//! `common::as_after_threads`); the fork_server rows also beside a hand-written fork server.

use crate::common::{as_after_threads, best_of_pair, best_of_three, progress, timed, Cfg, Row};
use crate::raw::{self, Counters};
use minigun::{Exec, Pipeline};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One minigun run: producer -> map (cow_fork(workers)) -> summing consumer.
pub(crate) fn minigun_run(items: u64, workers: usize) -> (Duration, u64) {
    run_on(items, Exec::cow_fork(workers))
}

/// [`minigun_run`] on any executor.
fn run_on(items: u64, exec: Exec) -> (Duration, u64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new("w1");
    p.producer("gen", move |out| {
        for i in 0..items {
            out.emit(i)?;
        }
        Ok(())
    });
    p.map("double", |x: u64| Ok(x * 2)).wire().executor(exec);
    p.consumer("sink", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W1 pipeline runs"));
    assert_eq!(report.consumed, items, "W1: every item consumed");
    assert_eq!(report.failures_total, 0, "W1: no failures");
    (wall, sum.load(Ordering::Relaxed))
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let items = cfg.size(2_000, 300);
    let expect = items * (items - 1);
    let mut rows = Vec::new();
    // Once, for the record: the raw loop in this process before it has had a thread.
    let (single, single_sum) = raw::fork_loop(items, 2, |x| x * 2).expect("raw fork loop");
    assert_eq!(single_sum, expect, "W1 raw: wrong sum");
    let single = items as f64 / single.as_secs_f64();
    as_after_threads();
    for workers in [2usize, 4] {
        progress(format!(
            "W1 raw fork loop ({workers} in flight) and minigun cow_fork({workers}), alternately"
        ));
        let ((raw_wall, (raw_sum, raw_ctr)), (wall, (sum, ctr))) = best_of_pair(
            cfg.reps,
            || {
                let c = Counters::now();
                let (w, s) = raw::fork_loop(items, workers, |x| x * 2).expect("raw fork loop");
                (w, (s, c.since()))
            },
            || {
                let c = Counters::now();
                let (w, s) = minigun_run(items, workers);
                (w, (s, c.since()))
            },
        );
        assert_eq!(raw_sum, expect, "W1 raw: wrong sum");
        assert_eq!(sum, expect, "W1 minigun: wrong sum");
        let mut base = Row::new("W1", "baseline", "raw-fork-loop", workers, items, raw_wall)
            .variant(format!("{workers} in flight"))
            .note(
                "in a process that has had a thread, as every minigun process has (glibc's \
                 multi-threaded fork)",
            );
        if workers == 2 {
            base = base.note(format!(
                "the same loop once at the start, before this process had a thread: \
                 {single:.0} items/s"
            ));
        }
        let floor = base.items_per_sec;
        rows.push(base);
        let ours = |wall| {
            Row::new(
                "W1",
                "minigun",
                format!("cow_fork({workers})"),
                workers,
                items,
                wall,
            )
        };
        rows.push(ours(wall).floor(floor).note(format!(
            "per item: {:.0} us minigun vs {:.0} us raw (wall / items); in the parent \
                 process per item: minigun {}, raw {}",
            wall.as_secs_f64() * 1e6 / items as f64,
            raw_wall.as_secs_f64() * 1e6 / items as f64,
            ctr.per_item(items),
            raw_ctr.per_item(items)
        )));
        // The same stage with its children forked by a fork server, against the raw loop
        // again and a hand-written fork server, alternately (the raw loop of this round is
        // its floor).
        progress(format!(
            "W1 raw fork loop, raw fork server and minigun cow_fork({workers}) fork_server \
             ({workers} in flight), alternately"
        ));
        let ((raw2_wall, raw2_sum), (srv_wall, srv_sum), (served_wall, served_sum)) = best_of_three(
            cfg.reps,
            || raw::fork_loop(items, workers, |x| x * 2).expect("raw fork loop"),
            || raw::fork_server_loop(items, workers, |x| x * 2).expect("raw fork server"),
            || run_on(items, Exec::cow_fork(workers).fork_server()),
        );
        assert_eq!(raw2_sum, expect, "W1 raw: wrong sum");
        assert_eq!(srv_sum, expect, "W1 raw fork server: wrong sum");
        assert_eq!(served_sum, expect, "W1 minigun fork_server: wrong sum");
        let floor2 = items as f64 / raw2_wall.as_secs_f64();
        let srv = items as f64 / srv_wall.as_secs_f64();
        rows.push(
            Row::new(
                "W1",
                "baseline",
                "raw-fork-server",
                workers,
                items,
                srv_wall,
            )
            .variant(format!("{workers} in flight"))
            .note(format!(
                "what minigun's fork_server must do, hand-written (raw::fork_server_loop): \
                     {:.2}x the raw loop measured alternately with it",
                srv / floor2
            )),
        );
        rows.push(
            ours(served_wall)
                .variant("fork_server".to_string())
                .floor(floor2)
                .note(format!(
                    "against the raw loop measured alternately with it ({:.0} items/s); \
                     {:.2}x the hand-written fork server in the same alternation; \
                     {:.2}x cow_fork({workers}) without it in this run",
                    floor2,
                    items as f64 / served_wall.as_secs_f64() / srv,
                    wall.as_secs_f64() / served_wall.as_secs_f64()
                )),
        );
        // The same stage letting cow_fork share forks over these cheap items: not a fork
        // loop any more, so no ratio to one; the gain over one child per item is the point.
        let (auto_wall, auto_sum) = (0..cfg.reps)
            .map(|_| run_on(items, Exec::cow_fork(workers).items_per_fork_auto(AUTO_MAX)))
            .min_by_key(|r| r.0)
            .expect("at least one rep");
        assert_eq!(auto_sum, expect, "W1 minigun auto: wrong sum");
        rows.push(
            ours(auto_wall)
                .variant(format!("items_per_fork_auto({AUTO_MAX})"))
                .note(format!(
                    "{:.1}x one child per item in the same run",
                    wall.as_secs_f64() / auto_wall.as_secs_f64()
                )),
        );
    }
    rows
}

/// The bound of the automatic items per fork in W1.
const AUTO_MAX: usize = 64;
