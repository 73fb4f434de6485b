//! The fault suite: a remote stage over a real server, its workers separate processes.
//!
//! Each worker is this test binary run again (`--exact remote_worker_entry --ignored`, with
//! `MINIGUN_WORKER=1`, the server's URL and the scenario's name in the environment): the
//! entry builds the same definition and serves it through
//! [`minigun::remote::serve_if_worker`], which is the same-binary model a real program uses.
//! A [`Workers`] supervisor starts them, signals them by pid, optionally respawns the dead
//! ones, and kills every one it started when dropped. Every scenario runs under a hard time
//! limit, so a hang fails the test instead of blocking the run.

use minigun::remote::broker::{Announcement, StageRun};
use minigun::remote::{serve_if_worker, Broker, Remote};
use minigun::{Exec, Failed, FailureKind, OnError, Pipeline, RunError, RunReport};
use minigun_redis::testing::{Fsync, RedisServer, ServerOptions};
use minigun_redis::RedisBroker;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The environment variable naming a worker's scenario.
const SCENARIO_ENV: &str = "FAULTS_SCENARIO";
/// The URL the stage uses for its marks and side-effect counters (the default user).
const MARK_ENV: &str = "FAULTS_MARK_URL";
/// A file with the CA certificate to trust (TLS scenarios).
const CA_ENV: &str = "FAULTS_CA";

/// What the remote stage does with an item, besides sleeping `per_item` and passing it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Plain,
    /// Item `k`: counts its executions in `t:exec`, pushes `<pid>` to `t:started`, and
    /// sleeps for a minute the first time (its worker is killed meanwhile).
    HangFirst(u64),
    /// Item `k`: counts its executions in `t:exec` (the side effect), and aborts its process
    /// the first time, before anything is committed.
    AbortAfterEffect(u64),
    /// Item `k`: pushes `<pid>` to `t:started` and sleeps 300 ms (its worker is stopped).
    Stall(u64),
    /// Item `k` aborts the process running it, every time.
    Poison(u64),
    /// Item `k` returns an error.
    Fatal(u64),
    /// The stage counts its items and emits `1_000_000 + count` at `finish`.
    Counter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    Inline,
    Threads(usize),
    Fork(usize),
}

/// One scenario's definition and settings.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    pipeline: &'static str,
    items: u64,
    batch: usize,
    local: Local,
    behaviour: Behaviour,
    per_item: Duration,
    claim_idle: Duration,
    max_deliveries: u32,
    max_in_flight: usize,
    keep_keys: bool,
    fail_fast: bool,
    grace: Duration,
    wait_for_workers: Duration,
    /// The worker builds another output type (its fingerprint differs).
    worker_differs: bool,
}

impl Cfg {
    fn new(pipeline: &'static str, items: u64) -> Cfg {
        Cfg {
            pipeline,
            items,
            batch: 16,
            local: Local::Inline,
            behaviour: Behaviour::Plain,
            per_item: Duration::ZERO,
            claim_idle: Duration::from_millis(400),
            max_deliveries: 3,
            max_in_flight: 1_000,
            keep_keys: false,
            fail_fast: false,
            grace: Duration::from_secs(5),
            wait_for_workers: Duration::from_secs(10),
            worker_differs: false,
        }
    }
}

/// Every scenario by name: parent and workers look it up the same way.
fn scenario(name: &str) -> Cfg {
    let ms = Duration::from_millis;
    let c = Cfg::new;
    match name {
        "happy" => Cfg {
            batch: 64,
            local: Local::Threads(2),
            ..c("faults-happy", 6_000)
        },
        "sigkill" => Cfg {
            behaviour: Behaviour::HangFirst(37),
            per_item: ms(2),
            batch: 8,
            ..c("faults-sigkill", 400)
        },
        "effect" => Cfg {
            behaviour: Behaviour::AbortAfterEffect(21),
            per_item: ms(2),
            batch: 8,
            ..c("faults-effect", 300)
        },
        "stall" => Cfg {
            behaviour: Behaviour::Stall(40),
            per_item: ms(2),
            batch: 8,
            ..c("faults-stall", 2_400)
        },
        "poison" => Cfg {
            behaviour: Behaviour::Poison(77),
            per_item: ms(1),
            max_deliveries: 3,
            ..c("faults-poison", 300)
        },
        "poison-fork" => Cfg {
            behaviour: Behaviour::Poison(77),
            local: Local::Fork(2),
            ..c("faults-poison-fork", 300)
        },
        "restart" => Cfg {
            per_item: ms(2),
            batch: 8,
            ..c("faults-restart", 1_200)
        },
        "pause" => Cfg {
            per_item: ms(1),
            batch: 8,
            claim_idle: ms(500),
            ..c("faults-pause", 3_000)
        },
        "backpressure" => Cfg {
            per_item: ms(1),
            batch: 16,
            max_in_flight: 200,
            ..c("faults-backpressure", 2_500)
        },
        "trim" => Cfg {
            batch: 64,
            local: Local::Threads(2),
            keep_keys: true,
            ..c("faults-trim", 20_000)
        },
        "finish" => Cfg {
            behaviour: Behaviour::Counter,
            local: Local::Threads(2),
            batch: 8,
            per_item: ms(1),
            ..c("faults-finish", 900)
        },
        "sigterm" => Cfg {
            per_item: ms(20),
            batch: 8,
            max_deliveries: 1,
            grace: Duration::ZERO,
            ..c("faults-sigterm", 240)
        },
        "sigterm-last" => Cfg {
            per_item: ms(50),
            batch: 4,
            grace: ms(300),
            ..c("faults-sigterm-last", 100_000)
        },
        "secure" => Cfg {
            per_item: ms(1),
            ..c("faults-secure", 300)
        },
        "garbage" => Cfg {
            per_item: ms(2),
            batch: 8,
            keep_keys: true,
            ..c("faults-garbage", 600)
        },
        "mismatch" => Cfg {
            worker_differs: true,
            wait_for_workers: ms(1_500),
            ..c("faults-mismatch", 10)
        },
        "fail-fast" => Cfg {
            behaviour: Behaviour::Fatal(300),
            per_item: ms(1),
            batch: 4,
            fail_fast: true,
            keep_keys: true,
            ..c("faults-fail-fast", 100_000)
        },
        other => panic!("no scenario {other:?}"),
    }
}

