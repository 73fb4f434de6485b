//! Hooks and running: run and stage hooks (once each, in order), real concurrency, backpressure,
//! background runs with stop, the report (Display, serde), and executor selection.
#[macro_use]
mod common;
use common::Sink;
use minigun::{Capacity, Exec, OnError, Output, Pipeline, RunError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

fn numbers(n: u64) -> impl FnOnce(&mut Output<'_, u64>) -> minigun::StageResult + Send + 'static {
    move |out| {
        for i in 0..n {
            out.emit(i)?;
        }
        Ok(())
    }
}

/// A shared event log.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, e: impl Into<String>) {
        self.0.lock().unwrap().push(e.into());
    }
    /// A hook that records `e`.
    fn hook(&self, e: &str) -> impl FnOnce() -> minigun::StageResult + Send + 'static {
        let (log, e) = (self.clone(), e.to_string());
        move || {
            log.push(e);
            Ok(())
        }
    }
    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn position(events: &[String], e: &str) -> usize {
    let hits: Vec<usize> = (0..events.len()).filter(|&i| events[i] == e).collect();
    assert_eq!(
        hits.len(),
        1,
        "{e:?} should occur exactly once in {events:?}"
    );
    hits[0]
}

// ---------------------------------------------------------------------------------------------
// Hooks

matrix!(fn hooks_run_once_each_and_in_order(ex) {
    let log = Log::default();
    let p = Pipeline::new("hooks");
    p.before_run(log.hook("before_run:1"));
    p.before_run(log.hook("before_run:2"));
    p.after_run(log.hook("after_run:1"));
    p.after_run(log.hook("after_run:2"));
    p.producer("src", numbers(5))
        .before(log.hook("before:src"))
        .after(log.hook("after:src"));
    let w = p
        .map("work", |x: u64| Ok(x))
        .before(log.hook("before:work:1"))
        .before(log.hook("before:work:2"))
        .after(log.hook("after:work:1"))
        .after(log.hook("after:work:2"));
    ex.apply(&w);
    let l = log.clone();
    p.consumer("sink", move |x: u64| {
        l.push(format!("item:sink:{x}"));
        Ok(())
    })
    .before(log.hook("before:sink"))
    .after(log.hook("after:sink"));
    p.run().unwrap();

    let ev = log.events();
    assert_eq!(ev.len(), 4 + 2 + 4 + 2 + 5, "{ev:?}");
    assert_eq!(&ev[..2], ["before_run:1", "before_run:2"], "{ev:?}");
    assert_eq!(&ev[ev.len() - 2..], ["after_run:1", "after_run:2"], "{ev:?}");
    // Several hooks on one stage run in definition order; before precedes after.
    assert!(position(&ev, "before:work:1") < position(&ev, "before:work:2"));
    assert!(position(&ev, "after:work:1") < position(&ev, "after:work:2"));
    assert!(position(&ev, "before:work:2") < position(&ev, "after:work:1"));
    assert!(position(&ev, "before:src") < position(&ev, "after:src"));
    // The consumer's hooks bracket every item it handled.
    let items: Vec<usize> = (0..ev.len()).filter(|&i| ev[i].starts_with("item:sink:")).collect();
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(|&i| i > position(&ev, "before:sink")), "{ev:?}");
    assert!(items.iter().all(|&i| i < position(&ev, "after:sink")), "{ev:?}");
});

#[test]
fn after_run_runs_once_when_the_run_aborts() {
    let log = Log::default();
    let p = Pipeline::new("abort-hooks");
    p.before_run(log.hook("before_run"));
    p.after_run(log.hook("after_run"));
    p.producer("src", numbers(100));
    p.map("boom", |x: u64| {
        if x == 3 {
            return Err("boom".into());
        }
        Ok(x)
    })
    .on_error(OnError::fail_fast())
    .after(log.hook("after:boom"));
    p.consumer("sink", |_: u64| Ok(()));
    match p.run() {
        Err(RunError::Aborted { cause, .. }) => assert_eq!(cause.stage, "boom"),
        other => panic!("expected an abort, got {other:?}"),
    }
    let ev = log.events();
    assert_eq!(ev.first().map(String::as_str), Some("before_run"), "{ev:?}");
    assert_eq!(ev.last().map(String::as_str), Some("after_run"), "{ev:?}");
    position(&ev, "after_run");
    position(&ev, "after:boom");
}

