//! Settings a stage cannot take are definition errors naming the stage, one variant per
//! mistake; and errors print as well with `Debug` (what `unwrap()` shows) as with `Display`.

use minigun::{DefinitionError, Exec, OnError, Pipeline, RunError, StageKind};
use std::time::Duration;

fn numbers(n: u64) -> impl FnOnce(&mut minigun::Output<'_, u64>) -> minigun::StageResult {
    move |out| out.emit_all(0..n).map_err(Into::into)
}

fn definition_error(p: Pipeline) -> DefinitionError {
    match p.build() {
        Err(e) => e,
        Ok(_) => panic!("expected a definition error"),
    }
}

/// The stage, its kind and the setting of a `NotForThisKind` error.
fn not_for_this_kind(p: Pipeline) -> (String, StageKind, String) {
    match definition_error(p) {
        DefinitionError::NotForThisKind {
            stage,
            kind,
            setting,
            ..
        } => (stage, kind, setting),
        other => panic!("expected NotForThisKind, got {other}"),
    }
}

#[test]
fn an_executor_on_an_accumulator_is_an_error_naming_it() {
    let p = Pipeline::new("batch-threads");
    p.producer("src", numbers(10));
    p.batch::<u64>("batch", 4).executor(Exec::threads(2));
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let (stage, kind, setting) = not_for_this_kind(p);
    assert_eq!((stage.as_str(), kind), ("batch", StageKind::Accumulator));
    assert_eq!(setting, "executor threads(2)");
}

#[test]
fn a_fork_executor_on_a_producer_is_an_error_naming_it() {
    // `()` is serialisable, so `.ipc_fork` compiles on a producer's handle.
    let p = Pipeline::new("producer-fork");
    p.producer("src", numbers(10)).ipc_fork(2);
    p.consumer("sink", |_: u64| Ok(()));
    let (stage, kind, setting) = not_for_this_kind(p);
    assert_eq!((stage.as_str(), kind), ("src", StageKind::Producer));
    assert_eq!(setting, "executor ipc_fork(2)");
}

#[test]
fn a_context_on_an_accumulator_is_an_error_but_an_inherited_default_is_not() {
    let p = Pipeline::new("batch-context");
    p.context("pool", Exec::threads(4));
    p.producer("src", numbers(10));
    p.batch::<u64>("batch", 4).context("pool");
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let (stage, _, setting) = not_for_this_kind(p);
    assert_eq!(
        (stage.as_str(), setting.as_str()),
        ("batch", "executor threads(4)")
    );

    // A pipeline-wide default does not apply to the accumulator, and is no error.
    let p = Pipeline::new("batch-default");
    p.default_executor(Exec::threads(4));
    p.producer("src", numbers(10));
    p.batch::<u64>("batch", 4);
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let report = p.run().unwrap();
    assert_eq!(report.stage("batch").unwrap().executor, "inline");
    assert_eq!(report.stage("sink").unwrap().items_in, 3);
}

#[test]
fn a_capacity_on_a_producer_and_fork_hooks_on_an_accumulator_are_errors() {
    let p = Pipeline::new("producer-capacity");
    p.producer("src", numbers(3))
        .capacity(minigun::Capacity::Bounded(8));
    p.consumer("sink", |_: u64| Ok(()));
    let (stage, _, setting) = not_for_this_kind(p);
    assert_eq!((stage.as_str(), setting.as_str()), ("src", "a capacity"));

    let p = Pipeline::new("batch-hook");
    p.producer("src", numbers(3));
    p.batch::<u64>("batch", 2).after_fork(|| Ok(()));
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let (stage, _, setting) = not_for_this_kind(p);
    assert_eq!(
        (stage.as_str(), setting.as_str()),
        ("batch", "an after_fork hook")
    );
}

/// The stage, option, executor and what the option applies to, of an
/// `OptionNotForExecutor` error.
fn option_not_for_executor(p: Pipeline) -> (String, &'static str, String, &'static str) {
    match definition_error(p) {
        DefinitionError::OptionNotForExecutor {
            stage,
            option,
            executor,
            applies_to,
        } => (stage, option, executor, applies_to),
        other => panic!("expected OptionNotForExecutor, got {other}"),
    }
}

