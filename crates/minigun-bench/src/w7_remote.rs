//! W7 remote stages: a `map` whose items run on 2 worker processes through Redis Streams,
//! against a hand-written loop on the `redis` client doing the same work through the same
//! server in the same run.
//!
//! The job starts a private `redis-server` (a free port on 127.0.0.1, a random password,
//! `appendonly no` and no RDB snapshots) and kills it by its pid at the end. Workers are this
//! binary re-executed with a hidden first argument, `--w7-worker <role>`: with
//! `MINIGUN_WORKER=1` the roles `a`..`d` serve the W7 definition of that name
//! (`serve_if_worker`), and `raw-u64` / `raw-bytes` run one consumer of the hand-written loop.
//! Every process the job starts is killed by its pid when the job ends, fails or overruns
//! its time limit.
//!
//! - **a**: u64 items, `map(x*2)`, `batch(64)`, `worker_exec(Exec::inline())`. Baseline: a
//!   producer XADDs 64-item entries, 16 per pipelined round trip; 2 consumer processes
//!   XREADGROUP COUNT 16, then XADD the results + XACK + XDEL in one pipeline; the parent
//!   XREADGROUPs the results. Both keep the same number of items in flight.
//! - **b**: 1 KiB `Vec<u8>` items (each byte doubled), one item per entry (`batch(1)`), and
//!   the same loop with one item per entry.
//! - **c**: one item in flight (`linger(0)`, `batch(1)`, the producer emits the next item
//!   when the last one has reached the consumer): each item's round trip, against XADD ->
//!   blocked XREADGROUP -> XADD out -> blocked XREADGROUP; p50 and p99.
//! - **d**: SIGKILL of the worker holding an item (it sleeps on it) to that item's result
//!   from the other worker, with `claim_idle` 1 s (so a reclaim interval of 250 ms).

use crate::common::{byte_sum, progress, timed, Cfg, Row};
use crate::raw;
use minigun::remote::{serve_if_worker, Remote};
use minigun::{Exec, Output, Pipeline, RunReport, StageResult};
use minigun_redis::testing::{RedisServer, ServerOptions};
use minigun_redis::RedisBroker;
use redis::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The hidden first argument of a re-executed worker: `--w7-worker <role> [args]`.
pub(crate) const WORKER_FLAG: &str = "--w7-worker";
/// The directory where the W7d worker that takes the marked item writes its pid.
const DIR_ENV: &str = "MINIGUN_BENCH_W7_DIR";

/// W7a: items per entry.
const A_BATCH: usize = 64;
/// W7a: items sent and not finished, at most (minigun's `max_in_flight`, the raw window).
const A_IN_FLIGHT: usize = 4096;
/// W7b: item size.
const B_SIZE: usize = 1024;
/// W7b: items in flight (minigun's default `max_in_flight`, and the raw window).
const B_IN_FLIGHT: usize = 1000;
/// Entries per pipelined XADD round trip of the raw producer.
const RAW_PIPE: usize = 16;
/// Entries per XREADGROUP of a raw consumer.
const RAW_COUNT: usize = 16;
/// Worker processes (minigun's and the raw loop's).
const WORKERS: usize = 2;
/// W7d: the lease after which a lost worker's entry is reclaimed.
pub(crate) const D_CLAIM_IDLE: Duration = Duration::from_secs(1);
/// W7d: the item the first worker holds until it is killed.
const D_MARK: u64 = 3;
/// W7d: items of a run.
const D_ITEMS: u64 = 16;

/// The W7d target, in ms: `claim_idle` plus two reclaim intervals (`claim_idle / 4`).
pub(crate) fn d_limit_ms() -> f64 {
    (D_CLAIM_IDLE + 2 * (D_CLAIM_IDLE / 4)).as_secs_f64() * 1e3
}

/// The W7 definitions (one per worker role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    A,
    B,
    C,
    D,
}

impl Variant {
    fn role(self) -> &'static str {
        match self {
            Variant::A => "a",
            Variant::B => "b",
            Variant::C => "c",
            Variant::D => "d",
        }
    }

    fn of_role(role: &str) -> Option<Variant> {
        [Variant::A, Variant::B, Variant::C, Variant::D]
            .into_iter()
            .find(|v| v.role() == role)
    }

    fn pipeline(self) -> String {
        format!("w7{}", self.role())
    }
}

