//! cow_fork with several items per child: the same results from far fewer children, and a
//! crash fails only the item the child was running; the items after it are run again in
//! another child.
#![allow(unsafe_code)] // Crashes a child for real.
mod common;
use common::Sink;
use minigun::{Exec, FailureKind, Output, Pipeline};
use std::collections::HashSet;
use std::time::Duration;

/// Runs 200 items through a cow_fork(3) stage with `per_fork` items per child, aborting the
/// child that runs `crash_on`. Returns each result (item times 3) with the pid of the child
/// that made it, sorted, and the report.
///
/// The stage starts only once the producer has emitted every item, so its children are given
/// full batches of consecutive items (`per_fork` divides the hand-off chunk of 32): the child
/// running item `x` was given the items from `x / per_fork * per_fork` on.
fn run(per_fork: usize, crash_on: Option<u64>) -> (Vec<(u64, u32)>, minigun::RunReport) {
    run_with(
        Exec::cow_fork(3).items_per_fork(per_fork),
        200,
        Duration::ZERO,
        crash_on,
    )
}

/// `exec`, with its children forked by a fork server if `served`.
fn served(exec: Exec, served: bool) -> Exec {
    match served {
        true => exec.fork_server(),
        false => exec,
    }
}

/// [`run`] with any executor, `n` items, each taking `each`.
fn run_with(
    exec: Exec,
    n: u64,
    each: Duration,
    crash_on: Option<u64>,
) -> (Vec<(u64, u32)>, minigun::RunReport) {
    let p = Pipeline::new("batched-forks");
    let got = Sink::default();
    let g = got.clone();
    let (all_sent, wait_for_all) = std::sync::mpsc::channel();
    p.producer("gen", move |out| {
        out.emit_all(0..n)?;
        all_sent.send(()).map_err(|e| e.to_string())?;
        Ok(())
    });
    p.processor("work", move |x: u64, out: &mut Output<'_, (u64, u32)>| {
        if Some(x) == crash_on {
            // SAFETY: kills this child process, as a crash would.
            unsafe { libc::abort() };
        }
        std::thread::sleep(each);
        out.emit((x * 3, std::process::id()))?;
        Ok(())
    })
    .wire()
    .executor(exec)
    .before(move || {
        wait_for_all
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| format!("the producer did not finish: {e}").into())
    });
    p.consumer("sink", move |x: (u64, u32)| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert!(common::live_children().is_empty() && common::zombies().is_empty());
    (got.sorted(), report)
}

/// Asserts that the results came from few children: at most twice one per `per_fork` items
/// (one child per item would make 200).
fn assert_few_children(got: &[(u64, u32)], per_fork: usize) {
    let pids: HashSet<u32> = got.iter().map(|&(_, pid)| pid).collect();
    let most = 2 * 200usize.div_ceil(per_fork);
    assert!(
        pids.len() <= most,
        "items_per_fork {per_fork}: {} children for 200 items, expected at most {most}",
        pids.len()
    );
}

#[test]
fn several_items_per_child_give_the_same_results() {
    let want: Vec<u64> = (0..200).map(|x| x * 3).collect();
    for per_fork in [1, 4, 16] {
        let (got, report) = run(per_fork, None);
        let results: Vec<u64> = got.iter().map(|&(y, _)| y).collect();
        assert_eq!(results, want, "items_per_fork {per_fork}");
        assert_eq!(report.stage("work").unwrap().latency.count, 200);
        if per_fork > 1 {
            assert_few_children(&got, per_fork);
        }
    }
}

#[test]
fn a_crash_fails_only_the_running_item() {
    crash_fails_only_the_running_item(false);
}

#[test]
fn with_a_fork_server_a_crash_fails_only_the_running_item() {
    crash_fails_only_the_running_item(true);
}

