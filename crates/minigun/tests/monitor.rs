//! Live snapshots: counters, queue depth, statuses and the live children of fork stages.
mod common;
use minigun::{Capacity, Exec, Pipeline, StageStatus};
use std::time::{Duration, Instant};

/// How long a monitor test waits for a state to show.
const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn snapshots_show_fork_children_queues_and_statuses() {
    let p = Pipeline::new("watched");
    p.producer("gen", |out| out.emit_all(0..40u64).map_err(Into::into));
    p.map("slow", |x: u64| {
        std::thread::sleep(Duration::from_millis(30));
        Ok(x)
    })
    .capacity(Capacity::Bounded(8))
    .wire()
    .executor(Exec::ipc_fork(2).in_flight(1));
    p.map("cow", |x: u64| Ok(x)).cow_fork(2);
    p.consumer("sink", |_x: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let monitor = handle.monitor();
    let mut saw_queue = 0;
    common::wait_until("two live ipc workers with memory", LIMIT, || {
        let s = monitor.snapshot();
        saw_queue = saw_queue.max(s.stages[1].queue_len);
        let slow = &s.stages[1];
        slow.children.len() == 2 && slow.children.iter().all(|c| c.rss_bytes > 0 && c.pid > 0)
    });
    common::wait_until("the slow stage to be active", LIMIT, || {
        monitor.snapshot().stages[1].status == StageStatus::Active
    });
    // 40 items, a queue of 8 and 30 ms per item: the backlog shows in the queue for a while
    // (its workers and feeder hold a few items of their own).
    common::wait_until("the slow stage's queue to show its backlog", LIMIT, || {
        let len = monitor.snapshot().stages[1].queue_len;
        saw_queue = saw_queue.max(len);
        len > 0
    });
    let snap = monitor.snapshot();
    assert_eq!(
        snap.stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["gen", "slow", "cow", "sink"]
    );
    assert_eq!(snap.edges, vec![(0, 1), (1, 2), (2, 3)]);
    assert_eq!(
        snap.stages.iter().map(|s| s.layer).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(
        snap.stages[1].queue_len <= 8 && saw_queue > 0,
        "queue {saw_queue}"
    );
    assert!(!snap.finished);
    let report = handle.wait().unwrap();
    let end = monitor.snapshot();
    assert!(end.finished);
    assert!(end.stages.iter().all(|s| s.status == StageStatus::Done));
    assert!(end.stages[1].children.is_empty() && end.stages[2].children.is_empty());
    assert_eq!(end.stages[3].items_in, 40);
    assert_eq!(end.produced, report.produced);
    let json = serde_json::to_value(&end).unwrap();
    assert_eq!(json["stages"][1]["executor"], "ipc_fork(2)");
}

#[test]
fn cancel_stops_a_fork_run_now_and_accounts_for_everything() {
    let p = Pipeline::new("cancelled");
    p.producer("endless", |out| {
        for i in 0u64.. {
            out.emit(i)?;
        }
        Ok(())
    });
    p.map("slow", |x: u64| {
        std::thread::sleep(Duration::from_secs(30));
        Ok(x)
    })
    .cow_fork(2);
    p.consumer("sink", |_x: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let monitor = handle.monitor();
    common::wait_until("two children", LIMIT, || {
        monitor.snapshot().stages[1].children.len() == 2
    });
    let started = Instant::now();
    handle.cancel();
    let report = handle.wait().unwrap();
    // Children sleeping 30 s were terminated, not waited for.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(report.stopped && report.signal.is_none());
    let slow = report.stage("slow").unwrap();
    assert_eq!(
        slow.items_in,
        slow.items_out + slow.failed + slow.cancelled,
        "{report}"
    );
    assert!(slow.cancelled >= 2);
    assert!(common::live_children().is_empty() && common::zombies().is_empty());
    // A finished run's elapsed time no longer grows.
    let (a, b) = (monitor.snapshot().elapsed_secs, {
        std::thread::sleep(Duration::from_millis(50));
        monitor.snapshot().elapsed_secs
    });
    assert_eq!(a, b);
}

#[test]
fn latencies_of_a_slow_stage_show_before_it_ends() {
    let p = Pipeline::new("slow-latency");
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    p.map("slow", |x: u64| {
        std::thread::sleep(Duration::from_millis(40));
        Ok(x)
    });
    p.consumer("sink", |_x: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let monitor = handle.monitor();
    // Far fewer items than a merge batch: the time-based merge makes p50 visible mid-run.
    common::wait_until("a p50 for the slow stage", LIMIT, || {
        let s = monitor.snapshot();
        s.stages[1].p50_us >= 30_000.0 && !s.finished
    });
    handle.wait().unwrap();
}

#[test]
fn producers_declare_their_total() {
    let p = Pipeline::new("totals");
    p.producer("a", |out| out.emit_all(0..5u64).map_err(Into::into))
        .total(5);
    p.producer("b", |out| out.emit_all(0..7u64).map_err(Into::into))
        .total(7);
    p.consumer("sink", |_x: u64| Ok(()));
    let r = p.build().unwrap();
    let monitor = r.monitor();
    r.run().unwrap();
    assert_eq!(monitor.snapshot().total, Some(12));
    // Unknown as soon as one producer does not say.
    let p = Pipeline::new("no-total");
    p.producer("a", |out| out.emit_all(0..5u64).map_err(Into::into))
        .total(5);
    p.producer("b", |out| out.emit_all(0..7u64).map_err(Into::into));
    p.consumer("sink", |_x: u64| Ok(()));
    let r = p.build().unwrap();
    let monitor = r.monitor();
    r.run().unwrap();
    assert_eq!(monitor.snapshot().total, None);
}

// Progress counts items finished, not produced: with every item produced and the first
// stage stuck on item 10, at most 10 of 100 are finished (it said 100%).
#[test]
fn finished_items_count_what_every_stage_is_done_with() {
    let (reached, wait) = std::sync::mpsc::channel::<()>();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let p = Pipeline::new("progress");
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into))
        .total(100);
    p.map("slow", move |x: u64| {
        if x == 10 {
            reached.send(()).unwrap();
            gate.lock().unwrap().recv().unwrap();
        }
        Ok(x)
    });
    p.batch::<u64>("batch", 10);
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let handle = p.spawn().unwrap();
    let monitor = handle.monitor();
    wait.recv().unwrap();
    common::wait_until("every item produced", LIMIT, || {
        monitor.snapshot().produced == 100
    });
    let s = monitor.snapshot();
    assert_eq!(s.total, Some(100));
    assert!(
        s.finished_items <= 10,
        "finished {} of 100",
        s.finished_items
    );
    release.send(()).unwrap();
    let report = handle.wait().unwrap();
    assert_eq!(report.consumed, 10, "ten batches");
    assert_eq!(monitor.snapshot().finished_items, 100);
}