/// What the parent's sinks saw.
#[derive(Clone, Default)]
struct Sinks {
    out: Arc<Mutex<Vec<u64>>>,
    dead: Arc<Mutex<Vec<(u64, FailureKind)>>>,
}

impl Sinks {
    fn out(&self) -> Vec<u64> {
        let mut v = self.out.lock().unwrap().clone();
        v.sort_unstable();
        v
    }
    fn dead(&self) -> Vec<(u64, FailureKind)> {
        let mut v = self.dead.lock().unwrap().clone();
        v.sort_by_key(|d| d.0);
        v
    }
    fn count(&self) -> usize {
        self.out.lock().unwrap().len()
    }
}

fn mark_conn(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("the mark connection")
}

/// The stage's own work on item `x`.
fn behave(cfg: &Cfg, mark: &Option<String>, x: u64) -> Result<(), String> {
    if !cfg.per_item.is_zero() {
        std::thread::sleep(cfg.per_item);
    }
    let pid = std::process::id();
    let conn = || mark_conn(mark.as_deref().expect("a mark URL in the worker"));
    match cfg.behaviour {
        Behaviour::HangFirst(k) if x == k => {
            let mut c = conn();
            let n: u64 = redis::cmd("INCR").arg("t:exec").query(&mut c).unwrap();
            let _: () = redis::cmd("RPUSH")
                .arg("t:started")
                .arg(pid)
                .query(&mut c)
                .unwrap();
            if n == 1 {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        Behaviour::AbortAfterEffect(k) if x == k => {
            let mut c = conn();
            let n: u64 = redis::cmd("INCR").arg("t:exec").query(&mut c).unwrap();
            if n == 1 {
                std::process::abort();
            }
        }
        Behaviour::Stall(k) if x == k => {
            let mut c = conn();
            let _: () = redis::cmd("RPUSH")
                .arg("t:started")
                .arg(pid)
                .query(&mut c)
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        Behaviour::Poison(k) if x == k => std::process::abort(),
        Behaviour::Fatal(k) if x == k => return Err(format!("item {x} is fatal")),
        _ => {}
    }
    Ok(())
}

/// A stage with state: it counts its items and emits the count at `finish`.
struct Counter(u64, Cfg);

impl minigun::Stage<u64, u64> for Counter {
    fn process(&mut self, x: u64, out: &mut minigun::Output<'_, u64>) -> minigun::StageResult {
        behave(&self.1, &None, x)?;
        self.0 += 1;
        out.emit(x)?;
        Ok(())
    }
    fn finish(&mut self, out: &mut minigun::Output<'_, u64>) -> minigun::StageResult {
        out.emit(1_000_000 + self.0)?;
        Ok(())
    }
}

/// The scenario's pipeline: numbers, the remote stage `work`, a collector and a dead-letter
/// collector. Parent and workers build it alike (`worker` only matters when the scenario
/// makes the worker's definition differ).
fn define(name: &str, broker: RedisBroker, sinks: &Sinks, worker: bool) -> Pipeline {
    let cfg = scenario(name);
    let mark = std::env::var(MARK_ENV).ok();
    let p = Pipeline::new(cfg.pipeline);
    p.handle_signals(false);
    let n = cfg.items;
    p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
    let mut r = Remote::new(broker)
        .claim_idle(cfg.claim_idle)
        .max_deliveries(cfg.max_deliveries)
        .max_in_flight(cfg.max_in_flight)
        .batch(cfg.batch)
        .grace(cfg.grace)
        .wait_for_workers(cfg.wait_for_workers)
        .max_outage(Duration::from_secs(20))
        .worker_exec(match cfg.local {
            Local::Inline => Exec::inline(),
            Local::Threads(n) => Exec::threads(n),
            Local::Fork(n) => Exec::ipc_fork(n),
        });
    if cfg.keep_keys {
        r = r.keep_keys(Duration::from_secs(120));
    }
    if cfg.worker_differs && worker {
        p.map("work", |x: u64| Ok(x.to_string())).remote(r);
        p.consumer("collect", |_: String| Ok(()));
        return p;
    }
    let stage = if cfg.behaviour == Behaviour::Counter {
        p.stage("work", move || Counter(0, cfg)).remote(r)
    } else {
        p.map("work", move |x: u64| {
            behave(&cfg, &mark, x)?;
            Ok(x)
        })
        .remote(r)
    };
    if cfg.fail_fast {
        stage.on_error(OnError::fail_fast());
    }
    let out = sinks.out.clone();
    p.consumer("collect", move |x: u64| {
        out.lock().unwrap().push(x);
        Ok(())
    });
    if !cfg.fail_fast {
        let dead = sinks.dead.clone();
        let dl = p.consumer("dead", move |f: Failed<u64>| {
            dead.lock().unwrap().push((f.item, f.failure.kind));
            Ok(())
        });
        stage.dead_letter(&dl);
    }
    p
}

/// The worker processes' entry: serves the scenario named in the environment.
#[test]
#[ignore = "the entry of the worker processes the fault tests start"]
fn remote_worker_entry() {
    let Ok(name) = std::env::var(SCENARIO_ENV) else {
        return;
    };
    let mut broker = RedisBroker::from_env()
        .expect("MINIGUN_REDIS_URL")
        .timeout(Duration::from_secs(2));
    if let Ok(ca) = std::env::var(CA_ENV) {
        broker = broker
            .tls_ca(&std::fs::read(ca).expect("the CA file"))
            .expect("TLS");
    }
    serve_if_worker(|| define(&name, broker, &Sinks::default(), true)).expect("serve");
}

// ----- the supervisor

/// How workers are started: the scenario, the broker's URL, and the CA file for TLS.
#[derive(Clone, Debug)]
struct WorkerEnv {
    scenario: String,
    url: String,
    mark: String,
    ca: Option<std::path::PathBuf>,
}

impl WorkerEnv {
    fn new(scenario: &str, server: &RedisServer) -> WorkerEnv {
        WorkerEnv {
            scenario: scenario.into(),
            url: server.url(),
            mark: server.url(),
            ca: server.ca_pem().map(|_| server.dir().join("ca.crt")),
        }
    }

    fn spawn(&self) -> Child {
        let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
        cmd.args(["--exact", "remote_worker_entry", "--ignored", "--nocapture"])
            .env("MINIGUN_WORKER", "1")
            .env("MINIGUN_REDIS_URL", &self.url)
            .env(SCENARIO_ENV, &self.scenario)
            .env(MARK_ENV, &self.mark)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(ca) = &self.ca {
            cmd.env(CA_ENV, ca);
        }
        cmd.spawn().expect("start a worker process")
    }
}

#[derive(Default)]
struct Inner {
    live: Vec<Child>,
    /// Workers that exited: pid and status.
    exited: Vec<(u32, ExitStatus)>,
    respawn: bool,
}

/// Worker processes: started, watched (and respawned, if asked), killed on drop.
struct Workers {
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

impl Workers {
    fn start(env: WorkerEnv, n: usize, respawn: bool) -> Workers {
        let inner = Arc::new(Mutex::new(Inner {
            live: (0..n).map(|_| env.spawn()).collect(),
            exited: Vec::new(),
            respawn,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s, e) = (inner.clone(), stop.clone(), env.clone());
        let watcher = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                {
                    let mut g = i.lock().unwrap();
                    let mut k = 0;
                    while k < g.live.len() {
                        if let Ok(Some(status)) = g.live[k].try_wait() {
                            // `try_wait` reaped it; `wait` returns the same status.
                            let mut c = g.live.swap_remove(k);
                            let _ = c.wait();
                            g.exited.push((c.id(), status));
                            if g.respawn && !s.load(Ordering::Relaxed) {
                                let fresh = e.spawn();
                                g.live.push(fresh);
                            }
                        } else {
                            k += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Workers {
            inner,
            stop,
            watcher: Some(watcher),
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.inner
            .lock()
            .unwrap()
            .live
            .iter()
            .map(Child::id)
            .collect()
    }

    fn exited(&self) -> Vec<(u32, ExitStatus)> {
        self.inner.lock().unwrap().exited.clone()
    }

    /// Waits until worker `pid` has exited; its status.
    fn wait_exit(&self, pid: u32, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some((_, s)) = self.exited().into_iter().find(|(p, _)| *p == pid) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let mut g = self.inner.lock().unwrap();
        for c in &mut g.live {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).expect("signal a worker");
}

// ----- helpers

/// Runs `f` on a thread and fails the test if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the thread sent nothing and did not panic"),
        },
        Err(_) => panic!("the scenario did not end within {limit:?}"),
    }
}

/// Waits for `cond` up to `limit`; whether it held.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The parent's run on a thread.
fn parent(
    name: &str,
    broker: RedisBroker,
    sinks: &Sinks,
) -> JoinHandle<Result<RunReport, RunError>> {
    let (name, sinks) = (name.to_string(), sinks.clone());
    std::thread::spawn(move || define(&name, broker, &sinks, false).run())
}

fn join(h: JoinHandle<Result<RunReport, RunError>>, limit: Duration) -> RunReport {
    within(limit, move || h.join().expect("parent thread"))
        .unwrap_or_else(|e| panic!("the run failed: {e}"))
}

/// The run's announcement, once the parent made it (it is removed when the run ends).
fn announced(broker: &RedisBroker, pipeline: &str) -> Announcement {
    let mut s = broker.session().expect("a session");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = s
            .announcements(pipeline, Some("0"), Duration::from_millis(100))
            .expect("announcements");
        if let Some((_, a)) = got.into_iter().next() {
            return a;
        }
        assert!(Instant::now() < deadline, "no announcement of {pipeline}");
    }
}

fn assert_each_once(sinks: &Sinks, n: u64) {
    let got = sinks.out();
    assert_eq!(got.len() as u64, n, "every item exactly once");
    assert_eq!(got, (0..n).collect::<Vec<_>>(), "every item exactly once");
}

/// The remote part of the report of stage `work` (its type is not exported by name).
macro_rules! remote {
    ($report:expr) => {
        $report
            .stage("work")
            .and_then(|s| s.remote.clone())
            .expect("a remote part in the report")
    };
}

fn keys(admin: &mut redis::Connection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS").arg(pattern).query(admin).unwrap()
}

fn started(admin: &mut redis::Connection) -> Vec<u32> {
    redis::cmd("LRANGE")
        .arg("t:started")
        .arg(0)
        .arg(-1)
        .query(admin)
        .unwrap()
}

/// What the server holds of every run, for a failure message.
fn state(admin: &mut redis::Connection) -> String {
    let mut out = Vec::new();
    for k in keys(admin, "mg:*") {
        let kind: String = redis::cmd("TYPE").arg(&k).query(admin).unwrap_or_default();
        let v: redis::Value = match kind.as_str() {
            "stream" if k.ends_with(":in") => redis::cmd("XPENDING")
                .arg(&k)
                .arg("mg")
                .query(admin)
                .unwrap_or(redis::Value::Nil),
            "stream" => redis::cmd("XLEN")
                .arg(&k)
                .query(admin)
                .unwrap_or(redis::Value::Nil),
            "hash" => redis::cmd("HGETALL")
                .arg(&k)
                .query(admin)
                .unwrap_or(redis::Value::Nil),
            _ => redis::Value::Nil,
        };
        let len: u64 = redis::cmd("XLEN").arg(&k).query(admin).unwrap_or(0);
        out.push(format!("{k} ({kind}, {len}): {v:?}"));
    }
    out.join("\n")
}

/// The pid of a worker that holds an entry of the run now.
fn holder(broker: &RedisBroker, run: &StageRun) -> u32 {
    let mut s = broker.session().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let workers = s.workers(run).unwrap();
        let pending = s.pending_idle(run, Duration::ZERO, 100).unwrap();
        if let Some(w) = pending
            .iter()
            .find_map(|p| workers.iter().find(|w| w.consumer == p.owner))
        {
            return w.pid;
        }
        assert!(Instant::now() < deadline, "no worker holds an entry");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The run of `pipeline` from its keys (kept after the run with `keep_keys`).
fn kept_run(admin: &mut redis::Connection, pipeline: &str) -> StageRun {
    let ctl = keys(admin, &format!("mg:{{{pipeline}:*}}:work:ctl"));
    assert_eq!(ctl.len(), 1, "one run's keys: {ctl:?}");
    let run = ctl[0]
        .strip_prefix(&format!("mg:{{{pipeline}:"))
        .and_then(|k| k.strip_suffix("}:work:ctl"))
        .expect("the key layout");
    StageRun {
        pipeline: pipeline.into(),
        run: run.into(),
        stage: "work".into(),
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ----- the scenarios

#[test]
fn happy_path_every_index_once_and_no_key_left() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let _w = Workers::start(WorkerEnv::new("happy", &server), 3, false);
    let sinks = Sinks::default();
    let report = join(parent("happy", server.broker(), &sinks), secs(30));
    assert_each_once(&sinks, 6_000);
    let st = report.stage("work").unwrap();
    assert_eq!((st.items_in, st.items_out, st.failed), (6_000, 6_000, 0));
    let r = remote!(report);
    // Entries of up to 64 items (a partial one goes after its linger).
    assert!(
        (6_000 / 64 + 1..=6_000 / 4).contains(&r.entries_sent),
        "batched entries: {}",
        r.entries_sent
    );
    let rows: u64 = r.workers.iter().map(|w| w.items).sum();
    assert_eq!(rows, 6_000, "the worker rows add up: {:?}", r.workers);
    assert!(
        r.workers.iter().all(|w| w.pid != std::process::id()),
        "the items ran in the worker processes: {:?}",
        r.workers
    );
    assert_eq!((r.reclaims, r.duplicates, r.dead_lettered), (0, 0, 0));
    let mut admin = server.admin();
    let left: Vec<String> = keys(&mut admin, "mg:*")
        .into_iter()
        .filter(|k| !k.ends_with(":runs"))
        .collect();
    assert!(left.is_empty(), "no key of the run is left: {left:?}");
    println!(
        "happy: {} workers, rows {:?}",
        r.workers.len(),
        r.workers.iter().map(|w| w.items).collect::<Vec<_>>()
    );
}

#[test]
fn a_worker_killed_mid_item_loses_nothing_and_its_entry_is_reclaimed() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("sigkill", &server), 3, false);
    let sinks = Sinks::default();
    let run = parent("sigkill", server.broker(), &sinks);
    let mut admin = server.admin();
    assert!(
        wait_until(secs(10), || !started(&mut admin).is_empty()),
        "item 37 started"
    );
    let victim = started(&mut admin)[0];
    assert!(w.pids().contains(&victim), "a worker process ran item 37");
    let t0 = Instant::now();
    signal(victim, Signal::SIGKILL);
    let claim_idle = scenario("sigkill").claim_idle;
    assert!(
        wait_until(claim_idle + secs(3), || sinks
            .out
            .lock()
            .unwrap()
            .contains(&37)),
        "item 37 completed elsewhere"
    );
    let took = t0.elapsed();
    assert!(
        took < claim_idle * 3,
        "item 37 completed about claim_idle ({claim_idle:?}) after the kill: {took:?}"
    );
    let report = join(run, secs(30));
    assert_each_once(&sinks, 400);
    let ran = started(&mut admin);
    assert_eq!(ran.len(), 2, "item 37 ran twice: {ran:?}");
    assert_ne!(ran[1], victim, "the second time on another worker");
    let r = remote!(report);
    assert!(r.reclaims >= 1, "the report shows the reclaim: {r:?}");
    assert_eq!(report.stage("work").unwrap().failed, 0);
    assert!(w.exited().iter().any(|(p, _)| *p == victim));
    println!(
        "sigkill: reclaims {}, item 37 done {took:?} after the kill",
        r.reclaims
    );
}

#[test]
fn a_worker_lost_between_side_effect_and_commit_runs_the_item_twice_and_publishes_once() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("effect", &server), 3, false);
    let sinks = Sinks::default();
    let report = join(parent("effect", server.broker(), &sinks), secs(30));
    assert_each_once(&sinks, 300);
    let mut admin = server.admin();
    let effects: u64 = redis::cmd("GET").arg("t:exec").query(&mut admin).unwrap();
    assert_eq!(effects, 2, "the side effect happened twice");
    assert_eq!(
        sinks.out().iter().filter(|&&x| x == 21).count(),
        1,
        "its output once"
    );
    let r = remote!(report);
    assert!(r.reclaims >= 1, "{r:?}");
    assert_eq!(w.exited().len(), 1, "one worker died: {:?}", w.exited());
    println!(
        "effect: executions {effects}, reclaims {}, duplicates {}",
        r.reclaims, r.duplicates
    );
}

#[test]
fn a_stalled_worker_loses_its_lease_and_its_late_commit_publishes_nothing() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let cfg = scenario("stall");
    let w = Workers::start(WorkerEnv::new("stall", &server), 3, false);
    let sinks = Sinks::default();
    let run = parent("stall", server.broker(), &sinks);
    let mut admin = server.admin();
    assert!(
        wait_until(secs(10), || !started(&mut admin).is_empty()),
        "item 40 started"
    );
    let victim = started(&mut admin)[0];
    signal(victim, Signal::SIGSTOP);
    std::thread::sleep(cfg.claim_idle * 3 + Duration::from_millis(200));
    let before = sinks.count();
    signal(victim, Signal::SIGCONT);
    let report = join(run, secs(30));
    assert!(
        before < 2_400,
        "the worker came back before the run ended ({before} items done)"
    );
    assert_each_once(&sinks, 2_400);
    let r = remote!(report);
    assert!(r.reclaims >= 1, "{r:?}");
    assert!(r.lease_lost >= 1, "the late commit was refused: {r:?}");
    let st = report.stage("work").unwrap();
    assert_eq!((st.failed, st.errors), (0, 0), "{:?}", report.failures);
    assert!(w.exited().is_empty(), "no worker died");
    println!(
        "stall: reclaims {}, lease_lost {}, duplicates {}",
        r.reclaims, r.lease_lost, r.duplicates
    );
}

#[test]
fn a_poison_item_is_dead_lettered_as_worker_lost_after_max_deliveries_alone() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("poison", &server), 2, true);
    let sinks = Sinks::default();
    let report = join(parent("poison", server.broker(), &sinks), secs(40));
    let dead = sinks.dead();
    assert_eq!(
        dead,
        vec![(77, FailureKind::WorkerLost { deliveries: 3 })],
        "only the poison item was dead-lettered"
    );
    let want: Vec<u64> = (0..300).filter(|&x| x != 77).collect();
    assert_eq!(sinks.out(), want, "everything else completed once");
    let deaths = w.exited().len();
    assert_eq!(
        deaths,
        3,
        "it killed its worker on each delivery: {:?}",
        w.exited()
    );
    let r = remote!(report);
    assert_eq!(r.dead_lettered, 1, "{r:?}");
    assert_eq!(report.stage("work").unwrap().failed, 1);
    println!(
        "poison: deaths {deaths}, reclaims {}, dead-lettered {:?}",
        r.reclaims, dead
    );
}

#[test]
fn a_poison_item_under_a_forked_worker_executor_fails_once_without_redelivery() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("poison-fork", &server), 2, false);
    let sinks = Sinks::default();
    let report = join(parent("poison-fork", server.broker(), &sinks), secs(30));
    let dead = sinks.dead();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, 77);
    assert!(
        matches!(dead[0].1, FailureKind::Signal(6)),
        "a signal kind: {:?}",
        dead[0].1
    );
    let want: Vec<u64> = (0..300).filter(|&x| x != 77).collect();
    assert_eq!(sinks.out(), want);
    let r = remote!(report);
    assert_eq!(
        (r.reclaims, r.dead_lettered),
        (0, 0),
        "no redelivery: {r:?}"
    );
    assert!(w.exited().is_empty(), "no worker died");
    println!("poison-fork: {:?}, reclaims {}", dead[0].1, r.reclaims);
}

