//! Crashes in forked children: every way a child can end badly is accounted for as exactly
//! one failed item with the right `FailureKind`, every other item still arrives, retries
//! recover items that crash once, and no run hangs or leaves a child behind.
#![allow(unsafe_code)] // raising signals and killing processes goes through libc

mod common;
use common::Sink;
use common::{assert_no_children, TempDir};
use minigun::{
    Exec, Failed, FailureKind, OnError, Pipeline, RunError, RunReport, StageRef, StageResult, Wire,
};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One of the two fork executors (ipc_fork also in strict request/response mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fork {
    Cow,
    /// cow_fork whose children are forked by its fork server.
    CowServed,
    /// ipc_fork with its defaults: a window of items in flight per worker, results sent in
    /// batches through shared memory.
    Ipc,
    /// ipc_fork with `in_flight(1)`: a worker holds one item at a time.
    IpcStrict,
    /// ipc_fork with `batch_results(false)`: workers write each item's results at once.
    IpcPerItem,
}

impl Fork {
    /// Puts the stage under this executor with `n` workers and an optional per-item timeout.
    fn apply<I: Wire, O: Wire>(
        self,
        s: &StageRef<I, O>,
        n: usize,
        timeout: Option<Duration>,
    ) -> StageRef<I, O> {
        let (s, exec) = match self {
            Fork::Cow => (s.cow_fork(n).stage(), Exec::cow_fork(n)),
            Fork::CowServed => (s.wire(), Exec::cow_fork(n).fork_server()),
            Fork::Ipc => (s.ipc_fork(n).stage(), Exec::ipc_fork(n)),
            Fork::IpcStrict => (s.ipc_fork(n).stage(), Exec::ipc_fork(n).in_flight(1)),
            Fork::IpcPerItem => (
                s.ipc_fork(n).stage(),
                Exec::ipc_fork(n).batch_results(false),
            ),
        };
        match timeout {
            None => s.executor(exec),
            Some(t) => s.executor(exec.timeout(t)),
        }
    }
}

/// How stage code ends an item badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    Error,
    Panic,
    Abort,
    Segv,
    Exit3,
    Kill,
    Hang,
}

impl Crash {
    fn kind(self) -> FailureKind {
        match self {
            Crash::Error => FailureKind::Error,
            Crash::Panic => FailureKind::Panic,
            Crash::Abort => FailureKind::Signal(libc::SIGABRT),
            Crash::Segv => FailureKind::Signal(libc::SIGSEGV),
            Crash::Exit3 => FailureKind::Exit(3),
            Crash::Kill => FailureKind::Signal(libc::SIGKILL),
            Crash::Hang => FailureKind::Timeout,
        }
    }

    /// The per-item timeout the stage needs for this crash.
    fn timeout(self) -> Option<Duration> {
        (self == Crash::Hang).then_some(HANG_TIMEOUT)
    }
}

/// Long enough for any healthy item in a loaded debug build, short enough for the test.
const HANG_TIMEOUT: Duration = Duration::from_millis(1000);

/// Runs in the forked child: ends the item the way `c` says.
fn crash(c: Crash) -> StageResult {
    match c {
        Crash::Error => return Err("item seven is bad".into()),
        Crash::Panic => panic!("item seven panicked"),
        // SAFETY: abort(3) ends this (forked child) process; it takes no arguments.
        Crash::Abort => unsafe { libc::abort() },
        Crash::Segv => {
            // SAFETY: raising a signal in this (forked child) process; SIGSEGV's default
            // disposition (the child resets dispositions) ends it.
            unsafe { libc::raise(libc::SIGSEGV) };
        }
        Crash::Exit3 => std::process::exit(3),
        Crash::Kill => {
            // SAFETY: kill(2) on this (forked child) process's own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        Crash::Hang => loop {
            std::thread::sleep(Duration::from_millis(50));
        },
    }
    // Still alive after a fatal signal: make it visible as a wrong kind, not a hang.
    std::process::exit(99)
}

/// Runs a built pipeline on its own thread; the receiver yields its result.
fn run_in_background(p: Pipeline) -> mpsc::Receiver<Result<RunReport, RunError>> {
    let r = p.build().expect("valid pipeline");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(r.run());
    });
    rx
}

