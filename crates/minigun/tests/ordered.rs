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

#[test]
fn least_loaded_dispatch_delivers_every_item_and_uses_both_workers() {
    use minigun::Dispatch;
    // Item costs alternate between slow and fast; least-loaded hands each item to the worker
    // holding fewer, so both take their share of slow items.
    let p = Pipeline::new("least-loaded");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..60u64).map_err(Into::into));
    p.map("work", |x: u64| {
        std::thread::sleep(Duration::from_millis(if x.is_multiple_of(2) {
            20
        } else {
            0
        }));
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
        Ok(())
    });
    p.run().unwrap();
    let v = got.sorted();
    assert_eq!(
        v.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>()
    );
    // Both workers took slow items.
    let mut per_worker = std::collections::HashMap::<u32, u32>::new();
    for (_, pid) in v.iter().filter(|(x, _)| x.is_multiple_of(2)) {
        *per_worker.entry(*pid).or_default() += 1;
    }
    let counts: Vec<u32> = per_worker.values().copied().collect();
    assert_eq!(counts.len(), 2, "{per_worker:?}");
    assert!(
        counts.iter().all(|&c| c >= 12),
        "slow items piled up on one worker: {per_worker:?}"
    );
}
