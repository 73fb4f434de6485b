//! Remote stages over the in-memory broker: parent and workers in this process (workers on
//! threads), so the executor's own logic is tested without a server.

mod common;
use minigun::remote::broker::{Delivery, StageRun};
use minigun::remote::{Broker, MemoryBroker, Remote, ServeOptions, ServeReport, Session};
use minigun::{Exec, Failed, FailureKind, OnError, Pipeline, StageResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

type Seen = Arc<Mutex<Vec<u64>>>;

fn define(
    broker: &MemoryBroker,
    remote: impl Fn(Remote) -> Remote,
    n: u64,
    seen: &Seen,
) -> Pipeline {
    define_with(broker, remote, n, seen, double)
}

fn double(x: u64) -> StageResult<u64> {
    Ok(x * 2)
}

/// `count` workers on threads, each serving what [`define_with`] builds with `cfg` and `f`.
fn workers_serving(
    count: usize,
    broker: &MemoryBroker,
    cfg: fn(Remote) -> Remote,
    n: u64,
    seen: &Seen,
    f: fn(u64) -> StageResult<u64>,
) -> Vec<Worker> {
    (0..count)
        .map(|_| {
            let (b, s) = (broker.clone(), seen.clone());
            worker(move || define_with(&b, cfg, n, &s, f))
        })
        .collect()
}

/// `seen` got each of the items `0..n` doubled, exactly once (in any order).
fn assert_doubled_once(seen: &Seen, n: u64) {
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    let want: Vec<u64> = (0..n).map(|x| x * 2).collect();
    assert_eq!(got, want, "every item exactly once");
}

/// [`define`] with `double` doing `f` (which must double its item).
fn define_with(
    broker: &MemoryBroker,
    remote: impl Fn(Remote) -> Remote,
    n: u64,
    seen: &Seen,
    f: fn(u64) -> StageResult<u64>,
) -> Pipeline {
    let p = Pipeline::new("remote-memory");
    p.handle_signals(false);
    p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
    let r = remote(Remote::new(broker.clone()).claim_idle(Duration::from_millis(300)));
    p.map("double", f).remote(r);
    collect_into(&p, seen);
    p
}

/// A consumer "collect" that records each item in `seen`.
fn collect_into(p: &Pipeline, seen: &Seen) {
    let seen = seen.clone();
    p.consumer("collect", move |x: u64| {
        seen.lock().unwrap().push(x);
        Ok(())
    });
}

struct Worker {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<ServeReport>,
}

/// A worker on a thread, serving the definition `define` builds there.
fn worker(define: impl FnOnce() -> Pipeline + Send + 'static) -> Worker {
    let opts = ServeOptions::new().handle_signals(false);
    let stop = opts.stop_flag();
    let handle = std::thread::spawn(move || define().serve(opts).expect("serve"));
    Worker { stop, handle }
}

impl Worker {
    fn stop(self) -> ServeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("worker thread")
    }
}

#[test]
fn every_item_arrives_once_through_two_workers() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::threads(2)).batch(16);
    let workers = workers_serving(2, &broker, cfg, 1000, &seen, double);
    let report = define(&broker, cfg, 1000, &seen).run().expect("run");
    let reports: Vec<ServeReport> = workers.into_iter().map(Worker::stop).collect();
    assert_doubled_once(&seen, 1000);
    let st = report.stage("double").unwrap();
    assert_eq!((st.items_in, st.items_out, st.failed), (1000, 1000, 0));
    assert_eq!(st.executor, "remote(memory)");
    let committed: u64 = reports.iter().map(|r| r.items).sum();
    assert_eq!(
        committed, 1000,
        "the workers committed every item: {reports:?}"
    );
    assert!(reports.iter().all(|r| r.runs == 1), "{reports:?}");
}

/// Runs the parent of the definition `define` builds, on a thread.
fn parent(
    define: impl FnOnce() -> Pipeline + Send + 'static,
) -> JoinHandle<Result<minigun::RunReport, minigun::RunError>> {
    std::thread::spawn(move || define().run())
}

/// Waits for the run of `pipeline` to be announced; returns its stage run.
fn announced(broker: &MemoryBroker, pipeline: &str) -> StageRun {
    let mut s = broker.session().unwrap();
    for _ in 0..100 {
        let got = s
            .announcements(pipeline, None, Duration::from_millis(100))
            .unwrap();
        if let Some((_, a)) = got.into_iter().next() {
            return a.stage_run;
        }
    }
    panic!("the run of {pipeline} was never announced");
}

