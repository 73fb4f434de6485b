//! cow_fork with a fork server (`Exec::fork_server`): the same results as cow_fork (one
//! child per item, `items_per_fork`, the automatic setting, ordered or not), children that
//! see the parent as it was when the run started, the hooks where the docs say, logs from
//! children, definition-time refusal of an input that cannot cross, and a fork server killed
//! mid-run failing its items clearly and ending the run, with nothing left behind. Crashes,
//! timeouts and retries under it are in the crash matrix (`fork_crashes.rs`).

mod common;
use common::{assert_no_children, Sink};
use minigun::{Exec, OnError, Pipeline, RunError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `n` items through `exec` (f(x) = 3x, with the pid of the child), in arrival order.
fn run(exec: Exec, n: u64) -> Vec<(u64, u32)> {
    let p = Pipeline::new("served");
    let got = Sink::default();
    common::gen(&p, n);
    p.map("work", |x: u64| Ok((x * 3, std::process::id())))
        .wire()
        .executor(exec);
    let g = got.clone();
    p.consumer("sink", move |x: (u64, u32)| {
        g.push(x);
        Ok(())
    });
    let r = common::run_bounded(p).expect("the run succeeds");
    assert_eq!(r.failures_total, 0, "{:?}", r.failures);
    assert_no_children();
    let arrived = got.0.lock().unwrap().clone();
    arrived
}

#[test]
fn the_results_are_cow_forks_under_every_setting() {
    let n = 120;
    let values = |v: &[(u64, u32)]| {
        let mut v: Vec<u64> = v.iter().map(|x| x.0).collect();
        v.sort_unstable();
        v
    };
    let plain = run(Exec::cow_fork(3), n);
    let settings = [
        Exec::cow_fork(3).fork_server(),
        Exec::cow_fork(3).items_per_fork(4).fork_server(),
        Exec::cow_fork(3).items_per_fork_auto(16).fork_server(),
        Exec::cow_fork(1).fork_server(),
    ];
    for exec in settings {
        let got = run(exec.clone(), n);
        assert_eq!(values(&got), values(&plain), "{exec:?}");
        assert!(
            got.iter().all(|x| x.1 != std::process::id()),
            "run in children"
        );
    }
    // One child per item: every item its own pid.
    let one = run(Exec::cow_fork(3).fork_server(), n);
    let pids: std::collections::HashSet<u32> = one.iter().map(|x| x.1).collect();
    assert_eq!(pids.len(), n as usize, "one child per item");
    // Ordered: exactly the input order.
    let ordered = run(Exec::cow_fork(4).ordered().fork_server(), n);
    let want: Vec<u64> = (0..n).map(|x| x * 3).collect();
    assert_eq!(ordered.iter().map(|x| x.0).collect::<Vec<_>>(), want);
}

/// Written by the parent; read by children.
static VALUE: AtomicU64 = AtomicU64::new(1);

/// What the children of `exec` read in [`VALUE`] when the producer set it to 2 before
/// emitting (after the run started).
fn values_seen(exec: Exec) -> Vec<u64> {
    VALUE.store(1, Ordering::SeqCst);
    let p = Pipeline::new("late-data");
    let got = Sink::default();
    p.producer("gen", |out| {
        VALUE.store(2, Ordering::SeqCst);
        out.emit_all(0..8u64).map_err(Into::into)
    });
    p.map("work", |_: u64| Ok(VALUE.load(Ordering::SeqCst)))
        .wire()
        .executor(exec);
    Sink::<u64>::consume(&got, &p);
    common::run_bounded(p).expect("the run succeeds");
    assert_no_children();
    got.sorted()
}

#[test]
fn children_of_the_server_see_the_parent_as_it_was_when_the_run_started() {
    assert_eq!(
        values_seen(Exec::cow_fork(2)),
        vec![2; 8],
        "cow_fork forks later"
    );
    assert_eq!(
        values_seen(Exec::cow_fork(2).fork_server()),
        vec![1; 8],
        "the server was forked before the producer wrote"
    );
}

static BEFORE: AtomicU64 = AtomicU64::new(0);
static AFTER: AtomicU64 = AtomicU64::new(0);

#[test]
fn before_fork_runs_once_in_the_parent_first_and_after_fork_in_every_child() {
    let p = Pipeline::new("hooks");
    let got = Sink::default();
    common::gen(&p, 10);
    p.map("work", |_: u64| {
        Ok((BEFORE.load(Ordering::SeqCst), AFTER.load(Ordering::SeqCst)))
    })
    .wire()
    .executor(Exec::cow_fork(2).fork_server())
    .before_fork(|| {
        BEFORE.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
    .after_fork(|| {
        AFTER.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    Sink::<(u64, u64)>::consume(&got, &p);
    common::run_bounded(p).expect("the run succeeds");
    assert_no_children();
    // Each child saw before_fork's write (made before the server) and its own after_fork.
    assert_eq!(got.sorted(), vec![(1, 1); 10]);
    assert_eq!(BEFORE.load(Ordering::SeqCst), 1, "once, in the parent");
    assert_eq!(AFTER.load(Ordering::SeqCst), 0, "never in the parent");
}

#[test]
fn records_logged_in_children_reach_the_parent() {
    let seen = common::capture_events(tracing::Level::INFO);
    let p = Pipeline::new("logs");
    common::gen(&p, 3);
    p.map("work", |x: u64| {
        tracing::info!(item = x, "hello from a served child");
        Ok(x)
    })
    .wire()
    .executor(Exec::cow_fork(2).fork_server());
    p.consumer("sink", |_: u64| Ok(()));
    common::run_bounded(p).expect("the run succeeds");
    assert_eq!(
        seen.count("hello from a served child"),
        3,
        "{:?}",
        seen.all()
    );
}

#[test]
fn a_stage_whose_input_cannot_cross_is_refused_when_built() {
    #[derive(Clone)]
    struct Local(u64);
    let p = Pipeline::new("refused");
    p.producer("gen", |out| out.emit(Local(1)).map_err(Into::into));
    p.map("work", |x: Local| Ok(x.0))
        .cow_fork(2)
        .executor(Exec::cow_fork(2).fork_server());
    p.consumer("sink", |_: u64| Ok(()));
    let e = p.build().expect_err("refused").to_string();
    assert!(e.contains("\"work\"") && e.contains("fork_server"), "{e}");
}

#[test]
fn a_killed_fork_server_fails_its_items_clearly_and_ends_the_run() {
    // A first run opens what a process keeps open across runs (the signal pipe).
    run(Exec::cow_fork(2).fork_server(), 4);
    let fds = common::open_fds();
    let p = Pipeline::new("lost");
    common::gen(&p, 1_000);
    p.map("work", |x: u64| {
        std::thread::sleep(Duration::from_millis(20));
        Ok(x)
    })
    .wire()
    .executor(Exec::cow_fork(2).fork_server())
    .on_error(OnError::retry(2));
    p.consumer("sink", |_: u64| Ok(()));
    let runnable = p.build().expect("valid pipeline");
    let (server, r) = common::kill_fork_server_mid_run(runnable, "work");
    let Err(RunError::Aborted { cause, report }) = r else {
        panic!("the stage fails: {r:?}");
    };
    assert_eq!(cause.stage, "work");
    assert!(
        cause.message.contains("fork server") && cause.message.contains("died"),
        "{cause:?}"
    );
    let work = report.stage("work").unwrap();
    assert!(work.items_out < 1_000, "the run stopped early");
    assert!(!report.failures.is_empty(), "the items in flight failed");
    for f in &report.failures {
        assert!(
            f.message.contains("fork server"),
            "in-flight items say why: {f:?}"
        );
    }
    assert_no_children();
    common::wait_until(
        "the server's children are gone",
        Duration::from_secs(30),
        || common::named_children(server, "mg:work").is_empty(),
    );
    assert_eq!(common::open_fds(), fds, "no fd left open");
}

#[test]
fn a_failing_run_leaves_no_child_no_zombie_and_no_fd() {
    run(Exec::cow_fork(2).fork_server(), 4);
    let fds = common::open_fds();
    for _ in 0..2 {
        let p = Pipeline::new("fail-fast");
        common::gen(&p, 200);
        p.map("work", |x: u64| {
            if x == 20 {
                return Err("item 20 fails".into());
            }
            std::thread::sleep(Duration::from_millis(5));
            Ok(x)
        })
        .wire()
        .executor(Exec::cow_fork(3).fork_server())
        .on_error(OnError::fail_fast());
        p.consumer("sink", |_: u64| Ok(()));
        let r = common::run_bounded(p);
        assert!(matches!(r, Err(RunError::Aborted { .. })), "{r:?}");
        assert_no_children();
    }
    run(Exec::cow_fork(2).fork_server(), 50);
    assert_eq!(common::open_fds(), fds, "no fd left open");
}

#[test]
fn the_stage_handle_sets_the_fork_server_and_declares_the_input() {
    let p = Pipeline::new("served-handle");
    let got = Sink::default();
    common::gen(&p, 20);
    // No `.wire()`: the handle's fork_server declares the input itself.
    p.map("work", |x: u64| Ok(x * 3))
        .cow_fork(2)
        .fork_server()
        .timeout(Duration::from_secs(30));
    let g = got.clone();
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let r = common::run_bounded(p).expect("the run succeeds");
    let work = r.stage("work").unwrap();
    assert_eq!(work.executor, "cow_fork(2) fork_server", "{r}");
    assert_eq!(got.sorted(), (0..20).map(|x| x * 3).collect::<Vec<_>>());
    assert_no_children();
}

// One child runs, the next waits in the server; the run is cancelled. The running child is
// ended, and the server, which forks the next child as soon as it reaps one, must not fork
// the waiting one then. (Before the parent told the server, it did in about a quarter of
// the rounds: a child started after the cancel, its items run, its hooks too.)
#[test]
fn items_waiting_in_the_server_when_the_run_is_cancelled_never_start() {
    let mut late = Vec::new();
    for round in 0..40 {
        let per_fork = 1 + round % 2;
        let dir = common::TempDir::new("served-cancel");
        let started = dir.path().to_path_buf();
        let p = Pipeline::new("cancelled");
        common::gen(&p, 8);
        p.map("work", |x: u64| {
            std::thread::sleep(Duration::from_secs(5));
            Ok(x)
        })
        .wire()
        // One child at a time: the next one waits in the server.
        .executor(Exec::cow_fork(1).items_per_fork(per_fork).fork_server())
        .after_fork(move || {
            std::fs::write(started.join(std::process::id().to_string()), b"")?;
            Ok(())
        });
        p.consumer("sink", |_: u64| Ok(()));
        let handle = p.build().expect("valid pipeline").spawn();
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        common::wait_until("a child starts", Duration::from_secs(30), || count() > 0);
        handle.cancel();
        let r = handle.wait();
        let report = match r {
            Ok(r) => r,
            Err(RunError::Aborted { report, .. }) => *report,
            Err(e) => panic!("{e:?}"),
        };
        if count() > 1 {
            late.push(round);
        }
        let work = report.stage("work").unwrap();
        assert_eq!(work.failed, 0, "{:?}", report.failures);
        assert_eq!(work.cancelled, work.items_in, "{report}");
        assert_no_children();
    }
    assert!(
        late.is_empty(),
        "children started after the cancel in rounds {late:?}"
    );
}

/// What a child's stage code sees of its signal state: the signals blocked, and whether
/// SIGTERM has its default disposition and SIGINT and SIGPIPE are ignored.
#[allow(unsafe_code)] // Reads this process's signal mask and dispositions.
fn signal_state() -> (u64, bool, bool, bool) {
    // SAFETY: sigset_t and sigaction are plain old data (zeroed is valid); the calls only
    // write into them (no mask or disposition is changed).
    unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
        let blocked = (1..32)
            .filter(|&s| libc::sigismember(&mask, s) == 1)
            .fold(0u64, |m, s| m | 1 << s);
        let handler = |sig| {
            let mut a: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut a);
            a.sa_sigaction
        };
        (
            blocked,
            handler(libc::SIGTERM) == libc::SIG_DFL,
            handler(libc::SIGINT) == libc::SIG_IGN,
            handler(libc::SIGPIPE) == libc::SIG_IGN,
        )
    }
}

/// A child forked by the fork server starts in the state of one forked by the parent (the
/// server resets nothing for it: it is single-threaded and installs no handler, and only
/// SIGTERM, which it keeps blocked for itself, is unblocked in the child): nothing blocked,
/// SIGTERM at its default, SIGINT and SIGPIPE ignored.
#[test]
fn a_served_child_starts_with_the_signal_state_of_one_forked_by_the_parent() {
    for exec in [Exec::cow_fork(2), Exec::cow_fork(2).fork_server()] {
        let p = Pipeline::new("signals");
        let got: Sink<(u64, bool, bool, bool)> = Sink::default();
        common::gen(&p, 6);
        p.map("state", |_: u64| Ok(signal_state()))
            .wire()
            .executor(exec.clone());
        let g = got.clone();
        p.consumer("sink", move |x| {
            g.push(x);
            Ok(())
        });
        let r = common::run_bounded(p).expect("the run succeeds");
        assert_eq!(r.failures_total, 0, "{exec:?}: {:?}", r.failures);
        let states = got.0.lock().unwrap().clone();
        assert_eq!(states.len(), 6, "{exec:?}");
        for s in states {
            assert_eq!(
                s,
                (0, true, true, true),
                "{exec:?}: (blocked, term, int, pipe)"
            );
        }
    }
    assert_no_children();
}
