//! A `tracing` event emitted by stage code in a cow_fork child and in an ipc_fork worker
//! reaches the parent's subscriber, with the stage and the child's pid.
mod common;
use minigun::{Exec, Pipeline};

fn run(exec: Exec) -> Vec<String> {
    let seen = common::capture_events(tracing::Level::INFO);
    let p = Pipeline::new("logs");
    p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    p.map("work", |x: u64| {
        tracing::info!(item = x, "hello from the child");
        tracing::debug!("filtered out by the parent's level");
        Ok(x)
    })
    .wire()
    .executor(exec);
    p.consumer("sink", |_x: u64| Ok(()));
    p.run().unwrap();
    let seen = seen.all();
    seen.into_iter()
        .filter(|l| l.contains("minigun::child"))
        .collect()
}

fn check(lines: Vec<String>) {
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for x in 0..3 {
        assert!(
            lines.iter().any(|l| l.contains("hello from the child")
                && l.contains(&format!("item={x}"))
                && l.contains("stage=\"work\"")
                && l.contains("pid=")
                && l.starts_with("INFO")),
            "{lines:#?}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("filtered out")),
        "{lines:#?}"
    );
}

#[test]
fn cow_fork_child_logs_reach_the_parent() {
    check(run(Exec::cow_fork(2)));
}

#[test]
fn ipc_fork_worker_logs_reach_the_parent() {
    check(run(Exec::ipc_fork(2)));
}

/// Another thread keeps installing and removing a scoped dispatcher (taking tracing's global
/// registry lock) while the stage forks children whose code logs: no child may be forked
/// while our own code holds that lock, and none may hang.
#[test]
fn children_do_not_hang_on_tracing_while_another_stage_installs_its_switch() {
    common::capture_events(tracing::Level::INFO);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A second fork stage starting and ending repeatedly installs and removes the switch.
    let s2 = stop.clone();
    let churn = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let p = Pipeline::new("churn");
            p.producer("gen", |out| out.emit_all(0..1u64).map_err(Into::into));
            p.map("w", |x: u64| Ok(x)).cow_fork(1);
            p.consumer("sink", |_x: u64| Ok(()));
            p.run().unwrap();
        }
    });
    let p = Pipeline::new("logs-under-churn");
    p.producer("gen", |out| out.emit_all(0..400u64).map_err(Into::into));
    p.map("work", |x: u64| {
        tracing::info!(item = x, "child log");
        Ok(x)
    })
    .wire()
    .executor(Exec::cow_fork(8).timeout(std::time::Duration::from_secs(20)));
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    let work = report.stage("work").unwrap();
    assert_eq!((work.items_out, work.failed), (400, 0), "{report}");
}
