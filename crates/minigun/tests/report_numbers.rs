//! What the report's numbers mean: items from the sources, items that reached the sinks,
//! failed and dead-lettered items apart; throughput from source items; stage-wide failures
//! without an item; the cap on the failures kept, and what it left out.
mod common;
use common::{gen, Sink};
use minigun::{Exec, Failed, FailureKind, Output, Pipeline, RunReport, Stage, StageResult};

/// 1,000 items, every tenth fails into a dead-letter stage, the rest go in batches of 100.
fn batched_with_dead_letters() -> RunReport {
    let p = Pipeline::new("numbers");
    gen(&p, 1000);
    let check = p
        .map("check", |x: u64| {
            if x.is_multiple_of(10) {
                Err(format!("{x} is round").into())
            } else {
                Ok(x)
            }
        })
        .executor(Exec::threads(2));
    p.batch::<u64>("batch", 100);
    p.consumer("store", |_: Vec<u64>| Ok(()));
    let dead = p.consumer("dead", |_: Failed<u64>| Ok(()));
    check.dead_letter(&dead);
    p.run().expect("run")
}

#[test]
fn sources_sinks_failed_and_dead_lettered_are_counted_apart() {
    let r = batched_with_dead_letters();
    assert_eq!(r.produced, 1000, "items from the sources");
    // 900 items in batches of 100; the dead-letter stage is not a sink.
    assert_eq!(r.consumed, 9, "batches that reached the sink");
    assert_eq!((r.failed, r.dead_lettered, r.stage_errors), (100, 100, 0));
    assert_eq!(r.throughput, r.produced as f64 / r.runtime_secs);
    let first = r.to_string().lines().next().unwrap().to_string();
    assert!(
        first.contains("1000 items from sources")
            && first.contains("9 reached sinks, 100 failed, 100 dead-lettered"),
        "{first}"
    );
    let json = serde_json::to_value(&r).unwrap();
    for (field, want) in [
        ("produced", 1000),
        ("consumed", 9),
        ("failed", 100),
        ("dead_lettered", 100),
        ("failures_total", 100),
        ("failures_left_out", 0),
    ] {
        assert_eq!(json[field], want, "{field} in {json}");
    }
}

/// A stage whose end-of-stream flush fails.
struct FailsAtFinish;

impl Stage<u64, u64> for FailsAtFinish {
    fn process(&mut self, item: u64, out: &mut Output<'_, u64>) -> StageResult {
        Ok(out.emit(item)?)
    }
    fn finish(&mut self, _out: &mut Output<'_, u64>) -> StageResult {
        Err("cannot flush".into())
    }
}

#[test]
fn a_stage_wide_failure_has_no_item() {
    let p = Pipeline::new("broken-flush");
    gen(&p, 3);
    p.stage("flush", || FailsAtFinish);
    p.consumer("sink", |_: u64| Ok(()));
    let r = p.run().expect("a stage error does not abort a skip run");
    let f = &r.failures[0];
    assert_eq!((f.item, f.kind.clone()), (None, FailureKind::Error));
    assert_eq!(
        f.to_string(),
        "stage \"flush\": error: finish: cannot flush"
    );
    assert_eq!((r.stage_errors, r.failed, r.consumed), (1, 0, 3));
    let json = serde_json::to_value(f).unwrap();
    assert!(json["item"].is_null(), "{json}");
}

#[test]
fn the_failure_list_is_capped_and_says_what_it_left_out() {
    let p = Pipeline::new("many-failures");
    gen(&p, 50);
    p.consumer("sink", |x: u64| {
        if x.is_multiple_of(2) {
            Err("even".into())
        } else {
            Ok(())
        }
    });
    p.keep_failures(3);
    let r = p.run().expect("run");
    assert_eq!((r.failures_total, r.failures.len()), (25, 3));
    assert_eq!(r.failures_left_out, 22);
    let text = r.to_string();
    assert!(text.contains("22 left out"), "{text}");

    // The default keeps 100.
    let p = Pipeline::new("default-cap");
    gen(&p, 300);
    p.consumer("sink", |_: u64| Err("no".into()));
    let r = p.run().expect("run");
    assert_eq!(r.failures.len(), minigun::KEEP_FAILURES);
    assert_eq!(r.failures_left_out, 300 - minigun::KEEP_FAILURES as u64);
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_child_is_described_once() {
    let p = Pipeline::new("abort");
    gen(&p, 5);
    p.map("work", |x: u64| {
        if x == 3 {
            std::process::abort();
        }
        Ok(x)
    })
    .cow_fork(2);
    let got = Sink::<u64>::default();
    Sink::consume(&got, &p);
    let r = p.run().expect("run");
    assert_eq!(got.sorted(), vec![0, 1, 2, 4]);
    let f = &r.failures[0];
    assert_eq!(f.kind, FailureKind::Signal(libc::SIGABRT));
    let text = f.to_string();
    assert!(
        text.contains("item 3: killed by signal 6 (SIGABRT)"),
        "{text}"
    );
    assert_eq!(text.matches("signal").count(), 1, "{text}");
}
