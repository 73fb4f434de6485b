//! Async stages under `ipc_fork(k).tasks_per_worker(n)`: real forked workers, each with a
//! tokio runtime of its own, calling a TCP server on 127.0.0.1 that this test runs and that
//! counts, per worker process, the calls it holds at once. Peak concurrency per worker is
//! exactly `n`; a worker SIGKILLed mid-flight fails exactly the items it had started (with
//! the signal) and every other item completes once; timeouts inside the worker, panics,
//! retries, `ordered`, `fail_fast`, a stop from outside, hooks, the live monitor's in-flight
//! figure; nothing left behind in the parent; and the definition errors of mis-combinations.
#![cfg(all(feature = "async", target_os = "linux"))]
mod common;
use common::{assert_no_children, run_bounded, wait_for, wait_until, TempDir};
use minigun::{DefinitionError, Exec, FailureKind, OnError, Pipeline, RunError};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server knows of one worker process.
#[derive(Default, Debug, Clone)]
struct Caller {
    /// Calls it holds now, by item.
    holding: HashSet<u64>,
    /// The most it ever held at once.
    peak: usize,
}

#[derive(Default)]
struct State {
    callers: HashMap<u64, Caller>,
    /// Calls per item (an item's attempts that reached the server).
    calls: HashMap<u64, u64>,
    /// Calls from this process are held until it dies.
    frozen: Option<u64>,
    /// Freeze the first process that calls.
    freeze_first: bool,
}

/// A TCP server on 127.0.0.1, on two threads of its own (made before the measured runs).
/// A call is 24 bytes: the caller's pid, the item, how long to hold the call (ms); the
/// reply is 8 bytes: how many calls for that item the server has seen, this one included.
struct Server {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Server {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("srv")
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(sock, st.clone()));
            }
        });
        Server {
            addr,
            state,
            rt: Some(rt),
        }
    }
    fn freeze_first_caller(&self) {
        self.state.lock().unwrap().freeze_first = true;
    }
    fn callers(&self) -> HashMap<u64, Caller> {
        self.state.lock().unwrap().callers.clone()
    }
    fn calls(&self) -> HashMap<u64, u64> {
        self.state.lock().unwrap().calls.clone()
    }
    fn frozen(&self) -> Option<(u64, HashSet<u64>)> {
        let s = self.state.lock().unwrap();
        let pid = s.frozen?;
        Some((pid, s.callers.get(&pid)?.holding.clone()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut req = [0u8; 24];
    if sock.read_exact(&mut req).await.is_err() {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(req[8 * i..8 * i + 8].try_into().unwrap());
    let (pid, item, hold) = (word(0), word(1), word(2));
    let calls = {
        let mut s = state.lock().unwrap();
        if s.freeze_first && s.frozen.is_none() {
            s.frozen = Some(pid);
        }
        let calls = s.calls.entry(item).or_default();
        *calls += 1;
        let calls = *calls;
        let c = s.callers.entry(pid).or_default();
        c.holding.insert(item);
        c.peak = c.peak.max(c.holding.len());
        calls
    };
    while state.lock().unwrap().frozen == Some(pid) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(hold)).await;
    state
        .lock()
        .unwrap()
        .callers
        .get_mut(&pid)
        .unwrap()
        .holding
        .remove(&item);
    let _ = sock.write_all(&calls.to_le_bytes()).await;
}

/// One call to the server from a worker: holds it `hold_ms`; returns the item's calls so far.
async fn call(addr: SocketAddr, item: u64, hold_ms: u64) -> std::io::Result<u64> {
    let mut s = TcpStream::connect(addr).await?;
    let mut req = Vec::with_capacity(24);
    for w in [std::process::id() as u64, item, hold_ms] {
        req.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&req).await?;
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).await?;
    Ok(u64::from_le_bytes(reply))
}

/// Appends `value` and a newline to the file at `path` in one write (workers append to the
/// same file).
fn append_line(path: &std::path::Path, value: impl std::fmt::Display) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(format!("{value}\n").as_bytes())
}

fn gen(p: &Pipeline, n: u64) {
    p.producer("gen", move |out| out.emit_all(0..n).map_err(Into::into));
}

/// `(item, pid of the worker that ran it)`, collected in arrival order.
type Got = Arc<Mutex<Vec<(u64, u32)>>>;

fn collect(p: &Pipeline) -> Got {
    let got = Got::default();
    let g = got.clone();
    p.consumer("sink", move |x: (u64, u32)| {
        g.lock().unwrap().push(x);
        Ok(())
    });
    got
}

