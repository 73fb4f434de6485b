//! Shared test helpers: the executor matrix.
//!
//! `matrix!` runs one behavioural test body under every executor; `matrix_local!` under the
//! in-process ones only (for item types that cannot be serialised). A body compares its run
//! with an expectation computed without the library, so the inline run is checked too
//! (comparing it with itself would check nothing).
#![allow(dead_code, unreachable_pub)]

use minigun::{Exec, StageRef, Wire};

/// An executor of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ex {
    Inline,
    Threads,
    Cow,
    Ipc,
}

impl Ex {
    pub const ALL: [Ex; 4] = [Ex::Inline, Ex::Threads, Ex::Cow, Ex::Ipc];

    /// Puts a stage under this executor (4 workers where it has workers).
    pub fn apply<I: Wire, O: Wire>(self, s: &StageRef<I, O>) -> StageRef<I, O> {
        match self {
            Ex::Inline => s.executor(Exec::inline()),
            Ex::Threads => s.executor(Exec::threads(4)),
            Ex::Cow => s.cow_fork(4).stage(),
            Ex::Ipc => s.ipc_fork(4).stage(),
        }
    }

    /// Like `apply`, for stages whose types are not serialisable (inline / threads only).
    pub fn apply_local<I, O>(self, s: &StageRef<I, O>) -> StageRef<I, O> {
        match self {
            Ex::Inline => s.executor(Exec::inline()),
            Ex::Threads => s.executor(Exec::threads(4)),
            other => panic!("{other:?} is not an in-process executor"),
        }
    }
}

/// Defines a module `$name` with one `#[test]` per executor; `$ex` is the executor.
#[macro_export]
macro_rules! matrix {
    (fn $name:ident($ex:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn inline() {
                let $ex = $crate::common::Ex::Inline;
                $body
            }
            #[test]
            fn threads() {
                let $ex = $crate::common::Ex::Threads;
                $body
            }
            #[test]
            fn cow_fork() {
                let $ex = $crate::common::Ex::Cow;
                $body
            }
            #[test]
            fn ipc_fork() {
                let $ex = $crate::common::Ex::Ipc;
                $body
            }
        }
    };
}

/// Like `matrix!`, over the in-process executors only.
#[macro_export]
macro_rules! matrix_local {
    (fn $name:ident($ex:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn inline() {
                let $ex = $crate::common::Ex::Inline;
                $body
            }
            #[test]
            fn threads() {
                let $ex = $crate::common::Ex::Threads;
                $body
            }
        }
    };
}

/// Collects items from a consumer across threads and processes (the consumer runs in the
/// parent, so a plain shared Vec works).
#[derive(Clone)]
pub struct Sink<T>(pub std::sync::Arc<std::sync::Mutex<Vec<T>>>);

impl<T> Default for Sink<T> {
    fn default() -> Self {
        Sink(Default::default())
    }
}

impl<T: Clone + Ord + Send + 'static> Sink<T> {
    /// Adds a consumer "collect" that keeps every item here.
    pub fn consume(&self, p: &minigun::Pipeline) {
        let s = self.clone();
        p.consumer("collect", move |x: T| {
            s.push(x);
            Ok(())
        });
    }
}

/// Adds a producer "gen" of `0..n`.
pub fn gen(p: &minigun::Pipeline, n: u64) {
    p.producer("gen", move |out| {
        for i in 0..n {
            out.emit(i)?;
        }
        Ok(())
    });
}

impl<T: Clone + Ord> Sink<T> {
    pub fn push(&self, t: T) {
        self.0.lock().unwrap().push(t);
    }
    pub fn sorted(&self) -> Vec<T> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of this process, by name.
pub fn threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Processes of this machine whose parent is `ppid`: pid, name and state letter (`Z` =
/// zombie: exited, not reaped).
fn children_of(ppid: u32) -> Vec<(u32, String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let mut f = stat[close + 2..].split_whitespace();
        let state = f.next().unwrap_or("").to_string();
        let parent: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if parent == ppid {
            v.push((pid, name, state));
        }
    }
    v
}

/// Children of this process with their state letter.
fn children() -> Vec<(u32, String)> {
    let me = std::process::id();
    children_of(me)
        .into_iter()
        .map(|(p, _, s)| (p, s))
        .collect()
}

/// Live (non-zombie) processes of this machine named `comm` whose parent is `ppid`.
pub fn named_children(ppid: u32, comm: &str) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|(_, name, state)| name == comm && state != "Z")
        .map(|(p, _, _)| p)
        .collect()
}