#[test]
fn a_fork_option_on_an_executor_without_it_is_an_error_naming_stage_and_option() {
    let p = Pipeline::new("threads-timeout");
    p.producer("src", numbers(3));
    p.map("work", |x: u64| Ok(x))
        .executor(Exec::threads(2).timeout(Duration::from_secs(1)));
    p.consumer("sink", |_: u64| Ok(()));
    let (stage, option, executor, applies_to) = option_not_for_executor(p);
    assert_eq!((stage.as_str(), option), ("work", "timeout"));
    let applies = if cfg!(feature = "async") {
        "cow_fork, ipc_fork and tasks"
    } else {
        "cow_fork and ipc_fork"
    };
    assert_eq!((executor.as_str(), applies_to), ("threads(2)", applies));

    // The same for an inherited executor: the error names the first stage it applies to.
    let p = Pipeline::new("default-items-per-fork");
    p.default_executor(Exec::ipc_fork(2).items_per_fork(8));
    p.producer("src", numbers(3));
    p.map("work", |x: u64| Ok(x)).wire();
    p.consumer("sink", |_: u64| Ok(()));
    let (stage, option, executor, _) = option_not_for_executor(p);
    assert_eq!((stage.as_str(), option), ("work", "items_per_fork"));
    assert_eq!(executor, "ipc_fork(2)");
}

#[test]
fn a_fork_option_after_the_executor_was_replaced_is_an_error() {
    let p = Pipeline::new("replaced");
    p.producer("src", numbers(3));
    let f = p.map("work", |x: u64| Ok(x)).cow_fork(2);
    f.executor(Exec::threads(2));
    f.ordered();
    p.consumer("sink", |_: u64| Ok(()));
    let (stage, option, executor, applies_to) = option_not_for_executor(p);
    assert_eq!((stage.as_str(), option), ("work", "ordered"));
    assert_eq!((executor.as_str(), applies_to), ("threads(2)", "cow_fork"));
}

#[test]
fn a_route_target_that_is_a_sub_pipeline_is_its_own_error() {
    let p = Pipeline::new("sub-target");
    p.producer("src", numbers(3));
    let sub = p.pipeline::<u64, u64>("sub", |s| {
        s.map("inner", |x: u64| Ok(x));
    });
    p.consumer("sink", |_: u64| Ok(()));
    p.map("router", |x: u64| Ok(x))
        .from_name("src")
        .routes_to(&sub);
    match definition_error(p) {
        DefinitionError::TargetIsSubPipeline {
            stage,
            what,
            target,
        } => {
            assert_eq!(
                (stage.as_str(), what, target.as_str()),
                ("router", "route target", "sub")
            );
        }
        other => panic!("expected TargetIsSubPipeline, got {other}"),
    }
}

#[test]
fn debug_of_a_definition_error_reads_as_its_display() {
    let p = Pipeline::new("debug");
    p.producer("src", numbers(3));
    p.batch::<u64>("batch", 0);
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let e = definition_error(p);
    assert_eq!(format!("{e:?}"), e.to_string());
    assert_eq!(
        e.to_string(),
        "accumulator \"batch\": the batch size must be at least 1"
    );
}

#[test]
fn unwrap_of_an_aborted_run_prints_the_cause_not_the_whole_report() {
    let run = || {
        let p = Pipeline::new("unwrapped");
        p.producer("src", numbers(5));
        p.map("boom", |x: u64| {
            if x == 3 {
                Err("three is not allowed".into())
            } else {
                Ok(x)
            }
        })
        .on_error(OnError::fail_fast());
        p.consumer("sink", |_: u64| Ok(()));
        p.run()
    };
    let e = run().unwrap_err();
    assert!(matches!(e, RunError::Aborted { .. }), "{e}");
    assert_eq!(format!("{e:?}"), e.to_string());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let panic = std::panic::catch_unwind(|| run().unwrap()).unwrap_err();
    std::panic::set_hook(hook);
    let msg = panic
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(
        msg.ends_with("run aborted: stage \"boom\", item 3: error: three is not allowed"),
        "{msg}"
    );
    assert!(!msg.contains("RunReport"), "{msg}");
}