fn items(got: &Got) -> Vec<u64> {
    let mut v: Vec<u64> = got.lock().unwrap().iter().map(|x| x.0).collect();
    v.sort_unstable();
    v
}

#[test]
fn each_worker_runs_exactly_n_at_once_with_its_hooks_and_leaves_nothing_behind() {
    let server = Server::start();
    let addr = server.addr;
    let dir = TempDir::new("async-ipc-hooks");
    let forks = Arc::new(AtomicUsize::new(0));
    let mut before = None;
    for run in 0..3 {
        // The first run starts what lives for the process (the signal watcher, the server's
        // threads): what the later runs leave is measured against the state after it.
        if run == 1 {
            before = Some((common::open_fds(), common::threads()));
        }
        let p = Pipeline::new("peak");
        gen(&p, 160);
        let f = forks.clone();
        let started = dir.path().join(format!("started-{run}"));
        p.map_async("call", move |x: u64| async move {
            call(addr, x, 40).await?;
            Ok((x, std::process::id()))
        })
        .ipc_fork(2)
        .tasks_per_worker(8)
        .before_fork(move || {
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .after_fork(move || Ok(append_line(&started, std::process::id())?));
        let got = collect(&p);
        let r = run_bounded(p).expect("run");
        assert_eq!(items(&got), (0..160).collect::<Vec<_>>());
        let s = r.stage("call").unwrap();
        assert_eq!((s.items_in, s.items_out, s.failed), (160, 160, 0));
        assert_eq!(s.executor, "ipc_fork(2) tasks_per_worker(8)");
        assert_eq!(s.latency.count, 160);
        assert!(s.latency.p50_us >= 40_000.0, "{:?}", s.latency);
        // The two workers ran everything, 8 calls at once each, never more.
        let pids: HashSet<u32> = got.lock().unwrap().iter().map(|x| x.1).collect();
        assert_eq!(pids.len(), 2, "{pids:?}");
        let hooked: HashSet<u32> =
            std::fs::read_to_string(dir.path().join(format!("started-{run}")))
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
        assert_eq!(hooked, pids, "after_fork ran once in each worker");
        for pid in &pids {
            let c = &server.callers()[&(*pid as u64)];
            assert_eq!(c.peak, 8, "worker {pid}: {c:?}");
        }
        assert_no_children();
    }
    assert_eq!(forks.load(Ordering::SeqCst), 3, "before_fork once per run");
    let (fds, threads) = before.unwrap();
    // The thread that ran the run, and the server's side of the last sockets, end on their
    // own time.
    let back = || common::threads() == threads && common::open_fds() == fds;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !back() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let links = || {
        let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .map(|e| format!("{:?}", std::fs::read_link(e.path())))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        common::open_fds(),
        fds,
        "file descriptors left open: {:?}",
        links()
    );
    assert_eq!(common::threads(), threads, "threads left running");
}

#[test]
fn a_worker_killed_mid_flight_fails_exactly_the_items_it_had_started() {
    const N: u64 = 200;
    let server = Server::start();
    let addr = server.addr;
    // The first worker to call is frozen: its calls are held until it dies.
    server.freeze_first_caller();
    let p = Pipeline::new("killed");
    gen(&p, N);
    p.map_async("call", move |x: u64| async move {
        call(addr, x, 10).await?;
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(10);
    let got = collect(&p);
    let run = p.spawn().expect("valid");
    // All 10 of its items are at the server (it has more waiting in its pipe): kill it.
    let (pid, held) = wait_for("a frozen worker full", Duration::from_secs(30), || {
        server.frozen().filter(|(_, held)| held.len() == 10)
    });
    let killed = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(killed, nix::sys::signal::Signal::SIGKILL).unwrap();
    let r = run.wait().expect("the run goes on without the dead worker");
    let s = r.stage("call").unwrap();
    let mut failed: Vec<(u64, FailureKind, Option<u32>)> = r
        .failures
        .iter()
        .map(|f| (f.item.unwrap(), f.kind.clone(), f.pid))
        .collect();
    failed.sort_unstable_by_key(|f| f.0);
    let mut want: Vec<u64> = held.iter().copied().collect();
    want.sort_unstable();
    assert_eq!(
        failed.iter().map(|f| f.0).collect::<Vec<_>>(),
        want,
        "the failed items are the ones it was running"
    );
    for (item, kind, by) in &failed {
        assert_eq!(*kind, FailureKind::Signal(libc::SIGKILL), "item {item}");
        assert_eq!(*by, Some(pid as u32), "item {item}");
    }
    // Every other item completed once, none in the dead worker, none twice.
    let out = items(&got);
    let rest: Vec<u64> = (0..N).filter(|x| !held.contains(x)).collect();
    assert_eq!(out, rest);
    assert!(got.lock().unwrap().iter().all(|x| x.1 != pid as u32));
    let calls = server.calls();
    for x in 0..N {
        assert_eq!(calls.get(&x), Some(&1), "calls for item {x}");
    }
    assert_eq!((s.items_in, s.items_out, s.failed), (N, N - 10, 10));
    assert_eq!((s.retried, s.cancelled), (0, 0));
    assert_no_children();
}

#[test]
fn an_abort_fails_the_items_its_worker_had_started_and_no_other() {
    let p = Pipeline::new("aborted");
    gen(&p, 300);
    p.map_async("work", |x: u64| async move {
        if x == 37 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            std::process::abort();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(6);
    let got = collect(&p);
    let r = run_bounded(p).expect("the run goes on");
    let failed: HashSet<u64> = r.failures.iter().map(|f| f.item.unwrap()).collect();
    assert!(failed.contains(&37), "{:?}", r.failures);
    // Besides it, at most the other items its worker was running.
    assert!(failed.len() <= 6, "{:?}", r.failures);
    let pid = r.failures[0].pid;
    for f in &r.failures {
        assert_eq!(f.kind, FailureKind::Signal(libc::SIGABRT), "{f:?}");
        assert_eq!(f.pid, pid, "{f:?}");
    }
    let want: Vec<u64> = (0..300).filter(|x| !failed.contains(x)).collect();
    assert_eq!(items(&got), want, "every other item completed once");
    let s = r.stage("work").unwrap();
    assert_eq!(s.items_out + s.failed, 300);
    assert_no_children();
}

#[test]
fn a_timeout_drops_the_future_inside_the_worker_which_lives_on() {
    let dir = TempDir::new("async-ipc-timeout");
    let dropped = dir.path().join("dropped");
    let d = dropped.clone();
    let p = Pipeline::new("timeouts");
    gen(&p, 40);
    p.map_async("wait", move |x: u64| {
        let d = d.clone();
        async move {
            if x.is_multiple_of(10) {
                // Appends the item to a file when the future is dropped.
                struct Guard(std::path::PathBuf, u64);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        append_line(&self.0, self.1).unwrap();
                    }
                }
                let _g = Guard(d, x);
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok((x, std::process::id()))
        }
    })
    .ipc_fork(2)
    .tasks_per_worker(4)
    .timeout(Duration::from_millis(300));
    let got = collect(&p);
    let r = run_bounded(p).expect("run");
    let mut failed: Vec<u64> = r.failures.iter().map(|f| f.item.unwrap()).collect();
    failed.sort_unstable();
    assert_eq!(failed, vec![0, 10, 20, 30]);
    for f in &r.failures {
        assert_eq!(f.kind, FailureKind::Timeout);
        assert!(f.message.contains("ran past its timeout of 300ms"), "{f:?}");
    }
    let mut guards: Vec<u64> = std::fs::read_to_string(&dropped)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    guards.sort_unstable();
    assert_eq!(
        guards, failed,
        "each overdue future was dropped in its worker"
    );
    assert_eq!(
        items(&got),
        (0..40).filter(|x| x % 10 != 0).collect::<Vec<_>>()
    );
    // No worker was killed for it: the two first workers ran every item.
    let pids: HashSet<u32> = got.lock().unwrap().iter().map(|x| x.1).collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_no_children();
}

#[test]
fn a_panic_fails_its_item_with_the_message() {
    let p = Pipeline::new("panics");
    gen(&p, 50);
    p.map_async("boom", |x: u64| async move {
        tokio::task::yield_now().await;
        if x % 7 == 3 {
            panic!("boom at item {x}");
        }
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(8);
    let got = collect(&p);
    let r = run_bounded(p).expect("run");
    let bad: Vec<u64> = (0..50).filter(|x| x % 7 == 3).collect();
    let mut failed: Vec<u64> = r.failures.iter().map(|f| f.item.unwrap()).collect();
    failed.sort_unstable();
    assert_eq!(failed, bad);
    for f in &r.failures {
        assert_eq!(f.kind, FailureKind::Panic);
        let want = format!("boom at item {}", f.item.unwrap());
        assert!(f.message.contains(&want), "{f:?}");
    }
    assert_eq!(
        items(&got),
        (0..50).filter(|x| x % 7 != 3).collect::<Vec<_>>()
    );
    let pids: HashSet<u32> = got.lock().unwrap().iter().map(|x| x.1).collect();
    assert_eq!(pids.len(), 2, "a panic does not end its worker: {pids:?}");
}

#[test]
fn a_failed_attempt_is_retried_by_the_stage_policy() {
    let server = Server::start();
    let addr = server.addr;
    let p = Pipeline::new("retries");
    gen(&p, 50);
    p.map_async("flaky", move |x: u64| async move {
        let calls = call(addr, x, 1).await?;
        if x.is_multiple_of(5) && calls == 1 {
            return Err(format!("item {x} fails its first attempt").into());
        }
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(8)
    .on_error(OnError::retry(2).backoff(Duration::from_millis(20)));
    let got = collect(&p);
    let r = run_bounded(p).expect("run");
    assert_eq!(items(&got), (0..50).collect::<Vec<_>>());
    let s = r.stage("flaky").unwrap();
    assert_eq!((s.items_out, s.failed, s.retried), (50, 0, 10));
    let calls = server.calls();
    for x in 0..50 {
        let want = if x % 5 == 0 { 2 } else { 1 };
        assert_eq!(calls.get(&x), Some(&want), "calls for item {x}");
    }
}

#[test]
fn failed_items_reach_the_dead_letter_stage_after_their_retries() {
    let dead = Arc::new(Mutex::new(Vec::new()));
    let p = Pipeline::new("dead-letters");
    gen(&p, 20);
    let s = p
        .map_async("odd-fails", |x: u64| async move {
            tokio::task::yield_now().await;
            if x % 2 == 1 {
                return Err(format!("odd {x}").into());
            }
            Ok((x, std::process::id()))
        })
        .ipc_fork(2)
        .tasks_per_worker(4)
        .stage()
        .on_error(OnError::retry(2));
    let got = collect(&p);
    let d = dead.clone();
    let dl = p.consumer("dead", move |f: minigun::Failed<u64>| {
        d.lock()
            .unwrap()
            .push((f.item, f.failure.attempt, f.failure.kind));
        Ok(())
    });
    s.dead_letter(&dl);
    let r = run_bounded(p).expect("run");
    let mut dead = dead.lock().unwrap().clone();
    dead.sort_unstable_by_key(|d| d.0);
    let want: Vec<_> = (1..20)
        .step_by(2)
        .map(|x| (x, 3, FailureKind::Error))
        .collect();
    assert_eq!(dead, want);
    assert_eq!(items(&got), (0..20).step_by(2).collect::<Vec<_>>());
    let st = r.stage("odd-fails").unwrap();
    assert_eq!((st.retried, st.dead_lettered, st.failed), (20, 10, 10));
}

#[test]
fn a_recycled_worker_answers_what_it_holds_and_is_replaced() {
    let p = Pipeline::new("recycled");
    gen(&p, 120);
    p.map_async("work", |x: u64| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(4)
    .max_items_per_worker(20);
    let got = collect(&p);
    let r = run_bounded(p).expect("run");
    assert_eq!(items(&got), (0..120).collect::<Vec<_>>());
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_out, s.failed, s.cancelled), (120, 0, 0));
    assert!(s.recycled_workers >= 4, "{s:?}");
    let pids: HashSet<u32> = got.lock().unwrap().iter().map(|x| x.1).collect();
    assert!(pids.len() >= 5, "{pids:?}");
    assert_no_children();
}

#[test]
fn a_worker_whose_runtime_is_blocked_is_killed_and_its_started_items_time_out() {
    let p = Pipeline::new("blocked");
    gen(&p, 40);
    p.map_async("work", |x: u64| async move {
        if x == 5 {
            // Blocks the worker's only thread: no timer of its runtime fires.
            std::thread::sleep(Duration::from_secs(60));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(3)
    .timeout(Duration::from_millis(200));
    let got = collect(&p);
    let r = run_bounded(p).expect("run");
    let failed: HashSet<u64> = r.failures.iter().map(|f| f.item.unwrap()).collect();
    assert!(failed.contains(&5) && failed.len() <= 3, "{:?}", r.failures);
    for f in &r.failures {
        assert_eq!(f.kind, FailureKind::Timeout, "{f:?}");
        assert!(f.message.contains("answered no item"), "{f:?}");
    }
    let want: Vec<u64> = (0..40).filter(|x| !failed.contains(x)).collect();
    assert_eq!(items(&got), want);
    assert_no_children();
}

#[test]
fn ordered_results_leave_in_input_order() {
    let p = Pipeline::new("ordered");
    gen(&p, 300);
    p.map_async("shuffle", |x: u64| async move {
        // Items end in an order of their own.
        tokio::time::sleep(Duration::from_millis((x * 7919) % 23)).await;
        Ok((x, std::process::id()))
    })
    .ipc_fork(2)
    .tasks_per_worker(32)
    .ordered();
    let got = collect(&p);
    run_bounded(p).expect("run");
    let arrived: Vec<u64> = got.lock().unwrap().iter().map(|x| x.0).collect();
    assert_eq!(arrived, (0..300).collect::<Vec<_>>());
}

#[test]
fn fail_fast_ends_the_run_and_its_workers_at_once() {
    let p = Pipeline::new("fail-fast");
    gen(&p, 1_000);
    p.map_async("call", |x: u64| async move {
        if x == 30 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err("item 30 is bad".into());
        }
        // Only the abort can end the others.
        std::future::pending::<()>().await;
        Ok((x, 0u32))
    })
    .ipc_fork(2)
    .tasks_per_worker(40)
    .on_error(OnError::fail_fast());
    collect(&p);
    let err = run_bounded(p).expect_err("fail_fast aborts");
    let RunError::Aborted { cause, report } = err else {
        panic!("{err}")
    };
    assert_eq!((cause.item, cause.stage.as_str()), (Some(30), "call"));
    assert!(cause.message.contains("item 30 is bad"), "{cause:?}");
    let s = report.stage("call").unwrap();
    assert_eq!(s.failed, 1);
    assert!(
        s.cancelled >= 79,
        "the items in the workers were cancelled: {s:?}"
    );
    assert_eq!(s.items_in, s.failed + s.cancelled + s.items_out);
    assert_no_children();
}

#[test]
fn a_stop_from_outside_ends_the_run_and_the_monitor_shows_what_is_in_flight() {
    let p = Pipeline::new("stopped");
    gen(&p, 10_000);
    p.map_async("hang", |x: u64| async move {
        std::future::pending::<()>().await;
        Ok((x, 0u32))
    })
    .ipc_fork(2)
    .tasks_per_worker(25);
    collect(&p);
    let run = p.spawn().expect("valid");
    let monitor = run.monitor();
    let row = |m: &minigun::Monitor| {
        let snap = m.snapshot();
        snap.stages.into_iter().find(|s| s.name == "hang").unwrap()
    };
    wait_until("both workers full", Duration::from_secs(30), || {
        row(&monitor).in_flight == 50
    });
    let r = row(&monitor);
    assert_eq!(r.in_flight_limit, Some(50));
    assert_eq!(r.children.len(), 2, "{:?}", r.children);
    run.cancel();
    let report = run.wait().expect("a cancelled run reports");
    assert!(report.stopped);
    let s = report.stage("hang").unwrap();
    assert!(s.cancelled >= 50, "{s:?}");
    assert_eq!((s.items_out, s.failed), (0, 0));
    assert_eq!(s.items_in, s.cancelled);
    assert_no_children();
}

#[test]
fn mis_combinations_are_definition_errors_naming_the_stage() {
    let async_under = |exec: Exec| {
        let p = Pipeline::new("bad");
        gen(&p, 1);
        p.map_async("fetch", |x: u64| async move { Ok(x) })
            .wire()
            .executor(exec);
        p.build().unwrap_err()
    };
    // Under cow_fork, ipc_fork without tasks_per_worker, or remote with the default worker
    // executor (ipc_fork without tasks_per_worker).
    let remote = Exec::remote(minigun::remote::Remote::new(
        minigun::remote::MemoryBroker::new(),
    ));
    for exec in [Exec::cow_fork(2), Exec::ipc_fork(2), remote] {
        let name = exec.to_string();
        match async_under(exec) {
            DefinitionError::AsyncStageNeedsTasks { stage, executor } => {
                assert_eq!((stage.as_str(), executor), ("fetch", name));
            }
            other => panic!("{other}"),
        }
    }
    let e = async_under(Exec::ipc_fork(2));
    assert!(e.to_string().contains("tasks_per_worker(n)"), "{e}");
    // A fixed in_flight beside tasks_per_worker.
    match async_under(Exec::ipc_fork(2).tasks_per_worker(8).in_flight(4)) {
        DefinitionError::OptionNotForExecutor { stage, option, .. } => {
            assert_eq!((stage.as_str(), option), ("fetch", "in_flight"));
        }
        other => panic!("{other}"),
    }
    // tasks_per_worker on another executor.
    for exec in [
        Exec::cow_fork(2).tasks_per_worker(8),
        Exec::tasks(4).tasks_per_worker(8),
    ] {
        match async_under(exec) {
            DefinitionError::OptionNotForExecutor { stage, option, .. } => {
                assert_eq!((stage.as_str(), option), ("fetch", "tasks_per_worker"));
            }
            other => panic!("{other}"),
        }
    }
    // tasks_per_worker on a sync stage, through Exec or the stage's fork handle.
    let p = Pipeline::new("bad");
    gen(&p, 1);
    p.map("sync", |x: u64| Ok(x))
        .ipc_fork(2)
        .tasks_per_worker(8);
    let e = p.build().unwrap_err();
    assert!(
        matches!(&e, DefinitionError::TasksNeedAsyncStage { stage, executor, .. }
            if stage == "sync" && executor == "ipc_fork(2) tasks_per_worker(8)"),
        "{e}"
    );
    // An inherited tasks_per_worker does not apply to a sync stage: it runs under ipc_fork.
    let p = Pipeline::new("inherited");
    p.default_executor(Exec::ipc_fork(2).tasks_per_worker(8));
    gen(&p, 10);
    p.map("sync", |x: u64| Ok(x)).wire();
    p.consumer("sink", |_: u64| Ok(()));
    let r = run_bounded(p).expect("run");
    assert_eq!(r.stage("sync").unwrap().executor, "ipc_fork(2)");
    assert_eq!(r.stage("sync").unwrap().items_out, 10);
}

/// A remote async stage on the in-memory broker: parent and two workers in this process
/// (workers on threads), each running the items under `worker_exec`.
fn remote_async(worker_exec: Exec, forked: bool) {
    use minigun::remote::{MemoryBroker, Remote, ServeOptions};
    let broker = MemoryBroker::new();
    let define = move |b: &MemoryBroker, seen: Got| {
        let p = Pipeline::new("remote-async");
        p.handle_signals(false);
        gen(&p, 300);
        let r = Remote::new(b.clone())
            .claim_idle(Duration::from_millis(300))
            .worker_exec(worker_exec.clone())
            .batch(8);
        p.map_async("fetch", |x: u64| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if x == 17 {
                return Err("item 17 is bad".into());
            }
            Ok((x * 2, std::process::id()))
        })
        .remote(r);
        p.consumer("sink", move |x: (u64, u32)| {
            seen.lock().unwrap().push(x);
            Ok(())
        });
        p
    };
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (b, d) = (broker.clone(), define.clone());
            let opts = ServeOptions::new().handle_signals(false);
            let stop = opts.stop_flag();
            let h = std::thread::spawn(move || d(&b, Got::default()).serve(opts).expect("serve"));
            (stop, h)
        })
        .collect();
    let seen = Got::default();
    let report = run_bounded(define(&broker, seen.clone())).expect("run");
    let served: Vec<_> = workers
        .into_iter()
        .map(|(stop, h)| {
            stop.store(true, Ordering::Relaxed);
            h.join().expect("worker thread")
        })
        .collect();
    let want: Vec<u64> = (0..300).filter(|x| *x != 17).map(|x| x * 2).collect();
    assert_eq!(items(&seen), want, "every item once, but the failed one");
    let s = report.stage("fetch").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (300, 299, 1));
    assert_eq!(s.executor, "remote(memory)");
    let f = &report.failures[0];
    assert_eq!((f.item, f.kind.clone()), (Some(17), FailureKind::Error));
    assert!(f.message.contains("item 17 is bad"), "{f:?}");
    let committed: u64 = served.iter().map(|r| r.items).sum();
    assert_eq!(committed, 300, "{served:?}");
    // The workers are threads of this process: under ipc_fork, their forked children ran
    // the items.
    let me = std::process::id();
    let in_children = seen.lock().unwrap().iter().all(|x| x.1 != me);
    let here = seen.lock().unwrap().iter().all(|x| x.1 == me);
    assert!(if forked { in_children } else { here });
}

#[test]
fn a_remote_async_stage_runs_under_tasks_on_its_workers() {
    remote_async(Exec::tasks(8), false);
}

#[test]
fn a_remote_async_stage_runs_under_ipc_fork_on_its_workers() {
    remote_async(Exec::ipc_fork(2).tasks_per_worker(4), true);
    assert_no_children();
}