fn aof_server(fsync: Fsync) -> Option<RedisServer> {
    RedisServer::start_with_or_skip(ServerOptions {
        aof: Some(fsync),
        ..ServerOptions::default()
    })
}

/// Waits until at least `n` items arrived downstream (the fault then comes mid-run).
fn wait_items(sinks: &Sinks, n: usize) {
    assert!(
        wait_until(secs(15), || sinks.count() >= n),
        "{n} items arrived (got {})",
        sinks.count()
    );
}

/// Runs scenario `name` on 3 workers with `fault` done to the server once `after` items
/// arrived: the fault came mid-run, no item failed or errored, every index arrived once.
fn survives(
    server: &mut RedisServer,
    name: &str,
    after: usize,
    fault: impl FnOnce(&mut RedisServer, &Sinks),
) {
    let n = scenario(name).items;
    let _w = Workers::start(WorkerEnv::new(name, server), 3, false);
    let sinks = Sinks::default();
    let run = parent(name, server.broker(), &sinks);
    wait_items(&sinks, after);
    let at = sinks.count();
    let t0 = Instant::now();
    fault(server, &sinks);
    let deadline = Instant::now() + secs(40);
    while !run.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        run.is_finished(),
        "the run did not end within 40 s: {} items arrived; the server holds {}",
        sinks.count(),
        state(&mut server.admin())
    );
    let report = join(run, secs(1));
    assert!((at as u64) < n, "the fault came mid-run ({at} items done)");
    assert_each_once(&sinks, n);
    let st = report.stage("work").unwrap();
    assert_eq!((st.failed, st.errors), (0, 0), "{:?}", report.failures);
    let r = remote!(report);
    println!(
        "{name}: fault at {at} items, run ended {:?} after it; resent {}, reclaims {}, \
         duplicates {}, lease_lost {}, outage {:.2}s",
        t0.elapsed(),
        r.entries_resent,
        r.reclaims,
        r.duplicates,
        r.lease_lost,
        r.outage_secs
    );
}

