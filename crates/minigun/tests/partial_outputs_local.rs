//! An item's outputs count only if the item succeeds, under the in-process executors as under
//! the fork executors (`tests/partial_outputs.rs`): the outputs (and routed items) of an
//! attempt that returned an error or panicked never reach a downstream stage. So a retried
//! item delivers what its successful attempt emitted, once, and a skipped or dead-lettered
//! item delivers nothing. An item whose `Clone` panics (when the policy keeps it for a retry
//! or a dead letter) fails itself, not the item before it.
mod common;
use common::Sink;
use minigun::{Exec, Failed, FailureKind, OnError, Output, Pipeline, RunReport};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

const N: u64 = 40;
const BAD: u64 = 5;
/// Outputs per item (the first of them routed to "side").
const OUTS: u32 = 3;

/// What the bad item does: fail on its first attempt only, on every attempt, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    Once,
    Always,
    Never,
}

/// What the consumers got (sorted, and in arrival order), the dead letters, the report.
struct Got {
    main: Vec<(u64, u32)>,
    main_in_order: Vec<(u64, u32)>,
    side: Vec<u64>,
    dead: Vec<u64>,
    report: RunReport,
}

/// `N` items through "work" under `exec` with `policy`: each item routes `(x, 0)` to "side"
/// and emits `(x, 1)`, `(x, 2)`; item `BAD` then ends its attempt with `end` (an `Error`
/// or a `Panic`; once or always).
fn run(exec: Exec, policy: OnError, dead_letter: bool, end: FailureKind, bad: Bad) -> Got {
    let panics = end == FailureKind::Panic;
    let p = Pipeline::new("partial-local");
    common::gen(&p, N);
    let attempts = Arc::new(AtomicU32::new(0));
    let s = p
        .processor("work", move |x: u64, out: &mut Output<'_, (u64, u32)>| {
            out.to("side", x)?;
            for k in 1..OUTS {
                out.emit((x, k))?;
            }
            let first = x == BAD && attempts.fetch_add(1, Ordering::SeqCst) == 0;
            if x == BAD && (first && bad == Bad::Once || bad == Bad::Always) {
                if panics {
                    panic!("item five panics after its outputs");
                }
                return Err("item five fails after its outputs".into());
            }
            Ok(())
        })
        .executor(exec)
        .on_error(policy);
    let main: Sink<(u64, u32)> = Sink::default();
    let m = main.clone();
    p.consumer("collect", move |o: (u64, u32)| {
        m.push(o);
        Ok(())
    });
    let side: Sink<u64> = Sink::default();
    let sd = side.clone();
    let side_stage = p.consumer("side", move |x: u64| {
        sd.push(x);
        Ok(())
    });
    s.routes_to(&side_stage);
    let dead: Sink<u64> = Sink::default();
    if dead_letter {
        let d = dead.clone();
        let dl = p.consumer("dead", move |f: Failed<u64>| {
            d.push(f.item);
            Ok(())
        });
        s.dead_letter(&dl);
    }
    let report = common::run_bounded(p).expect("the run succeeds");
    let main_in_order = main.0.lock().unwrap().clone();
    Got {
        main: main.sorted(),
        main_in_order,
        side: side.sorted(),
        dead: dead.sorted(),
        report,
    }
}

/// Every emitted `(item, k)` of the items in `items`.
fn outputs_of(items: impl Iterator<Item = u64>) -> Vec<(u64, u32)> {
    items.flat_map(|x| (1..OUTS).map(move |k| (x, k))).collect()
}

/// The bad item fails once and is retried: each of its outputs arrives exactly once.
fn retried(exec: Exec, end: FailureKind) {
    let g = run(exec, OnError::retry(2), false, end, Bad::Once);
    assert_eq!(
        g.main,
        outputs_of(0..N),
        "every item's outputs once, the failed attempt's not"
    );
    assert_eq!(g.side, (0..N).collect::<Vec<_>>(), "routed items once each");
    let s = g.report.stage("work").expect("stage in the report");
    assert_eq!((s.retried, s.failed), (1, 0), "{:?}", g.report.failures);
    assert_eq!(s.items_out, N * OUTS as u64, "outputs counted once");
}