fn crash_fails_only_the_running_item(server: bool) {
    for per_fork in [4, 16] {
        let exec = served(Exec::cow_fork(3).items_per_fork(per_fork), server);
        let (got, report) = run_with(exec, 200, Duration::ZERO, Some(77));
        let results: Vec<u64> = got.iter().map(|&(y, _)| y).collect();
        let want: Vec<u64> = (0..200).filter(|&x| x != 77).map(|x| x * 3).collect();
        assert_eq!(results, want, "items_per_fork {per_fork}: {report}");
        let work = report.stage("work").unwrap();
        assert_eq!((work.failed, work.retried, work.items_in), (1, 0, 200));
        let f = &report.failures[0];
        assert_eq!(
            (f.item, &f.kind),
            (Some(77), &FailureKind::Signal(libc::SIGABRT))
        );
        assert_few_children(&got, per_fork);
        // The crashed child was given the batch [first, first + per_fork), which holds 77
        // and the items 78 and 79 after it. It ran the items before 77, and no other.
        let crashed = f.pid.expect("the crashed child's pid");
        let first = 77 / per_fork as u64 * per_fork as u64;
        let ran_in_crashed: Vec<u64> = got
            .iter()
            .filter(|&&(_, pid)| pid == crashed)
            .map(|&(y, _)| y / 3)
            .collect();
        assert_eq!(
            ran_in_crashed,
            (first..77).collect::<Vec<_>>(),
            "items_per_fork {per_fork}: the items the crashed child ran"
        );
        // The items after 77 in its batch ran again, in another child.
        for x in 78..first + per_fork as u64 {
            let &(_, pid) = got.iter().find(|&&(y, _)| y == x * 3).unwrap();
            assert_ne!(
                pid, crashed,
                "items_per_fork {per_fork}: item {x} ran in the crashed child"
            );
        }
    }
}

/// [`run_with`] on cow_fork(3) choosing up to 16 items per child itself.
fn auto(n: u64, each: Duration, crash_on: Option<u64>) -> (Vec<(u64, u32)>, minigun::RunReport) {
    auto_served(n, each, crash_on, false)
}

/// [`auto`], with a fork server if `server`.
fn auto_served(
    n: u64,
    each: Duration,
    crash_on: Option<u64>,
    server: bool,
) -> (Vec<(u64, u32)>, minigun::RunReport) {
    let exec = served(Exec::cow_fork(3).items_per_fork_auto(16), server);
    run_with(exec, n, each, crash_on)
}

/// Items per child, by child.
fn per_child(got: &[(u64, u32)]) -> std::collections::HashMap<u32, usize> {
    let mut n = std::collections::HashMap::new();
    for &(_, pid) in got {
        *n.entry(pid).or_insert(0) += 1;
    }
    n
}

#[test]
fn automatic_items_per_fork_shares_forks_over_cheap_items_within_its_bound() {
    let (got, report) = auto(200, Duration::ZERO, None);
    let results: Vec<u64> = got.iter().map(|&(y, _)| y).collect();
    assert_eq!(results, (0..200).map(|x| x * 3).collect::<Vec<_>>());
    assert_eq!(report.stage("work").unwrap().latency.count, 200);
    let children = per_child(&got);
    let most = children.values().max().copied().unwrap_or(0);
    assert!(
        most <= 16,
        "a child ran {most} items, above the bound of 16"
    );
    assert!(
        children.len() < 100,
        "cheap items should share children: {} children for 200 items",
        children.len()
    );
}

#[test]
fn automatic_items_per_fork_gives_slow_items_a_child_each() {
    // Items of 400 ms against a fork of well under 40 ms, even as a loaded machine's parent
    // sees it (fork to reaped exit): one item per child keeps the fork's share under a tenth.
    let (got, _) = auto(12, Duration::from_millis(400), None);
    assert_eq!(got.len(), 12);
    let children = per_child(&got);
    assert_eq!(
        children.len(),
        12,
        "each slow item in its own child: {children:?}"
    );
}

#[test]
fn with_automatic_items_per_fork_a_crash_fails_only_the_running_item() {
    auto_crash_fails_only_the_running_item(false);
}

#[test]
fn with_automatic_items_per_fork_and_a_fork_server_a_crash_fails_only_the_running_item() {
    auto_crash_fails_only_the_running_item(true);
}

