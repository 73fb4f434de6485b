//! `Exec::ordered()`: fork stages emit results in input order, whatever order items finish in.
mod common;
use common::Sink;
use minigun::{Exec, Output, Pipeline};
use std::time::Duration;

fn run(exec: Exec) -> Vec<u64> {
    let p = Pipeline::new("ordered");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..200u64).map_err(Into::into));
    p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
        // Later items often finish first: item x sleeps (7x mod 5) ms.
        std::thread::sleep(Duration::from_millis((x * 7) % 5));
        out.emit(x * 10)?;
        out.emit(x * 10 + 1)?;
        Ok(())
    })
    .wire()
    .executor(exec);
    p.consumer("collect", move |x: u64| {
        g.0.lock().unwrap().push(x);
        Ok(())
    });
    p.run().unwrap();
    let v = got.0.lock().unwrap().clone();
    v
}

fn expected() -> Vec<u64> {
    (0..200u64).flat_map(|x| [x * 10, x * 10 + 1]).collect()
}

#[test]
fn cow_fork_ordered_keeps_input_order() {
    assert_eq!(run(Exec::cow_fork(4).ordered()), expected());
}

#[test]
fn ipc_fork_ordered_keeps_input_order() {
    assert_eq!(run(Exec::ipc_fork(4).in_flight(2).ordered()), expected());
}

#[test]
fn unordered_is_the_same_multiset() {
    let mut v = run(Exec::ipc_fork(4));
    v.sort();
    assert_eq!(v, expected());
}

/// Least-loaded dispatch hands each item to the worker holding the fewest: while one worker is
/// busy with a slow item 0, every later item goes to the other one. (Round-robin would queue
/// every other item behind item 0.)
#[test]
fn least_loaded_dispatch_sends_nothing_to_the_worker_busy_with_a_slow_item() {
    use minigun::Dispatch;
    let n = 20u64;
    // Item 0 runs until this file exists: it is in flight while every other item is sent.
    let dir = common::TempDir::new("least-loaded");
    let release = dir.path().join("release");
    let (tx, arrived) = std::sync::mpsc::channel();
    let p = Pipeline::new("least-loaded");
    let got = Sink::default();
    let g = got.clone();
    let r = release.clone();
    p.producer("gen", move |out| {
        out.emit(0u64)?;
        out.emit(1)?;
        // Each later item is sent once the one before it has arrived: when it is sent, the
        // only item in flight is item 0.
        let mut in_step = true;
        for x in 2..n {
            if in_step && arrived.recv_timeout(Duration::from_secs(5)).is_err() {
                // The item before is stuck behind item 0: let item 0 end, stop waiting.
                in_step = false;
                std::fs::write(&r, b"")?;
            }
            out.emit(x)?;
        }
        if in_step {
            arrived.recv_timeout(Duration::from_secs(5))?;
        }
        std::fs::write(&r, b"")?;
        Ok(())
    });
    p.map("work", move |x: u64| {
        let t0 = std::time::Instant::now();
        while x == 0 && !release.exists() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok((x, std::process::id()))
    })
    .wire()
    .executor(
        Exec::ipc_fork(2)
            .in_flight(8)
            .dispatch(Dispatch::LeastLoaded),
    );
    p.consumer("collect", move |(x, pid): (u64, u32)| {
        g.push((x, pid));
        if x > 0 {
            let _ = tx.send(x);
        }
        Ok(())
    });
    p.run().unwrap();
    let v = got.sorted();
    assert_eq!(
        v.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>()
    );
    let slow = v[0].1;
    let behind: Vec<u64> = v[1..]
        .iter()
        .filter(|&&(_, pid)| pid == slow)
        .map(|&(x, _)| x)
        .collect();
    assert!(
        behind.is_empty(),
        "items sent to the worker busy with item 0: {behind:?}"
    );
}
