//! Chaining: stages that run on their upstream's threads with no queue between them (the
//! rule is unit-tested in `link::chain`). Every run here is compared with the same pipeline
//! with chaining off, or with an expectation computed without the library.

mod common;

use minigun::{Exec, Failed, OnError, Output, Pipeline, RunError, RunReport, Stage, StageResult};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// producer -> explode (each x into x % 3 copies of x * 10) -> inc -> collect, under `exec`.
fn shape(exec: Exec, chaining: bool) -> (Vec<u64>, RunReport) {
    let p = Pipeline::new("shape");
    p.chaining(chaining);
    p.producer("gen", |out| out.emit_all(0..2000u64).map_err(Into::into));
    p.processor("explode", |x: u64, out: &mut Output<'_, u64>| {
        for _ in 0..x % 3 {
            out.emit(x * 10)?;
        }
        Ok(())
    })
    .executor(exec.clone());
    p.map("inc", |x: u64| Ok(x + 1)).executor(exec);
    let mut got = p.collect::<u64>().expect("runs");
    got.items.sort_unstable();
    (got.items, got.report)
}

fn expected() -> Vec<u64> {
    let mut v: Vec<u64> = (0..2000u64)
        .flat_map(|x| std::iter::repeat_n(x * 10 + 1, (x % 3) as usize))
        .collect();
    v.sort_unstable();
    v
}

/// A producer "gen" of 0, 1, 2... until the run stops.
fn endless(p: &Pipeline) {
    p.producer("gen", |out| {
        for i in 0u64.. {
            out.emit(i)?;
        }
        Ok(())
    });
}

fn chained_to(r: &RunReport, stage: &str) -> Option<String> {
    r.stage(stage).expect("stage in report").chained_to.clone()
}

#[test]
fn chained_runs_give_what_unchained_runs_give() {
    for exec in [Exec::inline(), Exec::threads(3)] {
        let (on, r_on) = shape(exec.clone(), true);
        let (off, r_off) = shape(exec.clone(), false);
        assert_eq!(on, expected(), "{exec}: chained");
        assert_eq!(off, expected(), "{exec}: unchained");
        // explode -> inc -> collect run as one chain (the collector is inline: it chains
        // only behind inline stages); the producer keeps its thread.
        assert_eq!(chained_to(&r_on, "gen"), None);
        assert_eq!(chained_to(&r_on, "explode"), None);
        assert_eq!(
            chained_to(&r_on, "inc").as_deref(),
            Some("explode"),
            "{exec}"
        );
        let collect = chained_to(&r_on, "collect");
        let threads = exec != Exec::inline();
        assert_eq!(collect.as_deref(), (!threads).then_some("inc"), "{exec}");
        for s in ["gen", "explode", "inc", "collect"] {
            assert_eq!(chained_to(&r_off, s), None, "{exec}: {s} with chaining off");
            let (a, b) = (r_on.stage(s).unwrap(), r_off.stage(s).unwrap());
            assert_eq!(
                (a.items_in, a.items_out, a.failed, a.cancelled),
                (b.items_in, b.items_out, b.failed, b.cancelled),
                "{exec}: {s}"
            );
        }
        // A chained stage has no queue.
        let inc = r_on.stage("inc").unwrap();
        assert_eq!((inc.queue_capacity, inc.queue_high_water), (None, 0));
        assert!(
            r_on.to_string().contains("inc: chained to explode"),
            "{r_on}"
        );
    }
}

#[test]
fn an_ordered_collection_keeps_its_order_chained_inline() {
    let p = Pipeline::new("ordered");
    p.producer("gen", |out| out.emit_all(0..3000u64).map_err(Into::into));
    p.map("a", |x: u64| Ok(x * 3));
    p.map("b", |x: u64| Ok(x + 1));
    let got = p.collect_ordered::<u64>().expect("runs");
    assert_eq!(
        got.items,
        (0..3000u64).map(|x| x * 3 + 1).collect::<Vec<_>>()
    );
    assert_eq!(chained_to(&got.report, "b").as_deref(), Some("a"));
}