/// Waits until `done` holds, failing the test with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The number of items collected so far.
fn collected(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

/// A consumer "ghost" takes one entry and is never heard of again.
fn hold_one(broker: &MemoryBroker, run: &StageRun) -> (Box<dyn Session>, Delivery) {
    let mut ghost = broker.session().unwrap();
    let mut held = None;
    wait_until("an entry for the ghost", Duration::from_secs(30), || {
        let got = ghost
            .fetch(run, "ghost", 1, Duration::from_millis(100), false)
            .unwrap();
        held = got.into_iter().next();
        held.is_some()
    });
    (ghost, held.expect("fetched"))
}

#[test]
fn an_entry_held_by_a_lost_consumer_is_reclaimed_and_its_items_arrive_once() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::inline()).batch(10);
    let (b, s) = (broker.clone(), seen.clone());
    let run = parent(move || define(&b, cfg, 100, &s));
    let stage_run = announced(&broker, "remote-memory");
    // A consumer that takes an entry and is never heard of again.
    let (mut ghost, held) = hold_one(&broker, &stage_run);
    let (b, s) = (broker.clone(), seen.clone());
    let w = worker(move || define(&b, cfg, 100, &s));
    let report = run.join().unwrap().expect("run");
    let served = w.stop();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (0..100).map(|x| x * 2).collect::<Vec<_>>());
    assert_eq!(report.stage("double").unwrap().failed, 0);
    assert_eq!(served.reclaimed, 1, "{served:?}");
    assert_eq!(
        ghost.commit(&stage_run, "ghost", &held.id, b"late").ok(),
        None,
        "the run's keys are gone after the run"
    );
}

/// A definition whose remote stage may fail: items in `crash` abort the process running
/// them, items in `fail` return an error; failures go to a dead-letter stage.
fn define_failing(
    broker: &MemoryBroker,
    remote: impl Fn(Remote) -> Remote,
    n: u64,
    crash: &'static [u64],
    fail: &'static [u64],
    seen: &Seen,
    dead: &Arc<Mutex<Vec<(u64, FailureKind)>>>,
) -> Pipeline {
    let p = Pipeline::new("remote-failing");
    p.handle_signals(false);
    p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
    let r = remote(Remote::new(broker.clone()).claim_idle(Duration::from_millis(300)));
    let stage = p
        .map("work", move |x: u64| {
            if crash.contains(&x) {
                std::process::abort();
            }
            if fail.contains(&x) {
                return Err(format!("item {x} is bad").into());
            }
            Ok(x * 2)
        })
        .remote(r);
    let seen = seen.clone();
    p.consumer("collect", move |x: u64| {
        seen.lock().unwrap().push(x);
        Ok(())
    });
    let dead = dead.clone();
    let dl = p.consumer("dead", move |f: Failed<u64>| {
        dead.lock().unwrap().push((f.item, f.failure.kind));
        Ok(())
    });
    stage.dead_letter(&dl);
    p
}

#[test]
fn a_crashing_item_under_a_forked_worker_executor_fails_once_and_the_rest_complete() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let dead = Arc::new(Mutex::new(Vec::new()));
    let cfg = |r: Remote| r.worker_exec(Exec::ipc_fork(2)).batch(8);
    let (b, s, d) = (broker.clone(), seen.clone(), dead.clone());
    let w = worker(move || define_failing(&b, cfg, 50, &[7], &[20], &s, &d));
    let report = define_failing(&broker, cfg, 50, &[7], &[20], &seen, &dead)
        .run()
        .expect("run");
    let served = w.stop();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    let want: Vec<u64> = (0..50)
        .filter(|x| *x != 7 && *x != 20)
        .map(|x| x * 2)
        .collect();
    assert_eq!(got, want);
    let mut dead = dead.lock().unwrap().clone();
    dead.sort_by_key(|d| d.0);
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, 7);
    assert!(
        matches!(dead[0].1, FailureKind::Signal(6)),
        "the aborting item failed with its signal: {:?}",
        dead[0].1
    );
    assert_eq!(dead[1], (20, FailureKind::Error));
    let st = report.stage("work").unwrap();
    assert_eq!((st.items_in, st.failed), (50, 2));
    assert_eq!(served.reclaimed, 0, "no entry was redelivered: {served:?}");
    let f = report
        .failures
        .iter()
        .find(|f| f.item == Some(20))
        .expect("item 20's failure");
    assert!(
        f.message.contains("item 20 is bad"),
        "the user's words are kept: {}",
        f.message
    );
}

#[test]
fn an_entry_past_max_deliveries_is_dead_lettered_as_worker_lost() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let dead = Arc::new(Mutex::new(Vec::new()));
    let cfg = |r: Remote| {
        r.worker_exec(Exec::inline())
            .batch(5)
            .max_deliveries(1)
            .keep_keys(Duration::from_secs(60))
    };
    let (b, s, d) = (broker.clone(), seen.clone(), dead.clone());
    let run = parent(move || define_failing(&b, cfg, 20, &[], &[], &s, &d));
    let stage_run = announced(&broker, "remote-failing");
    let (_ghost, held) = hold_one(&broker, &stage_run);
    let lost: Vec<u64> = (held.entry.first..held.entry.first + 5).collect();
    let (b, s, d) = (broker.clone(), seen.clone(), dead.clone());
    let w = worker(move || define_failing(&b, cfg, 20, &[], &[], &s, &d));
    let report = run.join().unwrap().expect("run");
    let served = w.stop();
    let mut dead = dead.lock().unwrap().clone();
    dead.sort_by_key(|d| d.0);
    let want: Vec<(u64, FailureKind)> = lost
        .iter()
        .map(|&i| (i, FailureKind::WorkerLost { deliveries: 1 }))
        .collect();
    assert_eq!(
        dead, want,
        "the ghost's entry went to the dead-letter stage"
    );
    assert_eq!(seen.lock().unwrap().len(), 15, "everything else completed");
    assert_eq!(report.stage("work").unwrap().failed, 5);
    assert_eq!(served.dead_lettered, 1, "{served:?}");
    let dlq = broker.dead_letters(&stage_run);
    assert_eq!(dlq.len(), 1, "the entry is in the dead-letter stream");
    assert_eq!((dlq[0].1, dlq[0].2.as_str()), (1, "ghost"));
}

