//! W3 large payloads: 64 KiB `Vec<u8>` items, f = checksum (u64), on ipc_fork(2); MB/s of
//! input. Floor: the same bytes written raw (64 KiB per write) to two forked workers. A second
//! floor makes and owns the items as the minigun pipeline does (the producer makes a new `Vec`
//! per item, each worker reads each item into a new one), so what the workload's own items
//! cost is measured apart from what the engine adds.
//!
//! A `Vec<u8>` item is its own payload (minigun writes its buffer, never a copy of it); a
//! second minigun row sends the same bytes as [`Blob`], which goes through serde
//! (`serialize_bytes`, one copy on each side): the difference between the two rows is what
//! the copies cost.

use crate::common::{best_of, best_of_three, byte_sum, progress, timed, Cfg, Row};
use crate::raw::{self, Workers};
use minigun::{Pipeline, Wire};
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ITEM: usize = 64 << 10;

/// Bytes that serialise as one byte string (what `serde_bytes::ByteBuf` does).
#[derive(Debug, Clone)]
pub(crate) struct Blob(pub(crate) Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob(v.to_vec()))
    }
    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element()? {
            v.push(b);
        }
        Ok(Blob(v))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        d.deserialize_byte_buf(BlobVisitor)
    }
}

/// The payload template: non-zero, not constant.
fn template() -> Vec<u8> {
    (0..ITEM).map(|i| (i % 251) as u8 + 1).collect()
}