/// The remote settings of each variant (parent and workers build the same).
fn remote(v: Variant, broker: RedisBroker) -> Remote {
    let r = Remote::new(broker)
        .worker_exec(Exec::inline())
        .wait_for_workers(Duration::from_secs(15));
    match v {
        Variant::A => r.batch(A_BATCH).max_in_flight(A_IN_FLIGHT),
        Variant::B => r.batch(1).max_in_flight(B_IN_FLIGHT),
        Variant::C => r.batch(1).linger(Duration::ZERO),
        Variant::D => r.batch(1).claim_idle(D_CLAIM_IDLE),
    }
}

type Gen<T> = Box<dyn FnOnce(&mut Output<'_, T>) -> StageResult + Send>;
type Sink<T> = Box<dyn Fn(T) -> StageResult + Send + Sync>;

/// W7a, W7c, W7d: u64 items doubled by a remote stage. A worker builds it with a producer and
/// a consumer that never run.
fn define_u64(v: Variant, broker: RedisBroker, gen: Gen<u64>, sink: Sink<u64>) -> Pipeline {
    let p = Pipeline::new(v.pipeline());
    p.handle_signals(false);
    p.producer("gen", gen);
    let stage = if v == Variant::D {
        let dir = std::env::var_os(DIR_ENV).map(PathBuf::from);
        p.map("double", move |x: u64| {
            if x == D_MARK {
                hold_once(dir.as_deref());
            }
            Ok(x * 2)
        })
    } else {
        p.map("double", |x: u64| Ok(x * 2))
    };
    stage.remote(remote(v, broker));
    p.consumer("sink", sink);
    p
}

/// W7b: 1 KiB items, each byte doubled by a remote stage.
fn define_bytes(broker: RedisBroker, gen: Gen<Vec<u8>>, sink: Sink<Vec<u8>>) -> Pipeline {
    let p = Pipeline::new(Variant::B.pipeline());
    p.handle_signals(false);
    p.producer("gen", gen);
    p.map("double", |mut v: Vec<u8>| {
        double_bytes(&mut v);
        Ok(v)
    })
    .remote(remote(Variant::B, broker));
    p.consumer("sink", sink);
    p
}

fn double_bytes(v: &mut [u8]) {
    for b in v {
        *b = b.wrapping_mul(2);
    }
}

fn double_u64s(v: &mut [u8]) {
    for c in v.chunks_exact_mut(8) {
        let x = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        c.copy_from_slice(&(x * 2).to_le_bytes());
    }
}

/// W7b item `i`.
fn b_item(i: u64) -> Vec<u8> {
    vec![(i % 251) as u8; B_SIZE]
}

/// W7d: the first worker to get the marked item writes its pid and holds the item until it
/// is killed; the one that takes it over finds the file and runs it at once.
fn hold_once(dir: Option<&Path>) {
    let Some(dir) = dir else { return };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join("holder"));
    if let Ok(mut f) = file {
        let _ = writeln!(f, "{}", std::process::id());
        drop(f);
        std::thread::sleep(Duration::from_secs(120));
    }
}

// ---------------------------------------------------------------------------------------
// Worker processes

