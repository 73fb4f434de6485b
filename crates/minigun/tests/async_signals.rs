//! SIGTERM during a run with an async stage: the run stops, the futures in flight are
//! dropped (their guards run), the report names the signal.
//!
//! One test in this binary: the signal goes to this whole process.
#![cfg(feature = "async")]
#![allow(unsafe_code)] // Sends a real SIGTERM to this process.
mod common;
use minigun::{Exec, Pipeline};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn sigterm_cancels_the_futures_in_flight() {
    let live = Arc::new(AtomicUsize::new(0));
    let l = live.clone();
    let p = Pipeline::new("sigterm");
    p.producer("gen", |out| out.emit_all(0..100_000u64).map_err(Into::into));
    p.consumer_async("hang", move |_: u64| {
        let l = l.clone();
        async move {
            l.fetch_add(1, Ordering::SeqCst);
            let _live = Live(l);
            std::future::pending::<()>().await;
            Ok(())
        }
    })
    .executor(Exec::tasks(500));
    let run = p.spawn().expect("valid");
    common::wait_until("500 in flight", Duration::from_secs(30), || {
        live.load(Ordering::SeqCst) == 500
    });
    // SAFETY: sends SIGTERM to this process, whose handler the run installed.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    let report = run.wait().expect("a stopped run reports");
    assert_eq!(report.signal, Some(libc::SIGTERM));
    assert!(report.stopped);
    assert_eq!(live.load(Ordering::SeqCst), 0, "every future was dropped");
    let s = report.stage("hang").unwrap();
    assert!(s.cancelled >= 500, "{s:?}");
    assert_eq!(s.items_in, s.cancelled);
}