/// The item `i`: the template with its index in the first 8 bytes.
fn item(template: &[u8], i: u64) -> Vec<u8> {
    let mut v = template.to_vec();
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

fn expected(template: &[u8], items: u64) -> u64 {
    let tail = byte_sum(&template[8..]);
    (0..items).map(|i| byte_sum(&i.to_le_bytes()) + tail).sum()
}

/// The W3 pipeline with the payload carried as `T` (`wrap` makes one from an item's bytes,
/// `bytes` reads them back in the worker).
fn minigun_run<T: Wire>(
    name: &str,
    items: u64,
    workers: usize,
    wrap: fn(Vec<u8>) -> T,
    bytes: fn(&T) -> &[u8],
) -> (Duration, u64) {
    let t = template();
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new(name);
    p.producer("gen", move |out| {
        for i in 0..items {
            out.emit(wrap(item(&t, i)))?;
        }
        Ok(())
    });
    p.map("checksum", move |v: T| Ok(byte_sum(bytes(&v))))
        .ipc_fork(workers);
    p.consumer("sink", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W3 pipeline runs"));
    assert_eq!(report.consumed, items, "W3: every item consumed");
    (wall, sum.load(Ordering::Relaxed))
}

fn minigun_vec(items: u64, workers: usize) -> (Duration, u64) {
    minigun_run("w3", items, workers, |v| v, |v| v)
}

fn minigun_blob(items: u64, workers: usize) -> (Duration, u64) {
    minigun_run("w3-blob", items, workers, Blob, |b| &b.0)
}

fn checksum_worker(input: i32, output: i32) -> i32 {
    let mut buf = vec![0u8; ITEM];
    loop {
        match raw::read_full(input, &mut buf) {
            Ok(0) => return 0,
            Ok(n) if n == ITEM => {}
            _ => return 1,
        }
        if raw::write_all(output, &byte_sum(&buf).to_le_bytes()).is_err() {
            return 1;
        }
    }
}

/// [`checksum_worker`] owning each item it reads, as a stage of `Vec<u8>` items does: a new
/// buffer per item, read into straight from the pipe.
fn owning_checksum_worker(input: i32, output: i32) -> i32 {
    loop {
        let buf = match raw::read_owned(input, ITEM) {
            Ok(b) if b.is_empty() => return 0,
            Ok(b) if b.len() == ITEM => b,
            _ => return 1,
        };
        if raw::write_all(output, &byte_sum(&buf).to_le_bytes()).is_err() {
            return 1;
        }
    }
}

/// The floor: 64 KiB writes to `workers` forked workers, which answer each with its checksum.
/// `owned`: items made and owned as in the minigun pipeline (the producer makes a new `Vec`
/// per item, the same way; the worker reads each into a new one); else one buffer is
/// rewritten and reread.
fn raw_run(items: u64, workers: usize, owned: bool) -> (Duration, u64) {
    let t = template();
    let t0 = Instant::now();
    let worker = match owned {
        true => owning_checksum_worker,
        false => checksum_worker,
    };
    let w = Workers::spawn(workers, worker).expect("fork checksum workers");
    let inputs = w.inputs.clone();
    let sum = std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = t.clone();
            for i in 0..items {
                let to = inputs[i as usize % inputs.len()];
                let wrote = match owned {
                    true => raw::write_all(to, &item(&t, i)),
                    false => {
                        buf[..8].copy_from_slice(&i.to_le_bytes());
                        raw::write_all(to, &buf)
                    }
                };
                wrote.expect("write to a checksum worker");
            }
            for &fd in &inputs {
                raw::close(fd);
            }
        });
        w.sum_u64s(64 << 10).expect("read checksum results")
    });
    (t0.elapsed(), sum)
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    // 8,000 items (0.5 GB, about 0.15 s a run): at 2,000, the start and end of a run
    // (forking the workers, the threads, the shutdown) were an eighth of it, and the ratio
    // moved between 0.63 and 0.88 from one run to the next.
    let items: u64 = cfg.size(8_000, 500);
    let workers = 2;
    let expect = expected(&template(), items);
    let mb = |wall: Duration| items as f64 * ITEM as f64 / 1e6 / wall.as_secs_f64();

    progress(
        "W3 raw pipes (64 KiB per write; one buffer, and owned items) and minigun ipc_fork(2) \
         Vec<u8>, alternately",
    );
    let ((raw_wall, raw_sum), (owned_wall, owned_sum), (wall, sum)) = best_of_three(
        cfg.reps,
        || raw_run(items, workers, false),
        || raw_run(items, workers, true),
        || minigun_vec(items, workers),
    );
    assert_eq!(raw_sum, expect, "W3 raw: wrong sum");
    assert_eq!(owned_sum, expect, "W3 raw, owned items: wrong sum");
    assert_eq!(sum, expect, "W3 minigun: wrong sum");
    let mut base = Row::new("W3", "baseline", "raw-pipes", workers, items, raw_wall)
        .variant("64 KiB per write");
    base.mb_per_sec = Some(mb(raw_wall));
    let floor = base.items_per_sec;
    let mut owned = Row::new("W3", "baseline", "raw-pipes", workers, items, owned_wall)
        .variant("owned items")
        .floor(floor)
        .note(
            "the same writes, with each item a new Vec made as the minigun producer makes it \
             and read into a new Vec in the worker, as a stage of Vec<u8> items receives it",
        );
    owned.mb_per_sec = Some(mb(owned_wall));
    let owned_floor = owned.items_per_sec;
    let mut vec_row = Row::new("W3", "minigun", "ipc_fork(2)", workers, items, wall)
        .variant("Vec<u8> (its own payload)")
        .floor(floor)
        .note(format!(
            "{:.2}x the raw pipes with owned items",
            (items as f64 / wall.as_secs_f64()) / owned_floor
        ));
    vec_row.mb_per_sec = Some(mb(wall));

    progress("W3 minigun ipc_fork(2), Blob (serialize_bytes)");
    let (wall, sum) = best_of(cfg.reps, || minigun_blob(items, workers));
    assert_eq!(sum, expect, "W3 minigun blob: wrong sum");
    let mut blob_row = Row::new("W3", "minigun", "ipc_fork(2)", workers, items, wall)
        .variant("Blob (serde bytes)")
        .floor(floor);
    blob_row.mb_per_sec = Some(mb(wall));

    vec![base, owned, vec_row, blob_row]
}