/// Waits for a background run; fails the test instead of hanging.
fn finish(rx: mpsc::Receiver<Result<RunReport, RunError>>) -> RunReport {
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r.expect("the run succeeds (skip policy)"),
        Err(_) => panic!(
            "the run did not end within 60 s\n{}",
            common::where_everyone_waits()
        ),
    }
}

/// (item, kind) of each recorded failure, for assertion messages.
fn summary(r: &RunReport) -> Vec<(Option<u64>, FailureKind)> {
    r.failures
        .iter()
        .map(|f| (f.item, f.kind.clone()))
        .collect()
}

/// Nothing lost in a 1:1 stage: every item either came out or failed.
fn assert_accounted(r: &RunReport, stage: &str, n: u64, failed: u64) {
    let s = r.stage(stage).expect("stage in the report");
    assert_eq!(s.items_in, n, "{stage}: items_in");
    assert_eq!(s.failed, failed, "{stage}: failed ({:?})", r.failures);
    assert_eq!(s.items_out, n - failed, "{stage}: items_out");
    assert_eq!(s.items_out + s.failed, n, "{stage}: nothing lost");
    assert_eq!(s.cancelled, 0, "{stage}: cancelled");
}

/// Counters in memory that forked children share with the test (a fork inherits the
/// mapping): counting costs an atomic add, so a counted item stays fast.
struct SharedCounters {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    n: usize,
}

// SAFETY: the mapping lives as long as the value and is only accessed through atomics.
unsafe impl Send for SharedCounters {}
// SAFETY: as above.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    fn new(n: usize) -> Self {
        // SAFETY: a fresh anonymous shared mapping (zero-filled: valid AtomicU64s), checked
        // before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap");
        let ptr = std::ptr::NonNull::new(raw.cast()).expect("mmap never returns null");
        SharedCounters { ptr, n }
    }

    fn get(&self, i: u64) -> &std::sync::atomic::AtomicU64 {
        assert!((i as usize) < self.n);
        // SAFETY: `i` is inside the mapping, which outlives `&self`.
        unsafe { &*self.ptr.as_ptr().add(i as usize) }
    }

    /// Counts one more run of item `i`; how many there were before.
    fn count(&self, i: u64) -> u64 {
        self.get(i)
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// How many runs item `i` had.
    fn runs(&self, i: u64) -> u64 {
        self.get(i).load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The items among `0..n` that did not run exactly once.
    fn not_once(&self, n: u64) -> Vec<u64> {
        (0..n).filter(|&x| self.runs(x) != 1).collect()
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no borrow outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.n * 8) };
    }
}

const N: u64 = 20;
const BAD: u64 = 7;

