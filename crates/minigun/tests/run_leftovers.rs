//! A process with no run active holds no thread and no descriptor of ours: the signal watcher
//! and its pipe exist only during runs (and the first run leaves nothing behind either).
//!
//! One test in this binary, so that no other test's threads or descriptors are counted.
mod common;
use common::{gen, open_fds, threads};
use minigun::{Exec, Pipeline};

/// A run with threads and forked workers: in the foreground, or (odd rounds) in the
/// background, waited for.
fn run_once(round: u64) {
    let p = Pipeline::new("leftovers");
    gen(&p, 200);
    p.map("double", |x: u64| Ok(x * 2))
        .executor(Exec::threads(2));
    p.map("fork", |x: u64| Ok(x + 1)).ipc_fork(2);
    p.consumer("sink", |_: u64| Ok(()));
    let report = match round % 2 {
        0 => p.run().expect("run"),
        _ => p.spawn().expect("spawn").wait().expect("wait"),
    };
    assert_eq!(report.stage("sink").unwrap().items_in, 200, "round {round}");
}

#[test]
fn runs_leave_no_thread_and_no_descriptor() {
    let (tasks, fds) = (threads(), open_fds());
    for round in 0..4 {
        run_once(round);
        assert_eq!(threads(), tasks, "threads after run {round}");
        assert_eq!(open_fds(), fds, "descriptors after run {round}");
    }
}