/// The bad item fails on every attempt and is skipped (after its retries) or dead-lettered:
/// none of its outputs arrives.
fn dropped(exec: Exec, policy: OnError, end: FailureKind, dead_letter: bool) {
    let g = run(exec, policy, dead_letter, end.clone(), Bad::Always);
    let good = || (0..N).filter(|&x| x != BAD);
    assert_eq!(
        g.main,
        outputs_of(good()),
        "a failed item's outputs do not arrive"
    );
    assert_eq!(g.side, good().collect::<Vec<_>>(), "nor its routed items");
    let s = g.report.stage("work").expect("stage in the report");
    assert_eq!(s.failed, 1, "{:?}", g.report.failures);
    assert_eq!(s.items_out, (N - 1) * OUTS as u64);
    assert_eq!(g.report.failures.len(), 1, "{:?}", g.report.failures);
    assert_eq!(g.report.failures[0].kind, end);
    match dead_letter {
        true => assert_eq!(g.dead, vec![BAD], "the failed item is dead-lettered"),
        false => assert!(g.dead.is_empty()),
    }
}

/// Items that all succeed deliver everything, each item's outputs in their order (and, with
/// one worker or in input order, every output in input order).
fn all_succeed(exec: Exec, in_order: bool) {
    let g = run(
        exec,
        OnError::retry(2),
        true,
        FailureKind::Error,
        Bad::Never,
    );
    assert_eq!(g.main, outputs_of(0..N));
    assert_eq!(g.side, (0..N).collect::<Vec<_>>());
    assert!(g.report.failures.is_empty(), "{:?}", g.report.failures);
    for x in 0..N {
        let ks: Vec<u32> = (g.main_in_order.iter())
            .filter(|o| o.0 == x)
            .map(|o| o.1)
            .collect();
        assert_eq!(
            ks,
            (1..OUTS).collect::<Vec<_>>(),
            "item {x}'s outputs in order"
        );
    }
    if in_order {
        assert_eq!(g.main_in_order, outputs_of(0..N), "in input order");
    }
}

macro_rules! per_exec {
    ($($name:ident => $exec:expr, $one:expr;)*) => {$(
        mod $name {
            use super::*;
            #[test]
            fn error_then_retried_delivers_once() {
                retried($exec, FailureKind::Error);
            }
            #[test]
            fn panic_then_retried_delivers_once() {
                retried($exec, FailureKind::Panic);
            }
            #[test]
            fn error_on_every_attempt_delivers_nothing() {
                dropped($exec, OnError::retry(2), FailureKind::Error, false);
            }
            #[test]
            fn error_and_skipped_delivers_nothing() {
                dropped($exec, OnError::skip(), FailureKind::Error, false);
            }
            #[test]
            fn panic_and_skipped_delivers_nothing() {
                dropped($exec, OnError::skip(), FailureKind::Panic, false);
            }
            #[test]
            fn error_and_dead_lettered_delivers_nothing() {
                dropped($exec, OnError::skip(), FailureKind::Error, true);
            }
            #[test]
            fn panic_and_dead_lettered_after_retries_delivers_nothing() {
                dropped($exec, OnError::retry(1), FailureKind::Panic, true);
            }
            #[test]
            fn items_that_succeed_deliver_everything_in_order() {
                all_succeed($exec, $one);
            }
        }
    )*};
}

per_exec! {
    inline => Exec::inline(), true;
    threads => Exec::threads(2), false;
}

/// `threads(2)` keeping input order (`collect_ordered`): item `BAD` emits, then fails (once
/// under `retry(2)`, always under skip); returns what was collected.
fn ordered(policy: OnError, bad: Bad) -> (Vec<(u64, u32)>, RunReport) {
    let p = Pipeline::new("partial-ordered");
    common::gen(&p, N);
    let attempts = Arc::new(AtomicU32::new(0));
    p.processor("work", move |x: u64, out: &mut Output<'_, (u64, u32)>| {
        for k in 1..OUTS {
            out.emit((x, k))?;
        }
        let first = x == BAD && attempts.fetch_add(1, Ordering::SeqCst) == 0;
        if x == BAD && (first && bad == Bad::Once || bad == Bad::Always) {
            return Err("item five fails after its outputs".into());
        }
        Ok(())
    })
    .executor(Exec::threads(2))
    .on_error(policy);
    let got = p.collect_ordered::<(u64, u32)>().expect("the run succeeds");
    (got.items, got.report)
}

#[test]
fn threads_in_input_order_error_then_retried_delivers_once_in_order() {
    let (items, r) = ordered(OnError::retry(2), Bad::Once);
    assert_eq!(items, outputs_of(0..N), "each output once, in input order");
    assert_eq!(r.stage("work").unwrap().retried, 1);
}