#[test]
fn a_broker_that_loses_everything_mid_run_is_reconciled_and_every_item_arrives_once() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let slow = |r: Remote| r.worker_exec(Exec::threads(2)).batch(4).max_in_flight(40);
    let n = 400;
    let (b, s) = (broker.clone(), seen.clone());
    let def = move || {
        let p = Pipeline::new("remote-restart");
        p.handle_signals(false);
        p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
        let r = slow(Remote::new(b.clone()).claim_idle(Duration::from_millis(300)));
        p.map("slow", |x: u64| {
            std::thread::sleep(Duration::from_millis(2));
            Ok(x)
        })
        .remote(r);
        collect_into(&p, &s);
        p
    };
    let w = worker(def.clone());
    let run = parent(def);
    // Lose everything once items are flowing.
    wait_until("50 items", Duration::from_secs(30), || {
        collected(&seen) >= 50
    });
    broker.restart();
    let report = run.join().unwrap().expect("run");
    w.stop();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (0..n).collect::<Vec<_>>(), "every item exactly once");
    assert_eq!(report.stage("slow").unwrap().failed, 0);
}

#[test]
fn a_worker_with_another_definition_refuses_the_run() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| {
        r.worker_exec(Exec::inline())
            .wait_for_workers(Duration::from_millis(800))
    };
    let b = broker.clone();
    // Same names, other output type: the fingerprint differs.
    let w = worker(move || {
        let p = Pipeline::new("remote-memory");
        p.producer("numbers", |out| out.emit_all(0..10u64).map_err(Into::into));
        p.map("double", |x: u64| Ok(format!("{x}")))
            .remote(cfg(Remote::new(b.clone())));
        p.consumer("collect", |_: String| Ok(()));
        p
    });
    let err = define(&broker, cfg, 10, &seen).run().unwrap_err();
    let served = w.stop();
    assert!(served.refused >= 1, "{served:?}");
    assert_eq!(served.items, 0);
    let text = err.to_string();
    assert!(text.contains("no worker served"), "{text}");
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn fail_fast_on_a_remote_stage_aborts_the_run_and_the_workers_stop_serving_it() {
    let broker = MemoryBroker::new();
    let b = broker.clone();
    let def = move || {
        let p = Pipeline::new("remote-fail-fast");
        p.handle_signals(false);
        p.producer("numbers", |out| {
            out.emit_all(0..100_000u64).map_err(Into::into)
        });
        p.map("work", |x: u64| {
            if x == 30 {
                return Err("item 30 is fatal".into());
            }
            Ok(x)
        })
        .remote(Remote::new(b.clone()).worker_exec(Exec::inline()).batch(4))
        .on_error(OnError::fail_fast());
        p.consumer("sink", |_: u64| Ok(()));
        p
    };
    let w = worker(def.clone());
    let t0 = std::time::Instant::now();
    let err = def().run().unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    match err {
        minigun::RunError::Aborted { cause, report } => {
            assert_eq!(cause.item, Some(30));
            assert!(
                cause.message.contains("item 30 is fatal"),
                "{}",
                cause.message
            );
            assert!(report.stage("work").unwrap().items_in < 100_000);
        }
        other => panic!("expected an abort, got {other}"),
    }
    let served = w.stop();
    assert_eq!(served.runs, 1, "{served:?}");
}

#[test]
fn the_report_has_a_row_per_worker_and_the_broker_counters() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::inline()).batch(10);
    let workers = workers_serving(2, &broker, cfg, 500, &seen, double);
    let report = define(&broker, cfg, 500, &seen).run().expect("run");
    for w in workers {
        w.stop();
    }
    let r = report
        .stage("double")
        .unwrap()
        .remote
        .clone()
        .expect("a remote part");
    assert_eq!(r.broker, "memory");
    assert_eq!(r.entries_sent, 50, "500 items in entries of 10");
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.round_trip.count, 50, "one round trip per entry");
    let items: u64 = r.workers.iter().map(|w| w.items).sum();
    assert_eq!(items, 500, "the worker rows add up: {:?}", r.workers);
    assert!(r.workers.iter().all(|w| w.pid == std::process::id()));
    let measured: u64 = r.workers.iter().map(|w| w.latency.count).sum();
    assert_eq!(measured, 500, "every item's latency reached the report");
    let text = report.to_string();
    assert!(text.contains("double on memory: 50 entries sent"), "{text}");
    assert!(text.contains("worker "), "{text}");
}