fn auto_crash_fails_only_the_running_item(server: bool) {
    let (got, report) = auto_served(200, Duration::ZERO, Some(150), server);
    let results: Vec<u64> = got.iter().map(|&(y, _)| y).collect();
    let want: Vec<u64> = (0..200).filter(|&x| x != 150).map(|x| x * 3).collect();
    assert_eq!(results, want, "{report}");
    let work = report.stage("work").unwrap();
    assert_eq!((work.failed, work.retried, work.items_in), (1, 0, 200));
    let f = &report.failures[0];
    assert_eq!(
        (f.item, &f.kind),
        (Some(150), &FailureKind::Signal(libc::SIGABRT))
    );
    let crashed = f.pid.expect("the crashed child's pid");
    assert!(
        got.iter().all(|&(y, pid)| pid != crashed || y / 3 < 150),
        "only items before the crash ran in the crashed child"
    );
}

#[test]
fn an_item_started_after_an_overdue_one_answered_is_not_blamed_for_its_kill() {
    overdue_item_answers_late(false);
}

#[test]
fn with_a_fork_server_an_item_started_after_an_overdue_one_answered_is_not_blamed() {
    overdue_item_answers_late(true);
}

/// One child with items 0, 1, 2 and a 300 ms limit per item ([`common::overdue`]): item 1,
/// started in the child after item 0 overran and answered, did not overrun anything: it runs
/// again in another child, its attempt not counted.
fn overdue_item_answers_late(server: bool) {
    let exec = Exec::cow_fork(1)
        .items_per_fork(3)
        .timeout(Duration::from_millis(300));
    common::overdue_item_runs_again(served(exec, server));
}

/// Eight items to a child under a 900 us time limit per item, shorter than the delay before
/// the parent watches a child's pipe (1 ms after the fork): seven answer at once, the eighth
/// after 1 ms (its output, larger than the child's write buffer, sent first). So the child is
/// still alive, its answers waiting in the pipe, when the parent first looks at it, at the
/// first item's deadline. Reading them before judging it, the parent gives the eighth item
/// its own limit: no child is killed for an item that had answered (which would fail the
/// eighth with the SIGTERM). A machine that stalls a child for the whole limit can still time
/// an item out (`Timeout`, the limit's own verdict); the slow item always does, and its output
/// is never delivered.
#[test]
fn a_time_limit_under_the_watch_delay_judges_a_child_after_reading_its_answers() {
    const N: u64 = 32;
    const SLOW: u64 = 13;
    for run in 0..5 {
        let p = Pipeline::new("quick");
        common::gen(&p, N);
        let got = Sink::default();
        let g = got.clone();
        let exec = Exec::cow_fork(2)
            .items_per_fork(8)
            .timeout(Duration::from_micros(900));
        p.processor("work", |x: u64, out: &mut Output<'_, (u64, String)>| {
            out.emit((x, "x".repeat(70_000)))?;
            match x {
                SLOW => std::thread::sleep(Duration::from_millis(50)),
                x if x % 8 == 7 => std::thread::sleep(Duration::from_millis(1)),
                _ => {}
            }
            Ok(())
        })
        .wire()
        .executor(exec);
        p.consumer("sink", move |(x, _): (u64, String)| {
            g.push(x);
            Ok(())
        });
        let report = common::run_bounded(p).expect("the run succeeds");
        common::assert_no_children();
        let not_timeouts: Vec<_> = (report.failures.iter())
            .filter(|f| f.kind != FailureKind::Timeout)
            .collect();
        assert!(
            not_timeouts.is_empty(),
            "run {run}: items failed although they answered in time: {not_timeouts:?}"
        );
        let failed: Vec<u64> = report.failures.iter().filter_map(|f| f.item).collect();
        assert!(failed.contains(&SLOW), "run {run}: {:?}", report.failures);
        let want: Vec<u64> = (0..N).filter(|x| !failed.contains(x)).collect();
        assert_eq!(
            got.sorted(),
            want,
            "run {run}: each answered item's output once"
        );
    }
}