/// Runs a re-executed worker (`args` follow [`WORKER_FLAG`]).
pub(crate) fn worker_main(args: &[String]) -> ExitCode {
    exit_with_parent();
    let Some(role) = args.first() else {
        eprintln!("{WORKER_FLAG} needs a role");
        return ExitCode::from(2);
    };
    if let Some(mode) = role.strip_prefix("raw-") {
        return match raw_consumer(mode, &args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("W7 raw consumer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(v) = Variant::of_role(role) else {
        eprintln!("{WORKER_FLAG}: unknown role {role:?}");
        return ExitCode::from(2);
    };
    let broker = match RedisBroker::from_env() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("W7 worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = if v == Variant::B {
        serve_if_worker(|| define_bytes(broker, Box::new(|_| Ok(())), Box::new(|_| Ok(()))))
    } else {
        serve_if_worker(|| define_u64(v, broker, Box::new(|_| Ok(())), Box::new(|_| Ok(()))))
    };
    // serve_if_worker ends the process when it served; it returns only if it could not.
    match served {
        Ok(()) => {
            eprintln!("W7 worker: MINIGUN_WORKER=1 is not set");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("W7 worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A worker ends when the job that started it is gone (a job killed from outside cannot
/// clean up after itself).
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(3);
        }
    });
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(c)
}

fn url_from_env() -> Result<String, String> {
    std::env::var(minigun_redis::URL_ENV).map_err(|_| format!("{} not set", minigun_redis::URL_ENV))
}

/// One consumer of the hand-written loop: XREADGROUP COUNT 16, then the results' XADDs, XACK
/// and XDEL in one pipeline. Says `ready` on stdout once connected; runs until killed.
fn raw_consumer(mode: &str, args: &[String]) -> Result<(), String> {
    let [input, output, name] = args else {
        return Err("needs <in key> <out key> <consumer>".into());
    };
    let transform: fn(&mut [u8]) = match mode {
        "u64" => double_u64s,
        "bytes" => double_bytes,
        other => return Err(format!("unknown mode {other:?}")),
    };
    let err = |e: redis::RedisError| e.to_string();
    let mut c = connect(&url_from_env()?).map_err(err)?;
    let mut out = std::io::stdout();
    writeln!(out, "ready")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    loop {
        let v: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(name)
            .arg("COUNT")
            .arg(RAW_COUNT)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(input)
            .arg(">")
            .query(&mut c)
            .map_err(err)?;
        let got = entries(v);
        if got.is_empty() {
            continue;
        }
        let mut p = redis::pipe();
        let mut ids = Vec::with_capacity(got.len());
        for (id, mut payload) in got {
            transform(&mut payload);
            p.cmd("XADD")
                .arg(output)
                .arg("*")
                .arg("p")
                .arg(payload)
                .ignore();
            ids.push(id);
        }
        p.cmd("XACK").arg(input).arg("g").arg(&ids).ignore();
        p.cmd("XDEL").arg(input).arg(&ids).ignore();
        p.query::<()>(&mut c).map_err(err)?;
    }
}

/// `(id, field p)` of each entry of an XREADGROUP reply (nil, RESP2 arrays or a RESP3 map).
fn entries(v: Value) -> Vec<(String, Vec<u8>)> {
    let streams: Vec<Value> = match v {
        Value::Array(s) => s
            .into_iter()
            .filter_map(|kv| match kv {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(list) = s else { continue };
        for e in list {
            let Value::Array(mut e) = e else { continue };
            if e.len() != 2 {
                continue;
            }
            let fields = e.pop().expect("two parts");
            let id = match e.pop().expect("two parts") {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::SimpleString(s) => s,
                _ => continue,
            };
            let fields = match fields {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => continue,
            };
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if matches!(&k, Value::BulkString(b) if b == b"p") {
                    if let Value::BulkString(p) = v {
                        out.push((id.clone(), p));
                    }
                    break;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Processes of the job: killed by pid whatever happens

/// Pids this job started and has not reaped: what the watchdog kills.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Child processes, killed by their pid and reaped when dropped (also when a step panics).
#[derive(Debug, Default)]
struct Procs {
    children: Vec<Child>,
}

impl Procs {
    /// Starts a worker of this binary; its stdout is piped for raw consumers (their `ready`),
    /// else discarded (an inherited stdout would hold the job's result pipe open).
    fn spawn(&mut self, url: &str, role: &str, args: &[&str], env: &[(&str, &Path)]) -> u32 {
        let exe = std::env::current_exe().expect("current_exe");
        let raw = role.starts_with("raw-");
        let mut cmd = Command::new(exe);
        cmd.arg(WORKER_FLAG)
            .arg(role)
            .args(args)
            .env(minigun_redis::URL_ENV, url)
            .stdin(Stdio::null())
            .stdout(if raw { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::inherit());
        if !raw {
            cmd.env("MINIGUN_WORKER", "1");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start a W7 worker process");
        let pid = child.id();
        live().push(pid);
        self.children.push(child);
        pid
    }

    /// Waits for each raw consumer's `ready` line.
    fn wait_ready(&mut self) {
        for c in &mut self.children {
            if let Some(out) = c.stdout.take() {
                let mut line = String::new();
                BufReader::new(out)
                    .read_line(&mut line)
                    .expect("read a consumer's ready line");
                assert_eq!(line.trim(), "ready", "a W7 raw consumer did not start");
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// SIGTERM (minigun workers release what they hold and leave), then SIGKILL after 5 s.
    fn stop(mut self) {
        for c in &self.children {
            let _ = raw::signal(c.id(), libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Drop kills what is left.
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
            live().retain(|&p| p != c.id());
        }
    }
}

/// Kills every live process of the job and ends it if the job overruns `limit`.
struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + limit;
            while Instant::now() < until {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("error: W7 did not finish within {limit:?}; killing its processes");
            for &pid in live().iter() {
                let _ = raw::signal(pid, libc::SIGKILL);
            }
            std::process::exit(1);
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The job's server, its pid known to the watchdog while it runs.
struct Server {
    server: RedisServer,
}

impl Server {
    fn start() -> Server {
        let options = ServerOptions::default();
        if !RedisServer::available(&options) {
            eprintln!(
                "error: W7 needs redis-server on the PATH (e.g. apt-get install redis-server); \
                 nothing was run"
            );
            std::process::exit(1);
        }
        let server = RedisServer::start_with(options);
        if let Some(pid) = server.pid() {
            live().push(pid);
        }
        Server { server }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn broker(&self) -> RedisBroker {
        RedisBroker::from_url(&self.url()).expect("a broker for the W7 server")
    }

    fn admin(&self) -> redis::Connection {
        connect(&self.url()).expect("connect to the W7 server")
    }

    /// Clears the server's command counters (CONFIG RESETSTAT).
    fn reset_stats(&self) {
        let _: redis::RedisResult<()> = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.admin());
    }

    /// What the server did since [`Server::reset_stats`], per `per` (entries or items): the
    /// calls of each command (scripts and the commands they run both count) and the server's
    /// command time (in brackets, each command's; a script's time includes the commands it
    /// runs). The admin connection's own calls are left out.
    fn stats_per(&self, per: u64, unit: &str) -> String {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.admin())
            .unwrap_or_default();
        let mut calls: Vec<(String, u64, u64)> = info
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |f: &str| {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                Some((name.to_string(), field("calls")?, field("usec")?))
            })
            .filter(|(name, _, _)| {
                !matches!(
                    name.as_str(),
                    "info" | "config" | "auth" | "client|setinfo" | "hello" | "del"
                )
            })
            .collect();
        calls.sort_by_key(|c| std::cmp::Reverse(c.1));
        let per = per.max(1) as f64;
        let listed: Vec<String> = calls
            .iter()
            .take(10)
            .map(|(n, k, us)| format!("{n} {:.2} ({:.1} us)", *k as f64 / per, *us as f64 / per))
            .collect();
        format!(
            "server calls per {unit}: {}; server command time {:.1} us per {unit}",
            listed.join(", "),
            calls.iter().map(|c| c.2).sum::<u64>() as f64 / per,
        )
    }

    fn version(&self) -> String {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut self.admin())
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(pid) = self.server.pid() {
            live().retain(|&p| p != pid);
        }
        // RedisServer's own drop kills it by its pid and removes its directory.
    }
}

// ---------------------------------------------------------------------------------------
// The hand-written loop

/// What a raw stream pair carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `per_entry` u64 (LE) per entry.
    U64,
    /// One 1 KiB item per entry.
    Bytes,
}

/// A fresh pair of streams with their groups, and `WORKERS` consumers reading it.
fn raw_setup(server: &Server, tag: &str, mode: Mode, procs: &mut Procs) -> (String, String) {
    let (input, output) = (format!("w7raw:{tag}:in"), format!("w7raw:{tag}:out"));
    let mut c = server.admin();
    let _: () = redis::cmd("DEL")
        .arg(&input)
        .arg(&output)
        .query(&mut c)
        .expect("DEL");
    for (k, g) in [(&input, "g"), (&output, "p")] {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(k)
            .arg(g)
            .arg("$")
            .arg("MKSTREAM")
            .query(&mut c)
            .expect("XGROUP CREATE");
    }
    let role = match mode {
        Mode::U64 => "raw-u64",
        Mode::Bytes => "raw-bytes",
    };
    for w in 0..WORKERS {
        procs.spawn(
            &server.url(),
            role,
            &[&input, &output, &format!("c{w}")],
            &[],
        );
    }
    procs.wait_ready();
    (input, output)
}

fn raw_cleanup(server: &Server, input: &str, output: &str) {
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(input)
        .arg(output)
        .query(&mut server.admin());
}

/// The entry payload of items `first..first + n`.
fn raw_payload(mode: Mode, first: u64, n: usize) -> Vec<u8> {
    match mode {
        Mode::U64 => (first..first + n as u64)
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        Mode::Bytes => b_item(first),
    }
}

/// The hand-written loop: `items` through `WORKERS` consumer processes, `per_entry` items an
/// entry, at most `window` items in flight. Returns the wall time (from the first XADD to
/// the last result read) and the checksum of the results.
fn raw_throughput(
    server: &Server,
    tag: &str,
    mode: Mode,
    items: u64,
    per_entry: usize,
    window: usize,
) -> (Duration, u64, String) {
    let mut procs = Procs::default();
    let (input, output) = raw_setup(server, tag, mode, &mut procs);
    server.reset_stats();
    let url = server.url();
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let sum = std::thread::scope(|s| {
        let (d, input, url) = (done.clone(), &input, &url);
        let producer = s.spawn(move || {
            let mut c = connect(url).expect("producer connection");
            let mut next = 0u64;
            while next < items {
                let mut p = redis::pipe();
                let mut batch = 0;
                while batch < RAW_PIPE && next < items {
                    let n = (items - next).min(per_entry as u64);
                    while next + n - d.load(Ordering::Acquire) > window as u64 {
                        std::thread::park_timeout(Duration::from_millis(1));
                    }
                    p.cmd("XADD")
                        .arg(input)
                        .arg("*")
                        .arg("p")
                        .arg(raw_payload(mode, next, n as usize))
                        .ignore();
                    next += n;
                    batch += 1;
                }
                p.query::<()>(&mut c).expect("producer XADDs");
            }
        });
        let mut c = connect(url).expect("collector connection");
        let (mut got, mut sum) = (0u64, 0u64);
        let mut last = Instant::now();
        while got < items {
            let v: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("p")
                .arg("parent")
                .arg("COUNT")
                .arg(256)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&output)
                .arg(">")
                .query(&mut c)
                .expect("collector XREADGROUP");
            let es = entries(v);
            if es.is_empty() {
                assert!(
                    last.elapsed() < Duration::from_secs(30),
                    "W7 raw loop: no result for 30 s ({got} of {items} items back)"
                );
                continue;
            }
            last = Instant::now();
            let mut ids = Vec::with_capacity(es.len());
            let mut n = 0u64;
            for (id, payload) in es {
                match mode {
                    Mode::U64 => {
                        for ch in payload.chunks_exact(8) {
                            sum += u64::from_le_bytes(ch.try_into().expect("8 bytes"));
                        }
                        n += payload.len() as u64 / 8;
                    }
                    Mode::Bytes => {
                        sum += byte_sum(&payload);
                        n += 1;
                    }
                }
                ids.push(id);
            }
            redis::pipe()
                .cmd("XACK")
                .arg(&output)
                .arg("p")
                .arg(&ids)
                .ignore()
                .cmd("XDEL")
                .arg(&output)
                .arg(&ids)
                .ignore()
                .query::<()>(&mut c)
                .expect("collector XACK + XDEL");
            got += n;
            done.fetch_add(n, Ordering::Release);
            producer.thread().unpark();
        }
        producer.join().expect("raw producer");
        sum
    });
    let wall = t0.elapsed();
    let stats = server.stats_per(items.div_ceil(per_entry as u64), "entry");
    drop(procs);
    raw_cleanup(server, &input, &output);
    (wall, sum, stats)
}

/// The hand-written round trip with one item in flight: XADD, blocked XREADGROUP on the
/// results (the acknowledgement of a result is sent after its clock stops).
fn raw_latency(server: &Server, tag: &str, n: usize) -> Vec<Duration> {
    let mut procs = Procs::default();
    let (input, output) = raw_setup(server, tag, Mode::U64, &mut procs);
    let mut c = server.admin();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t0 = Instant::now();
        let _: Value = redis::cmd("XADD")
            .arg(&input)
            .arg("*")
            .arg("p")
            .arg(&i.to_le_bytes()[..])
            .query(&mut c)
            .expect("XADD");
        let es = loop {
            let v: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("p")
                .arg("parent")
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(5000)
                .arg("STREAMS")
                .arg(&output)
                .arg(">")
                .query(&mut c)
                .expect("XREADGROUP");
            let es = entries(v);
            assert!(
                !es.is_empty() || t0.elapsed() < Duration::from_secs(10),
                "W7c raw: no result in 10 s"
            );
            if !es.is_empty() {
                break es;
            }
        };
        lat.push(t0.elapsed());
        let (id, p) = &es[0];
        assert_eq!(p[..], (i * 2).to_le_bytes(), "W7c raw: wrong result");
        redis::pipe()
            .cmd("XACK")
            .arg(&output)
            .arg("p")
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(&output)
            .arg(id)
            .ignore()
            .query::<()>(&mut c)
            .expect("XACK + XDEL");
    }
    drop(procs);
    raw_cleanup(server, &input, &output);
    lat
}

// ---------------------------------------------------------------------------------------
// minigun's side

/// minigun's workers of one variant, started and known to serve.
fn start_workers(server: &Server, v: Variant, env: &[(&str, &Path)]) -> Procs {
    let mut procs = Procs::default();
    for _ in 0..WORKERS {
        procs.spawn(&server.url(), v.role(), &[], env);
    }
    procs
}

/// What a run's remote part says, for the notes.
fn remote_note(report: &RunReport) -> String {
    let Some(r) = report.stage("double").and_then(|s| s.remote.as_ref()) else {
        return String::new();
    };
    let per_worker: Vec<String> = r.workers.iter().map(|w| w.items.to_string()).collect();
    format!(
        "{} entries; entry round trip p50 {:.2} ms p99 {:.2} ms; items per worker {}",
        r.entries_sent,
        r.round_trip.p50_us / 1e3,
        r.round_trip.p99_us / 1e3,
        per_worker.join("/")
    )
}

/// Workers that committed items in a run.
fn workers_used(report: &RunReport) -> usize {
    report
        .stage("double")
        .and_then(|s| s.remote.as_ref())
        .map_or(0, |r| r.workers.iter().filter(|w| w.items > 0).count())
}

/// One W7a or W7b run of `items` items (`make(i)`, checksummed by `check`): wall time of
/// `run()`, the time its last result reached the consumer, the checksum and the report.
fn minigun_run<T: minigun::Item>(
    define: impl FnOnce(Gen<T>, Sink<T>) -> Pipeline,
    items: u64,
    make: fn(u64) -> T,
    check: fn(&T) -> u64,
) -> (Duration, Duration, u64, RunReport) {
    let sum = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (s, l) = (sum.clone(), last.clone());
    let t0 = Instant::now();
    let p = define(
        Box::new(move |out| {
            for i in 0..items {
                out.emit(make(i))?;
            }
            Ok(())
        }),
        Box::new(move |x| {
            s.fetch_add(check(&x), Ordering::Relaxed);
            l.fetch_max(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            Ok(())
        }),
    );
    let report = p.run().expect("W7 pipeline runs");
    let wall = t0.elapsed();
    assert_eq!(report.consumed, items, "W7: every item consumed");
    let last = Duration::from_nanos(last.load(Ordering::Relaxed));
    (wall, last, sum.load(Ordering::Relaxed), report)
}

/// W7c: `n` items one at a time; each one's time from `emit` to the consumer.
fn minigun_latency(broker: &RedisBroker, n: usize) -> (Vec<Duration>, RunReport) {
    let (tx, rx) = crossbeam_channel::bounded::<(u64, Instant)>(1);
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let l = lat.clone();
    let p = define_u64(
        Variant::C,
        broker.clone(),
        Box::new(move |out| {
            for i in 0..n as u64 {
                let t0 = Instant::now();
                out.emit(i)?;
                let (x, t1) = rx
                    .recv_timeout(Duration::from_secs(10))
                    .map_err(|_| "W7c: no result within 10 s")?;
                if x != i * 2 {
                    return Err(format!("W7c: item {i} came back as {x}").into());
                }
                l.lock().unwrap_or_else(|e| e.into_inner()).push(t1 - t0);
            }
            Ok(())
        }),
        Box::new(move |x| {
            let _ = tx.send((x, Instant::now()));
            Ok(())
        }),
    );
    let report = p.run().expect("W7c pipeline runs");
    assert_eq!(report.consumed, n as u64, "W7c: every item consumed");
    let lat = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    (lat, report)
}

/// W7d once: fresh workers; the one holding the marked item is killed. The time from the
/// kill to the item's result, and the run's report.
fn reclaim_once(server: &Server, rep: usize) -> (Duration, RunReport) {
    let dir = std::env::temp_dir().join(format!(
        "minigun-bench-w7d-{}-{rep}-{}",
        std::process::id(),
        minigun_redis::testing::random_hex(4)
    ));
    std::fs::create_dir_all(&dir).expect("create the W7d directory");
    let procs = start_workers(server, Variant::D, &[(DIR_ENV, &dir)]);
    let pids = procs.pids();
    let arrived: Arc<Mutex<Option<Instant>>> = Arc::default();
    let a = arrived.clone();
    let p = define_u64(
        Variant::D,
        server.broker(),
        Box::new(|out| out.emit_all(0..D_ITEMS).map_err(Into::into)),
        Box::new(move |x| {
            if x == D_MARK * 2 {
                *a.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            Ok(())
        }),
    );
    let holder = dir.join("holder");
    let (killed, report) = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let pid = std::fs::read_to_string(&holder)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok());
                if let Some(pid) = pid {
                    assert!(pids.contains(&pid), "W7d: holder {pid} is not our worker");
                    raw::signal(pid, libc::SIGKILL).expect("SIGKILL the holding worker");
                    return Instant::now();
                }
                assert!(
                    Instant::now() < until,
                    "W7d: no worker took the marked item"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let report = p.run().expect("W7d pipeline runs");
        (killer.join().expect("W7d killer"), report)
    });
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(report.consumed, D_ITEMS, "W7d: every item consumed");
    let at = arrived
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expect("W7d: the marked item arrived");
    (at.saturating_duration_since(killed), report)
}

// ---------------------------------------------------------------------------------------
// The job

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile of sorted durations, in ms.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    ms(sorted[i])
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let _watchdog = Watchdog::start(Duration::from_secs(cfg.size(1200, 150)));
    let server = Server::start();
    let server_note = format!(
        "redis-server {} on loopback, appendonly no, no snapshots; {WORKERS} worker processes",
        server.version()
    );
    progress(format!("W7 {server_note}"));
    let mut rows = Vec::new();
    rows.extend(throughput(cfg, &server, Variant::A, &server_note));
    rows.extend(throughput(cfg, &server, Variant::B, &server_note));
    rows.extend(latency(cfg, &server));
    rows.extend(reclaim(cfg, &server));
    rows
}

/// W7a or W7b: minigun and the raw loop, alternately, best of `reps`.
fn throughput(cfg: &Cfg, server: &Server, v: Variant, server_note: &str) -> Vec<Row> {
    let (items, mode, per_entry, window, what) = match v {
        Variant::A => (
            cfg.size(1_000_000u64, 100_000),
            Mode::U64,
            A_BATCH,
            A_IN_FLIGHT,
            format!("a: u64 x2, batch({A_BATCH}), in flight {A_IN_FLIGHT}"),
        ),
        _ => (
            cfg.size(20_000u64, 4_000),
            Mode::Bytes,
            1,
            B_IN_FLIGHT,
            format!("b: 1 KiB, batch(1), in flight {B_IN_FLIGHT}"),
        ),
    };
    let expect = match mode {
        Mode::U64 => items * (items - 1),
        Mode::Bytes => (0..items)
            .map(|i| {
                byte_sum(&{
                    let mut b = b_item(i);
                    double_bytes(&mut b);
                    b
                })
            })
            .sum(),
    };
    let broker = server.broker();
    let workers = start_workers(server, v, &[]);
    let one = |n: u64| match v {
        Variant::A => minigun_run(
            |g, k| define_u64(Variant::A, broker.clone(), g, k),
            n,
            |i| i,
            |x| *x,
        ),
        _ => minigun_run(
            |g, k| define_bytes(broker.clone(), g, k),
            n,
            b_item,
            |v| byte_sum(v),
        ),
    };
    // A first small run until both workers serve (they start, connect and load the scripts).
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, _, report) = one(items.min(20_000) / 10);
        if workers_used(&report) >= WORKERS {
            break;
        }
        assert!(
            Instant::now() < until,
            "W7{}: the workers did not both serve",
            v.role()
        );
    }
    progress(format!(
        "W7{} hand-written redis loop and minigun remote(redis), {items} items, alternately",
        v.role()
    ));
    let mut raw_best: Option<(Duration, String)> = None;
    let mut best: Option<(Duration, Duration, RunReport, String)> = None;
    for rep in 0..cfg.reps {
        let (raw_wall, raw_sum, stats) = raw_throughput(
            server,
            &format!("{}{rep}", v.role()),
            mode,
            items,
            per_entry,
            window,
        );
        assert_eq!(raw_sum, expect, "W7{} raw: wrong checksum", v.role());
        if raw_best.as_ref().is_none_or(|b| raw_wall < b.0) {
            raw_best = Some((raw_wall, stats));
        }
        server.reset_stats();
        let (wall, last, sum, report) = one(items);
        let stats = server.stats_per(items.div_ceil(per_entry as u64), "entry");
        assert_eq!(sum, expect, "W7{} minigun: wrong checksum", v.role());
        if best.as_ref().is_none_or(|b| wall < b.0) {
            best = Some((wall, last, report, stats));
        }
    }
    workers.stop();
    let (raw_wall, raw_stats) = raw_best.expect("measured");
    let (wall, last, report, stats) = best.expect("measured");
    let base = Row::new("W7", "baseline", "redis-loop", WORKERS, items, raw_wall)
        .variant(what.clone())
        .note(format!(
            "{per_entry} items/entry, {RAW_PIPE} XADDs per pipeline, XREADGROUP COUNT \
             {RAW_COUNT} -> XADD+XACK+XDEL; {server_note}; {raw_stats}"
        ));
    let floor = base.items_per_sec;
    let ours = Row::new("W7", "minigun", "remote(redis)", WORKERS, items, wall)
        .variant(what)
        .floor(floor)
        .note(format!(
            "worker_exec inline; last result after {:.3} s, run() returned after {:.3} s; {}; \
             {stats}",
            last.as_secs_f64(),
            wall.as_secs_f64(),
            remote_note(&report)
        ));
    let mut rows = vec![base, ours];
    if let Mode::Bytes = mode {
        for r in &mut rows {
            r.mb_per_sec = Some(items as f64 * B_SIZE as f64 / 1e6 / r.wall_secs);
        }
    }
    rows
}

/// W7c: one item in flight, minigun and the raw round trip in alternating rounds.
fn latency(cfg: &Cfg, server: &Server) -> Vec<Row> {
    let (n, rounds, warm) = (cfg.size(2000usize, 300), 4usize, 20usize);
    let broker = server.broker();
    let workers = start_workers(server, Variant::C, &[]);
    progress(format!(
        "W7c round trip with one item in flight: {n} items each, hand-written and minigun in \
         {rounds} alternating rounds"
    ));
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let (mut note, mut stats, mut raw_stats) = (String::new(), String::new(), String::new());
    // A first run until both workers serve; then the rounds.
    let until = Instant::now() + Duration::from_secs(20);
    while workers_used(&minigun_latency(&broker, warm * 2).1) < WORKERS {
        assert!(
            Instant::now() < until,
            "W7c: the workers did not both serve"
        );
    }
    let (mut ours_wall, mut raw_wall) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        server.reset_stats();
        let (w, mut r) = timed(|| raw_latency(server, &format!("c{round}"), warm + n / rounds));
        raw_stats = server.stats_per((warm + n / rounds) as u64, "item");
        raw_wall += w;
        raw.extend(r.drain(warm..));
        server.reset_stats();
        let (w, (mut l, report)) = timed(|| minigun_latency(&broker, warm + n / rounds));
        stats = server.stats_per((warm + n / rounds) as u64, "item");
        ours_wall += w;
        ours.extend(l.drain(warm..));
        note = remote_note(&report);
    }
    workers.stop();
    ours.sort_unstable();
    raw.sort_unstable();
    let what = "c: one in flight, batch(1), linger(0)";
    let row = |runner: &str, executor: &str, sorted: &[Duration], wall: Duration| {
        let mut r =
            Row::new("W7", runner, executor, WORKERS, sorted.len() as u64, wall).variant(what);
        r.p50_ms = Some(quantile_ms(sorted, 0.50));
        r.p99_ms = Some(quantile_ms(sorted, 0.99));
        r
    };
    let base = row("baseline", "redis-loop", &raw, raw_wall).note(format!(
        "XADD -> blocked XREADGROUP -> XADD out (+XACK+XDEL) -> blocked XREADGROUP; {raw_stats}"
    ));
    // No ratio: items/s here is one item at a time with each round's run start and finish
    // included; p50 and p99 are the figures.
    let ours = row("minigun", "remote(redis)", &ours, ours_wall).note(format!(
        "emit -> consumer, the next item after it; {note}; {stats}"
    ));
    vec![base, ours]
}

/// W7d: SIGKILL of the worker holding an item to that item's result.
fn reclaim(cfg: &Cfg, server: &Server) -> Vec<Row> {
    let reps = cfg.size(3usize, 1);
    progress(format!(
        "W7d SIGKILL of the worker holding an item, claim_idle {D_CLAIM_IDLE:?}, {reps} time(s)"
    ));
    let mut times = Vec::new();
    let mut reclaims = 0;
    for rep in 0..reps {
        let (t, report) = reclaim_once(server, rep);
        reclaims += report
            .stage("double")
            .and_then(|s| s.remote.as_ref())
            .map_or(0, |r| r.reclaims);
        times.push(t);
    }
    times.sort_unstable();
    let worst = *times.last().expect("measured");
    let mut row = Row::new("W7", "minigun", "remote(redis)", WORKERS, 1, worst)
        .variant(format!("d: kill -9, claim_idle {}ms", D_CLAIM_IDLE.as_millis()))
        .note(format!(
            "SIGKILL -> the item's result from the other worker: {} ms; reclaims reported {reclaims}; \
             target <= claim_idle + 2 x claim_idle/4 = {:.0} ms",
            times.iter().map(|t| format!("{:.0}", ms(*t))).collect::<Vec<_>>().join(", "),
            d_limit_ms()
        ));
    row.p50_ms = Some(quantile_ms(&times, 0.5));
    row.p99_ms = Some(ms(worst));
    vec![row]
}
