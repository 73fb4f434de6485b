//! Wiring: default sequential edges, explicit edges, forward references by name, fan-out
//! (broadcast and round-robin), fan-in, several producers, edge cases, and every definition
//! error `build()` can return.
mod common;
use common::Sink;
use minigun::{Capacity, DefinitionError, Exec, Output, Pipeline, RunError, StageKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A producer body that emits `0..n`.
fn numbers(n: u64) -> impl FnOnce(&mut Output<'_, u64>) -> minigun::StageResult + Send + 'static {
    move |out| {
        for i in 0..n {
            out.emit(i)?;
        }
        Ok(())
    }
}

/// Builds `p`, expecting a definition error (never a panic, never a runnable pipeline).
fn definition_error(p: Pipeline) -> DefinitionError {
    match p.build() {
        Ok(r) => panic!("expected a definition error, got a runnable pipeline {r:?}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Sequential and explicit wiring

matrix!(fn sequential_wiring(ex) {
    let p = Pipeline::new("sequential");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(100));
    let inc = p.map("inc", |x: u64| Ok(x + 1));
    ex.apply(&inc);
    p.map("double", |x: u64| Ok(x * 2));
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    let expected: Vec<u64> = (0..100).map(|x| (x + 1) * 2).collect();
    assert_eq!(got.sorted(), expected);
    assert_eq!(report.produced, 100);
    assert_eq!(report.consumed, 100);
    for name in ["inc", "double", "sink"] {
        let s = report.stage(name).unwrap();
        assert_eq!(s.items_in, 100, "{name}");
        assert_eq!(s.failed, 0, "{name}");
    }
    assert_eq!(report.stage("src").unwrap().items_out, 100);
    assert_eq!(report.stage("inc").unwrap().items_out, 100);
    assert_eq!(report.stage("sink").unwrap().items_out, 0);
    // Topological order in the report.
    let names: Vec<&str> = report.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["src", "inc", "double", "sink"]);
});

matrix!(fn explicit_edges_override_definition_order(ex) {
    // Defined in an order that default wiring would get wrong: sink, then the two maps.
    let p = Pipeline::new("explicit");
    let got = Sink::default();
    let g = got.clone();
    let src = p.producer("src", numbers(50));
    let sink = p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let tens = p.map("tens", |x: u64| Ok(x * 10)).to(&sink);
    let plus = p.map("plus", |x: u64| Ok(x + 1)).from(&src).to(&tens);
    ex.apply(&plus);
    ex.apply(&tens);
    let report = p.run().unwrap();
    let expected: Vec<u64> = (0..50).map(|x| (x + 1) * 10).collect();
    assert_eq!(got.sorted(), expected);
    let names: Vec<&str> = report.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["src", "plus", "tens", "sink"]);
    assert_eq!(report.consumed, 50);
});

matrix!(fn forward_references_by_name(ex) {
    let p = Pipeline::new("forward");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(40)).to_name("square");
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    })
    .from_name("square");
    // Defined last, referenced by both of the others.
    let sq = p.map("square", |x: u64| Ok(x * x));
    ex.apply(&sq);
    let report = p.run().unwrap();
    let expected: Vec<u64> = (0..40).map(|x| x * x).collect();
    assert_eq!(got.sorted(), expected);
    assert_eq!(report.stage("square").unwrap().items_in, 40);
    let names: Vec<&str> = report.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["src", "square", "sink"]);
});

// ---------------------------------------------------------------------------------------------
// Fan-out and fan-in

matrix!(fn broadcast_fan_out_gives_every_item_to_each_downstream(ex) {
    let p = Pipeline::new("broadcast");
    let left = Sink::default();
    let right = Sink::default();
    let (l, r) = (left.clone(), right.clone());
    let src = p.producer("src", numbers(60));
    let lsink = p.consumer("lsink", move |x: u64| {
        l.push(x);
        Ok(())
    });
    let rsink = p.consumer("rsink", move |x: u64| {
        r.push(x);
        Ok(())
    });
    let lmap = p.map("left", |x: u64| Ok(x + 1000)).from(&src).to(&lsink);
    let rmap = p.map("right", |x: u64| Ok(x + 2000)).from(&src).to(&rsink);
    ex.apply(&lmap);
    ex.apply(&rmap);
    let report = p.run().unwrap();
    assert_eq!(left.sorted(), (1000..1060).collect::<Vec<u64>>());
    assert_eq!(right.sorted(), (2000..2060).collect::<Vec<u64>>());
    assert_eq!(report.produced, 60);
    assert_eq!(report.stage("src").unwrap().items_out, 60);
    assert_eq!(report.stage("left").unwrap().items_in, 60);
    assert_eq!(report.stage("right").unwrap().items_in, 60);
    assert_eq!(report.consumed, 120);
});

