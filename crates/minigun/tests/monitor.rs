//! Live snapshots: counters, queue depth, statuses and the live children of fork stages.
mod common;
use minigun::{Capacity, Exec, Pipeline, StageStatus};
use std::time::{Duration, Instant};

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

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
    wait_until("two live ipc workers with memory", || {
        let s = monitor.snapshot();
        saw_queue = saw_queue.max(s.stages[1].queue_len);
        let slow = &s.stages[1];
        slow.children.len() == 2 && slow.children.iter().all(|c| c.rss_bytes > 0 && c.pid > 0)
    });
    wait_until("the slow stage to be active", || {
        monitor.snapshot().stages[1].status == StageStatus::Active
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
