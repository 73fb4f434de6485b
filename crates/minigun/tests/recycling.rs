//! ipc_fork worker recycling: a worker is replaced after a number of items, or once its
//! resident memory passes a limit, without losing an item or changing what `ordered` means.
#![cfg(target_os = "linux")]
mod common;
use common::{assert_no_children, gen};
use minigun::{Exec, Pipeline, RunReport};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Runs 0..n through an ipc_fork(2) stage under `exec`, whose items each leak `leak` bytes
/// (written, so they are resident); returns what came out, in arrival order (value, pid).
fn leaky_run(n: u64, leak: usize, exec: Exec) -> (Vec<(u64, u32)>, RunReport) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let p = Pipeline::new("leaky");
    gen(&p, n);
    p.map("leak", move |x: u64| {
        if leak > 0 {
            // Leaked on purpose: the memory stays resident in the worker until it exits.
            Box::leak(vec![1u8; leak].into_boxed_slice());
        }
        Ok((x, std::process::id()))
    })
    .wire()
    .executor(exec);
    p.consumer("sink", move |v: (u64, u32)| {
        g.lock().unwrap().push(v);
        Ok(())
    });
    let report = p.run().expect("run");
    assert_no_children();
    let got = got.lock().unwrap().clone();
    (got, report)
}

/// Items per worker process.
fn per_pid(got: &[(u64, u32)]) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for (_, pid) in got {
        *m.entry(*pid).or_default() += 1;
    }
    m
}

#[test]
fn workers_are_replaced_after_n_items_and_order_holds() {
    let exec = Exec::ipc_fork(2).max_items_per_worker(10).ordered();
    let (got, r) = leaky_run(100, 0, exec);
    let values: Vec<u64> = got.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        values,
        (0..100).collect::<Vec<_>>(),
        "every item once, in order"
    );
    let pids = per_pid(&got);
    assert!(pids.values().all(|&n| n <= 10), "{pids:?}");
    // Every worker that was handed 10 items was replaced (the last ones may share the rest).
    let full = pids.values().filter(|&&n| n == 10).count() as u64;
    assert!(full >= 9, "{pids:?}");
    let s = r.stage("leak").unwrap();
    assert_eq!(s.recycled_workers, full, "{r} {pids:?}");
    let line = format!("leak: {full} workers recycled");
    assert!(r.to_string().contains(&line), "{r}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["stages"][1]["recycled_workers"], full);
}

#[test]
fn a_leaking_worker_is_replaced_once_its_memory_passes_the_limit() {
    // A forked worker starts with about the parent's resident memory; each item leaks 4 MiB.
    let start = minigun_rss();
    let limit = start + (32 << 20);
    let exec = Exec::ipc_fork(2).in_flight(1).max_worker_rss(limit);
    let (got, r) = leaky_run(60, 4 << 20, exec);
    let mut values: Vec<u64> = got.iter().map(|(v, _)| *v).collect();
    values.sort();
    assert_eq!(values, (0..60).collect::<Vec<_>>(), "every item once");
    let s = r.stage("leak").unwrap();
    assert_eq!((s.failed, s.retried), (0, 0), "{r}");
    assert!(s.recycled_workers >= 1, "{r}");
    assert!(
        per_pid(&got).len() > 2,
        "replacements ran items: {:?}",
        per_pid(&got)
    );
}

/// This process's resident memory, in bytes.
fn minigun_rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn retries_mean_the_same_across_recycled_workers() {
    // Item 25 fails on its first attempt (a marker file tells the second); with workers
    // replaced every 5 items its retry runs on another worker process and succeeds.
    let dir = common::TempDir::new("recycling-retry");
    let marker = dir.path().join("25-failed-once");
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let p = Pipeline::new("retried");
    gen(&p, 50);
    p.map("work", move |x: u64| {
        if x == 25 && std::fs::File::create_new(&marker).is_ok() {
            return Err("first attempt fails".into());
        }
        Ok(x)
    })
    .on_error(minigun::OnError::retry(1))
    .wire()
    .executor(Exec::ipc_fork(2).max_items_per_worker(5).ordered());
    p.consumer("sink", move |x: u64| {
        g.lock().unwrap().push(x);
        Ok(())
    });
    let r = p.run().expect("run");
    assert_eq!(*got.lock().unwrap(), (0..50).collect::<Vec<_>>(), "{r}");
    let s = r.stage("work").unwrap();
    assert_eq!((s.retried, s.failed), (1, 0), "{r}");
    assert!(s.recycled_workers >= 8, "{r}");
    assert_no_children();
}