#[test]
fn threads_in_input_order_error_and_skipped_delivers_nothing() {
    let (items, r) = ordered(OnError::skip(), Bad::Always);
    assert_eq!(items, outputs_of((0..N).filter(|&x| x != BAD)));
    assert_eq!(r.stage("work").unwrap().failed, 1);
}

/// An item whose `Clone` panics (for one value): the policy clones each item it may need
/// again (a retry, a dead letter).
#[derive(Debug)]
struct Touchy(u64);

impl Clone for Touchy {
    fn clone(&self) -> Self {
        if self.0 == BAD {
            panic!("item {} cannot be cloned", self.0);
        }
        Touchy(self.0)
    }
}

/// `N` items, as `Touchy`, through "work" (`x -> x * 10`) under `exec`, retry(1) and a
/// dead-letter stage, optionally chained to its upstream (both inline). The item whose clone
/// panics fails itself, with the clone's panic: no other item is retried or dead-lettered for
/// it, and every other item's output arrives once.
fn clone_panics(exec: Exec, inline: bool, chained: bool) {
    let p = Pipeline::new("touchy");
    common::gen(&p, N);
    let up = p.map("wrap", |x: u64| Ok(Touchy(x)));
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let s = p
        .processor("work", move |t: Touchy, out: &mut Output<'_, u64>| {
            c.fetch_add(1, Ordering::SeqCst);
            out.emit(t.0 * 10)?;
            Ok(())
        })
        .executor(exec.clone())
        .on_error(OnError::retry(1));
    if !chained {
        // A queue between them: the threads(2) of "work" are not chained anyway.
        up.executor(Exec::threads(1));
    }
    let got: Sink<u64> = Sink::default();
    let g = got.clone();
    p.consumer("collect", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let dead: Sink<u64> = Sink::default();
    let d = dead.clone();
    let dl = p.consumer("dead", move |f: Failed<Touchy>| {
        d.push(f.item.0);
        Ok(())
    });
    s.dead_letter(&dl);
    let report = common::run_bounded(p).expect("the run succeeds");
    let want: Vec<u64> = (0..N).filter(|&x| x != BAD).map(|x| x * 10).collect();
    assert_eq!(got.sorted(), want, "every other item's output, once");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        N as u32 - 1,
        "no item was processed again for the one whose clone panicked"
    );
    let w = report.stage("work").expect("stage in the report");
    assert_eq!((w.failed, w.dead_lettered), (1, 1), "{:?}", report.failures);
    let f = &report.failures[..];
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind, FailureKind::Panic, "{f:?}");
    assert!(f[0].message.contains("item 5 cannot be cloned"), "{f:?}");
    if inline {
        assert_eq!(f[0].item, Some(BAD), "blamed on its own index: {f:?}");
    }
    assert_eq!(dead.sorted(), vec![BAD], "the item itself is dead-lettered");
}

#[test]
fn inline_an_item_whose_clone_panics_is_blamed_for_it() {
    clone_panics(Exec::inline(), true, false);
}

#[test]
fn inline_chained_an_item_whose_clone_panics_is_blamed_for_it() {
    clone_panics(Exec::inline(), true, true);
}

#[test]
fn threads_an_item_whose_clone_panics_is_blamed_for_it() {
    clone_panics(Exec::threads(2), false, false);
}

/// The same under `threads(2)` keeping input order (items guarded one by one): the item
/// whose clone panics fails itself (retried, then skipped) and the worker goes on.
#[test]
fn threads_in_input_order_an_item_whose_clone_panics_is_blamed_for_it() {
    let p = Pipeline::new("touchy-ordered");
    common::gen(&p, N);
    p.map("wrap", |x: u64| Ok(Touchy(x)));
    p.processor("work", |t: Touchy, out: &mut Output<'_, u64>| {
        out.emit(t.0 * 10)?;
        Ok(())
    })
    .executor(Exec::threads(2))
    .on_error(OnError::retry(1));
    let got = p.collect_ordered::<u64>().expect("the run succeeds");
    let want: Vec<u64> = (0..N).filter(|&x| x != BAD).map(|x| x * 10).collect();
    assert_eq!(got.items, want, "every other item's output, once, in order");
    let f = &got.report.failures[..];
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(
        (f[0].kind.clone(), f[0].attempt),
        (FailureKind::Panic, 2),
        "{f:?}"
    );
    assert!(f[0].message.contains("item 5 cannot be cloned"), "{f:?}");
}