#[test]
fn a_server_restart_with_aof_always_mid_run_fails_no_item() {
    let Some(mut server) = aof_server(Fsync::Always) else {
        return;
    };
    survives(&mut server, "restart", 200, |server, _| server.restart());
}

#[test]
fn a_server_killed_with_aof_everysec_and_restarted_is_reconciled_exactly_once() {
    let Some(mut server) = aof_server(Fsync::EverySec) else {
        return;
    };
    survives(&mut server, "restart", 200, |server, _| {
        server.kill();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
    });
}

#[test]
fn a_client_pause_of_all_commands_mid_run_fails_no_item() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    survives(&mut server, "pause", 300, |server, sinks| {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(3_000)
            .arg("ALL")
            .query(&mut server.admin())
            .unwrap();
        let at = sinks.count();
        std::thread::sleep(Duration::from_millis(2_500));
        assert!(sinks.count() - at < 300, "nothing moved during the pause");
    });
}

#[test]
fn a_stopped_server_process_mid_run_fails_no_item() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    survives(&mut server, "pause", 300, |server, sinks| {
        server.pause();
        let at = sinks.count();
        std::thread::sleep(secs(3));
        assert!(
            sinks.count() - at < 300,
            "nothing moved while the server was stopped"
        );
        server.resume();
    });
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn backpressure_keeps_outstanding_items_within_max_in_flight() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let cfg = scenario("backpressure");
    let _w = Workers::start(WorkerEnv::new("backpressure", &server), 1, false);
    let sinks = Sinks::default();
    let broker = server.broker();
    let rss0 = rss_kib();
    let run = parent("backpressure", broker.clone(), &sinks);
    let a = announced(&broker, cfg.pipeline);
    let keys = broker.keys(&a.stage_run);
    let mut probe = broker.session().unwrap();
    let mut admin = server.admin();
    let (mut samples, mut most, mut most_entries, mut rss_max) = (0u64, 0u64, 0u64, 0u64);
    while !run.is_finished() {
        let out = probe.outstanding(&a.stage_run).unwrap_or_default();
        let items: u64 = out.iter().map(|&(_, n)| n as u64).sum();
        let len: u64 = redis::cmd("XLEN")
            .arg(&keys.work)
            .query(&mut admin)
            .unwrap_or(0);
        most = most.max(items);
        most_entries = most_entries.max(len);
        rss_max = rss_max.max(rss_kib());
        samples += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = join(run, secs(30));
    assert_each_once(&sinks, cfg.items);
    assert!(
        samples > 20,
        "the probe sampled the run ({samples} samples)"
    );
    assert!(most > 0, "the probe saw items outstanding");
    assert!(
        most <= cfg.max_in_flight as u64,
        "at most max_in_flight items outstanding: saw {most}"
    );
    let bound = (cfg.max_in_flight as u64).div_ceil(cfg.batch as u64) + 1;
    assert!(most_entries <= bound, "XLEN {most_entries} > {bound}");
    let grown = rss_max.saturating_sub(rss0);
    assert!(
        grown < 64 << 10,
        "parent RSS grew by {grown} KiB (from {rss0} KiB)"
    );
    assert_eq!(report.stage("work").unwrap().failed, 0);
    println!(
        "backpressure: {samples} samples, most items outstanding {most}, most entries {most_entries}, RSS {rss0} -> max {rss_max} KiB"
    );
}