#[test]
fn failing_before_run_runs_nothing() {
    let started = Arc::new(AtomicBool::new(false));
    let s = started.clone();
    let log = Log::default();
    let p = Pipeline::new("before-run-fails");
    p.before_run(|| Err("no config".into()));
    p.before_run(log.hook("second before_run"));
    p.producer("src", move |out| {
        s.store(true, Ordering::SeqCst);
        out.emit(1u64)?;
        Ok(())
    });
    p.consumer("sink", |_: u64| Ok(()));
    match p.run() {
        Err(RunError::BeforeRun(msg)) => assert!(msg.contains("no config"), "{msg}"),
        other => panic!("expected BeforeRun, got {other:?}"),
    }
    assert!(
        !started.load(Ordering::SeqCst),
        "a stage ran after before_run failed"
    );
    assert!(
        log.events().is_empty(),
        "later before_run hooks ran: {:?}",
        log.events()
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency and backpressure

/// Counts items in flight and holds each one until `target` are in flight at once (or 10 s
/// passed, a safety net), so the maximum shows the real concurrency.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    in_flight: usize,
    max: usize,
    reached: bool,
}

impl Gate {
    fn pass(&self, target: usize) {
        let mut g = self.state.lock().unwrap();
        g.in_flight += 1;
        g.max = g.max.max(g.in_flight);
        if g.in_flight >= target {
            g.reached = true;
            self.cv.notify_all();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !g.reached {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
        g.in_flight -= 1;
    }
}

#[test]
fn threads_4_runs_4_items_at_once() {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let p = Pipeline::new("concurrency");
    p.producer("src", numbers(16));
    p.map("wide", move |x: u64| {
        g.pass(4);
        Ok(x)
    })
    .executor(Exec::threads(4));
    let got = Sink::default();
    let s = got.clone();
    p.consumer("sink", move |x: u64| {
        s.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    let st = gate.state.lock().unwrap();
    assert!(st.reached, "never had 4 items in flight (max {})", st.max);
    assert_eq!(st.max, 4);
    assert_eq!(got.sorted(), (0..16).collect::<Vec<u64>>());
    assert_eq!(report.stage("wide").unwrap().executor, "threads(4)");
}

#[test]
fn bounded_queue_applies_backpressure() {
    const CAP: usize = 10;
    let sent = Arc::new(AtomicU64::new(0));
    let sent_p = sent.clone();
    let sent_c = sent.clone();
    let timed_out = Arc::new(AtomicBool::new(false));
    let t = timed_out.clone();
    let p = Pipeline::new("backpressure");
    p.producer("src", move |out| {
        for i in 0..1000u64 {
            out.emit(i)?;
            sent_p.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    p.consumer("slow", move |x: u64| {
        if x == 0 {
            // Hold the first item until the producer has filled the queue behind it (item 0 out,
            // CAP items queued); with a working bound it then blocks on the next emit.
            let deadline = Instant::now() + Duration::from_secs(10);
            while sent_c.load(Ordering::SeqCst) < CAP as u64 + 1 {
                if Instant::now() > deadline {
                    t.store(true, Ordering::SeqCst);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })
    .capacity(Capacity::Bounded(CAP));
    let report = p.run().unwrap();
    assert!(
        !timed_out.load(Ordering::SeqCst),
        "the producer never filled the queue"
    );
    let st = report.stage("slow").unwrap();
    assert_eq!(st.items_in, 1000);
    assert_eq!(st.queue_capacity, Some(CAP));
    assert!(st.queue_high_water <= CAP, "{st:?}");
    assert!(st.queue_high_water >= 1, "{st:?}");
    // The producer was held while the consumer sat on item 0 with a full queue behind it.
    assert_eq!(st.queue_high_water, CAP, "{st:?}");
}

#[test]
fn default_capacity_applies_to_every_stage() {
    let p = Pipeline::new("default-capacity");
    p.default_capacity(Capacity::Bounded(7));
    p.producer("src", numbers(50));
    p.map("work", |x: u64| Ok(x));
    p.consumer("sink", |_: u64| Ok(()))
        .capacity(Capacity::Unbounded);
    let report = p.run().unwrap();
    assert_eq!(report.stage("src").unwrap().queue_capacity, None);
    assert_eq!(report.stage("work").unwrap().queue_capacity, Some(7));
    assert!(report.stage("work").unwrap().queue_high_water <= 7);
    assert_eq!(report.stage("sink").unwrap().queue_capacity, None);
    assert_eq!(report.consumed, 50);
}

// ---------------------------------------------------------------------------------------------
// Background runs

matrix!(fn spawn_then_stop_accounts_for_every_item(ex) {
    let gave_up = Arc::new(AtomicBool::new(false));
    let g = gave_up.clone();
    let consumed = Arc::new(AtomicU64::new(0));
    let c = consumed.clone();
    let p = Pipeline::new("background");
    p.producer("src", move |out| {
        let t0 = Instant::now();
        let mut i = 0u64;
        loop {
            if t0.elapsed() > Duration::from_secs(20) {
                g.store(true, Ordering::SeqCst);
                return Ok(());
            }
            out.emit(i)?;
            i += 1;
        }
    });
    let w = p.map("work", |x: u64| Ok(x));
    ex.apply(&w);
    p.consumer("sink", move |_: u64| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let handle = p.spawn().unwrap();
    common::wait_until("items to flow", Duration::from_secs(15), || consumed.load(Ordering::SeqCst) >= 20);
    assert!(!handle.is_finished(), "an endless run ended on its own");
    handle.stop();
    let report = handle.wait().unwrap();
    assert!(!gave_up.load(Ordering::SeqCst), "stop() did not stop the producer");
    assert!(report.stopped);
    assert!(report.produced >= 20);
    assert_eq!(report.produced, report.consumed, "{report}");
    assert_eq!(consumed.load(Ordering::SeqCst), report.consumed);
    for s in &report.stages {
        assert_eq!((s.failed, s.cancelled), (0, 0), "{}", s.name);
    }
    assert_eq!(report.failures_total, 0);
});

#[test]
fn spawn_runs_to_completion_without_stop() {
    let p = Pipeline::new("background-finite");
    p.producer("src", numbers(100));
    p.map("work", |x: u64| Ok(x * 2)).executor(Exec::threads(2));
    p.consumer("sink", |_: u64| Ok(()));
    let report = p.spawn().unwrap().wait().unwrap();
    assert!(!report.stopped);
    assert_eq!(report.consumed, 100);
}

// ---------------------------------------------------------------------------------------------
// The report

fn small_report() -> minigun::RunReport {
    let p = Pipeline::new("report-test");
    p.producer("numbers", numbers(10));
    p.map("squarer", |x: u64| {
        if x == 4 {
            return Err("four is not allowed".into());
        }
        Ok(x * x)
    })
    .executor(Exec::threads(2));
    p.consumer("collector", |_: u64| Ok(()));
    p.run().unwrap()
}

#[test]
fn report_display_names_the_stages() {
    let report = small_report();
    let text = report.to_string();
    for name in [
        "report-test",
        "numbers",
        "squarer",
        "collector",
        "threads(2)",
    ] {
        assert!(text.contains(name), "{name:?} missing from:\n{text}");
    }
    assert!(
        text.contains("four is not allowed"),
        "failure missing from:\n{text}"
    );
}

#[test]
fn report_serialises_to_json() {
    let report = small_report();
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["pipeline"], "report-test");
    assert_eq!(v["produced"], 10);
    assert_eq!(v["consumed"], 9);
    assert_eq!(v["stopped"], false);
    assert_eq!(v["failures_total"], 1);
    assert!(v["runtime_secs"].is_number());
    assert!(v["throughput"].is_number());
    let f = &v["failures"][0];
    assert_eq!(f["stage"], "squarer");
    assert_eq!(f["item"], 4);
    assert_eq!(f["attempt"], 1);
    assert!(f["message"]
        .as_str()
        .unwrap()
        .contains("four is not allowed"));
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["numbers", "squarer", "collector"]);
    let sq = &stages[1];
    assert_eq!(sq["executor"], "threads(2)");
    assert_eq!(sq["items_in"], 10);
    assert_eq!(sq["items_out"], 9);
    assert_eq!(sq["failed"], 1);
    for field in [
        "kind",
        "retried",
        "dead_lettered",
        "cancelled",
        "runtime_secs",
        "throughput",
        "utilisation",
        "queue_capacity",
        "queue_high_water",
    ] {
        assert!(sq.get(field).is_some(), "stage field {field} missing: {sq}");
    }
    assert_eq!(sq["queue_capacity"], 1000);
    let lat = &sq["latency"];
    assert_eq!(lat["count"], 10);
    for field in ["mean_us", "p50_us", "p90_us", "p95_us", "p99_us", "max_us"] {
        assert!(
            lat[field].is_number(),
            "latency field {field} missing: {lat}"
        );
    }
    // The JSON agrees with the struct.
    assert_eq!(v["stages"].as_array().unwrap().len(), report.stages.len());
}

// ---------------------------------------------------------------------------------------------
// Executor selection

#[test]
fn execution_blocks_and_contexts_choose_the_executor() {
    let p = Pipeline::new("executors");
    p.default_executor(Exec::threads(2));
    p.context("io", Exec::threads(8));
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(20));
    p.map("plain", |x: u64| Ok(x));
    p.with_executor(Exec::threads(3), |p| {
        p.map("outer", |x: u64| Ok(x));
        p.with_executor(Exec::threads(5), |p| {
            p.map("inner", |x: u64| Ok(x));
            p.map("own", |x: u64| Ok(x)).executor(Exec::inline());
            p.map("ctx", |x: u64| Ok(x)).context("io");
        });
        p.map("outer_again", |x: u64| Ok(x));
    });
    p.map("late_ctx", |x: u64| Ok(x)).context("late");
    p.context("late", Exec::threads(6));
    p.batch::<u64>("batch", 4);
    p.consumer("sink", move |b: Vec<u64>| {
        for x in b {
            g.push(x);
        }
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), (0..20).collect::<Vec<u64>>());
    let expected = [
        ("src", "inline"), // producers run on their driver thread
        ("plain", "threads(2)"),
        ("outer", "threads(3)"),
        ("inner", "threads(5)"),
        ("own", "inline"),
        ("ctx", "threads(8)"),
        ("outer_again", "threads(3)"),
        ("late_ctx", "threads(6)"),
        ("batch", "inline"), // accumulators too
        ("sink", "threads(2)"),
    ];
    for (name, exec) in expected {
        assert_eq!(report.stage(name).unwrap().executor, exec, "stage {name}");
    }
}

#[test]
fn fork_blocks_apply_to_wired_stages_only() {
    let p = Pipeline::new("fork-blocks");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(10));
    p.with_executor(Exec::ipc_fork(2), |p| {
        p.map("wired", |x: u64| Ok(x + 1)).wire();
        p.map("unwired", |x: u64| Ok(x * 2));
    });
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), (1..11).map(|x| x * 2).collect::<Vec<u64>>());
    assert_eq!(report.stage("wired").unwrap().executor, "ipc_fork(2)");
    assert_eq!(report.stage("unwired").unwrap().executor, "inline");
    assert_eq!(report.stage("sink").unwrap().executor, "inline");
}

/// A producer "src" of `0..n`; the flag it returns is set once all are emitted (queued).
fn producer_then_flag(p: &Pipeline, n: u64) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let done = flag.clone();
    p.producer("src", move |out| {
        numbers(n)(out)?;
        done.store(true, Ordering::SeqCst);
        Ok(())
    });
    flag
}

/// A consumer "sink" that keeps its items and announces each on `seen`.
fn announcing_sink(p: &Pipeline, seen: crossbeam_channel::Sender<u64>) -> Sink<u64> {
    let sink = Sink::default();
    let s = sink.clone();
    p.consumer("sink", move |x: u64| {
        s.push(x);
        let _ = seen.send(x);
        Ok(())
    });
    sink
}

// In-process workers take every ready item from their queue at once and send what they emit
// in batches. A batch must never hold an output back while its stage works on later items of
// the same batch: here the stage's workers start once all 20 items are queued (so an inline
// worker takes them in one batch), and the stage cannot get past item 5 until the consumer
// has seen item 1. Were item 1's output held until the end of its batch, the wait would fail.
struct Slow {
    seen: Arc<Mutex<crossbeam_channel::Receiver<u64>>>,
}

impl minigun::Stage<u64, u64> for Slow {
    fn process(&mut self, x: u64, out: &mut Output<'_, u64>) -> minigun::StageResult {
        if x == 5 {
            let t0 = Instant::now();
            let rx = self.seen.lock().unwrap();
            let seen_one = loop {
                match rx.recv_timeout(Duration::from_secs(20).saturating_sub(t0.elapsed())) {
                    Ok(1) => break true,
                    Ok(_) => continue,
                    Err(_) => break false,
                }
            };
            assert!(seen_one, "item 1 not delivered while its stage was busy");
        }
        std::thread::sleep(Duration::from_millis(2));
        out.emit(x)?;
        Ok(())
    }
}

matrix_local!(fn an_output_is_delivered_while_its_stage_is_still_busy(ex) {
    let (seen_tx, seen_rx) = crossbeam_channel::unbounded::<u64>();
    let seen = Arc::new(Mutex::new(seen_rx));
    let p = Pipeline::new("no-holding");
    let emitted = producer_then_flag(&p, 20);
    ex.apply_local(&p.stage("slow", move || {
        let t0 = Instant::now();
        while !emitted.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Slow { seen: seen.clone() }
    }));
    let sink = announcing_sink(&p, seen_tx);
    let report = p.run().unwrap();
    assert_eq!(report.stage("slow").unwrap().failed, 0, "{report}");
    assert_eq!(sink.sorted(), (0..20).collect::<Vec<_>>());
});

// An output emitted in the middle of a long call counts only once the call succeeds: it
// reaches the idle downstream after the call returns, never during it.
matrix_local!(fn an_output_reaches_an_idle_downstream_when_a_long_call_ends(ex) {
    let (seen_tx, seen_rx) = crossbeam_channel::unbounded::<u64>();
    let seen_rx = Arc::new(Mutex::new(seen_rx));
    let p = Pipeline::new("long-call");
    p.producer("src", numbers(1));
    let rx = seen_rx.clone();
    ex.apply_local(&p.processor("long", move |x: u64, out: &mut Output<'_, u64>| {
        // Let the consumer go idle (asleep on its empty queue: generous, for loaded
        // machines), then emit and wait for the item to arrive downstream.
        std::thread::sleep(Duration::from_millis(300));
        out.emit(x + 100)?;
        let got = rx.lock().unwrap().recv_timeout(Duration::from_millis(300));
        assert!(got.is_err(), "the output left before its call succeeded: {got:?}");
        out.emit(x + 200)?;
        Ok(())
    }));
    let sink = announcing_sink(&p, seen_tx);
    let report = p.run().unwrap();
    assert_eq!(report.stage("long").unwrap().failed, 0, "{report}");
    assert_eq!(sink.sorted(), vec![100, 200]);
});

/// A meeting point for `n` threads that gives up after a while (`false`): a plain barrier
/// would hang a test whose workers cannot all arrive.
struct Rendezvous {
    n: usize,
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Rendezvous {
    fn new(n: usize) -> Self {
        Rendezvous {
            n,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }
    fn meet(&self, patience: Duration) -> bool {
        let mut s = self.state.lock().unwrap();
        let generation = s.1;
        s.0 += 1;
        if s.0 == self.n {
            *s = (0, generation + 1);
            self.cv.notify_all();
            return true;
        }
        let (s, _) = self
            .cv
            .wait_timeout_while(s, patience, |s| s.1 == generation)
            .unwrap();
        s.1 != generation
    }
}

// threads(4) on a backlog of slow items: every item waits until four are in progress at once.
// That holds to the last item only if no worker sits on a private pile of items while others
// have none: a worker takes its share of what is ready (a fraction that shrinks with the
// backlog), never all of it.
struct Meeting {
    meet: Arc<Rendezvous>,
}

impl minigun::Stage<u64, u64> for Meeting {
    fn process(&mut self, x: u64, out: &mut Output<'_, u64>) -> minigun::StageResult {
        if !self.meet.meet(Duration::from_secs(5)) {
            return Err(format!("item {x}: fewer than four items in progress").into());
        }
        out.emit(x)?;
        Ok(())
    }
}

#[test]
fn a_backlog_of_slow_items_stays_shared_among_threads() {
    let meet = Arc::new(Rendezvous::new(4));
    let p = Pipeline::new("shared-backlog");
    let queued = producer_then_flag(&p, 40);
    // The workers start once the whole backlog is queued.
    p.stage("slow", move || {
        let t0 = Instant::now();
        while !queued.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Meeting { meet: meet.clone() }
    })
    .executor(Exec::threads(4));
    p.consumer("sink", |_: u64| Ok(()));
    let report = p.run().unwrap();
    let slow = report.stage("slow").unwrap();
    assert_eq!((slow.items_out, slow.failed), (40, 0), "{report}");
}
