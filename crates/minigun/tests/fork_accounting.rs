//! Accounting of the two fork executors: every item is processed exactly once, whatever the
//! shape of the input (empty, one item, duplicates, bursts, large items and results, more
//! workers than items), outputs are the inline executor's, and stage state, several fork
//! stages and several concurrent pipelines all add up.
mod common;
use common::Sink;
use common::{assert_no_children, run_bounded, Fork};
use minigun::{Exec, Output, Pipeline, RunReport, Stage, StageResult};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A 1:1 stage took `n` items and accounted for each exactly once, without failures.
fn assert_clean_1to1(r: &RunReport, stage: &str, n: u64) {
    let s = r.stage(stage).expect("stage in the report");
    assert_eq!(s.items_in, n, "{stage}: items_in");
    assert_eq!(s.items_out, n, "{stage}: items_out");
    assert_eq!(s.failed, 0, "{stage}: failed ({:?})", r.failures);
    assert_eq!(s.cancelled, 0, "{stage}: cancelled");
    assert_eq!(s.retried, 0, "{stage}: retried");
    assert_eq!(s.items_out + s.failed, s.items_in, "{stage}: nothing lost");
    assert_eq!(s.latency.count, n, "{stage}: one latency sample per item");
    assert!(r.failures.is_empty(), "failures: {:?}", r.failures);
}

/// Deterministic pseudo-random numbers (Knuth's MMIX LCG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// `len` pseudo-random bytes determined by `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut g = Lcg(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let x = g.next().to_le_bytes();
        let k = (len - v.len()).min(4);
        v.extend_from_slice(&x[..k]);
    }
    v
}

/// FNV-1a over the bytes, mixed with the length.
fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (b.len() as u64)
}

/// producer 0..n -> `work` (x*3+1) under `fk` with `workers` -> collect.
fn map_run(fk: Fork, workers: usize, input: Vec<u64>) -> (RunReport, Vec<u64>) {
    let p = Pipeline::new("map");
    let got = Sink::default();
    p.producer("gen", move |out| {
        for i in input {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
        out.emit(x * 3 + 1)?;
        Ok(())
    });
    fk.apply(&s, workers);
    Sink::<u64>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    (r, got.sorted())
}

both!(fn ten_thousand_items_exactly_once(fk) {
    // 10,000 under both executors: a cow_fork child per item takes a few ms in a debug build,
    // which keeps this test well inside its budget.
    let n = 10_000u64;
    let t0 = Instant::now();
    let (r, got) = map_run(fk, 4, (0..n).collect());
    let expected: Vec<u64> = (0..n).map(|x| x * 3 + 1).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "outputs differ from 0..{n} mapped");
    assert_clean_1to1(&r, "work", n);
    assert_eq!(r.stage("collect").unwrap().items_in, n);
    assert_no_children();
    eprintln!("{fk:?}: {n} items in {:?}", t0.elapsed());
});

both!(fn duplicates_are_kept(fk) {
    // Each value three times, interleaved: equal items are distinct items.
    let input: Vec<u64> = (0..3).flat_map(|_| 0..100u64).collect();
    let (r, got) = map_run(fk, 4, input.clone());
    let mut expected: Vec<u64> = input.iter().map(|x| x * 3 + 1).collect();
    expected.sort();
    assert_eq!(got, expected);
    assert_clean_1to1(&r, "work", 300);
    assert_no_children();
});

both!(fn empty_input(fk) {
    let (r, got) = map_run(fk, 4, Vec::new());
    assert!(got.is_empty());
    assert_clean_1to1(&r, "work", 0);
    assert_eq!(r.failures_total, 0);
    assert_no_children();
});

both!(fn one_item(fk) {
    let (r, got) = map_run(fk, 4, vec![41]);
    assert_eq!(got, vec![124]);
    assert_clean_1to1(&r, "work", 1);
    assert_no_children();
});

both!(fn more_workers_than_items(fk) {
    let (r, got) = map_run(fk, 8, vec![5, 6, 7]);
    assert_eq!(got, vec![16, 19, 22]);
    assert_clean_1to1(&r, "work", 3);
    assert_no_children();
});

