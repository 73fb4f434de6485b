//! W6 in-process: producer -> map +1 -> map *2 -> summing consumer, all inline and with
//! threads(4) on the two middle stages, against a hand-written chain of 4 threads joined by
//! crossbeam bounded(1000) channels doing the same work. Each minigun variant runs with
//! chaining (the default: the middle stages and the consumer run on one thread, see
//! `Pipeline::chaining`) and without it (one queue and one thread per stage, as before).
//!
//! Two floors, written by hand, show where the limit is: the cheapest version of the same
//! pipeline that keeps what minigun must keep (the producer's own thread, since its code may
//! wait between emits, joined by a bounded channel to one thread that runs the three other
//! stages' code item by item; the channel moves runs of [`RUN`] items, with room for about
//! the same 1000 items as a minigun queue), and the whole pipeline fused into one loop on one
//! thread (an upper bound: no hand-over at all). Both run the same per-item code as the
//! minigun stages, the consumer's atomic add included. Every minigun row notes its ratio to
//! the first floor.

use crate::common::{best_of_pair, progress, timed, Cfg, Row};
use minigun::{Exec, Pipeline};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn minigun_run(items: u64, exec: Exec, chaining: bool) -> (Duration, u64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new("w6");
    p.chaining(chaining);
    p.producer("gen", move |out| {
        for i in 0..items {
            out.emit(i)?;
        }
        Ok(())
    });
    p.map("inc", |x: u64| Ok(x + 1)).executor(exec.clone());
    p.map("double", |x: u64| Ok(x * 2)).executor(exec);
    p.consumer("sum", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W6 pipeline runs"));
    assert_eq!(report.consumed, items, "W6: every item consumed");
    (wall, sum.load(Ordering::Relaxed))
}

fn chain_run(items: u64) -> (Duration, u64) {
    timed(|| {
        let (tx1, rx1) = crossbeam_channel::bounded::<u64>(1000);
        let (tx2, rx2) = crossbeam_channel::bounded::<u64>(1000);
        let (tx3, rx3) = crossbeam_channel::bounded::<u64>(1000);
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 0..items {
                    tx1.send(i).expect("send");
                }
            });
            s.spawn(move || {
                for x in rx1 {
                    tx2.send(x + 1).expect("send");
                }
            });
            s.spawn(move || {
                for x in rx2 {
                    tx3.send(x * 2).expect("send");
                }
            });
            s.spawn(move || rx3.iter().sum::<u64>())
                .join()
                .expect("sum thread")
        })
    })
}

/// Items per run in the two-thread floor.
const RUN: usize = 128;

/// The floor that keeps the producer on its own thread: runs of `RUN` items over a
/// crossbeam bounded channel (room for `1000 / RUN` runs) to one thread doing both maps and
/// the sum, item by item.
fn runs_floor(items: u64) -> (Duration, u64) {
    let sum = AtomicU64::new(0);
    let wall = timed(|| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u64>>(1000 / RUN);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut run = Vec::with_capacity(RUN);
                for i in 0..items {
                    run.push(i);
                    if run.len() == RUN {
                        let full = std::mem::replace(&mut run, Vec::with_capacity(RUN));
                        tx.send(full).expect("send");
                    }
                }
                if !run.is_empty() {
                    tx.send(run).expect("send");
                }
            });
            let sum = &sum;
            s.spawn(move || {
                for run in rx {
                    for x in run {
                        let y = std::hint::black_box(x + 1) * 2;
                        sum.fetch_add(y, Ordering::Relaxed);
                    }
                }
            });
        })
    })
    .0;
    (wall, sum.load(Ordering::Relaxed))
}

/// The whole pipeline as one loop on one thread.
fn fused_floor(items: u64) -> (Duration, u64) {
    let sum = AtomicU64::new(0);
    let wall = timed(|| {
        for i in 0..items {
            let y = std::hint::black_box(i + 1) * 2;
            sum.fetch_add(y, Ordering::Relaxed);
        }
    })
    .0;
    (wall, sum.load(Ordering::Relaxed))
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let items: u64 = cfg.size(1_000_000, 200_000);
    // sum of 2(x+1) for x in 0..n = n(n-1) + 2n
    let expect = items * (items - 1) + 2 * items;
    let mut rows = Vec::new();
    let mut chain_best: Option<Duration> = None;
    let mut ours = Vec::new();
    for (exec, workers, chaining, variant) in [
        (Exec::inline(), 1, true, "all stages inline"),
        (Exec::inline(), 1, false, "all stages inline, chaining off"),
        (Exec::threads(4), 4, true, "threads(4) on the middle stages"),
        (Exec::threads(4), 4, false, "threads(4), chaining off"),
    ] {
        progress(format!(
            "W6 hand-written crossbeam chain and minigun {variant}, alternately"
        ));
        let name = exec.to_string();
        let ((chain_wall, chain_sum), (wall, sum)) = best_of_pair(
            cfg.reps,
            || chain_run(items),
            || minigun_run(items, exec.clone(), chaining),
        );
        assert_eq!(chain_sum, expect, "W6 chain: wrong sum");
        assert_eq!(sum, expect, "W6 minigun: wrong sum");
        chain_best = Some(chain_best.map_or(chain_wall, |b| b.min(chain_wall)));
        ours.push((name, workers, variant, wall));
    }
    let mut floors = Vec::new();
    for (name, workers, variant, floor) in [
        (
            "runs-2-threads",
            2,
            "floor: producer thread, runs of 128 to one thread",
            runs_floor as fn(u64) -> (Duration, u64),
        ),
        (
            "fused-loop",
            1,
            "floor: one fused loop, one thread",
            fused_floor,
        ),
    ] {
        progress(format!(
            "W6 hand-written crossbeam chain and the {name} floor, alternately"
        ));
        let ((chain_wall, chain_sum), (wall, sum)) =
            best_of_pair(cfg.reps, || chain_run(items), || floor(items));
        assert_eq!((chain_sum, sum), (expect, expect), "W6 {name}: wrong sum");
        chain_best = Some(chain_best.map_or(chain_wall, |b| b.min(chain_wall)));
        floors.push((name, workers, variant, wall));
    }
    let chain_wall = chain_best.expect("measured");
    let base = Row::new("W6", "baseline", "crossbeam-chain", 4, items, chain_wall)
        .variant("4 threads, bounded(1000)");
    let floor = base.items_per_sec;
    rows.push(base);
    let runs_floor = items as f64 / floors[0].3.as_secs_f64();
    for (name, workers, variant, wall) in floors {
        rows.push(
            Row::new("W6", "baseline", name, workers, items, wall)
                .variant(variant)
                .floor(floor),
        );
    }
    for (name, workers, variant, wall) in ours {
        let row = Row::new("W6", "minigun", name, workers, items, wall)
            .variant(variant)
            .floor(floor);
        let of_floor = row.items_per_sec / runs_floor;
        rows.push(row.note(format!("{of_floor:.3}x the runs-2-threads floor")));
    }
    rows
}