#[test]
fn entries_added_twice_by_a_send_whose_reply_was_lost_deliver_each_result_once() {
    let broker = MemoryBroker::new();
    // The first three sends add their entries and then fail as a lost connection does: the
    // parent sends the same entries again, so they are in the work stream twice.
    broker.fail_after_next("send", 3);
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::inline()).batch(10);
    let workers = workers_serving(2, &broker, cfg, 500, &seen, double);
    let report = define(&broker, cfg, 500, &seen).run().expect("run");
    let served: u64 = workers.into_iter().map(|w| w.stop().items).sum();
    assert_doubled_once(&seen, 500);
    let st = report.stage("double").unwrap();
    assert_eq!((st.items_in, st.items_out, st.failed), (500, 500, 0));
    let r = st.remote.clone().expect("a remote part");
    assert!(
        served > 500 && r.duplicates > 0,
        "some entries ran twice (served {served}) and their second results were dropped: {r:?}"
    );
    // A copy committed after the parent had every result is not read, so not counted.
    assert!(
        r.duplicates <= served - 500,
        "each dropped result was a second execution: {r:?}"
    );
}

#[test]
fn a_worker_gives_back_a_copy_of_items_it_runs_and_every_item_arrives_once() {
    let events = common::capture_events(tracing::Level::DEBUG);
    let broker = MemoryBroker::new();
    // The first send's entries are in the work stream three times, one copy after another.
    broker.fail_after_next("send", 2);
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::threads(4)).batch(10);
    // Item 0 holds its entry long enough for the worker to fetch that entry's copies while
    // it runs; the others end out of order.
    let slow = |x: u64| {
        let ms = if x == 0 { 150 } else { x % 3 };
        std::thread::sleep(Duration::from_millis(ms));
        Ok(x * 2)
    };
    let workers = workers_serving(1, &broker, cfg, 200, &seen, slow);
    let report = define_with(&broker, cfg, 200, &seen, slow)
        .run()
        .expect("run");
    for w in workers {
        w.stop();
    }
    assert_doubled_once(&seen, 200);
    let st = report.stage("double").unwrap();
    assert_eq!((st.items_out, st.failed), (200, 0), "{:?}", report.failures);
    assert!(
        events.count("gave back a copy of items this worker runs") > 0,
        "the worker fetched a copy of an entry it was running and gave it back"
    );
}

/// A stage with state: it counts its items and emits the count at `finish`.
struct Counter(u64);

impl minigun::Stage<u64, u64> for Counter {
    fn process(&mut self, x: u64, out: &mut minigun::Output<'_, u64>) -> minigun::StageResult {
        self.0 += 1;
        out.emit(x)?;
        Ok(())
    }
    fn finish(&mut self, out: &mut minigun::Output<'_, u64>) -> minigun::StageResult {
        out.emit(1_000_000 + self.0)?;
        Ok(())
    }
}

#[test]
fn each_workers_finish_outputs_arrive_once() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let (b, s) = (broker.clone(), seen.clone());
    let def = move || {
        let p = Pipeline::new("remote-finish");
        p.handle_signals(false);
        p.producer("numbers", |out| out.emit_all(0..300u64).map_err(Into::into));
        p.stage("count", || Counter(0)).remote(
            Remote::new(b.clone())
                .worker_exec(Exec::threads(2))
                .batch(8),
        );
        collect_into(&p, &s);
        p
    };
    let workers: Vec<Worker> = (0..3).map(|_| worker(def.clone())).collect();
    let report = def().run().expect("run");
    for w in workers {
        w.stop();
    }
    let got = seen.lock().unwrap().clone();
    let (counts, items): (Vec<u64>, Vec<u64>) = got.iter().partition(|&&x| x >= 1_000_000);
    assert_eq!(items.len(), 300, "every item once");
    // Three workers with two stage instances each: six flushes, counting 300 items.
    assert_eq!(
        counts.len(),
        6,
        "each instance's flush arrived once: {counts:?}"
    );
    let total: u64 = counts.iter().map(|c| c - 1_000_000).sum();
    assert_eq!(total, 300);
    assert_eq!(report.stage("count").unwrap().errors, 0);
}

#[test]
fn a_stopped_worker_releases_its_entries_and_another_finishes_them_without_a_delivery_counted() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let (b, s) = (broker.clone(), seen.clone());
    // Slow items and a short grace: the first worker is stopped with entries in hand. With
    // max_deliveries(1), a release that counted a delivery would dead-letter them.
    let def = move |item_time: Duration| {
        let p = Pipeline::new("remote-release");
        p.handle_signals(false);
        p.producer("numbers", |out| out.emit_all(0..60u64).map_err(Into::into));
        let r = Remote::new(b.clone())
            .worker_exec(Exec::threads(2))
            .batch(3)
            .max_deliveries(1)
            .grace(Duration::from_millis(10))
            .claim_idle(Duration::from_millis(400));
        p.map("slow", move |x: u64| {
            std::thread::sleep(item_time);
            Ok(x)
        })
        .remote(r);
        collect_into(&p, &s);
        p
    };
    let slow = Duration::from_millis(30);
    let (d1, d2) = (def.clone(), def.clone());
    let first = worker(move || d1(slow));
    let run = parent(move || def(slow));
    wait_until("5 items", Duration::from_secs(30), || collected(&seen) >= 5);
    first.stop();
    let second = worker(move || d2(Duration::ZERO));
    let report = run.join().unwrap().expect("run");
    let served = second.stop();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (0..60).collect::<Vec<_>>(), "every item exactly once");
    let st = report.stage("slow").unwrap();
    assert_eq!(st.failed, 0, "no release counted as a delivery");
    let r = st.remote.clone().unwrap();
    assert!(
        r.releases >= 1,
        "the stopped worker released entries: {r:?}"
    );
    assert!(
        served.reclaimed >= 1,
        "the second worker took them over: {served:?}"
    );
}