both!(fn bursty_and_randomly_delayed_items(fk) {
    let n = 600u64;
    let p = Pipeline::new("bursty");
    let got = Sink::default();
    p.producer("gen", move |out| {
        let mut rng = Lcg(7);
        let mut i = 0u64;
        while i < n {
            // A burst of 1..=40 items, then a pause of 0..=2 ms (sometimes none at all).
            let burst = 1 + rng.next() % 40;
            for _ in 0..burst {
                if i == n {
                    break;
                }
                out.emit(i)?;
                i += 1;
            }
            let pause = rng.next() % 3;
            if pause > 0 {
                std::thread::sleep(Duration::from_millis(pause));
            }
        }
        Ok(())
    });
    let s = p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
        // Some items take a little longer, so children / workers finish out of order.
        let mut rng = Lcg(x);
        let d = rng.next() % 4;
        if d == 0 {
            std::thread::sleep(Duration::from_micros(500 + rng.next() % 1500));
        }
        out.emit(x * 3 + 1)?;
        Ok(())
    });
    fk.apply(&s, 4);
    Sink::<u64>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    let expected: Vec<u64> = (0..n).map(|x| x * 3 + 1).collect();
    assert_eq!(got.sorted(), expected);
    assert_clean_1to1(&r, "work", n);
    assert_no_children();
});

const MIB: usize = 1 << 20;

both!(fn one_mib_results(fk) {
    // Each child / worker emits a 1 MiB result: larger than a default pipe buffer.
    let n = 6u64;
    let p = Pipeline::new("big-results");
    let got = Sink::default();
    let g = got.clone();
    common::gen(&p, n);
    let s = p.processor("work", |x: u64, out: &mut Output<'_, (u64, Vec<u8>)>| {
        out.emit((x, pattern(x, MIB)))?;
        Ok(())
    });
    fk.apply(&s, 3);
    p.consumer("collect", move |(x, v): (u64, Vec<u8>)| {
        g.push((x, v.len(), checksum(&v)));
        Ok(())
    });
    let r = run_bounded(p).expect("run succeeds");
    let expected: Vec<(u64, usize, u64)> =
        (0..n).map(|x| (x, MIB, checksum(&pattern(x, MIB)))).collect();
    assert_eq!(got.sorted(), expected, "1 MiB results arrive intact");
    assert_clean_1to1(&r, "work", n);
    assert_no_children();
});

both!(fn many_16k_results_for_one_item(fk) {
    // 200 results of 16 KiB for one item (3.2 MB, several pipe buffers): the parent must
    // read while the child is still writing; nothing is lost, nothing is corrupted.
    const K16: usize = 16 << 10;
    let p = Pipeline::new("many-results");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| {
        out.emit(9u64)?;
        Ok(())
    });
    let s = p.processor("work", |x: u64, out: &mut Output<'_, (u64, u32, Vec<u8>)>| {
        for j in 0..200u32 {
            out.emit((x, j, pattern(x * 1000 + u64::from(j), K16)))?;
        }
        Ok(())
    });
    fk.apply(&s, 2);
    p.consumer("collect", move |(x, j, v): (u64, u32, Vec<u8>)| {
        g.push((x, j, v.len(), checksum(&v)));
        Ok(())
    });
    let r = run_bounded(p).expect("run succeeds");
    let expected: Vec<(u64, u32, usize, u64)> = (0..200u32)
        .map(|j| (9, j, K16, checksum(&pattern(9000 + u64::from(j), K16))))
        .collect();
    assert_eq!(got.sorted(), expected);
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (1, 200, 0));
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_no_children();
});

both!(fn one_mib_items(fk) {
    // 1 MiB inputs: ipc_fork serialises them over the worker's pipe (in_flight frames of
    // 1 MiB each); cow_fork hands them over through copy-on-write memory.
    let n = 8u64;
    let p = Pipeline::new("big-items");
    let got = Sink::default();
    p.producer("gen", move |out| {
        for i in 0..n {
            out.emit((i, pattern(i + 100, MIB)))?;
        }
        Ok(())
    });
    let s = p.map("work", |(i, v): (u64, Vec<u8>)| Ok((i, v.len(), checksum(&v))));
    fk.apply(&s, 3);
    Sink::<(u64, usize, u64)>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    let expected: Vec<(u64, usize, u64)> = (0..n)
        .map(|i| (i, MIB, checksum(&pattern(i + 100, MIB))))
        .collect();
    assert_eq!(got.sorted(), expected);
    assert_clean_1to1(&r, "work", n);
    assert_no_children();
});