/// Items that each emit more than a held list takes (256), so a fast run flushes after every
/// good item and its attempt begins again after each flush; every 7th fails after its
/// outputs, right after such a flush: exactly the good items' outputs arrive, under `exec`
/// (chained to the consumer unless `chaining` is off).
fn many_outputs_between_flushes(exec: Exec, chaining: bool) {
    const ITEMS: u64 = 60;
    const EACH: u32 = 300;
    let bad = |x: u64| x % 7 == 3;
    let p = Pipeline::new("partial-flushes");
    p.chaining(chaining);
    common::gen(&p, ITEMS);
    p.processor("work", move |x: u64, out: &mut Output<'_, (u64, u32)>| {
        for k in 0..EACH {
            out.emit((x, k))?;
        }
        match bad(x) {
            true => Err("fails after its outputs".into()),
            false => Ok(()),
        }
    })
    .executor(exec.clone())
    .on_error(OnError::skip());
    let got: Sink<(u64, u32)> = Sink::default();
    let g = got.clone();
    // The consumer runs as the processor does, so the two chain (same thread count).
    p.consumer("collect", move |o: (u64, u32)| {
        g.push(o);
        Ok(())
    })
    .executor(exec);
    let report = common::run_bounded(p).expect("the run succeeds");
    let want: Vec<(u64, u32)> = (0..ITEMS)
        .filter(|&x| !bad(x))
        .flat_map(|x| (0..EACH).map(move |k| (x, k)))
        .collect();
    assert_eq!(got.sorted(), want, "the good items' outputs, once each");
    let s = report.stage("work").expect("stage in the report");
    let failed = (0..ITEMS).filter(|&x| bad(x)).count() as u64;
    assert_eq!(s.failed, failed, "{:?}", report.failures);
    assert_eq!(
        s.items_out,
        want.len() as u64,
        "only the good items' outputs counted"
    );
    let chained = report.stage("collect").and_then(|c| c.chained_to.clone());
    assert_eq!(chained.is_some(), chaining, "{chained:?}");
}

#[test]
fn inline_chained_many_outputs_between_flushes_drop_only_the_failed_items() {
    many_outputs_between_flushes(Exec::inline(), true);
}

#[test]
fn inline_many_outputs_between_flushes_drop_only_the_failed_items() {
    many_outputs_between_flushes(Exec::inline(), false);
}

#[test]
fn threads_many_outputs_between_flushes_drop_only_the_failed_items() {
    many_outputs_between_flushes(Exec::threads(2), true);
}

/// `N` items under `exec`, each emitting two `Touchy` outputs to two consumers (a broadcast,
/// which clones each output for the first); item `BAD`'s second output is `Touchy(BAD)`,
/// whose clone panics in the middle of the broadcast. That item fails alone (skipped), and
/// each consumer gets every other item's outputs, once: none of the failed item's, and none
/// of the item before it lost.
fn broadcast_clone_panics(exec: Exec) {
    let p = Pipeline::new("touchy-broadcast");
    common::gen(&p, N);
    let work = p
        .processor("work", |x: u64, out: &mut Output<'_, Touchy>| {
            out.emit(Touchy(1000 + 2 * x))?;
            out.emit(Touchy(if x == BAD { BAD } else { 1001 + 2 * x }))?;
            Ok(())
        })
        .executor(exec.clone())
        .on_error(OnError::skip());
    let sinks: [Sink<u64>; 2] = Default::default();
    for (name, sink) in ["left", "right"].into_iter().zip(&sinks) {
        let s = sink.clone();
        p.consumer(name, move |t: Touchy| {
            s.push(t.0);
            Ok(())
        })
        .from(&work);
    }
    let report = common::run_bounded(p).expect("the run succeeds");
    let want: Vec<u64> = (0..N)
        .filter(|&x| x != BAD)
        .flat_map(|x| [1000 + 2 * x, 1001 + 2 * x])
        .collect();
    for (name, sink) in ["left", "right"].into_iter().zip(&sinks) {
        assert_eq!(
            sink.sorted(),
            want,
            "{exec:?}: {name} got every other item's outputs once"
        );
    }
    let w = report.stage("work").expect("stage in the report");
    assert_eq!(
        (w.failed, w.items_out),
        (1, 2 * (N - 1)),
        "{:?}",
        report.failures
    );
    assert_eq!(report.failures[0].kind, FailureKind::Panic);
}

#[test]
fn inline_a_broadcast_output_whose_clone_panics_fails_its_item_alone() {
    broadcast_clone_panics(Exec::inline());
}

#[test]
fn threads_a_broadcast_output_whose_clone_panics_fails_its_item_alone() {
    broadcast_clone_panics(Exec::threads(2));
}
