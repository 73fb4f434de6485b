//! SIGTERM during a run with an async stage under `ipc_fork(k).tasks_per_worker(n)`: the run
//! stops at once, the items in the workers are cancelled, no worker is left.
//!
//! One test in this binary: the signal goes to this whole process.
#![cfg(all(feature = "async", target_os = "linux"))]
mod common;
use minigun::Pipeline;
use std::time::Duration;

#[test]
fn sigterm_ends_the_run_and_its_async_workers() {
    let p = Pipeline::new("sigterm");
    p.producer("gen", |out| out.emit_all(0..100_000u64).map_err(Into::into));
    p.consumer_async("hang", |_: u64| async move {
        std::future::pending::<()>().await;
        Ok(())
    })
    .ipc_fork(2)
    .tasks_per_worker(100);
    let run = p.spawn().expect("valid");
    let monitor = run.monitor();
    common::wait_until("200 in flight", Duration::from_secs(30), || {
        let snap = monitor.snapshot();
        snap.stages
            .iter()
            .any(|s| s.name == "hang" && s.in_flight == 200)
    });
    let me = nix::unistd::Pid::this();
    nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGTERM).unwrap();
    let report = run.wait().expect("a stopped run reports");
    assert_eq!(report.signal, Some(libc::SIGTERM));
    assert!(report.stopped);
    let s = report.stage("hang").unwrap();
    assert!(s.cancelled >= 200, "{s:?}");
    assert_eq!((s.items_in, s.failed), (s.cancelled, 0));
    common::assert_no_children();
}