/// 0, 1 or 3 results per item, by x % 3 (Vec results of mixed size and empty results).
fn zero_one_three(ex: Option<Fork>, n: u64) -> (RunReport, Vec<Vec<u64>>) {
    let p = Pipeline::new("zero-one-three");
    let got = Sink::default();
    common::gen(&p, n);
    let s = p.processor("work", |x: u64, out: &mut Output<'_, Vec<u64>>| {
        match x % 3 {
            0 => {}
            1 => out.emit(vec![x])?,
            _ => {
                out.emit(Vec::new())?;
                out.emit(vec![x; 2])?;
                out.emit((0..x % 17).collect())?;
            }
        }
        Ok(())
    });
    match ex {
        Some(fk) => {
            fk.apply(&s, 4);
        }
        None => {
            s.executor(Exec::inline());
        }
    }
    Sink::<Vec<u64>>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    (r, got.sorted())
}

both!(fn vec_and_empty_results_match_inline(fk) {
    let n = 600u64;
    let (_, oracle) = zero_one_three(None, n);
    assert_eq!(oracle.len() as u64, n / 3 + 3 * (n / 3));
    let (r, got) = zero_one_three(Some(fk), n);
    assert_eq!(got, oracle, "same results as inline");
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (n, oracle.len() as u64, 0));
    assert_eq!(s.latency.count, n, "items with no result are completed too");
    assert_eq!(r.stage("collect").unwrap().items_in, oracle.len() as u64);
    assert_no_children();
});

/// Output of the stateful stage: every item, and one count per stage instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Counted {
    Item(u64),
    /// Items this instance saw, and the process it ran in.
    Count(u64, u32),
}

struct Counter {
    seen: u64,
}

impl Stage<u64, Counted> for Counter {
    fn process(&mut self, item: u64, out: &mut Output<'_, Counted>) -> StageResult {
        self.seen += 1;
        out.emit(Counted::Item(item))?;
        Ok(())
    }
    fn finish(&mut self, out: &mut Output<'_, Counted>) -> StageResult {
        out.emit(Counted::Count(self.seen, std::process::id()))?;
        Ok(())
    }
}

fn stateful_run(fk: Fork, n: u64, workers: usize) -> (RunReport, Vec<Counted>) {
    let p = Pipeline::new("stateful");
    let got: Sink<Counted> = Sink(Default::default());
    common::gen(&p, n);
    let s = p.stage("count", || Counter { seen: 0 });
    fk.apply(&s, workers);
    Sink::<Counted>::consume(&got, &p);
    (run_bounded(p).expect("run succeeds"), got.sorted())
}

#[test]
fn stateful_stage_finish_per_ipc_worker() {
    let (n, workers) = (2_000u64, 4usize);
    let (r, got) = stateful_run(Fork::Ipc, n, workers);
    let items: Vec<u64> = got
        .iter()
        .filter_map(|c| match c {
            Counted::Item(x) => Some(*x),
            _ => None,
        })
        .collect();
    let counts: Vec<(u64, u32)> = got
        .iter()
        .filter_map(|c| match c {
            Counted::Count(k, pid) => Some((*k, *pid)),
            _ => None,
        })
        .collect();
    assert_eq!(items, (0..n).collect::<Vec<_>>());
    assert_eq!(counts.len(), workers, "one finish per worker: {counts:?}");
    let pids: std::collections::BTreeSet<u32> = counts.iter().map(|c| c.1).collect();
    assert_eq!(
        pids.len(),
        workers,
        "each finish in its own worker: {counts:?}"
    );
    assert!(
        !pids.contains(&std::process::id()),
        "finish ran in the workers"
    );
    assert_eq!(counts.iter().map(|c| c.0).sum::<u64>(), n, "{counts:?}");
    let s = r.stage("count").unwrap();
    assert_eq!(
        (s.items_in, s.items_out, s.failed),
        (n, n + workers as u64, 0)
    );
    assert_no_children();
}

#[test]
fn stateful_stage_finish_per_cow_child() {
    // cow_fork makes one instance per child, so finish runs once per item.
    let n = 200u64;
    let (r, got) = stateful_run(Fork::Cow, n, 4);
    let counts: Vec<u64> = got
        .iter()
        .filter_map(|c| match c {
            Counted::Count(k, _) => Some(*k),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![1; n as usize]);
    assert_eq!(got.len() as u64, 2 * n);
    let s = r.stage("count").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (n, 2 * n, 0));
    assert_no_children();
}