/// Runs `runnable` on its own thread and, once the fork server of `stage` has children
/// running items, kills the server. Returns the server's pid and how the run ended (within
/// 60 s).
pub fn kill_fork_server_mid_run(
    runnable: minigun::Runnable,
    stage: &str,
) -> (u32, Result<minigun::RunReport, minigun::RunError>) {
    use std::time::Duration;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(runnable.run());
    });
    let me = std::process::id();
    let server = wait_for("the fork server", Duration::from_secs(30), || {
        named_children(me, &format!("mg:{stage}:srv"))
            .first()
            .copied()
    });
    // Children of the server are running items.
    wait_for("a child of the server", Duration::from_secs(30), || {
        named_children(server, &format!("mg:{stage}"))
            .first()
            .copied()
    });
    let pid = nix::unistd::Pid::from_raw(server as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the server");
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the run ends after its fork server died");
    (server, r)
}

/// Children of this process that are zombies (exited, not reaped).
pub fn zombies() -> Vec<u32> {
    children()
        .into_iter()
        .filter(|(_, s)| s == "Z")
        .map(|(p, _)| p)
        .collect()
}

/// Live (non-zombie) children of this process.
pub fn live_children() -> Vec<u32> {
    children()
        .into_iter()
        .filter(|(_, s)| s != "Z")
        .map(|(p, _)| p)
        .collect()
}

/// Where this process's threads and live children are waiting (name, state, kernel wait
/// channel, and the kernel stack where it can be read): printed when a run does not end, so
/// a hang seen once can be told apart from a slow machine.
pub fn where_everyone_waits() -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let describe = |dir: String| {
        let stat = read(format!("{dir}/stat"));
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        format!(
            "{} [{}] wchan={} {}",
            read(format!("{dir}/comm")).trim(),
            state.unwrap_or("?"),
            read(format!("{dir}/wchan")),
            read(format!("{dir}/stack")).replace('\n', " | ")
        )
    };
    let mut out = String::from("threads of this process:\n");
    for e in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = e.path().display().to_string();
        out += &format!("  {}: {}\n", e.file_name().to_string_lossy(), describe(dir));
    }
    out += "live children:\n";
    for pid in live_children() {
        out += &format!("  {pid}: {}\n", describe(format!("/proc/{pid}")));
    }
    out
}

/// For tests that re-run the test binary: the copy dies with this process, even if the
/// harness kills us mid-test.
pub trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for std::process::Command {
    #[allow(unsafe_code)]
    fn die_with_parent(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches only the new process.
        unsafe {
            self.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        }
    }
}

/// One of the two fork executors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    Cow,
    Ipc,
}

impl Fork {
    pub fn apply<I: Wire, O: Wire>(self, s: &StageRef<I, O>, n: usize) -> StageRef<I, O> {
        match self {
            Fork::Cow => s.cow_fork(n).stage(),
            Fork::Ipc => s.ipc_fork(n).stage(),
        }
    }
}

/// One `#[test]` per fork executor; `$fk` is the executor.
#[macro_export]
macro_rules! both {
    (fn $name:ident($fk:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn cow_fork() {
                let $fk = $crate::common::Fork::Cow;
                $body
            }
            #[test]
            fn ipc_fork() {
                let $fk = $crate::common::Fork::Ipc;
                $body
            }
        }
    };
}

/// Runs a pipeline on its own thread; fails the test instead of hanging if it does not end.
pub fn run_bounded(p: minigun::Pipeline) -> Result<minigun::RunReport, minigun::RunError> {
    let r = p.build().expect("valid pipeline");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(r.run());
    });
    rx.recv_timeout(std::time::Duration::from_secs(90))
        .expect("the run did not end within 90 s")
}

/// After a run: every child reaped, none left running.
pub fn assert_no_children() {
    assert_eq!(
        zombies(),
        Vec::<u32>::new(),
        "zombie children after the run"
    );
    assert_eq!(
        live_children(),
        Vec::<u32>::new(),
        "live children after the run"
    );
}

