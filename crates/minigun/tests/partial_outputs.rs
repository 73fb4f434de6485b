//! An item's outputs count only if the item succeeds: under a fork executor, outputs that a
//! failed attempt emitted before it crashed (or returned an error) never reach the
//! consumer. So a retried item delivers exactly what its successful attempt emitted, once,
//! and a skipped or dead-lettered item delivers nothing.
#![allow(unsafe_code)] // a child kills itself for real

mod common;
use common::{assert_no_children, Sink, TempDir};
use minigun::{Exec, Failed, FailureKind, OnError, Output, Pipeline, RunReport, StageResult};
use std::path::{Path, PathBuf};

const N: u64 = 10;
const BAD: u64 = 5;
/// Outputs per item.
const OUTS: u32 = 3;

/// How the bad item's attempt ends after it emitted its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// SIGKILL to itself. Its outputs are large, so each one has been written to the pipe
    /// (and reached the parent) before the kill.
    Kill,
    /// An error returned from stage code, after small outputs that travel in the same write
    /// as the error.
    Error,
}

impl End {
    fn kind(self) -> FailureKind {
        match self {
            End::Kill => FailureKind::Signal(libc::SIGKILL),
            End::Error => FailureKind::Error,
        }
    }
    /// Padding per output: more than a child's write buffer for `Kill`.
    fn pad(self) -> usize {
        match self {
            End::Kill => 70_000,
            End::Error => 8,
        }
    }
}

/// What the bad item does on each attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    /// Fails on its first attempt only (a marker file records that it ran).
    Once,
    /// Fails on every attempt.
    Always,
}

/// Ends the running (forked) attempt as `end` says.
fn end_attempt(end: End) -> StageResult {
    match end {
        End::Kill => {
            // SAFETY: kill(2) on this (forked child) process's own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            // Still alive after SIGKILL: a wrong failure kind, not a hang.
            std::process::exit(99)
        }
        End::Error => Err("item five fails after its outputs".into()),
    }
}

/// The stage's code: `OUTS` outputs `(item, k, padding)` per item; item `BAD` then ends its
/// attempt with `end` (each attempt, or only the first: `marker` does not exist yet).
fn work(
    x: u64,
    out: &mut Output<'_, (u64, u32, String)>,
    end: End,
    bad: Bad,
    marker: &Path,
) -> StageResult {
    for k in 0..OUTS {
        out.emit((x, k, "x".repeat(end.pad())))?;
    }
    if x == BAD {
        let first = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(marker)
            .is_ok();
        if first || bad == Bad::Always {
            end_attempt(end)?;
        }
    }
    Ok(())
}

/// `N` items through "work" under `exec` with `policy`; returns the `(item, k)` the
/// consumer got, sorted, the items dead-lettered (with `dead_letter`), and the report.
fn run(
    exec: Exec,
    policy: OnError,
    dead_letter: bool,
    end: End,
    bad: Bad,
) -> (Vec<(u64, u32)>, Vec<u64>, RunReport) {
    let dir = TempDir::new("partial");
    let marker: PathBuf = dir.path().join("bad-item-ran");
    let p = Pipeline::new("partial");
    common::gen(&p, N);
    let s = p
        .processor("work", move |x: u64, out| work(x, out, end, bad, &marker))
        .wire()
        .executor(exec)
        .on_error(policy);
    let got: Sink<(u64, u32)> = Sink::default();
    let g = got.clone();
    p.consumer("collect", move |(x, k, _): (u64, u32, String)| {
        g.push((x, k));
        Ok(())
    });
    let dead: Sink<u64> = Sink::default();
    if dead_letter {
        let d = dead.clone();
        let dl = p.consumer("dead", move |f: Failed<u64>| {
            d.push(f.item);
            Ok(())
        });
        s.dead_letter(&dl);
    }
    let r = common::run_bounded(p).expect("the run succeeds");
    assert_no_children();
    (got.sorted(), dead.sorted(), r)
}

/// Every `(item, k)` of the items in `items`.
fn outputs_of(items: impl Iterator<Item = u64>) -> Vec<(u64, u32)> {
    items.flat_map(|x| (0..OUTS).map(move |k| (x, k))).collect()
}

/// The bad item fails once and is retried: each of its outputs arrives exactly once.
fn retried(exec: Exec, end: End) {
    let (got, _, r) = run(exec, OnError::retry(1), false, end, Bad::Once);
    let bad: Vec<_> = got.iter().filter(|(x, _)| *x == BAD).collect();
    assert_eq!(
        bad.len(),
        OUTS as usize,
        "the retried item's outputs arrive once, not with the failed attempt's too: {bad:?}"
    );
    assert_eq!(got, outputs_of(0..N), "every item's outputs, once each");
    let s = r.stage("work").expect("stage in the report");
    assert_eq!(s.retried, 1, "{:?}", r.failures);
    assert_eq!(s.failed, 0, "{:?}", r.failures);
    assert_eq!(s.items_out, N * OUTS as u64);
}

/// The bad item fails on every attempt and is skipped (or dead-lettered): none of its
/// outputs arrives.
fn dropped(exec: Exec, end: End, dead_letter: bool) {
    let (got, dead, r) = run(exec, OnError::skip(), dead_letter, end, Bad::Always);
    assert_eq!(
        got,
        outputs_of((0..N).filter(|&x| x != BAD)),
        "a failed item's outputs do not arrive"
    );
    let s = r.stage("work").expect("stage in the report");
    assert_eq!(s.failed, 1, "{:?}", r.failures);
    assert_eq!(s.items_out, (N - 1) * OUTS as u64);
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    assert_eq!(r.failures[0].item, Some(BAD));
    assert_eq!(r.failures[0].kind, end.kind());
    match dead_letter {
        true => assert_eq!(dead, vec![BAD], "the failed item is dead-lettered"),
        false => assert!(dead.is_empty()),
    }
}

/// One module per executor: retry, skip and dead letter, for a kill and an error.
macro_rules! per_exec {
    ($($name:ident => $exec:expr;)*) => {$(
        mod $name {
            use super::*;
            #[test]
            fn killed_then_retried_delivers_once() {
                retried($exec, End::Kill);
            }
            #[test]
            fn error_then_retried_delivers_once() {
                retried($exec, End::Error);
            }
            #[test]
            fn killed_and_skipped_delivers_nothing() {
                dropped($exec, End::Kill, false);
            }
            #[test]
            fn error_and_skipped_delivers_nothing() {
                dropped($exec, End::Error, false);
            }
            #[test]
            fn killed_and_dead_lettered_delivers_nothing() {
                dropped($exec, End::Kill, true);
            }
            #[test]
            fn error_and_dead_lettered_delivers_nothing() {
                dropped($exec, End::Error, true);
            }
        }
    )*};
}

per_exec! {
    ipc_fork => Exec::ipc_fork(2);
    ipc_fork_per_item => Exec::ipc_fork(2).batch_results(false);
    ipc_fork_ordered => Exec::ipc_fork(2).ordered();
    cow_fork => Exec::cow_fork(2);
    cow_fork_items_per_fork => Exec::cow_fork(2).items_per_fork(4);
    cow_fork_served => Exec::cow_fork(2).items_per_fork(4).fork_server();
}