#[test]
fn items_in_flight_never_exceed_max_in_flight() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let (b, s) = (broker.clone(), seen.clone());
    let def = move || {
        let p = Pipeline::new("remote-backpressure");
        p.handle_signals(false);
        p.producer("numbers", |out| out.emit_all(0..400u64).map_err(Into::into));
        let r = Remote::new(b.clone())
            .worker_exec(Exec::inline())
            .batch(5)
            .max_in_flight(20);
        p.map("slow", |x: u64| {
            std::thread::sleep(Duration::from_millis(1));
            Ok(x)
        })
        .remote(r);
        collect_into(&p, &s);
        p
    };
    let w = worker(def.clone());
    let run = parent(def);
    let stage_run = announced(&broker, "remote-backpressure");
    let mut probe = broker.session().unwrap();
    let mut most = 0u64;
    let mut samples = 0;
    let t0 = std::time::Instant::now();
    while !run.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the run did not end"
        );
        if let Ok(entries) = probe.outstanding(&stage_run) {
            let items: u64 = entries.iter().map(|(_, n)| *n as u64).sum();
            most = most.max(items);
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    run.join().unwrap().expect("run");
    w.stop();
    assert_eq!(seen.lock().unwrap().len(), 400);
    assert!(
        samples > 20,
        "the probe sampled the run ({samples} samples)"
    );
    assert!(most > 5, "items were in flight: {most}");
    assert!(
        most <= 20,
        "at most max_in_flight items outstanding, saw {most}"
    );
}

#[test]
fn with_remote_stages_off_the_stage_runs_here_under_its_worker_executor() {
    std::env::set_var("MINIGUN_REMOTE", "off");
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::threads(3));
    let report = define(&broker, cfg, 100, &seen).run().expect("run");
    assert_eq!(report.stage("double").unwrap().executor, "threads(3)");
    assert_eq!(seen.lock().unwrap().len(), 100);
    let mut s = broker.session().unwrap();
    let ever = s
        .announcements("remote-memory", Some("0"), Duration::ZERO)
        .unwrap();
    assert!(ever.is_empty(), "nothing went through the broker: {ever:?}");
}

#[test]
fn live_views_list_the_remote_workers_beside_local_children() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::inline()).batch(1).max_in_flight(2);
    let (b, s) = (broker.clone(), seen.clone());
    let w = worker(move || define(&b, cfg, 3000, &s));
    // The driver's definition is `define`'s (same names and types, so the worker serves
    // it), with a producer that goes on until the worker has been listed: how soon the
    // parent first looks depends on the machine's load, not on the number of items.
    let listed_flag = Arc::new(AtomicBool::new(false));
    let p = Pipeline::new("remote-memory");
    p.handle_signals(false);
    let flag = listed_flag.clone();
    p.producer("numbers", move |out| {
        let limit = std::time::Instant::now() + Duration::from_secs(60);
        let mut i = 0u64;
        while i < 100 || !flag.load(Ordering::Relaxed) && std::time::Instant::now() < limit {
            out.emit(i)?;
            i += 1;
        }
        Ok(())
    });
    let r = cfg(Remote::new(broker.clone()).claim_idle(Duration::from_millis(300)));
    p.map("double", |x: u64| Ok(x * 2)).remote(r);
    let s = seen.clone();
    p.consumer("collect", move |x: u64| {
        s.lock().unwrap().push(x);
        Ok(())
    });
    let handle = p.spawn().expect("build");
    let monitor = handle.monitor();
    let mut listed = None;
    wait_until("the remote worker listed", Duration::from_secs(60), || {
        let snap = monitor.snapshot();
        let st = snap.stages.iter().find(|s| s.name == "double").unwrap();
        listed = st.children.iter().find(|c| c.host.is_some()).cloned();
        listed.is_some()
    });
    listed_flag.store(true, Ordering::Relaxed);
    let report = handle.wait().expect("run");
    w.stop();
    let c = listed.expect("listed");
    assert_eq!(c.pid, std::process::id());
    assert_eq!(
        c.rss_bytes, 0,
        "a remote worker's memory is not read from this host"
    );
    let produced = report.stage("numbers").unwrap().items_out;
    assert!(produced >= 100, "{produced}");
    assert_eq!(report.stage("double").unwrap().items_out, produced);
    assert_eq!(seen.lock().unwrap().len() as u64, produced);
}

#[test]
fn a_bound_smaller_than_a_batch_sends_partial_entries_instead_of_waiting() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    // 64 items per entry, at most 10 in flight, a long linger: only sending the partial
    // entry when the bound is reached lets the run go on.
    let cfg = |r: Remote| {
        r.worker_exec(Exec::inline())
            .batch(64)
            .max_in_flight(10)
            .linger(Duration::from_secs(3600))
    };
    let (b, s) = (broker.clone(), seen.clone());
    let w = worker(move || define(&b, cfg, 200, &s));
    let run = parent({
        let (b, s) = (broker.clone(), seen.clone());
        move || define(&b, cfg, 200, &s)
    });
    let t0 = std::time::Instant::now();
    while !run.is_finished() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        run.is_finished(),
        "the run did not end: the sender waited for credit it held"
    );
    let report = run.join().unwrap().expect("run");
    w.stop();
    assert_eq!(seen.lock().unwrap().len(), 200);
    let r = report.stage("double").unwrap().remote.clone().unwrap();
    assert_eq!(r.entries_sent, 20, "entries of the bound's size: {r:?}");
}