#[test]
fn cow_then_ipc_in_one_pipeline() {
    let n = 500u64;
    let p = Pipeline::new("two-forks");
    let got = Sink::default();
    common::gen(&p, n);
    p.map("cow", |x: u64| Ok((x + 1, std::process::id())))
        .cow_fork(3);
    p.map("ipc", |(x, pid): (u64, u32)| {
        Ok((x * 2, pid, std::process::id()))
    })
    .ipc_fork(3);
    Sink::<(u64, u32, u32)>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    let got = got.sorted();
    let me = std::process::id();
    let values: Vec<u64> = got.iter().map(|x| x.0).collect();
    assert_eq!(values, (0..n).map(|x| (x + 1) * 2).collect::<Vec<_>>());
    let cow_pids: std::collections::BTreeSet<u32> = got.iter().map(|x| x.1).collect();
    let ipc_pids: std::collections::BTreeSet<u32> = got.iter().map(|x| x.2).collect();
    assert!(!cow_pids.contains(&me) && !ipc_pids.contains(&me));
    assert_eq!(cow_pids.len() as u64, n, "one cow child per item");
    assert!(
        ipc_pids.len() <= 3,
        "three persistent workers: {ipc_pids:?}"
    );
    assert!(cow_pids.is_disjoint(&ipc_pids));
    assert_clean_1to1(&r, "cow", n);
    assert_clean_1to1(&r, "ipc", n);
    assert_no_children();
}

#[test]
fn two_pipelines_at_once_from_two_threads() {
    let n = 300u64;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let one = |tag: u64, barrier: std::sync::Arc<std::sync::Barrier>| {
        std::thread::spawn(move || {
            let p = Pipeline::new(format!("p{tag}"));
            let got = Sink::default();
            let g = got.clone();
            p.producer("gen", move |out| {
                for i in 0..n {
                    out.emit(i)?;
                }
                Ok(())
            });
            p.map("cow", move |x: u64| Ok(x + tag * 1_000_000))
                .cow_fork(2);
            p.map("ipc", move |x: u64| Ok(x * 10 + tag)).ipc_fork(2);
            p.consumer("collect", move |x: u64| {
                g.push(x);
                Ok(())
            });
            barrier.wait();
            let r = run_bounded(p).expect("run succeeds");
            (r, got.sorted())
        })
    };
    let a = one(1, barrier.clone());
    let b = one(2, barrier);
    for (tag, h) in [(1u64, a), (2u64, b)] {
        let (r, got) = h.join().expect("pipeline thread");
        let expected: Vec<u64> = (0..n).map(|x| (x + tag * 1_000_000) * 10 + tag).collect();
        assert_eq!(got, expected, "pipeline {tag}");
        assert_clean_1to1(&r, "cow", n);
        assert_clean_1to1(&r, "ipc", n);
    }
    assert_no_children();
}

/// This process's resident memory in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// Small ipc inputs share one buffer per hand-off. An item waiting out a retry's backoff gets a
// copy of its own bytes, so it does not keep its hand-off's buffer (up to 1 MiB) alive: 235
// items waiting 2 s each held about 240 MiB before; now a few MiB.
#[test]
fn items_waiting_for_a_retry_hold_only_their_own_bytes() {
    const N: u64 = 60_000;
    const SIZE: usize = 4000;
    let p = Pipeline::new("retry-memory");
    p.producer("gen", |out| {
        out.emit_all((0..N).map(|i| {
            let mut v = vec![7u8; SIZE];
            v[..8].copy_from_slice(&i.to_le_bytes());
            v
        }))
        .map_err(Into::into)
    });
    // Every 256th item fails its first attempt (the worker remembers what it has seen).
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    p.map("work", move |v: Vec<u8>| {
        let i = u64::from_le_bytes(v[..8].try_into().unwrap());
        if i % 256 == 0 && seen.lock().unwrap().insert(i) {
            return Err("first attempt fails".into());
        }
        Ok(i)
    })
    .wire()
    .executor(Exec::ipc_fork(1))
    .on_error(minigun::OnError::retry(1).backoff(Duration::from_secs(2)));
    let base = rss_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pk = peak.clone();
    let n = std::sync::atomic::AtomicU64::new(0);
    p.consumer("sink", move |_i: u64| {
        if n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1000 == 999 {
            pk.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    });
    let report = p.run().unwrap();
    let work = report.stage("work").unwrap();
    assert_eq!(
        (work.items_out, work.retried),
        (N, N.div_ceil(256)),
        "{report}"
    );
    let growth = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(base);
    assert!(
        growth < 64 << 10,
        "resident memory grew by {growth} KiB during the run"
    );
}