#[test]
fn after_a_long_run_the_work_stream_is_empty_and_small() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let _w = Workers::start(WorkerEnv::new("trim", &server), 3, false);
    let sinks = Sinks::default();
    let broker = server.broker();
    let run = parent("trim", broker.clone(), &sinks);
    // The announcement is removed with the run: read it while the run goes.
    let a = announced(&broker, "faults-trim");
    let report = join(run, secs(40));
    assert_each_once(&sinks, 20_000);
    let keys = broker.keys(&a.stage_run);
    let mut admin = server.admin();
    let len: u64 = redis::cmd("XLEN")
        .arg(&keys.work)
        .query(&mut admin)
        .unwrap();
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&keys.work)
        .query(&mut admin)
        .unwrap();
    assert_eq!(len, 0, "every entry was removed");
    assert!(
        bytes < 32 << 10,
        "the empty work stream takes {bytes} bytes"
    );
    for k in keys.run_keys() {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut admin).unwrap();
        assert!(ttl != -1, "{k} has no TTL");
    }
    let r = remote!(report);
    println!(
        "trim: {} entries sent, XLEN {len}, MEMORY USAGE {bytes} B",
        r.entries_sent
    );
}

#[test]
fn each_workers_finish_flush_arrives_once() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let _w = Workers::start(WorkerEnv::new("finish", &server), 3, false);
    let sinks = Sinks::default();
    let report = join(parent("finish", server.broker(), &sinks), secs(30));
    let got = sinks.out();
    let (flushes, items): (Vec<u64>, Vec<u64>) = got.iter().partition(|&&x| x >= 1_000_000);
    assert_eq!(items, (0..900).collect::<Vec<_>>(), "every item once");
    // Three workers with two stage instances each: six flushes, counting every item.
    assert_eq!(flushes.len(), 6, "each instance's flush once: {flushes:?}");
    let total: u64 = flushes.iter().map(|c| c - 1_000_000).sum();
    assert_eq!(total, 900);
    assert_eq!(report.stage("work").unwrap().errors, 0);
    println!("finish: flushes {flushes:?}");
}

