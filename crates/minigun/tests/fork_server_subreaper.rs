//! A program that reaps its orphans (a subreaper, or PID 1 in a container) and whose fork
//! server dies with children alive: those children become the program's own when the server
//! dies, and the run reaps them, leaving no zombie. (Its own test binary: the subreaper
//! setting holds for the whole process.)
#![allow(unsafe_code)] // prctl, to make this process a subreaper

mod common;
use minigun::{Exec, Pipeline, RunError};
use std::time::Duration;

#[test]
fn children_orphaned_by_a_dead_fork_server_are_reaped_by_a_subreaper_parent() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's attributes.
    let set = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    let p = Pipeline::new("orphans");
    common::gen(&p, 1_000);
    p.map("work", |x: u64| {
        std::thread::sleep(Duration::from_millis(20));
        Ok(x)
    })
    .wire()
    .executor(Exec::cow_fork(2).fork_server());
    p.consumer("sink", |_: u64| Ok(()));
    let runnable = p.build().expect("valid pipeline");
    let (_, r) = common::kill_fork_server_mid_run(runnable, "work");
    assert!(matches!(r, Err(RunError::Aborted { .. })), "{r:?}");
    // The server's children were running items: each became this process's child when the
    // server died, and is reaped.
    common::assert_no_children();
}
