//! ipc_fork hands ready items to a worker in runs (one frame, one flight), and an item in a
//! run still means what it meant alone: a crash, an error, a retry, a time limit or a
//! recycled worker is that item's, `ordered` orders items, latency is recorded per item,
//! and a lone item goes at once, without waiting for a run to fill.
mod common;
use common::{Sink, TempDir};
use minigun::{Exec, FailureKind, OnError, Pipeline, RunReport};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

/// Items per run: the producer emits them at once, so the feeder hands them on in runs of
/// up to the window.
const N: u64 = 1000;

/// The window of each of the 2 workers: runs of up to this many items.
const WINDOW: usize = 256;

fn exec() -> Exec {
    Exec::ipc_fork(2).in_flight(WINDOW)
}

/// The stage's failures as (item, kind).
fn failures(r: &RunReport) -> Vec<(Option<u64>, FailureKind)> {
    r.failures
        .iter()
        .map(|f| (f.item, f.kind.clone()))
        .collect()
}

/// Every item but `missing` arrived exactly once.
fn assert_each_once_but(got: &[u64], missing: &[u64]) {
    let mut seen = BTreeMap::new();
    for &x in got {
        *seen.entry(x).or_insert(0u32) += 1;
    }
    for x in 0..N {
        let want = u32::from(!missing.contains(&x));
        assert_eq!(seen.get(&x).copied().unwrap_or(0), want, "item {x}");
    }
}

#[test]
fn a_crash_inside_a_run_fails_that_item_alone_and_the_rest_of_its_run_runs_once() {
    let p = Pipeline::new("runs-crash");
    let sink = Sink::<u64>::default();
    p.producer("gen", |out| out.emit_all(0..N).map_err(Into::into));
    p.map("work", |x: u64| {
        if x == 500 {
            std::process::abort();
        }
        Ok(x)
    })
    .ipc_fork(2)
    .stage()
    .executor(exec())
    .on_error(OnError::skip());
    sink.consume(&p);
    let r = p.run().expect("runs");
    assert_eq!(
        failures(&r),
        [(Some(500), FailureKind::Signal(libc::SIGABRT))]
    );
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (N, N - 1, 1));
    assert_each_once_but(&sink.sorted(), &[500]);
    // Latency describes items, not runs.
    assert_eq!(s.latency.count, N - 1);
}

#[test]
fn an_item_that_fails_inside_a_run_is_retried_alone() {
    let dir = TempDir::new("runs-retry");
    let tries = dir.path().join("tries");
    let p = Pipeline::new("runs-retry");
    let sink = Sink::<u64>::default();
    p.producer("gen", |out| out.emit_all(0..N).map_err(Into::into));
    let file = tries.clone();
    p.map("work", move |x: u64| {
        if x == 321 {
            // Each attempt leaves a byte: the first two fail, the third succeeds.
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)?;
            f.write_all(b".")?;
            if std::fs::metadata(&file)?.len() < 3 {
                return Err("not yet".into());
            }
        }
        Ok(x)
    })
    .ipc_fork(2)
    .stage()
    .executor(exec())
    .on_error(OnError::retry(2));
    sink.consume(&p);
    let r = p.run().expect("runs");
    assert!(failures(&r).is_empty(), "{:?}", failures(&r));
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_out, s.failed, s.retried), (N, 0, 2));
    assert_eq!(
        std::fs::read(&tries).unwrap(),
        b"...",
        "item 321 ran 3 times"
    );
    assert_each_once_but(&sink.sorted(), &[]);
}

#[test]
fn an_item_that_overruns_inside_a_run_times_out_alone() {
    let p = Pipeline::new("runs-timeout");
    let sink = Sink::<u64>::default();
    p.producer("gen", |out| out.emit_all(0..N).map_err(Into::into));
    p.map("work", |x: u64| {
        if x == 300 {
            std::thread::sleep(Duration::from_secs(30));
        }
        Ok(x)
    })
    .ipc_fork(2)
    .stage()
    .executor(exec().timeout(Duration::from_secs(1)))
    .on_error(OnError::skip());
    sink.consume(&p);
    let r = p.run().expect("runs");
    assert_eq!(failures(&r), [(Some(300), FailureKind::Timeout)]);
    assert_each_once_but(&sink.sorted(), &[300]);
}

#[test]
fn ordered_keeps_input_order_across_runs_and_workers() {
    let p = Pipeline::new("runs-ordered");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    p.producer("gen", |out| out.emit_all(0..N).map_err(Into::into));
    p.map("work", |x: u64| {
        if x.is_multiple_of(97) {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(x)
    })
    .ipc_fork(2)
    .stage()
    .executor(exec().ordered());
    let g = got.clone();
    p.consumer("sink", move |x: u64| {
        g.lock().unwrap().push(x);
        Ok(())
    });
    p.run().expect("runs");
    let got = got.lock().unwrap().clone();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
}

#[test]
fn a_recycled_worker_is_never_handed_more_than_its_items_even_in_runs() {
    let p = Pipeline::new("runs-recycle");
    let sink = Sink::<(u32, u64)>::default();
    p.producer("gen", |out| out.emit_all(0..N).map_err(Into::into));
    p.map("work", |x: u64| Ok((std::process::id(), x)))
        .ipc_fork(2)
        .stage()
        .executor(exec().max_items_per_worker(60));
    sink.consume(&p);
    let r = p.run().expect("runs");
    let got = sink.sorted();
    let mut per_pid = BTreeMap::new();
    for (pid, _) in &got {
        *per_pid.entry(*pid).or_insert(0u64) += 1;
    }
    assert!(
        per_pid.values().all(|&n| n <= 60),
        "a worker ran more than 60 items: {per_pid:?}"
    );
    assert!(per_pid.len() >= (N / 60) as usize, "{per_pid:?}");
    let mut xs: Vec<u64> = got.iter().map(|(_, x)| *x).collect();
    xs.sort_unstable();
    assert_each_once_but(&xs, &[]);
    assert!(r.stage("work").unwrap().recycled_workers >= N / 60 - 2);
}

#[test]
fn a_lone_item_goes_at_once_without_waiting_for_a_run() {
    // The producer emits one item and waits until the consumer has it before the next: an
    // item that waited for others to join its run would never arrive.
    let p = Pipeline::new("runs-lone");
    let (tx, rx) = mpsc::channel::<u64>();
    let rx = std::sync::Mutex::new(rx);
    p.producer("gen", move |out| {
        let rx = rx.lock().unwrap();
        for i in 0..20u64 {
            out.emit(i)?;
            let got = rx
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| format!("item {i} did not arrive within 30 s"))?;
            assert_eq!(got, i * 2);
        }
        Ok(())
    });
    p.map("work", |x: u64| Ok(x * 2))
        .ipc_fork(2)
        .stage()
        .executor(exec());
    p.consumer("sink", move |x: u64| {
        tx.send(x).map_err(|e| e.to_string())?;
        Ok(())
    });
    let r = p.run().expect("runs");
    assert_eq!(r.consumed, 20);
}

/// One worker holding items 0, 1, 2 (one run) under a 300 ms limit per item
/// ([`common::overdue`]): item 1, started in the worker after item 0 overran and answered,
/// did not overrun anything: it runs again in another worker, its attempt not counted (as
/// cow_fork does for an item started in a child after an overdue one answered).
#[test]
fn an_item_started_after_an_overdue_one_answered_is_not_blamed_for_its_kill() {
    let exec = Exec::ipc_fork(1)
        .in_flight(3)
        .timeout(Duration::from_millis(300));
    common::overdue_item_runs_again(exec);
}