#[test]
fn an_ordered_remote_stage_emits_results_in_input_order() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let (b, s) = (broker.clone(), seen.clone());
    let def = move |ordered: bool| {
        let p = Pipeline::new("remote-ordered");
        p.handle_signals(false);
        p.producer("numbers", |out| out.emit_all(0..300u64).map_err(Into::into));
        let r = Remote::new(b.clone())
            .worker_exec(Exec::threads(4))
            .batch(3)
            .ordered(ordered);
        // Later items of each entry finish first.
        p.map("jumble", |x: u64| {
            std::thread::sleep(Duration::from_micros(300 * (3 - x % 3)));
            Ok(x)
        })
        .remote(r);
        collect_into(&p, &s);
        p
    };
    let d = def.clone();
    let workers: Vec<Worker> = (0..2)
        .map(|_| {
            let d = d.clone();
            worker(move || d(true))
        })
        .collect();
    def(true).run().expect("run");
    for w in workers {
        w.stop();
    }
    let got = seen.lock().unwrap().clone();
    assert_eq!(got, (0..300).collect::<Vec<_>>(), "in input order");
}

/// A definition whose remote stage emits three outputs `(item, k, padding)` per item; item
/// 5 then ends its attempt (an abort, after outputs large enough to have left the child, or
/// an error), on its first attempt only (`marker` records it), and is retried once.
fn define_partial(
    broker: &MemoryBroker,
    worker_exec: Exec,
    abort: bool,
    marker: std::path::PathBuf,
    seen: &Arc<Mutex<Vec<(u64, u32)>>>,
) -> Pipeline {
    let p = Pipeline::new("remote-partial");
    p.handle_signals(false);
    p.producer("numbers", move |out| {
        out.emit_all(0..10u64).map_err(Into::into)
    });
    let r = Remote::new(broker.clone())
        .claim_idle(Duration::from_millis(300))
        .worker_exec(worker_exec)
        .batch(4);
    let pad = if abort { 70_000 } else { 8 };
    p.processor("work", move |x: u64, out| {
        for k in 0..3u32 {
            out.emit((x, k, "x".repeat(pad)))?;
        }
        let first = x == 5
            && std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_ok();
        match (first, abort) {
            (true, true) => std::process::abort(),
            (true, false) => Err("item 5 fails after its outputs".into()),
            (false, _) => Ok(()),
        }
    })
    .remote(r)
    .on_error(OnError::retry(1));
    let seen = seen.clone();
    p.consumer("collect", move |(x, k, _): (u64, u32, String)| {
        seen.lock().unwrap().push((x, k));
        Ok(())
    });
    p
}

/// Under a forked worker executor, the outputs a failed attempt sent before it ended are
/// not published with the retry's: each output of the retried item arrives once.
fn partial_outputs_of_a_retried_item_arrive_once(worker_exec: Exec, abort: bool) {
    let dir = std::env::temp_dir().join(format!(
        "minigun-remote-partial-{}-{abort}-{}",
        std::process::id(),
        worker_exec
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("item-5-ran");
    let broker = MemoryBroker::new();
    let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let (b, s, e, m) = (
        broker.clone(),
        seen.clone(),
        worker_exec.clone(),
        marker.clone(),
    );
    let w = worker(move || define_partial(&b, e, abort, m, &s));
    let report = define_partial(&broker, worker_exec, abort, marker, &seen)
        .run()
        .expect("run");
    w.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    let want: Vec<(u64, u32)> = (0..10u64)
        .flat_map(|x| (0..3u32).map(move |k| (x, k)))
        .collect();
    assert_eq!(got, want, "every output once, the retried item's too");
    let st = report.stage("work").unwrap();
    assert_eq!(st.failed, 0, "{:?}", report.failures);
}

#[test]
fn a_retried_items_outputs_arrive_once_under_ipc_fork_after_an_abort() {
    partial_outputs_of_a_retried_item_arrive_once(Exec::ipc_fork(2), true);
}

#[test]
fn a_retried_items_outputs_arrive_once_under_ipc_fork_after_an_error() {
    partial_outputs_of_a_retried_item_arrive_once(Exec::ipc_fork(2), false);
}

#[test]
fn a_retried_items_outputs_arrive_once_under_cow_fork_after_an_abort() {
    partial_outputs_of_a_retried_item_arrive_once(Exec::cow_fork(2).items_per_fork(4), true);
}

/// A number that cannot be serialised when it is 13.
#[derive(Debug, Clone, serde::Deserialize)]
struct NotThirteen(u64);

impl serde::Serialize for NotThirteen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            13 => Err(serde::ser::Error::custom("thirteen does not travel")),
            x => s.serialize_u64(x),
        }
    }
}

