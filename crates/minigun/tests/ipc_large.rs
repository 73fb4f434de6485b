//! ipc_fork hands a large payload to a worker's pipe by its pages, not by a copy: the pipe
//! reads whatever the pages hold when the worker reads. So the parent must never change or
//! free a payload a live worker may still read. These runs free and reallocate payloads all
//! the time (every answered item frees its buffer; the producer makes a new one per item, of
//! sizes on both sides of the allocator's mmap threshold) while workers die with items still
//! in their pipes, which then go to other workers: every item must arrive intact, once.
mod common;
use common::{assert_no_children, Sink, TempDir};
use minigun::{Exec, OnError, Pipeline};
use std::collections::BTreeMap;

const N: u64 = 300;

/// Item `i`'s size: 16 KiB to about 200 KiB.
fn size(i: u64) -> usize {
    (16 << 10) + (i as usize * 7919) % (184 << 10)
}

/// Item `i`: its index, then bytes that depend on the index and the position.
fn item(i: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..size(i))
        .map(|k| (k as u64).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

/// `Err` unless `v` is item `i` exactly.
fn check(v: &[u8]) -> Result<u64, String> {
    let i = u64::from_le_bytes(v[..8].try_into().unwrap());
    match i < N && v == item(i).as_slice() {
        true => Ok(i),
        false => Err(format!("item {i} arrived with other bytes")),
    }
}

fn run(exec: Exec, crashing: fn(u64) -> bool) {
    let dir = TempDir::new("ipc-large");
    let marks = dir.path().to_path_buf();
    let p = Pipeline::new("large");
    p.producer("gen", |out| {
        for i in 0..N {
            out.emit(item(i))?;
        }
        Ok(())
    });
    p.map("check", move |v: Vec<u8>| {
        let i = check(&v)?;
        // A crashing item kills its worker on its first attempt, with the items behind it
        // still in its pipe; they go to another worker, and it runs again.
        let mark = marks.join(i.to_string());
        if crashing(i) && !mark.exists() {
            std::fs::write(&mark, b"")?;
            std::process::abort();
        }
        Ok(i)
    })
    .ipc_fork(2)
    .stage()
    .executor(exec)
    .on_error(OnError::retry(1));
    let got = Sink::<u64>::default();
    got.consume(&p);
    let r = p.run().expect("runs");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let mut seen = BTreeMap::new();
    for x in got.sorted() {
        *seen.entry(x).or_insert(0) += 1;
    }
    assert_eq!(seen.len() as u64, N, "every item arrived");
    assert!(seen.values().all(|&n| n == 1), "an item arrived twice");
    let s = r.stage("check").unwrap();
    let crashes = (0..N).filter(|&i| crashing(i)).count() as u64;
    assert_eq!(s.retried, crashes, "each crashing item ran again once");
    assert_no_children();
}

#[test]
fn large_items_arrive_intact_while_workers_die_with_items_in_their_pipes() {
    run(Exec::ipc_fork(2).in_flight(8), |i| i % 37 == 11);
}

#[test]
fn large_items_arrive_intact_in_order_and_one_at_a_time() {
    run(Exec::ipc_fork(2).in_flight(8).ordered(), |i| i % 53 == 5);
    run(Exec::ipc_fork(2).in_flight(1).batch_results(false), |i| {
        i == 100
    });
}