#[test]
fn a_worker_killed_before_finish_is_a_stage_error_naming_it() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("finish", &server), 3, false);
    let sinks = Sinks::default();
    let run = parent("finish", server.broker(), &sinks);
    wait_items(&sinks, 150);
    let victim = w.pids()[0];
    signal(victim, Signal::SIGKILL);
    let report = join(run, secs(30));
    let got = sinks.out();
    let (flushes, items): (Vec<u64>, Vec<u64>) = got.iter().partition(|&&x| x >= 1_000_000);
    assert_eq!(items, (0..900).collect::<Vec<_>>(), "every item once");
    assert_eq!(
        flushes.len(),
        4,
        "the two live workers' flushes: {flushes:?}"
    );
    let st = report.stage("work").unwrap();
    assert_eq!((st.errors, st.failed), (1, 0), "{:?}", report.failures);
    let e = report
        .failures
        .iter()
        .find(|f| f.message.contains("lost before it finished"))
        .expect("the stage error");
    assert!(
        e.message.contains(&format!("pid {victim}")) && e.pid == Some(victim),
        "it names the worker: {e:?}"
    );
    println!("finish with a lost worker: {}", e.message);
}

#[test]
fn a_worker_stopped_with_sigterm_releases_its_entries_and_nothing_is_redelivered() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("sigterm", &server), 3, false);
    let sinks = Sinks::default();
    let broker = server.broker();
    let run = parent("sigterm", broker.clone(), &sinks);
    let a = announced(&broker, "faults-sigterm");
    wait_items(&sinks, 40);
    let victim = holder(&broker, &a.stage_run);
    assert!(w.pids().contains(&victim));
    let t0 = Instant::now();
    signal(victim, Signal::SIGTERM);
    let status = w.wait_exit(victim, secs(5)).expect("the worker exited");
    let exit = t0.elapsed();
    let report = join(run, secs(30));
    assert!(status.success(), "a clean exit: {status:?}");
    assert_each_once(&sinks, 240);
    assert!(
        sinks.dead().is_empty(),
        "nothing was dead-lettered: {:?}",
        sinks.dead()
    );
    let r = remote!(report);
    assert!(r.releases >= 1, "its entries were released: {r:?}");
    assert_eq!(
        (r.dead_lettered, report.stage("work").unwrap().failed),
        (0, 0)
    );
    println!(
        "sigterm: exited in {exit:?}, releases {}, reclaims {}",
        r.releases, r.reclaims
    );
}

