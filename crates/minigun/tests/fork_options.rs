//! Every fork option is reachable from the stage handle, without `.wire()`, and takes effect
//! in real forked children; `.wire_output()` declares only what cow_fork needs.
mod common;
use common::Sink;
use minigun::{Dispatch, Exec, FailureKind, Output, Pipeline, RunReport};
use std::time::Duration;

/// An input type without serde: it reaches a cow_fork child through copy-on-write memory.
#[derive(Clone)]
struct Local(u64);

/// Item `x` sleeps `(7x mod 5)` ms, so later items often finish first.
fn shuffled(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis((x * 7) % 5));
    x * 10
}

fn collected(p: Pipeline, sink: &Sink<u64>) -> (Vec<u64>, RunReport) {
    let report = p.run().unwrap();
    let v = sink.0.lock().unwrap().clone();
    (v, report)
}

#[test]
fn cow_fork_options_on_the_handle_of_a_u64_stage_apply_in_real_children() {
    let p = Pipeline::new("cow-options");
    let sink = Sink::default();
    p.producer("gen", |out| out.emit_all(0..60u64).map_err(Into::into));
    p.map("work", |x: u64| {
        if x == 7 {
            std::thread::sleep(Duration::from_secs(30));
        }
        Ok(shuffled(x))
    })
    .cow_fork(4)
    .timeout(Duration::from_millis(500))
    .ordered()
    .items_per_fork(3)
    .max_frame(1 << 20);
    sink.consume(&p);
    let (got, report) = collected(p, &sink);
    let want: Vec<u64> = (0..60).filter(|&x| x != 7).map(|x| x * 10).collect();
    assert_eq!(got, want, "in input order, item 7 timed out");
    let s = report.stage("work").unwrap();
    assert_eq!(s.executor, "cow_fork(4)");
    let f = &report.failures;
    assert!(
        f.len() == 1 && f[0].kind == FailureKind::Timeout && f[0].pid.is_some(),
        "{f:?}"
    );
}

#[test]
fn ipc_fork_options_on_the_handle_apply_in_real_workers() {
    let p = Pipeline::new("ipc-options");
    let sink = Sink::default();
    p.producer("gen", |out| out.emit_all(0..200u64).map_err(Into::into));
    p.map("work", |x: u64| Ok(shuffled(x)))
        .ipc_fork(3)
        .in_flight(1)
        .dispatch(Dispatch::LeastLoaded)
        .batch_results(false)
        .timeout(Duration::from_secs(20))
        .ordered();
    sink.consume(&p);
    let (got, report) = collected(p, &sink);
    assert_eq!(got, (0..200).map(|x| x * 10).collect::<Vec<_>>());
    assert_eq!(report.stage("work").unwrap().executor, "ipc_fork(3)");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

#[test]
fn cow_fork_needs_only_a_serialisable_output() {
    // The handle method: the input type has no serde.
    let p = Pipeline::new("cow-local-input");
    let sink = Sink::default();
    p.producer("gen", |out| {
        out.emit_all((0..40).map(Local)).map_err(Into::into)
    });
    p.map("work", |x: Local| Ok(shuffled(x.0)))
        .cow_fork(3)
        .ordered();
    sink.consume(&p);
    let (got, report) = collected(p, &sink);
    assert_eq!(got, (0..40).map(|x| x * 10).collect::<Vec<_>>());
    assert_eq!(report.stage("work").unwrap().executor, "cow_fork(3)");

    // `.wire_output()`: a cow_fork executor value, and a context, apply to such a stage.
    let p = Pipeline::new("cow-wire-output");
    let sink = Sink::default();
    p.context("isolated", Exec::cow_fork(2).ordered());
    p.producer("gen", |out| {
        out.emit_all((0..20).map(Local)).map_err(Into::into)
    });
    p.map("a", |x: Local| Ok(x.0 + 1))
        .wire_output()
        .context("isolated");
    p.map("c", |x: u64| Ok(Local(x)));
    p.processor(
        "b",
        |x: Local, out: &mut Output<'_, u64>| Ok(out.emit(x.0)?),
    )
    .wire_output()
    .executor(Exec::cow_fork(2).timeout(Duration::from_secs(20)));
    sink.consume(&p);
    let (got, report) = collected(p, &sink);
    assert_eq!(got.len(), 20);
    assert_eq!(sink.sorted(), (1..=20).collect::<Vec<_>>());
    for stage in ["a", "b"] {
        assert_eq!(report.stage(stage).unwrap().executor, "cow_fork(2)");
    }
}

#[test]
fn an_ipc_fork_context_does_not_apply_to_a_stage_that_declared_only_its_output() {
    // ipc_fork needs the input to cross too: inherited, it falls back to inline.
    let p = Pipeline::new("ipc-wire-output");
    let sink = Sink::default();
    p.default_executor(Exec::ipc_fork(2));
    p.producer("gen", |out| {
        out.emit_all((0..5).map(Local)).map_err(Into::into)
    });
    p.map("a", |x: Local| Ok(x.0)).wire_output();
    sink.consume(&p);
    let (got, report) = collected(p, &sink);
    assert_eq!(got.len(), 5);
    assert_eq!(report.stage("a").unwrap().executor, "inline");
}
