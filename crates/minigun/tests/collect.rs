//! Running a pipeline for its results: `collect`, `collect_ordered`, `fold`, `reduce`, with
//! real forked children where the stage forks.
use minigun::{DefinitionError, Exec, FailureKind, Output, Pipeline, RunError};
use std::time::Duration;

/// Item `x` sleeps `(7x mod 5)` ms, so later items often finish first.
fn shuffled(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis((x * 7) % 5));
    x * 10
}

fn squares(n: u64) -> Pipeline {
    let p = Pipeline::new("squares");
    p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
    p.map("square", |x: u64| Ok(x * x)).ipc_fork(2);
    p
}

fn definition_error<T: std::fmt::Debug>(r: Result<T, RunError>) -> DefinitionError {
    match r {
        Err(RunError::Definition(e)) => e,
        other => panic!("expected a definition error, got {other:?}"),
    }
}

#[test]
fn collect_returns_the_final_stage_items_from_forked_workers_with_the_report() {
    let got = squares(100).collect::<u64>().unwrap();
    let mut items = got.items;
    items.sort();
    assert_eq!(items, (0..100).map(|x| x * x).collect::<Vec<_>>());
    assert_eq!(got.report.stage("square").unwrap().executor, "ipc_fork(2)");
    assert_eq!(got.report.stage("collect").unwrap().items_in, 100);
}

#[test]
fn collect_ordered_keeps_input_order_through_fork_stages_that_did_not_ask_for_it() {
    for fork in ["cow", "ipc"] {
        let p = Pipeline::new("ordered");
        p.producer("gen", |out| out.emit_all(0..150u64).map_err(Into::into));
        let work = p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
            out.emit(shuffled(x))?;
            out.emit(shuffled(x) + 1)?;
            Ok(())
        });
        match fork {
            "cow" => drop(work.cow_fork(4)),
            _ => drop(work.ipc_fork(3).in_flight(4)),
        }
        p.batch::<u64>("pairs", 2);
        p.map("sum", |v: Vec<u64>| Ok(v.iter().sum::<u64>()));
        let items = p.collect_ordered::<u64>().unwrap().items;
        assert_eq!(
            items,
            (0..150).map(|x| 20 * x + 1).collect::<Vec<_>>(),
            "{fork}"
        );
    }
}

#[test]
fn collect_ordered_keeps_input_order_through_thread_pools() {
    let p = Pipeline::new("threads");
    p.producer("gen", |out| out.emit_all(0..300u64).map_err(Into::into));
    p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
        if x == 5 {
            return Err("five".into()); // a failed item holds nothing up
        }
        out.emit(shuffled(x))?;
        out.emit(x % 7)?;
        Ok(())
    })
    .executor(Exec::threads(4));
    p.map("plus", |x: u64| Ok(x + 1)).executor(Exec::threads(3));
    let got = p.collect_ordered::<u64>().unwrap();
    let want: Vec<u64> = (0..300)
        .filter(|&x| x != 5)
        .flat_map(|x| [x * 10 + 1, x % 7 + 1])
        .collect();
    assert_eq!(got.items, want);
    assert_eq!(got.report.stage("work").unwrap().executor, "threads(4)");
    assert_eq!(got.report.failures.len(), 1);
}

#[test]
fn collect_ordered_refuses_interleaving_upstreams() {
    let p = Pipeline::new("two-producers");
    p.producer("a", |out| out.emit_all(0..10u64).map_err(Into::into));
    p.producer("b", |out| out.emit_all(10..20u64).map_err(Into::into));
    p.map("work", |x: u64| Ok(x));
    match definition_error(p.collect_ordered::<u64>()) {
        DefinitionError::OrderLostByFanIn { stage, upstreams } => {
            assert_eq!(stage, "work");
            assert_eq!(upstreams, ["a", "b"]);
        }
        other => panic!("expected OrderLostByFanIn, got {other}"),
    }
}

#[test]
fn fold_and_reduce_run_over_the_final_stage_items() {
    let folded = squares(10).fold(0u64, |acc, x: u64| acc + x).unwrap();
    assert_eq!(folded.value, (0..10).map(|x| x * x).sum::<u64>());
    assert_eq!(folded.report.stage("collect").unwrap().items_in, 10);
    let max = squares(10).reduce(|a, b: u64| a.max(b)).unwrap();
    assert_eq!(max.value, Some(81));
    let none = squares(0).reduce(|a, b: u64| a.max(b)).unwrap();
    assert_eq!(none.value, None);
}

#[test]
fn failed_items_are_missing_from_the_results_and_listed_in_the_report() {
    let p = Pipeline::new("fragile");
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    p.map("parse", |x: u64| {
        if x == 13 {
            std::process::abort();
        }
        Ok(x)
    })
    .cow_fork(2);
    let got = p.collect_ordered::<u64>().unwrap();
    let want: Vec<u64> = (0..20).filter(|&x| x != 13).collect();
    assert_eq!(got.items, want);
    let f = &got.report.failures;
    assert!(f.len() == 1 && f[0].kind == FailureKind::Signal(6), "{f:?}");
}

