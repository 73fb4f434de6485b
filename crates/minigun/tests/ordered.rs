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