/// A temporary directory, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!("minigun-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// For re-executed test binaries: a pipeline `name` whose producer "endless" never stops and
/// whose stage `stage` spends `item` on each item in forked children (`cow_fork(workers)` for
/// the role "cow", else `ipc_fork(workers)`). The caller adds the rest.
pub fn endless_forked(
    name: &str,
    role: &str,
    stage: &str,
    workers: usize,
    item: std::time::Duration,
) -> minigun::Pipeline {
    let exec = match role {
        "cow" => Exec::cow_fork(workers),
        "cow-served" => Exec::cow_fork(workers).fork_server(),
        _ => Exec::ipc_fork(workers),
    };
    let p = minigun::Pipeline::new(name);
    p.producer("endless", |out| {
        for i in 0u64.. {
            out.emit(i)?;
        }
        Ok(())
    });
    p.map(stage, move |x: u64| {
        std::thread::sleep(item);
        Ok(x)
    })
    .wire()
    .executor(exec);
    p
}

/// Every `tracing` event this process emits at `max` or a more severe level, as
/// `LEVEL target: field=value;...`. Installs the process's global subscriber (nextest runs
/// each test in a process of its own) and clears what earlier calls captured.
pub fn capture_events(max: tracing::Level) -> &'static Events {
    let _ = tracing::subscriber::set_global_default(Capture(max));
    EVENTS.0.lock().unwrap().clear();
    &EVENTS
}

/// What the parent logs (at debug level) when it takes finished results from a busy
/// worker's shared log.
pub const TOOK_FROM_BUSY_WORKER: &str = "took finished results from a busy worker's log";
/// ... and when it replays what a dead worker left there.
pub const REPLAYED_DEAD_WORKER: &str = "replaying the results a dead worker left in its log";

/// The events captured by [`capture_events`].
pub struct Events(std::sync::Mutex<Vec<String>>);

impl Events {
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// How many events contain `what`.
    pub fn count(&self, what: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains(what))
            .count()
    }
}

static EVENTS: Events = Events(std::sync::Mutex::new(Vec::new()));

struct Capture(tracing::Level);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?};", f.name(), v));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= self.0
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(format!(
            "{} {}: ",
            e.metadata().level(),
            e.metadata().target()
        ));
        e.record(&mut f);
        EVENTS.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Polls `f` every 2 ms until it yields a value; panics naming `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// [`wait_for`] a condition.
pub fn wait_until(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, limit, || cond().then_some(()))
}

/// Set in a child by [`overdue`]'s item 0, seen by the items after it in the same child only.
static IGNORING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A stage for items 0, 1, 2 in one child under a 300 ms limit per item: item 0 ignores
/// SIGTERM and answers at 550 ms (after the SIGTERM at 300 ms, before the SIGKILL at
/// 800 ms); an item started after it in the same child is still running when the SIGKILL
/// lands. Each answers its number and its process id.
#[allow(unsafe_code)]
pub fn overdue(x: u64) -> minigun::StageResult<(u64, u32)> {
    use std::sync::atomic::Ordering;
    if x == 0 {
        // SAFETY: sets this (forked child) process's disposition for SIGTERM.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
        IGNORING.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(550));
    } else if IGNORING.load(Ordering::SeqCst) {
        // In the child that item 0 made overdue: killed by the SIGKILL meanwhile.
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    Ok((x, std::process::id()))
}

/// Runs [`overdue`]'s three items under `exec` (one child or worker for all three, a 300 ms
/// limit per item) and checks that item 1 was not failed for item 0's time limit but ran
/// again in another child, its attempt not counted.
pub fn overdue_item_runs_again(exec: Exec) {
    let p = minigun::Pipeline::new("overdue");
    gen(&p, 3);
    let got = Sink::default();
    let g = got.clone();
    p.map("work", overdue)
        .wire()
        .executor(exec)
        .on_error(minigun::OnError::skip());
    p.consumer("sink", move |x: (u64, u32)| {
        g.push(x);
        Ok(())
    });
    let report = run_bounded(p).expect("the run succeeds");
    assert_no_children();
    let got = got.sorted();
    assert!(
        report.failures.is_empty(),
        "item 1 was killed for item 0's time limit: {:?}",
        report.failures
    );
    assert_eq!(got.iter().map(|&(x, _)| x).collect::<Vec<_>>(), [0, 1, 2]);
    assert_ne!(got[0].1, got[1].1, "item 1 ran again in another child");
    let work = report.stage("work").unwrap();
    assert_eq!((work.failed, work.retried, work.items_in), (0, 0, 3));
}