#[test]
fn the_last_worker_stopped_with_sigterm_exits_within_its_grace() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let cfg = scenario("sigterm-last");
    let w = Workers::start(WorkerEnv::new("sigterm-last", &server), 1, false);
    let sinks = Sinks::default();
    let handle = define("sigterm-last", server.broker(), &sinks, false)
        .spawn()
        .expect("spawn the run");
    wait_items(&sinks, 4);
    let victim = w.pids()[0];
    let t0 = Instant::now();
    signal(victim, Signal::SIGTERM);
    let status = w.wait_exit(victim, secs(5)).expect("the worker exited");
    let exit = t0.elapsed();
    // No worker is left to finish the items: the run is cancelled.
    handle.cancel();
    let _ = within(secs(20), move || handle.wait());
    assert!(status.success(), "a clean exit: {status:?}");
    assert!(
        exit < cfg.grace + Duration::from_millis(1_500),
        "it exited within its grace ({:?}): {exit:?}",
        cfg.grace
    );
    println!("sigterm of the last worker: exited in {exit:?}");
}

#[test]
fn a_wrong_password_fails_the_run_at_start_with_a_clear_error() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let sinks = Sinks::default();
    let broker = server.broker_for(&server.url_for("default", "not-the-password"));
    let err = within(secs(20), move || {
        define("secure", broker, &sinks, false).run().unwrap_err()
    });
    let text = err.to_string();
    assert!(matches!(err, RunError::Aborted { .. }), "{text}");
    assert!(
        text.contains("refused access") && text.to_lowercase().contains("password"),
        "the error names the problem: {text}"
    );
    println!("wrong password: {text}");
}

const WORKER_RULES: &str = "on >worker-secret ~mg:* +@stream +@hash +@connection +evalsha \
    +script|load +time -@dangerous -xgroup -xtrim -xsetid";
const PARENT_RULES: &str = "on >parent-secret ~mg:* +@stream +@hash +@connection +evalsha \
    +script|load +time +del +expire -@dangerous +info";

#[test]
fn acl_limited_users_serve_a_run() {
    let Some(server) = RedisServer::start_with_or_skip(ServerOptions {
        users: vec![
            ("mg-worker".into(), WORKER_RULES.into()),
            ("mg-parent".into(), PARENT_RULES.into()),
        ],
        ..ServerOptions::default()
    }) else {
        return;
    };
    let mut env = WorkerEnv::new("secure", &server);
    env.url = server.url_for("mg-worker", "worker-secret");
    let w = Workers::start(env, 2, false);
    let sinks = Sinks::default();
    let broker = server.broker_for(&server.url_for("mg-parent", "parent-secret"));
    let report = join(parent("secure", broker, &sinks), secs(30));
    assert_each_once(&sinks, 300);
    let r = remote!(report);
    let rows: u64 = r.workers.iter().map(|w| w.items).sum();
    assert_eq!(rows, 300, "{:?}", r.workers);
    assert!(w.exited().is_empty(), "the workers serve on");
    println!("acl: {} workers served {rows} items", r.workers.len());
}

#[test]
fn tls_with_a_self_signed_certificate_works_end_to_end() {
    // `openssl version` (the helper's own check runs `openssl --version`, which OpenSSL 3.0
    // refuses, and would skip this test).
    let openssl = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let options = ServerOptions {
        tls: true,
        ..ServerOptions::default()
    };
    let server = if openssl && RedisServer::available(&ServerOptions::default()) {
        RedisServer::start_with(options)
    } else {
        match RedisServer::start_with_or_skip(options) {
            Some(s) => s,
            None => return,
        }
    };
    let env = WorkerEnv::new("secure", &server);
    assert!(env.ca.as_ref().is_some_and(|p| p.exists()), "the CA file");
    let _w = Workers::start(env, 2, false);
    let sinks = Sinks::default();
    let report = join(parent("secure", server.broker(), &sinks), secs(30));
    assert_each_once(&sinks, 300);
    let rows: u64 = remote!(report).workers.iter().map(|w| w.items).sum();
    assert_eq!(rows, 300);
    println!("tls: {rows} items through rediss://");
}