#[test]
fn what_the_rule_leaves_apart_keeps_its_queue() {
    let sink = common::Sink::<u64>::default();
    let p = Pipeline::new("apart");
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
    let fan = p.map("fan", |x: u64| Ok(x));
    // Fan-out: two downstreams.
    let left = p.map("left", |x: u64| Ok(x)).from(&fan);
    let right = p.map("right", |x: u64| Ok(x)).from(&fan);
    // Other thread counts, a capacity of its own, an opted-out stage.
    p.map("threads", |x: u64| Ok(x))
        .from(&left)
        .executor(Exec::threads(2));
    let capacity = p
        .map("capacity", |x: u64| Ok(x))
        .from(&right)
        .capacity(minigun::Capacity::Bounded(10));
    let opted = p.map("opted", |x: u64| Ok(x)).from(&capacity).chain(false);
    let s = sink.clone();
    p.consumer("after_opted", move |x: u64| {
        s.push(x);
        Ok(())
    })
    .from(&opted);
    let r = p.run().expect("runs");
    for s in [
        "fan",
        "left",
        "right",
        "threads",
        "capacity",
        "opted",
        "after_opted",
    ] {
        assert_eq!(chained_to(&r, s), None, "{s}");
    }
    assert_eq!(sink.sorted(), (0..100).collect::<Vec<_>>());
}

#[test]
fn a_chained_stage_counts_fails_retries_and_dead_letters_as_itself() {
    for chaining in [true, false] {
        let dead = common::Sink::<(u64, Option<u64>, String)>::default();
        let tries = Arc::new(Mutex::new(std::collections::HashMap::<u64, u32>::new()));
        let p = Pipeline::new("policies");
        p.chaining(chaining);
        p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
        // Each item twice: the chained stage's indices are its own (0..200).
        p.processor("twice", |x: u64, out: &mut Output<'_, u64>| {
            out.emit(x)?;
            Ok(out.emit(x + 1000)?)
        });
        let t = tries.clone();
        let picky = p
            .map("picky", move |x: u64| {
                let mut tries = t.lock().unwrap();
                let n = tries.entry(x).or_insert(0);
                *n += 1;
                match x {
                    // Fails once, then succeeds on the retry.
                    x if x % 10 == 1 && *n == 1 => Err("flaky".into()),
                    // Fails every attempt: dead-lettered after the retry.
                    x if x % 10 == 3 => Err("bad".into()),
                    x => Ok(x),
                }
            })
            .on_error(OnError::retry(1));
        let d = dead.clone();
        let dl = p.consumer("dead", move |f: Failed<u64>| {
            d.push((f.item, f.failure.item, f.failure.stage));
            Ok(())
        });
        picky.dead_letter(&dl);
        p.consumer("sink", |_: u64| Ok(())).from(&picky);
        let r = p.run().expect("runs");
        assert_eq!(
            chained_to(&r, "picky").map(|_| ()),
            chaining.then_some(()),
            "{chaining}"
        );
        let s = r.stage("picky").unwrap();
        // 200 in; 20 flaky (x % 10 == 1) and 20 bad (x % 10 == 3) of them.
        assert_eq!(
            (
                s.items_in,
                s.items_out,
                s.failed,
                s.retried,
                s.dead_lettered
            ),
            (200, 180, 20, 40, 20),
            "chaining {chaining}"
        );
        // The item index of a failure is its place in picky's own input: 0, 1000, 1, 1001...
        let mut want: Vec<(u64, Option<u64>, String)> = (0..100u64)
            .flat_map(|x| [x, x + 1000])
            .zip(0u64..)
            .filter(|(v, _)| v % 10 == 3)
            .map(|(v, i)| (v, Some(i), "picky".to_string()))
            .collect();
        want.sort_unstable();
        assert_eq!(dead.sorted(), want, "chaining {chaining}");
        let failures: Vec<_> = r.failures.iter().filter(|f| f.stage == "picky").collect();
        assert_eq!(failures.len(), 20);
    }
}