matrix!(fn round_robin_fan_out_splits_items(ex) {
    let p = Pipeline::new("round-robin");
    let sinks: Vec<Sink<u64>> = (0..3).map(|_| Sink::default()).collect();
    let src = p.producer("src", numbers(99)).round_robin();
    for (k, sink) in sinks.iter().enumerate() {
        let s = sink.clone();
        let c = p.consumer(format!("sink{k}"), move |x: u64| {
            s.push(x);
            Ok(())
        });
        let m = p.map(format!("worker{k}"), |x: u64| Ok(x)).from(&src).to(&c);
        ex.apply(&m);
    }
    let report = p.run().unwrap();
    let mut all = Vec::new();
    for (k, sink) in sinks.iter().enumerate() {
        let got = sink.sorted();
        // One producer, three downstreams in turn: exactly a third each, one residue class.
        assert_eq!(got.len(), 33, "sink{k} got {got:?}");
        let residue = got[0] % 3;
        assert!(got.iter().all(|x| x % 3 == residue), "sink{k} got {got:?}");
        assert_eq!(report.stage(&format!("worker{k}")).unwrap().items_in, 33);
        all.extend(got);
    }
    all.sort();
    assert_eq!(all, (0..99).collect::<Vec<u64>>());
    assert_eq!(report.produced, 99);
    assert_eq!(report.consumed, 99);
});

matrix!(fn fan_in_waits_for_every_upstream(ex) {
    // A fast producer straight into `join`, and a slow path (slow producer, then a map under the
    // executor) into `join` too: `join` must not end when the fast side ends.
    let p = Pipeline::new("fan-in");
    let got = Sink::default();
    let g = got.clone();
    let fast = p.producer("fast", numbers(30));
    let slow = p.producer("slow", |out| {
        for i in 0..5u64 {
            std::thread::sleep(Duration::from_millis(60));
            out.emit(1000 + i)?;
        }
        Ok(())
    });
    let join = p.map("join", |x: u64| Ok(x + 1));
    let slow_map = p.map("slow_map", |x: u64| Ok(x * 2)).from(&slow).to(&join);
    ex.apply(&slow_map);
    join.from(&fast);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    })
    .from(&join);
    let report = p.run().unwrap();
    let mut expected: Vec<u64> = (0..30).map(|x| x + 1).collect();
    expected.extend((1000..1005u64).map(|x| x * 2 + 1));
    expected.sort();
    assert_eq!(got.sorted(), expected);
    assert_eq!(report.stage("join").unwrap().items_in, 35);
    assert_eq!(report.produced, 35);
    assert_eq!(report.consumed, 35);
});

matrix!(fn several_producers_feed_the_next_stage(ex) {
    let p = Pipeline::new("producers");
    let got = Sink::default();
    let g = got.clone();
    p.producer("a", |out| out.emit_all(0..10u64).map_err(Into::into));
    p.producer("b", |out| out.emit_all(100..120u64).map_err(Into::into));
    p.producer("c", |out| out.emit_all(200..205u64).map_err(Into::into));
    let m = p.map("merge", |x: u64| Ok(x));
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    let expected: Vec<u64> = (0..10).chain(100..120).chain(200..205).collect();
    assert_eq!(got.sorted(), expected);
    assert_eq!(report.produced, 35);
    assert_eq!(report.stage("merge").unwrap().items_in, 35);
    for (name, n) in [("a", 10), ("b", 20), ("c", 5)] {
        assert_eq!(report.stage(name).unwrap().items_out, n, "{name}");
    }
});

matrix!(fn empty_input(ex) {
    let p = Pipeline::new("empty");
    let got: Sink<Vec<u64>> = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(0));
    let m = p.map("work", |x: u64| Ok(x + 1));
    ex.apply(&m);
    p.batch::<u64>("batch", 4);
    p.consumer("sink", move |b: Vec<u64>| {
        g.push(b);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.len(), 0, "no batch at all, not even an empty one");
    assert_eq!(report.produced, 0);
    assert_eq!(report.consumed, 0);
    for s in &report.stages {
        assert_eq!((s.items_in, s.items_out, s.failed), (0, 0, 0), "{}", s.name);
    }
    assert_eq!(report.failures_total, 0);
    assert!(!report.stopped);
});