/// Items `0..40` through a remote stage of `batch(4)`, item 13 unsendable in the middle of
/// its entry; what the consumer saw, in order, and the run's report.
fn run_with_an_unsendable_item(ordered: bool) -> (Vec<u64>, minigun::RunReport) {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let (b, s) = (broker.clone(), seen.clone());
    let def = move || {
        let p = Pipeline::new("remote-unsendable");
        p.handle_signals(false);
        // The second half waits for item 14's output: in input order, it must not wait
        // for the end of the run behind the item that failed.
        let s2 = s.clone();
        p.producer("numbers", move |out| {
            out.emit_all((0..20u64).map(NotThirteen))?;
            let since = std::time::Instant::now();
            while !s2.lock().unwrap().contains(&28) {
                if since.elapsed() > Duration::from_secs(10) {
                    return Err("item 14's output was held".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            out.emit_all((20..40u64).map(NotThirteen))
                .map_err(Into::into)
        });
        let r = Remote::new(b.clone())
            .worker_exec(Exec::threads(2))
            .batch(4)
            .linger(Duration::from_secs(1))
            .ordered(ordered);
        p.map("double", |x: NotThirteen| Ok(x.0 * 2))
            .remote(r)
            .on_error(OnError::skip());
        collect_into(&p, &s);
        p
    };
    let w = worker(def.clone());
    let run = parent(def);
    wait_until("the run to end", Duration::from_secs(20), || {
        run.is_finished()
    });
    let report = run.join().unwrap().expect("run");
    w.stop();
    let got = seen.lock().unwrap().clone();
    (got, report)
}

#[test]
fn an_unsendable_item_inside_a_batch_fails_alone_and_the_others_of_its_entry_arrive() {
    for ordered in [false, true] {
        let (mut got, report) = run_with_an_unsendable_item(ordered);
        let want: Vec<u64> = (0..40).filter(|&x| x != 13).map(|x| x * 2).collect();
        if !ordered {
            got.sort_unstable();
        }
        assert_eq!(got, want, "ordered {ordered}: every sendable item once");
        let st = report.stage("double").unwrap();
        assert_eq!((st.items_in, st.failed), (40, 1), "ordered {ordered}");
        assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
        let f = &report.failures[0];
        assert_eq!((f.item, &f.kind), (Some(13), &FailureKind::Encode), "{f:?}");
        assert!(f.message.contains("thirteen does not travel"), "{f:?}");
    }
}

/// Doubles its items; [`broken_worker`]'s cannot be made.
struct Doubler;

impl minigun::Stage<u64, u64> for Doubler {
    fn process(&mut self, x: u64, out: &mut minigun::Output<'_, u64>) -> StageResult {
        out.emit(x * 2)?;
        Ok(())
    }
}

/// [`define`]'s pipeline on a worker whose stage instance cannot be made.
fn broken_worker(broker: &MemoryBroker, cfg: fn(Remote) -> Remote, n: u64) -> Worker {
    let b = broker.clone();
    worker(move || {
        let p = Pipeline::new("remote-memory");
        p.handle_signals(false);
        p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
        let r = cfg(Remote::new(b).claim_idle(Duration::from_millis(300)));
        // After the fetcher has taken entries: they are held when the local run aborts.
        p.stage("double", || -> Doubler {
            std::thread::sleep(Duration::from_millis(300));
            panic!("no model on this host")
        })
        .remote(r);
        collect_into(&p, &Seen::default());
        p
    })
}

#[test]
fn a_worker_whose_stage_cannot_start_leaves_the_run_and_its_entries_go_to_the_others() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::inline()).batch(4);
    // The broken worker first, so that it takes entries before the healthy one exists.
    let broken = broken_worker(&broker, cfg, 400);
    let (b, s) = (broker.clone(), seen.clone());
    let run = parent(move || define(&b, cfg, 400, &s));
    std::thread::sleep(Duration::from_millis(300));
    let healthy = workers_serving(1, &broker, cfg, 400, &seen, double);
    wait_until("the run to end", Duration::from_secs(20), || {
        run.is_finished()
    });
    let report = run.join().unwrap().expect("run");
    assert_doubled_once(&seen, 400);
    assert_eq!(report.stage("double").unwrap().failed, 0);
    let broken = broken.stop();
    assert_eq!((broken.runs, broken.items), (0, 0), "{broken:?}");
    assert_eq!(broken.refused, 1, "it left the run: {broken:?}");
    let healthy: Vec<ServeReport> = healthy.into_iter().map(Worker::stop).collect();
    // The broken worker's entries were released to it (claimable at once), not left
    // heartbeated for ever: without that the run never ends.
    assert_eq!(healthy[0].items, 400, "{healthy:?}");
    assert!(
        healthy[0].reclaimed >= 1,
        "it took the released entries: {healthy:?}"
    );
}

/// Runs of each of the two tests below (a counter each: tests may share a process).
static EXECUTED_COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static EXECUTED_FETCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Doubles `x` in 30 ms, counted in `runs`.
fn counted(runs: &std::sync::atomic::AtomicU64, x: u64) -> StageResult<u64> {
    runs.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(30));
    Ok(x * 2)
}