#[test]
fn fail_fast_in_a_chained_stage_aborts_with_every_item_accounted_for() {
    for chaining in [true, false] {
        let p = Pipeline::new("fail-fast");
        p.chaining(chaining);
        endless(&p);
        p.map("inc", |x: u64| Ok(x + 1));
        p.consumer("boom", |x: u64| match x {
            5000 => Err("boom".into()),
            _ => Ok(()),
        })
        .on_error(OnError::fail_fast());
        let Err(RunError::Aborted { cause, report }) = p.run() else {
            panic!("the run aborts");
        };
        assert_eq!(cause.stage, "boom");
        assert_eq!(cause.item, Some(4999), "boom's own index of the item 5000");
        let (inc, boom) = (report.stage("inc").unwrap(), report.stage("boom").unwrap());
        assert_eq!(chained_to(&report, "boom").is_some(), chaining);
        assert_eq!(boom.failed, 1);
        // Nothing lost between the stages: what inc emitted, boom received.
        assert_eq!(inc.items_out, boom.items_in, "chaining {chaining}");
        // One inline worker takes items in order: 4999 processed, then the failure, then
        // every later item cancelled.
        let processed = boom.items_in - boom.cancelled - boom.failed;
        assert_eq!(processed, 4999, "chaining {chaining}: {report}");
    }
}