matrix!(fn duplicate_values_are_kept(ex) {
    let p = Pipeline::new("duplicates");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", |out| {
        for _ in 0..5 {
            out.emit(7u64)?;
            out.emit(3u64)?;
        }
        out.emit(3u64)?;
        Ok(())
    });
    let m = p.processor("twice", |x: u64, out: &mut Output<'_, u64>| {
        out.emit(x)?;
        out.emit(x)?;
        Ok(())
    });
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    let mut expected = vec![3u64; 12];
    expected.extend(vec![7u64; 10]);
    assert_eq!(got.sorted(), expected);
    assert_eq!(report.stage("twice").unwrap().items_in, 11);
    assert_eq!(report.stage("twice").unwrap().items_out, 22);
    assert_eq!(report.consumed, 22);
});

matrix_local!(fn a_million_items_through_four_stages(ex) {
    const N: u64 = 1_000_000;
    let p = Pipeline::new("million");
    let count = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicU64::new(0));
    let (c, s) = (count.clone(), sum.clone());
    p.producer("src", numbers(N));
    let a = p.map("plus", |x: u64| Ok(x + 1));
    let b = p.map("times", |x: u64| Ok(x * 3));
    ex.apply_local(&a);
    ex.apply_local(&b);
    p.consumer("sink", move |x: u64| {
        c.fetch_add(1, Ordering::Relaxed);
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(count.load(Ordering::Relaxed), N);
    // sum of 3 * (x + 1) for x in 0..N
    assert_eq!(sum.load(Ordering::Relaxed), 3 * N * (N + 1) / 2);
    assert_eq!(report.produced, N);
    assert_eq!(report.consumed, N);
    for name in ["plus", "times", "sink"] {
        let st = report.stage(name).unwrap();
        assert_eq!(st.items_in, N, "{name}");
        assert_eq!(st.failed + st.cancelled, 0, "{name}");
    }
    assert_eq!(report.stage("times").unwrap().items_out, N);
});

// ---------------------------------------------------------------------------------------------
// Definition errors

#[test]
fn duplicate_name() {
    let p = Pipeline::new("dups");
    p.producer("src", numbers(3));
    p.map("same", |x: u64| Ok(x));
    p.map("same", |x: u64| Ok(x));
    p.consumer("sink", |_: u64| Ok(()));
    match definition_error(p) {
        DefinitionError::DuplicateName { pipeline, name } => {
            assert_eq!(pipeline, "dups");
            assert_eq!(name, "same");
        }
        other => panic!("expected DuplicateName, got {other:?}"),
    }
}

#[test]
fn unknown_reference_in_to_name() {
    let p = Pipeline::new("unknown-to");
    p.producer("src", numbers(3)).to_name("nowhere");
    p.consumer("sink", |_: u64| Ok(()));
    match definition_error(p) {
        DefinitionError::UnknownReference {
            stage, reference, ..
        } => {
            assert_eq!(stage, "src");
            assert_eq!(reference, "nowhere");
        }
        other => panic!("expected UnknownReference, got {other:?}"),
    }
}

#[test]
fn unknown_reference_in_from_name() {
    let p = Pipeline::new("unknown-from");
    p.producer("src", numbers(3));
    p.consumer("sink", |_: u64| Ok(())).from_name("nobody");
    let e = definition_error(p);
    match &e {
        DefinitionError::UnknownReference {
            stage, reference, ..
        } => {
            assert_eq!(stage, "sink");
            assert_eq!(reference, "nobody");
        }
        other => panic!("expected UnknownReference, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("sink") && msg.contains("nobody"), "{msg}");
}

#[test]
fn unknown_execution_context() {
    let p = Pipeline::new("unknown-context");
    p.producer("src", numbers(3));
    p.map("work", |x: u64| Ok(x)).context("gpu");
    p.consumer("sink", |_: u64| Ok(()));
    match definition_error(p) {
        DefinitionError::UnknownReference {
            stage, reference, ..
        } => {
            assert_eq!(stage, "work");
            assert_eq!(reference, "gpu");
        }
        other => panic!("expected UnknownReference, got {other:?}"),
    }
}

#[test]
fn reference_to_a_stage_of_another_pipeline() {
    let other = Pipeline::new("other");
    let foreign = other.consumer("foreign", |_: u64| Ok(()));
    let p = Pipeline::new("mine");
    p.producer("src", numbers(3)).to(&foreign);
    match definition_error(p) {
        DefinitionError::UnknownReference {
            stage, reference, ..
        } => {
            assert_eq!(stage, "src");
            assert_eq!(reference, "foreign");
        }
        other => panic!("expected UnknownReference, got {other:?}"),
    }
}

#[test]
fn cycle() {
    let p = Pipeline::new("cycle");
    let src = p.producer("src", numbers(3));
    let a = p.map("a", |x: u64| Ok(x)).from(&src);
    let b = p.map("b", |x: u64| Ok(x)).from(&a);
    let c = p.map("c", |x: u64| Ok(x)).from(&b);
    a.from(&c);
    p.consumer("sink", |_: u64| Ok(())).from(&c);
    match definition_error(p) {
        DefinitionError::Cycle { stages } => {
            let mut s = stages.clone();
            s.sort();
            assert_eq!(s, ["a", "b", "c"], "{stages:?}");
        }
        other => panic!("expected Cycle, got {other:?}"),
    }
}

#[test]
fn self_loop_by_name_is_a_cycle() {
    let p = Pipeline::new("self-loop");
    p.producer("src", numbers(3));
    p.map("echo", |x: u64| Ok(x))
        .from_name("src")
        .to_name("echo");
    p.consumer("sink", |_: u64| Ok(())).from_name("echo");
    match definition_error(p) {
        DefinitionError::Cycle { stages } => assert_eq!(stages, ["echo"]),
        other => panic!("expected Cycle, got {other:?}"),
    }
}

#[test]
fn unfed_stage() {
    let p = Pipeline::new("unfed");
    let sink = p.consumer("sink", |_: u64| Ok(()));
    p.producer("src", numbers(3)).to(&sink);
    // Every producer's output is taken explicitly: nothing is left to feed this one.
    p.map("orphan", |x: u64| Ok(x)).to(&sink);
    match definition_error(p) {
        DefinitionError::Unfed { stage } => assert_eq!(stage, "orphan"),
        other => panic!("expected Unfed, got {other:?}"),
    }
}

#[test]
fn producer_with_an_input() {
    let p = Pipeline::new("producer-input");
    p.producer("src", numbers(3));
    p.consumer("sink", |_: u64| Ok(())).from_name("src");
    p.producer("late", numbers(3)).from_name("src");
    match definition_error(p) {
        DefinitionError::ProducerHasInput { stage, upstream } => {
            assert_eq!(stage, "late");
            assert_eq!(upstream, "src");
        }
        other => panic!("expected ProducerHasInput, got {other:?}"),
    }
}

#[test]
fn type_mismatch_through_name_wiring() {
    let p = Pipeline::new("types");
    p.producer("numbers", numbers(3)).to_name("words");
    p.consumer("words", |_: String| Ok(()));
    match definition_error(p) {
        DefinitionError::TypeMismatch {
            from,
            to,
            output,
            input,
        } => {
            assert_eq!(from, "numbers");
            assert_eq!(to, "words");
            assert!(output.contains("u64"), "{output}");
            assert!(input.contains("String"), "{input}");
        }
        other => panic!("expected TypeMismatch, got {other:?}"),
    }
}

#[test]
fn type_mismatch_through_default_wiring() {
    let p = Pipeline::new("types-default");
    p.producer("numbers", numbers(3));
    p.map("len", |s: String| Ok(s.len()));
    p.consumer("sink", |_: usize| Ok(()));
    match definition_error(p) {
        DefinitionError::DefaultEdgeMismatch { from, to, .. } => {
            assert_eq!(from, "numbers");
            assert_eq!(to, "len");
        }
        other => panic!("expected DefaultEdgeMismatch, got {other:?}"),
    }
}

#[test]
fn type_mismatch_of_a_dead_letter_stage_by_name() {
    // A dead-letter stage wired by name as an ordinary downstream takes Failed<u64>, not u64.
    let p = Pipeline::new("dl-types");
    p.producer("src", numbers(3)).to_name("dl");
    p.consumer("dl", |_: minigun::Failed<u64>| Ok(()));
    match definition_error(p) {
        DefinitionError::TypeMismatch { from, to, .. } => {
            assert_eq!(from, "src");
            assert_eq!(to, "dl");
        }
        other => panic!("expected TypeMismatch, got {other:?}"),
    }
}

#[test]
fn zero_threads_is_a_no_workers_error() {
    let p = Pipeline::new("zero-threads");
    p.producer("src", numbers(3));
    p.map("work", |x: u64| Ok(x)).executor(Exec::threads(0));
    p.consumer("sink", |_: u64| Ok(()));
    match definition_error(p) {
        DefinitionError::NoWorkers { stage, executor } => {
            assert_eq!((stage.as_str(), executor.as_str()), ("work", "threads(0)"));
        }
        other => panic!("expected NoWorkers, got {other:?}"),
    }
}

#[test]
fn zero_fork_workers_is_a_no_workers_error() {
    let p = Pipeline::new("zero-forks");
    p.producer("src", numbers(3));
    p.map("work", |x: u64| Ok(x)).ipc_fork(0);
    p.consumer("sink", |_: u64| Ok(()));
    match definition_error(p) {
        DefinitionError::NoWorkers { stage, .. } => assert_eq!(stage, "work"),
        other => panic!("expected NoWorkers, got {other:?}"),
    }
}

#[test]
fn zero_batch_size_is_an_error() {
    let p = Pipeline::new("zero-batch");
    p.producer("src", numbers(3));
    p.batch::<u64>("batch", 0);
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    match definition_error(p) {
        DefinitionError::ZeroBatchSize { stage } => assert_eq!(stage, "batch"),
        other => panic!("expected ZeroBatchSize, got {other:?}"),
    }
}

#[test]
fn max_wait_on_a_non_accumulator_is_an_error() {
    let p = Pipeline::new("max-wait");
    p.producer("src", numbers(3));
    p.map("pairs", |x: u64| Ok(vec![x, x]))
        .max_wait(Duration::from_millis(10));
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    match definition_error(p) {
        DefinitionError::NotForThisKind {
            stage,
            kind,
            setting,
            ..
        } => {
            assert_eq!((stage.as_str(), setting.as_str()), ("pairs", "max_wait"));
            assert_eq!(kind, StageKind::Processor);
        }
        other => panic!("expected NotForThisKind, got {other:?}"),
    }
}

/// A type without serde: it cannot cross a process.
#[derive(Debug, Clone, PartialEq)]
struct Opaque(u64);

#[test]
fn not_serialisable_cow_fork() {
    let p = Pipeline::new("not-serialisable");
    p.producer("src", |out| out.emit(Opaque(1)).map_err(Into::into));
    p.map("work", |x: Opaque| Ok(x)).executor(Exec::cow_fork(2));
    p.consumer("sink", |_: Opaque| Ok(()));
    match definition_error(p) {
        DefinitionError::NotSerialisable { stage, executor } => {
            assert_eq!(stage, "work");
            assert_eq!(executor, "cow_fork(2)");
        }
        other => panic!("expected NotSerialisable, got {other:?}"),
    }
}

#[test]
fn not_serialisable_even_for_serde_types_without_wire() {
    // u64 is serialisable, but the stage was never declared `wire`: `.executor(fork)` alone is
    // not enough.
    let p = Pipeline::new("not-wired");
    p.producer("src", numbers(3));
    p.map("work", |x: u64| Ok(x)).executor(Exec::ipc_fork(2));
    p.consumer("sink", |_: u64| Ok(()));
    match definition_error(p) {
        DefinitionError::NotSerialisable { stage, executor } => {
            assert_eq!(stage, "work");
            assert_eq!(executor, "ipc_fork(2)");
        }
        other => panic!("expected NotSerialisable, got {other:?}"),
    }
}

#[test]
fn definition_errors_come_back_from_run_too() {
    let p = Pipeline::new("via-run");
    p.producer("src", numbers(3)).to_name("missing");
    p.consumer("sink", |_: u64| Ok(()));
    match p.run() {
        Err(RunError::Definition(DefinitionError::UnknownReference { stage, .. })) => {
            assert_eq!(stage, "src")
        }
        other => panic!("expected a definition error, got {other:?}"),
    }
    let p = Pipeline::new("via-spawn");
    p.producer("src", numbers(3));
    p.map("m", |x: u64| Ok(x)).capacity(Capacity::Bounded(4));
    p.map("m", |x: u64| Ok(x));
    match p.spawn() {
        Err(DefinitionError::DuplicateName { name, .. }) => assert_eq!(name, "m"),
        other => panic!("expected DuplicateName, got {other:?}"),
    }
}
