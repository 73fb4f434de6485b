//! Runs: a producer's items move into the next queue in runs, and in-process stages attempt
//! items in fast runs under one panic guard. What each item means is kept: an item emitted
//! before the producer waits in its own code still reaches its consumer, the producer's
//! output count moves with every emit, and a failure or a panic inside a run is the item's
//! own (its index, its dead letter, its retry).
mod common;
use minigun::{Exec, Failed, FailureKind, OnError, Output, Pipeline};
use std::sync::mpsc;
use std::time::Duration;

/// How long a test waits for an event that a working engine brings at once.
const LIMIT: Duration = Duration::from_secs(20);

/// The producer emits one item and waits, in its own code, for the consumer to have it:
/// the item must not wait for an emit that never comes.
#[test]
fn an_item_emitted_before_the_producer_waits_reaches_the_consumer() {
    for exec in [Exec::inline(), Exec::threads(2)] {
        let (got_tx, got_rx) = mpsc::channel::<u64>();
        let (seen_tx, seen_rx) = mpsc::channel::<bool>();
        let p = Pipeline::new("one-then-wait");
        p.producer("gen", move |out| {
            out.emit(7u64)?;
            // Still inside the producer's code: the consumer must get the item meanwhile.
            let seen = got_rx.recv_timeout(LIMIT) == Ok(7);
            seen_tx.send(seen).unwrap();
            out.emit(8u64)?;
            Ok(())
        });
        p.consumer("sink", move |x: u64| {
            got_tx.send(x).ok();
            Ok(())
        })
        .executor(exec.clone());
        let report = p.run().unwrap();
        assert!(
            seen_rx.recv().unwrap(),
            "{exec}: the item stayed with the waiting producer"
        );
        assert_eq!(report.stage("sink").unwrap().items_in, 2, "{exec}");
    }
}

/// The consumer is busy when the producer emits (so nobody waits on the queue then), and the
/// producer then waits in its own code: the consumer, done, takes the item from the
/// producer's partial run.
#[test]
fn a_busy_consumer_takes_a_waiting_producers_partial_run() {
    let (emitted_tx, emitted_rx) = mpsc::channel::<()>();
    let (got_tx, got_rx) = mpsc::channel::<u64>();
    let (seen_tx, seen_rx) = mpsc::channel::<bool>();
    let p = Pipeline::new("busy-consumer");
    p.producer("gen", move |out| {
        out.emit(0u64)?;
        // The consumer has item 0 and sits on it until item 1 is emitted.
        let first = got_rx.recv_timeout(LIMIT) == Ok(0);
        out.emit(1u64)?;
        emitted_tx.send(()).unwrap();
        let second = got_rx.recv_timeout(LIMIT) == Ok(1);
        seen_tx.send(first && second).unwrap();
        Ok(())
    });
    let emitted_rx = std::sync::Mutex::new(emitted_rx);
    p.consumer("sink", move |x: u64| {
        got_tx.send(x).ok();
        if x == 0 {
            emitted_rx.lock().unwrap().recv_timeout(LIMIT).ok();
        }
        Ok(())
    });
    let report = p.run().unwrap();
    assert!(
        seen_rx.recv().unwrap(),
        "item 1 stayed with the waiting producer"
    );
    assert_eq!(report.stage("sink").unwrap().items_in, 2);
}

/// Fan-out: each downstream of a producer has its own run, and each gets the item.
#[test]
fn every_downstream_of_a_waiting_producer_gets_its_item() {
    let (got_tx, got_rx) = mpsc::channel::<&'static str>();
    let (seen_tx, seen_rx) = mpsc::channel::<Vec<&'static str>>();
    let p = Pipeline::new("fan-out-wait");
    let gen = p.producer("gen", move |out| {
        out.emit(1u64)?;
        let mut seen: Vec<_> = (0..2)
            .filter_map(|_| got_rx.recv_timeout(LIMIT).ok())
            .collect();
        seen.sort_unstable();
        seen_tx.send(seen).unwrap();
        Ok(())
    });
    let a = got_tx.clone();
    p.consumer("a", move |_: u64| {
        a.send("a").ok();
        Ok(())
    })
    .from(&gen);
    p.consumer("b", move |_: u64| {
        got_tx.send("b").ok();
        Ok(())
    })
    .from(&gen);
    p.run().unwrap();
    assert_eq!(seen_rx.recv().unwrap(), ["a", "b"]);
}