/// 20 items through a 1:1 map under `fk` with 4 workers; item 7 crashes with `c`.
fn one_crash(fk: Fork, c: Crash) {
    let p = Pipeline::new("crash");
    let got = Sink::default();
    p.producer("gen", |out| {
        for i in 0..N {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p.map("work", move |x: u64| {
        if x == BAD {
            crash(c)?;
        }
        Ok(x * 2)
    });
    fk.apply(&s, 4, c.timeout());
    Sink::<u64>::consume(&got, &p);
    let r = finish(run_in_background(p));

    let expected: Vec<u64> = (0..N).filter(|&x| x != BAD).map(|x| x * 2).collect();
    assert_eq!(
        got.sorted(),
        expected,
        "every other item arrives; failures: {:?}",
        summary(&r)
    );
    assert_accounted(&r, "work", N, 1);
    assert_eq!(r.stage("work").unwrap().retried, 0);
    assert_eq!(r.failures_total, 1);
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    let f = &r.failures[0];
    assert_eq!(f.stage, "work");
    assert_eq!(f.item, Some(BAD), "{f:?}");
    assert_eq!(f.attempt, 1, "{f:?}");
    assert_eq!(f.kind, c.kind(), "{f:?}");
    let pid = f.pid.expect("fork failures name the child");
    assert_ne!(pid, std::process::id(), "the child, not the parent");
    match c {
        Crash::Error => assert!(f.message.contains("item seven is bad"), "{f:?}"),
        Crash::Panic => {
            assert!(f.message.contains("item seven panicked"), "{f:?}");
            assert!(f.message.contains("fork_crashes.rs"), "location: {f:?}");
        }
        Crash::Hang => assert!(f.message.contains("no result within"), "{f:?}"),
        _ => {}
    }
    // The hung child was killed, every child reaped.
    assert_no_children();
}

/// Like `one_crash`, with `retry(2)`: item 7 crashes on its first attempt only and then
/// succeeds. Every execution of an item is counted in memory shared by every process: the
/// count tells the attempts apart, and shows afterwards that item 7 ran twice and every other
/// item exactly once. (Counting costs nothing, so the items around item 7 stay fast and a
/// batched worker may still hold their results when it dies; the replay test below makes
/// sure of that case.)
fn crash_once_then_retry(fk: Fork, c: Crash) {
    let runs = std::sync::Arc::new(SharedCounters::new(N as usize));
    let counted = runs.clone();
    let p = Pipeline::new("retry");
    let got = Sink::default();
    p.producer("gen", |out| {
        for i in 0..N {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p
        .map("work", move |x: u64| {
            let k = counted.count(x);
            if x == BAD && k == 0 {
                crash(c)?;
            }
            Ok(x * 2)
        })
        .on_error(OnError::retry(2));
    fk.apply(&s, 4, c.timeout());
    Sink::<u64>::consume(&got, &p);
    let r = finish(run_in_background(p));

    let executions: Vec<u64> = (0..N).map(|x| runs.runs(x)).collect();
    let expected_runs: Vec<u64> = (0..N).map(|x| if x == BAD { 2 } else { 1 }).collect();
    assert_eq!(
        executions, expected_runs,
        "executions per item: item {BAD} twice, every other item once"
    );
    let expected: Vec<u64> = (0..N).map(|x| x * 2).collect();
    assert_eq!(
        got.sorted(),
        expected,
        "the retried item arrives once; failures: {:?}",
        summary(&r)
    );
    assert_accounted(&r, "work", N, 0);
    assert_eq!(r.stage("work").unwrap().retried, 1);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.failures_total, 0);
    assert_no_children();
}

/// One module per crash kind, with a test per executor, and the same with a retry.
macro_rules! crash_tests {
    ($($name:ident: $crash:expr;)*) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn cow_fork() {
                    one_crash(Fork::Cow, $crash);
                }
                #[test]
                fn cow_fork_server() {
                    one_crash(Fork::CowServed, $crash);
                }
                #[test]
                fn cow_fork_server_retried() {
                    crash_once_then_retry(Fork::CowServed, $crash);
                }
                #[test]
                fn ipc_fork() {
                    one_crash(Fork::Ipc, $crash);
                }
                #[test]
                fn cow_fork_retried() {
                    crash_once_then_retry(Fork::Cow, $crash);
                }
                #[test]
                fn ipc_fork_retried() {
                    crash_once_then_retry(Fork::Ipc, $crash);
                }
                #[test]
                fn ipc_fork_in_flight_1() {
                    one_crash(Fork::IpcStrict, $crash);
                }
                #[test]
                fn ipc_fork_per_item() {
                    one_crash(Fork::IpcPerItem, $crash);
                }
                #[test]
                fn ipc_fork_per_item_retried() {
                    crash_once_then_retry(Fork::IpcPerItem, $crash);
                }
            }
        )*
    };
}

crash_tests! {
    stage_error: Crash::Error;
    panic: Crash::Panic;
    abort: Crash::Abort;
    segfault: Crash::Segv;
    exit_3: Crash::Exit3;
    sigkill: Crash::Kill;
    timeout: Crash::Hang;
}

/// ipc_fork: a worker kills itself on item 50 of 200. Exactly that item fails; the items
/// queued behind it in the dead worker are re-dispatched; a replacement worker takes over.
#[test]
fn ipc_worker_killed_mid_stream() {
    worker_killed_mid_stream(Fork::Ipc);
}

#[test]
fn ipc_worker_killed_mid_stream_in_flight_1() {
    worker_killed_mid_stream(Fork::IpcStrict);
}

#[test]
fn ipc_worker_killed_mid_stream_per_item() {
    worker_killed_mid_stream(Fork::IpcPerItem);
}

fn worker_killed_mid_stream(fk: Fork) {
    let (n, bad) = (200u64, 50u64);
    let p = Pipeline::new("mid-stream");
    let got = Sink::default();
    common::gen(&p, n);
    let s = p.map("work", move |x: u64| {
        if x == bad {
            crash(Crash::Kill)?;
        }
        Ok((x * 2, std::process::id()))
    });
    fk.apply(&s, 4, None);
    Sink::<(u64, u32)>::consume(&got, &p);
    let r = finish(run_in_background(p));
    check_worker_replaced(&r, &got.sorted(), n, bad, None);
}

/// The checks shared by the two "worker dies mid-stream" tests.
fn check_worker_replaced(r: &RunReport, got: &[(u64, u32)], n: u64, bad: u64, killed: Option<u32>) {
    let values: Vec<u64> = got.iter().map(|x| x.0).collect();
    let expected: Vec<u64> = (0..n).filter(|&x| x != bad).map(|x| x * 2).collect();
    assert_eq!(
        values,
        expected,
        "every other item arrives exactly once; failures: {:?}",
        summary(r)
    );
    assert_accounted(r, "work", n, 1);
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    let f = &r.failures[0];
    assert_eq!(
        (f.item, &f.kind),
        (Some(bad), &FailureKind::Signal(libc::SIGKILL)),
        "{f:?}"
    );
    let dead = f.pid.expect("the dead worker's pid");
    if let Some(k) = killed {
        assert_eq!(dead, k, "the failure names the killed process");
    }
    // The dead worker ran items in order: nothing it reported can come after the bad item.
    for &(v, pid) in got {
        if pid == dead {
            assert!(v / 2 < bad, "item {} came from the dead worker", v / 2);
        }
    }
    // Four original workers plus at least one replacement produced results.
    let pids: std::collections::BTreeSet<u32> = got.iter().map(|x| x.1).collect();
    assert!(
        pids.len() >= 5,
        "a replacement worker took over after the death: {pids:?}"
    );
    assert!(!pids.contains(&std::process::id()));
    assert_no_children();
}

/// The test kills the child running item 50 from outside (the child announces its pid in a
/// file and then waits to be killed). Exactly that item fails; everything else arrives; for
/// ipc_fork a replacement worker takes over.
fn killed_from_outside(fk: Fork) {
    let dir = TempDir::new("outside");
    let pidfile = dir.path().join("pid");
    let (n, bad) = (200u64, 50u64);
    let p = Pipeline::new("outside");
    let got = Sink::default();
    common::gen(&p, n);
    let pf = pidfile.clone();
    let s = p.map("work", move |x: u64| {
        // Only the first attempt announces itself and waits to be killed: if the item were
        // run again, it would go through (and the checks below say so) instead of hanging.
        let claim = pf.with_extension("claimed");
        if x == bad && std::fs::File::create_new(&claim).is_ok() {
            let tmp = pf.with_extension("tmp");
            std::fs::write(&tmp, std::process::id().to_string())?;
            std::fs::rename(&tmp, &pf)?;
            crash(Crash::Hang)?;
        }
        Ok((x * 2, std::process::id()))
    });
    fk.apply(&s, 4, None);
    Sink::<(u64, u32)>::consume(&got, &p);
    let rx = run_in_background(p);
    let pid: i32 = common::wait_for("the child of item 50", Duration::from_secs(30), || {
        std::fs::read_to_string(&pidfile).ok()?.parse().ok()
    });
    assert_ne!(pid as u32, std::process::id());
    // SAFETY: kill(2) on the pid of a child of this process that is blocked in the stage
    // (it is not reaped before its item ends, so the pid cannot have been reused).
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill the child of item 50");
    let r = finish(rx);
    let got = got.sorted();
    match fk {
        Fork::Ipc | Fork::IpcStrict | Fork::IpcPerItem => {
            check_worker_replaced(&r, &got, n, bad, Some(pid as u32))
        }
        Fork::Cow | Fork::CowServed => {
            let values: Vec<u64> = got.iter().map(|x| x.0).collect();
            let expected: Vec<u64> = (0..n).filter(|&x| x != bad).map(|x| x * 2).collect();
            assert_eq!(values, expected, "failures: {:?}", summary(&r));
            assert_accounted(&r, "work", n, 1);
            assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
            let f = &r.failures[0];
            assert_eq!(f.item, Some(bad), "{f:?}");
            assert_eq!(f.kind, FailureKind::Signal(libc::SIGKILL), "{f:?}");
            assert_eq!(f.pid, Some(pid as u32), "{f:?}");
            assert_no_children();
        }
    }
}

#[test]
fn cow_child_killed_from_outside() {
    killed_from_outside(Fork::Cow);
}

#[test]
fn cow_fork_server_child_killed_from_outside() {
    killed_from_outside(Fork::CowServed);
}

#[test]
fn ipc_worker_killed_from_outside() {
    killed_from_outside(Fork::Ipc);
}

#[test]
fn ipc_worker_killed_from_outside_per_item() {
    killed_from_outside(Fork::IpcPerItem);
}

/// Every way an item can end badly except hanging.
const FATAL: [Crash; 6] = [
    Crash::Error,
    Crash::Panic,
    Crash::Abort,
    Crash::Segv,
    Crash::Exit3,
    Crash::Kill,
];

/// Every fifth item crashes, each time a different way: each is one failure of its own kind,
/// the rest succeed. For ipc_fork this makes workers die repeatedly (replacement and backoff).
fn many_crashes(fk: Fork) {
    let n = 120u64;
    let which = move |x: u64| (x % 5 == 2).then(|| FATAL[(x / 5) as usize % FATAL.len()]);
    let p = Pipeline::new("many");
    let got = Sink::default();
    common::gen(&p, n);
    let s = p.map("work", move |x: u64| {
        if let Some(c) = which(x) {
            crash(c)?;
        }
        Ok(x * 2)
    });
    fk.apply(&s, 4, None);
    Sink::<u64>::consume(&got, &p);
    let r = finish(run_in_background(p));
    for f in each_crash_failed_once(&r, &got, n, which) {
        assert_eq!(f.attempt, 1);
    }
    assert_no_children();
}

/// Items `0..n` of a map `x -> 2x` where `which` says which crash and how: every other item's
/// result arrived once, and each crashing item failed once, with its crash's kind. Returns the
/// failures in item order.
fn each_crash_failed_once(
    r: &RunReport,
    got: &Sink<u64>,
    n: u64,
    which: impl Fn(u64) -> Option<Crash>,
) -> Vec<minigun::ItemFailure> {
    let bad: Vec<u64> = (0..n).filter(|&x| which(x).is_some()).collect();
    let expected: Vec<u64> = (0..n)
        .filter(|&x| which(x).is_none())
        .map(|x| x * 2)
        .collect();
    assert_eq!(got.sorted(), expected, "failures: {:?}", summary(r));
    assert_accounted(r, "work", n, bad.len() as u64);
    let mut failures = r.failures.clone();
    failures.sort_by_key(|f| f.item);
    assert_eq!(
        failures.iter().map(|f| f.item).collect::<Vec<_>>(),
        bad.iter().map(|&b| Some(b)).collect::<Vec<_>>(),
        "each crashing item fails once"
    );
    for f in &failures {
        assert_eq!(f.kind, which(f.item.unwrap()).unwrap().kind(), "{f:?}");
    }
    failures
}

#[test]
fn cow_fork_many_crash_kinds() {
    many_crashes(Fork::Cow);
}

#[test]
fn ipc_fork_many_crash_kinds() {
    many_crashes(Fork::Ipc);
}

#[test]
fn ipc_fork_per_item_many_crash_kinds() {
    many_crashes(Fork::IpcPerItem);
}

/// The bytes of large item `i`: its index, then a pattern that depends on it.
fn large_item(i: u64, size: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..size as u64)
        .map(|k| k.wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

/// Items of 300 KiB through two workers that crash every seventh item: every other item
/// reaches a worker whole (the worker checks its bytes) and arrives once, and each crashing
/// item fails once. The items queued behind a crash are written again, from their own
/// buffers, to another worker.
fn large_items_with_crashes(fk: Fork) {
    const SIZE: usize = 300 << 10;
    let n = 42u64;
    let which = move |x: u64| (x % 7 == 3).then(|| FATAL[(x / 7) as usize % FATAL.len()]);
    let p = Pipeline::new("large");
    let got = Sink::default();
    p.producer("gen", move |out| {
        for i in 0..n {
            out.emit(large_item(i, SIZE))?;
        }
        Ok(())
    });
    let s = p.map("work", move |v: Vec<u8>| {
        let x = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
        if v != large_item(x, SIZE) {
            return Err(format!("item {x} arrived corrupt").into());
        }
        if let Some(c) = which(x) {
            crash(c)?;
        }
        Ok(x * 2)
    });
    fk.apply(&s, 2, None);
    Sink::<u64>::consume(&got, &p);
    let r = finish(run_in_background(p));
    each_crash_failed_once(&r, &got, n, which);
    assert_no_children();
}

#[test]
fn ipc_fork_large_items_with_crashes() {
    large_items_with_crashes(Fork::Ipc);
}

#[test]
fn ipc_fork_per_item_large_items_with_crashes() {
    large_items_with_crashes(Fork::IpcPerItem);
}

#[test]
fn cow_fork_large_items_with_crashes() {
    large_items_with_crashes(Fork::Cow);
}

/// A crashed item goes to the dead-letter stage intact, with its failure.
fn crash_dead_lettered(fk: Fork) {
    let p = Pipeline::new("dead-letter");
    let got = Sink::default();
    let dead: Sink<(u64, String)> = Sink(Default::default());
    let d = dead.clone();
    p.producer("gen", |out| {
        for i in 0..N {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p.map("work", |x: u64| {
        if x == BAD {
            crash(Crash::Abort)?;
        }
        Ok(x * 2)
    });
    fk.apply(&s, 4, None);
    Sink::<u64>::consume(&got, &p);
    let dl = p.consumer("dead", move |f: Failed<u64>| {
        d.push((f.item, format!("{:?}/{:?}", f.failure.kind, f.failure.item)));
        Ok(())
    });
    s.dead_letter(&dl);
    let r = finish(run_in_background(p));
    let expected: Vec<u64> = (0..N).filter(|&x| x != BAD).map(|x| x * 2).collect();
    assert_eq!(got.sorted(), expected, "failures: {:?}", summary(&r));
    assert_eq!(
        dead.sorted(),
        vec![(
            BAD,
            format!("{:?}/{:?}", FailureKind::Signal(libc::SIGABRT), Some(BAD))
        )]
    );
    assert_accounted(&r, "work", N, 1);
    assert_eq!(r.stage("work").unwrap().dead_lettered, 1);
    assert_no_children();
}

#[test]
fn cow_fork_crash_dead_lettered() {
    crash_dead_lettered(Fork::Cow);
}

#[test]
fn ipc_fork_crash_dead_lettered() {
    crash_dead_lettered(Fork::Ipc);
}

// With batched results (the default), a worker keeps finished items' results in shared memory while more
// items wait in its input. When it then runs a long item, the parent takes those results
// itself after a millisecond: they do not wait for the long item to end.
#[test]
fn batched_results_do_not_wait_for_a_long_item() {
    let p = Pipeline::new("long-item");
    common::gen(&p, 10);
    let s = p.map("work", |x: u64| {
        if x == 5 {
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(x)
    });
    Fork::Ipc.apply(&s, 1, None);
    let t0 = Instant::now();
    let arrived = Sink::default();
    let a = arrived.clone();
    p.consumer("collect", move |x: u64| {
        a.push((x, t0.elapsed()));
        Ok(())
    });
    let r = p.run().unwrap();
    assert_accounted(&r, "work", 10, 0);
    let arrived = arrived.sorted();
    let long = arrived[5].1;
    assert!(long >= Duration::from_secs(2), "{arrived:?}");
    for &(x, at) in &arrived[..5] {
        assert!(
            at < Duration::from_secs(1),
            "item {x} arrived after {at:?}, behind the long item"
        );
    }
}

/// Items `0..n` through a batched ipc stage with `workers` workers, where item `x` first
/// sleeps `pause(x)` and then crashes as `which(x)` says: each crashing item fails once,
/// every other item arrives once, nothing runs twice, and the parent took results from a
/// busy worker's log at least once. Returns the run's events.
fn batched_log_run(
    n: u64,
    workers: usize,
    pause: fn(u64) -> Option<Duration>,
    which: fn(u64) -> Option<Crash>,
) -> &'static common::Events {
    let events = common::capture_events(tracing::Level::DEBUG);
    let runs = std::sync::Arc::new(SharedCounters::new(n as usize));
    let counted = runs.clone();
    let p = Pipeline::new("batched-log");
    let got = Sink::default();
    common::gen(&p, n);
    let s = p.map("work", move |x: u64| {
        counted.count(x);
        if let Some(d) = pause(x) {
            std::thread::sleep(d);
        }
        if let Some(c) = which(x) {
            crash(c)?;
        }
        Ok(x * 2)
    });
    // A fixed window: the items after a slow one queue up in the worker's pipe whatever the
    // machine's load makes of the measured item times (an automatic window of two slow items
    // let a loaded worker flush its log between two fast items, so nothing was left to replay).
    s.ipc_fork(workers).in_flight(16);
    Sink::<u64>::consume(&got, &p);
    let r = finish(run_in_background(p));
    each_crash_failed_once(&r, &got, n, which);
    let twice = runs.not_once(n);
    assert!(twice.is_empty(), "items not run exactly once: {twice:?}");
    assert!(
        events.count(common::TOOK_FROM_BUSY_WORKER) > 0,
        "the parent never took results from a busy worker"
    );
    assert_no_children();
    events
}

// Results taken from a busy worker's log, then the worker dies: what it had finished arrives
// once, the item it was running fails once, and nothing runs twice. Every 7th item, and every
// crashing one, runs long enough for the parent to take the results the worker holds of the
// fast items before it.
#[test]
fn batched_results_taken_from_a_busy_worker_then_crashes() {
    let which = |x: u64| (x % 23 == 11).then(|| FATAL[(x / 23) as usize % FATAL.len()]);
    let pause = |x: u64| (x.is_multiple_of(7) || x % 23 == 11).then_some(Duration::from_millis(20));
    batched_log_run(300, 2, pause, which);
}

// One batched worker, in blocks of ten items: a slow item (the next ones queue up in the
// worker's pipe meanwhile), two fast ones (their results wait in the log), a long one (the
// parent takes those results while it runs), two fast ones, then one that aborts the worker
// with their results still in the log. The parent replays them from the log after a take
// moved its start: they arrive once, only the aborting item fails, nothing runs twice.
#[test]
fn a_dead_workers_log_is_replayed_after_the_parent_took_from_it() {
    let pause = |x: u64| match x % 10 {
        0 => Some(Duration::from_millis(30)),
        3 => Some(Duration::from_millis(20)),
        _ => None,
    };
    let events = batched_log_run(50, 1, pause, |x| (x % 10 == 6).then_some(Crash::Abort));
    assert!(
        events.count(common::REPLAYED_DEAD_WORKER) > 0,
        "no dead worker left results in its log"
    );
}

// A worker that ignores SIGTERM and answers its overdue item after the SIGTERM: the SIGKILL
// after the grace period still comes, a new worker takes the items that waited, and the run
// ends. (An answer after the SIGTERM once cleared the kill deadline: the worker, no longer
// given items, was never killed or replaced, and the run hung.)
#[test]
fn a_worker_that_ignores_sigterm_is_killed_even_if_it_answers_late() {
    let p = Pipeline::new("ignores-sigterm");
    common::gen(&p, 3);
    let s = p.map("work", |x: u64| {
        if x == 0 {
            // SAFETY: setting this (forked worker) process's disposition for SIGTERM.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            // The SIGTERM comes at 200 ms, the SIGKILL at 700 ms: the answer lands midway.
            std::thread::sleep(Duration::from_millis(450));
        }
        Ok((x, std::process::id()))
    });
    Fork::IpcStrict.apply(&s, 1, Some(Duration::from_millis(200)));
    let got = Sink::default();
    Sink::<(u64, u32)>::consume(&got, &p);
    let r = finish(run_in_background(p));
    let got = got.sorted();
    assert_eq!(
        got.iter().map(|&(x, _)| x).collect::<Vec<_>>(),
        vec![0, 1, 2],
        "every item arrives once; failures: {:?}",
        summary(&r)
    );
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_ne!(got[0].1, got[1].1, "item 1 ran in a replacement worker");
    assert_no_children();
}
