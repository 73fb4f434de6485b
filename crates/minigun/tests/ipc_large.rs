//! ipc_fork hands a large payload to a worker's pipe by its pages, not by a copy: the pipe
//! reads whatever the pages hold when the worker reads. So the parent must never change or
//! free a payload a live worker may still read. These runs free and reallocate payloads all
//! the time (every answered item frees its buffer, or gives it back to the feeder to encode
//! the next items into; the producer makes a new one per item, of sizes on both sides of the
//! allocator's mmap threshold) while workers die with items still in their pipes, which then
//! go to other workers: every item must arrive intact, once.
//!
//! `Vec<u8>` items are their own payloads; `String` items are encoded into buffers of their
//! own (reused once their items end) when large, into one shared buffer per hand-off when
//! small (runs of them are still large payloads).
mod common;
use common::{assert_no_children, Sink, TempDir};
use minigun::{Exec, OnError, Pipeline, Wire};
use std::collections::BTreeMap;

const N: u64 = 300;

/// Item sizes: 16 KiB to about 200 KiB.
fn large(i: u64) -> usize {
    (16 << 10) + (i as usize * 7919) % (184 << 10)
}

/// Item sizes: 100 to 900 bytes.
fn small(i: u64) -> usize {
    100 + (i as usize * 7919) % 800
}

/// Item `i` of `size(i)` bytes: its index in 16 hex digits, then letters that depend on the
/// index and the position.
fn item(i: u64, size: fn(u64) -> usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..size(i))
        .map(|k| b'a' + ((k as u64 * 31 + i) % 26) as u8)
        .collect();
    v[..16].copy_from_slice(format!("{i:016x}").as_bytes());
    v
}

/// `Err` unless `v` is item `i` exactly.
fn check(v: &[u8], size: fn(u64) -> usize) -> Result<u64, String> {
    let i = std::str::from_utf8(&v[..16])
        .ok()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .filter(|&i| i < N);
    match i {
        Some(i) if v == item(i, size).as_slice() => Ok(i),
        _ => Err(format!(
            "an item arrived with other bytes: {:?}",
            String::from_utf8_lossy(&v[..16])
        )),
    }
}

/// Items `0..N` as `T` (`make` from their bytes, `bytes` back) through `exec`, the items
/// `crashing` says killing their worker on their first attempt.
fn run<T: Wire>(
    exec: Exec,
    size: fn(u64) -> usize,
    make: fn(Vec<u8>) -> T,
    bytes: fn(&T) -> &[u8],
    crashing: fn(u64) -> bool,
) {
    let dir = TempDir::new("ipc-large");
    let marks = dir.path().to_path_buf();
    let p = Pipeline::new("large");
    p.producer("gen", move |out| {
        for i in 0..N {
            out.emit(make(item(i, size)))?;
        }
        Ok(())
    });
    p.map("check", move |v: T| {
        let i = check(bytes(&v), size)?;
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

fn vec(v: Vec<u8>) -> Vec<u8> {
    v
}

fn string(v: Vec<u8>) -> String {
    String::from_utf8(v).expect("letters and digits")
}

#[test]
fn large_byte_vectors_arrive_intact_while_workers_die_with_items_in_their_pipes() {
    let exec = Exec::ipc_fork(2).in_flight(8);
    run(exec, large, vec, |v| v, |i| i % 37 == 11);
}

#[test]
fn large_byte_vectors_arrive_intact_in_order_and_one_at_a_time() {
    let exec = Exec::ipc_fork(2).in_flight(8).ordered();
    run(exec, large, vec, |v| v, |i| i % 53 == 5);
    let exec = Exec::ipc_fork(2).in_flight(1).batch_results(false);
    run(exec, large, vec, |v| v, |i| i == 100);
}

#[test]
fn large_strings_in_reused_buffers_arrive_intact_while_workers_die() {
    let exec = Exec::ipc_fork(2).in_flight(8);
    run(exec, large, string, |s| s.as_bytes(), |i| i % 37 == 11);
}

#[test]
fn runs_of_small_strings_arrive_intact_while_workers_die() {
    let exec = Exec::ipc_fork(2).in_flight(64);
    run(exec, small, string, |s| s.as_bytes(), |i| i % 41 == 20);
}