/// A live view shows the producer's outputs while it runs, item by item, not per run.
#[test]
fn a_running_producers_output_count_shows_every_emit() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let p = Pipeline::new("live-producer");
    p.producer("gen", move |out| {
        out.emit_all(0..5u64)?;
        // Waits (in its own code) until the test has seen the count.
        go_rx.recv_timeout(LIMIT).ok();
        out.emit_all(5..8u64)?;
        Ok(())
    });
    p.consumer("sink", |_: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let monitor = handle.monitor();
    common::wait_until(
        "the producer's 5 outputs and the sink's 5 inputs",
        LIMIT,
        || {
            let s = monitor.snapshot();
            s.stages[0].items_out == 5 && s.stages[1].items_in == 5
        },
    );
    assert!(!monitor.snapshot().finished);
    go_tx.send(()).unwrap();
    let report = handle.wait().unwrap();
    assert_eq!(report.stage("gen").unwrap().items_out, 8);
    assert_eq!(report.stage("sink").unwrap().items_in, 8);
}

/// Failures and panics in the middle of fast runs: each is its item's, with its index, its
/// dead letter, its message; the items around it go on, and a retried item succeeds alone.
#[test]
fn a_failure_inside_a_run_is_its_items_own() {
    for chaining in [true, false] {
        // (item, its index, a panic?, message)
        let dead = common::Sink::<(u64, Option<u64>, bool, String)>::default();
        let out = common::Sink::<u64>::default();
        let tries = std::sync::Arc::new(std::sync::Mutex::new(
            std::collections::HashMap::<u64, u32>::new(),
        ));
        let p = Pipeline::new("failures-in-runs");
        p.chaining(chaining);
        p.producer("gen", |out| out.emit_all(0..10_000u64).map_err(Into::into));
        let t = tries.clone();
        let pick = p
            .processor("pick", move |x: u64, out: &mut Output<'_, u64>| {
                let first = {
                    let mut tries = t.lock().unwrap();
                    let n = tries.entry(x).or_insert(0);
                    *n += 1;
                    *n == 1
                };
                match x {
                    x if x % 1000 == 500 => panic!("boom at {x}"),
                    x if x % 1000 == 900 => Err(format!("bad {x}").into()),
                    // Fails its first attempt only: the retry emits it.
                    x if x % 1000 == 300 && first => Err("flaky".into()),
                    x => Ok(out.emit(x)?),
                }
            })
            .on_error(OnError::retry(1));
        let d = dead.clone();
        let dl = p.consumer("dead", move |f: Failed<u64>| {
            let panic = f.failure.kind == FailureKind::Panic;
            d.push((f.item, f.failure.item, panic, f.failure.message));
            Ok(())
        });
        pick.dead_letter(&dl);
        let o = out.clone();
        p.consumer("sink", move |x: u64| {
            o.push(x);
            Ok(())
        })
        .from(&pick);
        let r = p.run().expect("runs");
        let s = r.stage("pick").unwrap();
        assert_eq!(
            (
                s.items_in,
                s.items_out,
                s.failed,
                s.retried,
                s.dead_lettered
            ),
            (10_000, 9_980, 20, 30, 20),
            "chaining {chaining}"
        );
        let want: Vec<u64> = (0..10_000u64)
            .filter(|x| x % 1000 != 500 && x % 1000 != 900)
            .collect();
        assert_eq!(out.sorted(), want, "chaining {chaining}");
        let dead = dead.sorted();
        assert_eq!(dead.len(), 20, "chaining {chaining}");
        for (item, index, panic, message) in dead {
            // One producer, one inline worker: an item's index is its value.
            assert_eq!(index, Some(item), "chaining {chaining}");
            if item % 1000 == 500 {
                assert!(panic, "{item}: {message}");
                assert!(message.contains(&format!("boom at {item}")), "{message}");
            } else {
                assert_eq!((panic, message), (false, format!("bad {item}")));
            }
        }
    }
}