#[test]
fn a_panic_in_the_fold_aborts_the_run() {
    let r = squares(10).fold(0u64, |acc, x: u64| {
        assert!(x != 49, "no sevens");
        acc + x
    });
    match r {
        Err(RunError::Aborted { cause, .. }) => {
            assert_eq!(
                (cause.stage.as_str(), cause.kind),
                ("collect", FailureKind::Panic)
            );
            assert!(cause.message.contains("no sevens"), "{}", cause.message);
        }
        other => panic!("expected an aborted run, got {other:?}"),
    }
}

#[test]
fn the_final_stage_must_be_one_and_emit_the_type_asked_for() {
    let p = Pipeline::new("consumed");
    p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    p.consumer("sink", |_: u64| Ok(()));
    assert!(matches!(
        definition_error(p.collect::<u64>()),
        DefinitionError::NothingToCollect { pipeline } if pipeline == "consumed"
    ));

    let p = Pipeline::new("forked");
    let gen = p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    p.map("a", |x: u64| Ok(x)).from(&gen);
    p.map("b", |x: u64| Ok(x)).from(&gen);
    match definition_error(p.collect::<u64>()) {
        DefinitionError::SeveralFinalStages { stages, .. } => assert_eq!(stages, ["a", "b"]),
        other => panic!("expected SeveralFinalStages, got {other}"),
    }

    match definition_error(squares(3).collect::<String>()) {
        DefinitionError::CollectTypeMismatch {
            stage,
            emits,
            wanted,
        } => {
            assert_eq!((stage.as_str(), emits), ("square", "u64"));
            assert!(wanted.contains("String"), "{wanted}");
        }
        other => panic!("expected CollectTypeMismatch, got {other}"),
    }
}

#[test]
fn collects_from_a_nested_pipeline_under_a_default_executor_and_a_taken_name() {
    let p = Pipeline::new("nested");
    p.default_executor(Exec::threads(3));
    p.producer("gen", |out| out.emit_all(0..30u64).map_err(Into::into));
    p.map("collect", |x: u64| Ok(x + 1));
    p.pipeline::<u64, u64>("clean", |s| {
        s.map("twice", |x: u64| Ok(x * 2));
    });
    let got = p.collect::<u64>().unwrap();
    let mut items = got.items;
    items.sort();
    assert_eq!(items, (1..=30).map(|x| x * 2).collect::<Vec<_>>());
    // The user's own "collect" stage keeps its name; the collecting stage runs inline.
    let sink = got.report.stage("collect-2").unwrap();
    assert_eq!((sink.items_in, sink.executor.as_str()), (30, "inline"));
    assert_eq!(
        got.report.stage("clean/twice").unwrap().executor,
        "threads(3)"
    );
}

#[test]
fn an_aborted_run_with_results_held_for_order_ends() {
    let p = Pipeline::new("abort-in-order");
    p.producer("gen", |out| out.emit_all(0..2_000u64).map_err(Into::into));
    p.map("work", |x: u64| {
        if x == 50 {
            return Err("stop here".into());
        }
        Ok(shuffled(x % 3))
    })
    .executor(Exec::threads(4))
    .on_error(minigun::OnError::fail_fast());
    match p.collect_ordered::<u64>() {
        Err(RunError::Aborted { cause, .. }) => assert_eq!(cause.message, "stop here"),
        other => panic!("expected an aborted run, got {other:?}"),
    }
}

/// Items through unchanged (item 0 slowly); its `finish` emits `u64::MAX` and routes 99 to
/// "side".
struct Trailer;

impl minigun::Stage<u64, u64> for Trailer {
    fn process(&mut self, x: u64, out: &mut Output<'_, u64>) -> minigun::StageResult {
        if x == 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        out.emit(x)?;
        Ok(())
    }
    fn finish(&mut self, out: &mut Output<'_, u64>) -> minigun::StageResult {
        out.emit(u64::MAX)?;
        out.to("side", 99u64)?;
        Ok(())
    }
}

#[test]
fn in_input_order_a_thread_pools_finish_outputs_come_last_and_its_routed_items_arrive() {
    let side = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = Pipeline::new("trailer");
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
    let work = p.stage("work", || Trailer).executor(Exec::threads(2));
    let s = side.clone();
    let target = p.consumer("side", move |x: u64| {
        s.lock().unwrap().push(x);
        Ok(())
    });
    work.routes_to(&target);
    let got = p.collect_ordered::<u64>().unwrap();
    // The worker without item 0 ends long before item 0 does: its trailer still comes after.
    let want: Vec<u64> = (0..100).chain([u64::MAX, u64::MAX]).collect();
    assert_eq!(got.items, want);
    assert_eq!(
        *side.lock().unwrap(),
        [99, 99],
        "one routed item per instance"
    );
}