/// 40 items of 30 ms through one inline worker, `batch(4)`; `fault` is injected into the
/// broker once 8 have arrived (the failures it injects, if any, into the method it names
/// are all used by the end); `f` doubles, counting its runs in `runs`. Every item arrives
/// once and runs once: what the worker reported.
fn one_worker_through(
    f: fn(u64) -> StageResult<u64>,
    runs: &std::sync::atomic::AtomicU64,
    fault: impl FnOnce(&MemoryBroker) -> Option<&'static str>,
) -> ServeReport {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::inline()).batch(4);
    let w = workers_serving(1, &broker, cfg, 40, &seen, f);
    let (b, s) = (broker.clone(), seen.clone());
    let run = parent(move || define_with(&b, cfg, 40, &s, f));
    wait_until("8 items", Duration::from_secs(20), || collected(&seen) >= 8);
    let faulted = fault(&broker);
    let report = run.join().unwrap().expect("run");
    let served = w.into_iter().map(Worker::stop).next().unwrap();
    if let Some(method) = faulted {
        assert_eq!(
            broker.faults_left(method),
            0,
            "the faults of {method} happened"
        );
    }
    assert_doubled_once(&seen, 40);
    assert_eq!(report.stage("double").unwrap().failed, 0);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        40,
        "nothing ran twice: {served:?}"
    );
    served
}

#[test]
fn commits_that_fail_for_longer_than_the_lease_are_retried_and_the_entries_kept() {
    // 30 failures 50 ms apart: the broker refuses commits for 1.5 s, five times the lease
    // (claim_idle 300 ms); everything else still works, the keeper's reclaims included.
    let f = |x| counted(&EXECUTED_COMMITS, x);
    let served = one_worker_through(f, &EXECUTED_COMMITS, |b| {
        b.fail_next("commit", 30);
        Some("commit")
    });
    assert_eq!(served.reclaimed, 0, "{served:?}");
    assert_eq!(served.items, 40, "{served:?}");
}

#[test]
fn after_a_lost_fetch_reply_a_worker_takes_its_own_entries_back_and_keeps_those_it_runs() {
    // The next fetch delivers and loses its reply: the worker reads its own pending list
    // again, which also holds the entries it runs.
    let f = |x| counted(&EXECUTED_FETCH, x);
    let served = one_worker_through(f, &EXECUTED_FETCH, |b| {
        b.fail_after_next("fetch", 1);
        Some("fetch")
    });
    assert_eq!(
        served.reclaimed, 0,
        "no entry waited for claim_idle: {served:?}"
    );
}

static EXECUTED_CLAIM_BACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn a_worker_that_claims_back_its_own_lapsed_entries_neither_splits_them_nor_runs_them_twice() {
    // The broker's clock jumps past the lease five times while entries of four items run:
    // the worker's keeper finds its own entries idle and claims them back, delivered twice.
    let f = |x| counted(&EXECUTED_CLAIM_BACK, x);
    let served = one_worker_through(f, &EXECUTED_CLAIM_BACK, |b| {
        for _ in 0..5 {
            b.advance(Duration::from_millis(600));
            std::thread::sleep(Duration::from_millis(40));
        }
        None
    });
    assert_eq!(served.lease_lost, 0, "{served:?}");
    assert_eq!(served.items, 40, "{served:?}");
}

/// What [`logged_double`] did, in order: (item, started) for each start and end.
static EVENTS: Mutex<Vec<(u64, bool)>> = Mutex::new(Vec::new());

fn logged_double(x: u64) -> StageResult<u64> {
    EVENTS.lock().unwrap().push((x, true));
    std::thread::sleep(Duration::from_millis(10));
    EVENTS.lock().unwrap().push((x, false));
    Ok(x * 2)
}

#[test]
fn a_redelivered_entry_runs_only_once_its_worker_holds_nothing_else() {
    let broker = MemoryBroker::new();
    let seen: Seen = Arc::default();
    let cfg = |r: Remote| r.worker_exec(Exec::threads(4)).batch(10);
    let (b, s) = (broker.clone(), seen.clone());
    let run = parent(move || define_with(&b, cfg, 400, &s, logged_double));
    let stage_run = announced(&broker, "remote-memory");
    // A consumer that takes items 0..10 and is never heard of again: the worker reclaims
    // them after claim_idle, while it runs the others four at a time, and splits them.
    let (_ghost, held) = hold_one(&broker, &stage_run);
    assert_eq!(held.entry.first, 0);
    let w = workers_serving(1, &broker, cfg, 400, &seen, logged_double);
    let report = run.join().unwrap().expect("run");
    let served: Vec<ServeReport> = w.into_iter().map(Worker::stop).collect();
    assert_doubled_once(&seen, 400);
    assert_eq!(report.stage("double").unwrap().failed, 0);
    assert_eq!(served[0].reclaimed, 1, "{served:?}");
    // Each of items 0..10 (each a redelivered part) ran with no other item running.
    let events = EVENTS.lock().unwrap().clone();
    let mut running = std::collections::BTreeSet::new();
    for (x, started) in events {
        match started {
            true => {
                assert!(
                    x >= 10 || running.is_empty(),
                    "redelivered item {x} started while {running:?} ran"
                );
                assert!(
                    running.iter().all(|&r| r >= 10),
                    "item {x} started while redelivered {running:?} ran"
                );
                running.insert(x);
            }
            false => {
                running.remove(&x);
            }
        }
    }
}