#[test]
fn a_garbage_entry_is_dead_lettered_as_protocol_and_the_worker_survives() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("garbage", &server), 1, false);
    let sinks = Sinks::default();
    let broker = server.broker();
    let run = parent("garbage", broker.clone(), &sinks);
    let a = announced(&broker, "faults-garbage");
    let keys = broker.keys(&a.stage_run);
    wait_items(&sinks, 50);
    let mut admin = server.admin();
    // An item frame (length, kind 1 = item, id, postcard of 5u64) numbered 9.
    let item = |id: u64| {
        let mut frame = vec![10, 0, 0, 0, 1];
        frame.extend_from_slice(&id.to_le_bytes());
        frame.push(5);
        frame
    };
    let (misnumbered, spent) = (item(9), item(4_000_000));
    let garbage: [(u64, u32, u32, &[u8]); 4] = [
        (1_000_000, 1, 0, b"\xff\xfe not an encoded item"),
        // It says item 2,000,000 and holds item 9.
        (2_000_000, 1, 0, &misnumbered),
        // No item at all.
        (3_000_000, 0, 0, b""),
        // A well-formed item whose deliveries spent are as many as a counter can say: it
        // runs (alone, as a redelivery), and its result reaches the parent.
        (4_000_000, 1, u32::MAX, &spent),
    ];
    for (first, count, attempts, payload) in garbage {
        let _: String = redis::cmd("XADD")
            .arg(&keys.work)
            .arg("*")
            .arg("s")
            .arg(first)
            .arg("n")
            .arg(count)
            .arg("a")
            .arg(attempts)
            .arg("p")
            .arg(payload)
            .query(&mut admin)
            .unwrap();
    }
    let report = join(run, secs(30));
    assert_each_once(&sinks, 600);
    let dlq: Vec<(String, Vec<(String, redis::Value)>)> = {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(&keys.dlq)
            .arg("-")
            .arg("+")
            .query(&mut admin)
            .unwrap();
        redis::from_redis_value(v).unwrap()
    };
    let mut firsts: Vec<u64> = dlq
        .iter()
        .filter_map(|(_, fields)| fields.iter().find(|(k, _)| k == "s"))
        .map(|(_, v)| redis::from_redis_value::<u64>(v.clone()).unwrap())
        .collect();
    firsts.sort_unstable();
    assert_eq!(
        firsts,
        [1_000_000, 2_000_000, 3_000_000],
        "each malformed entry is in the dead-letter stream: {dlq:?}"
    );
    assert!(w.exited().is_empty(), "the worker survived");
    let r = remote!(report);
    assert_eq!(r.dead_lettered, 3, "{r:?}");
    assert_eq!(
        r.duplicates, 3,
        "two malformed entries' failures and the spent entry's result reached the parent, \
         which never sent those indexes"
    );
    // Its Protocol failure names an index the parent never sent: dropped, not counted.
    assert_eq!(report.stage("work").unwrap().failed, 0);
    println!(
        "garbage: dead-lettered {}, duplicates {}",
        r.dead_lettered, r.duplicates
    );
}

#[test]
fn a_worker_built_from_another_definition_refuses_and_the_parent_fails_clearly() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("mismatch", &server), 1, false);
    let sinks = Sinks::default();
    let broker = server.broker();
    let s = sinks.clone();
    let err = within(secs(20), move || {
        define("mismatch", broker, &s, false).run().unwrap_err()
    });
    let text = err.to_string();
    assert!(
        text.contains("no worker served") && text.contains("faults-mismatch"),
        "{text}"
    );
    assert!(sinks.out().is_empty());
    assert!(w.exited().is_empty(), "the refusing worker serves on");
    println!("mismatch: {text}");
}

#[test]
fn fail_fast_stops_every_worker_quickly_and_leaves_nothing_kept() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let w = Workers::start(WorkerEnv::new("fail-fast", &server), 3, false);
    let sinks = Sinks::default();
    let broker = server.broker();
    let run = parent("fail-fast", broker.clone(), &sinks);
    let err = within(secs(30), move || run.join().unwrap().unwrap_err());
    let t0 = Instant::now();
    let a = kept_run(&mut server.admin(), "faults-fail-fast");
    match &err {
        RunError::Aborted { cause, report } => {
            assert_eq!(cause.item, Some(300), "{cause:?}");
            assert!(
                cause.message.contains("item 300 is fatal"),
                "{}",
                cause.message
            );
            assert!(report.stage("work").unwrap().items_in < 100_000);
        }
        other => panic!("expected an abort, got {other}"),
    }
    let mut s = broker.session().unwrap();
    std::thread::sleep(Duration::from_millis(1_500).saturating_sub(t0.elapsed()));
    let workers = s.workers(&a).unwrap();
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert!(
        workers
            .iter()
            .all(|w| w.since_heartbeat >= Duration::from_millis(500)),
        "every worker stopped serving the run within a second: {workers:?}"
    );
    let pending = s.pending_idle(&a, Duration::ZERO, 1_000).unwrap();
    assert!(
        pending.iter().all(|p| p.idle >= Duration::from_millis(500)),
        "nothing is kept by a live consumer: {pending:?}"
    );
    assert!(w.exited().is_empty(), "the workers wait for the next run");
    println!(
        "fail-fast: workers' last heartbeats {:?} ago, {} entries left pending",
        workers
            .iter()
            .map(|w| w.since_heartbeat)
            .collect::<Vec<_>>(),
        pending.len()
    );
}