#[test]
fn an_outside_stop_or_cancel_ends_a_chained_run_with_exact_counts() {
    for cancel in [false, true] {
        let seen = Arc::new(AtomicU64::new(0));
        let p = Pipeline::new("stopped");
        p.handle_signals(false);
        endless(&p);
        p.map("inc", |x: u64| Ok(x + 1));
        let s = seen.clone();
        p.consumer("count", move |_: u64| {
            s.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        let h = p.spawn().expect("starts");
        common::wait_until("10,000 items consumed", Duration::from_secs(60), || {
            seen.load(Ordering::Relaxed) >= 10_000
        });
        if cancel {
            h.cancel();
        } else {
            h.stop();
        }
        let report = h.wait().expect("a stopped run reports");
        assert!(report.stopped);
        assert_eq!(chained_to(&report, "count").as_deref(), Some("inc"));
        let (gen, inc, count) = (
            report.stage("gen").unwrap(),
            report.stage("inc").unwrap(),
            report.stage("count").unwrap(),
        );
        assert_eq!(gen.items_out, inc.items_in, "cancel {cancel}: {report}");
        assert_eq!(inc.items_out, count.items_in, "cancel {cancel}: {report}");
        let processed = count.items_in - count.cancelled - count.failed;
        assert_eq!(processed, seen.load(Ordering::Relaxed), "cancel {cancel}");
        if !cancel {
            // A stop lets every emitted item through.
            assert_eq!((inc.cancelled, count.cancelled), (0, 0), "{report}");
        }
    }
}

/// Counts its items and emits the count when it finishes.
struct Counter {
    n: u64,
    finished: Arc<AtomicU64>,
}

impl Stage<u64, u64> for Counter {
    fn process(&mut self, _: u64, _: &mut Output<'_, u64>) -> StageResult {
        self.n += 1;
        Ok(())
    }
    fn finish(&mut self, out: &mut Output<'_, u64>) -> StageResult {
        self.finished.fetch_add(1, Ordering::SeqCst);
        out.emit(self.n)?;
        Ok(())
    }
}

#[test]
fn a_chained_instance_finishes_once_and_its_outputs_arrive() {
    for (exec, instances) in [(Exec::inline(), 1), (Exec::threads(3), 3)] {
        let finished = Arc::new(AtomicU64::new(0));
        let made = Arc::new(AtomicU64::new(0));
        let sink = common::Sink::<u64>::default();
        let p = Pipeline::new("finish");
        p.producer("gen", |out| out.emit_all(0..1000u64).map_err(Into::into));
        p.map("up", |x: u64| Ok(x)).executor(exec.clone());
        let (f, m) = (finished.clone(), made.clone());
        p.stage("count", move || {
            m.fetch_add(1, Ordering::SeqCst);
            Counter {
                n: 0,
                finished: f.clone(),
            }
        })
        .executor(exec.clone());
        sink.consume(&p);
        let r = p.run().expect("runs");
        assert_eq!(chained_to(&r, "count").as_deref(), Some("up"), "{exec}");
        assert_eq!(
            made.load(Ordering::SeqCst),
            instances,
            "{exec}: one per upstream worker"
        );
        assert_eq!(finished.load(Ordering::SeqCst), instances, "{exec}");
        let counts = sink.sorted();
        assert_eq!(counts.len() as u64, instances, "{exec}: {counts:?}");
        assert_eq!(counts.iter().sum::<u64>(), 1000, "{exec}");
        assert_eq!(r.stage("count").unwrap().items_out, instances);
    }
}

#[test]
fn hooks_fire_per_stage_around_its_items() {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let p = Pipeline::new("hooks");
    p.producer("gen", |out| out.emit_all(0..50u64).map_err(Into::into));
    let l = log.clone();
    let up = p.map("up", move |x: u64| {
        l.lock().unwrap().push("up item".into());
        Ok(x)
    });
    let l = log.clone();
    let down = p.consumer("down", move |_: u64| {
        l.lock().unwrap().push("down item".into());
        Ok(())
    });
    let hook = |what: &'static str| {
        let log = log.clone();
        move || {
            log.lock().unwrap().push(what.to_string());
            Ok(())
        }
    };
    up.before(hook("up before")).after(hook("up after"));
    down.before(hook("down before")).after(hook("down after"));
    let r = p.run().expect("runs");
    assert_eq!(chained_to(&r, "down").as_deref(), Some("up"));
    let log = log.lock().unwrap().clone();
    let at = |what: &str| log.iter().position(|l| l == what).expect(what);
    let last = |what: &str| log.iter().rposition(|l| l == what).expect(what);
    for name in ["up", "down"] {
        let count = |w: &str| log.iter().filter(|l| *l == &format!("{name} {w}")).count();
        assert_eq!((count("before"), count("after"), count("item")), (1, 1, 50));
        assert!(at(&format!("{name} before")) < at(&format!("{name} item")));
        assert!(last(&format!("{name} item")) < at(&format!("{name} after")));
    }
}

#[test]
fn the_upstreams_latency_leaves_out_the_chained_stages_work() {
    let p = Pipeline::new("latency");
    p.producer("gen", |out| out.emit_all(0..5u64).map_err(Into::into));
    p.map("quick", |x: u64| Ok(x));
    p.consumer("slow", |_: u64| {
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    });
    let r = p.run().expect("runs");
    assert_eq!(chained_to(&r, "slow").as_deref(), Some("quick"));
    let (quick, slow) = (r.stage("quick").unwrap(), r.stage("slow").unwrap());
    assert_eq!((quick.latency.count, slow.latency.count), (5, 5));
    // A sleep lasts at least as long as asked.
    assert!(slow.latency.p50_us >= 200_000.0, "{r}");
    // The upstream's first item hands its output to the chained stage at once, inside the
    // upstream's call (its timer starts one item long): counted as the upstream's, that item
    // would take the chained stage's whole 200 ms or more. Its own work is a copy, so it is
    // compared with the chained stage's recorded time, not with a clock threshold: only a
    // pause of 100 ms in a copy could fail this.
    assert!(quick.latency.max_us * 2.0 < slow.latency.p50_us, "{r}");
}

#[test]
fn a_panic_in_a_chained_stage_is_its_own_failure() {
    let stop = Arc::new(AtomicBool::new(false));
    let p = Pipeline::new("panics");
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    p.map("up", |x: u64| Ok(x));
    let s = stop.clone();
    p.consumer("down", move |x: u64| {
        if x == 7 {
            s.store(true, Ordering::SeqCst);
            panic!("seven");
        }
        Ok(())
    });
    let r = p.run().expect("runs");
    assert!(stop.load(Ordering::SeqCst));
    assert_eq!(chained_to(&r, "down").as_deref(), Some("up"));
    let f = &r.failures[0];
    assert_eq!((f.stage.as_str(), f.item), ("down", Some(7)));
    assert!(f.message.contains("seven"), "{}", f.message);
    assert_eq!(r.stage("up").unwrap().failed, 0);
    assert_eq!(r.stage("down").unwrap().failed, 1);
}

#[test]
fn live_views_say_which_stage_a_stage_is_chained_to() {
    for chaining in [true, false] {
        let p = Pipeline::new("views");
        p.chaining(chaining);
        p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
        p.map("double", |x: u64| Ok(x * 2));
        p.consumer("sink", |_: u64| Ok(()));
        let handle = p.spawn().expect("build");
        let snap = handle.monitor().snapshot();
        handle.wait().expect("runs");
        let st = |name: &str| snap.stages.iter().find(|s| s.name == name).unwrap().clone();
        let want = chaining.then(|| "double".to_string());
        assert_eq!(st("sink").chained_to, want, "chaining {chaining}");
        assert_eq!(
            st("double").chained_to,
            None,
            "a producer is not chained to"
        );
        // A chained stage has no queue of its own.
        assert_eq!(st("sink").queue_capacity.is_none(), chaining);
    }
}
