//! W4 copy-on-write sharing: the parent builds a large read-only dataset; each item sums a
//! random 1 MiB slice of it in a cow_fork child, 4 at a time. Reports items/s and the largest
//! summed PSS of the parent and its live children (sampled every ~20 ms on a thread).
//!
//! Two datasets: a plain `Vec<u8>` (4 KiB pages: every fork copies ~2 MiB of page tables per
//! GiB and every exit tears them down), and `minigun::HugeBuf` (transparent huge pages, 2 MiB aligned)
//! (transparent huge pages: the page tables of 1 GiB are 512 PMD entries).
//! Floor: the raw fork loop doing the same work with the same dataset, 4 in flight (in a
//! process that has had a thread, as minigun's always has: `common::as_after_threads`); the
//! fork_server row also beside a hand-written fork server (`raw::fork_server_loop`).

#![allow(unsafe_code)]

use crate::common::{
    as_after_threads, best_of_pair, best_of_three, byte_sum, mib, progress, smaps_field, timed,
    Cfg, PssSampler, PssStats, Rng, Row,
};
use crate::raw;
use minigun::{Exec, HugePages, Pipeline};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SLICE: usize = 1 << 20;
const WORKERS: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Which memory the dataset lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Memory {
    Vec,
    Thp,
}

/// The read-only dataset: a plain `Vec`, or the library's transparent-huge-page buffer.
#[derive(Debug)]
enum Dataset {
    Vec(Vec<u8>),
    Huge(minigun::HugeBuf),
}

impl Dataset {
    fn new(memory: Memory, len: usize) -> std::io::Result<Dataset> {
        let mut d = match memory {
            Memory::Vec => Dataset::Vec(vec![0u8; len]),
            Memory::Thp => Dataset::Huge(minigun::HugeBuf::new(len)?),
        };
        fill(d.as_mut_slice());
        Ok(d)
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Dataset::Vec(v) => v,
            Dataset::Huge(h) => h,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Dataset::Vec(v) => v,
            Dataset::Huge(h) => h,
        }
    }
}

/// Non-zero data in every byte, so every page is really written.
fn fill(bytes: &mut [u8]) {
    for (i, c) in bytes.chunks_exact_mut(8).enumerate() {
        let v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 0x0101_0101_0101_0101;
        c.copy_from_slice(&v.to_le_bytes());
    }
}

fn slice_sum(d: &Dataset, off: u64) -> u64 {
    let off = off as usize;
    byte_sum(&d.as_slice()[off..off + SLICE])
}

fn minigun_run(data: &Arc<Dataset>, offsets: &Arc<Vec<u64>>, server: bool) -> (Duration, u64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let offs = offsets.clone();
    let d = data.clone();
    let p = Pipeline::new("w4");
    p.producer("offsets", move |out| {
        for &o in offs.iter() {
            out.emit(o)?;
        }
        Ok(())
    });
    // The `Vec` variant measures 4 KiB pages: the stage must not collapse them (W4b
    // measures that).
    let exec = match **data {
        Dataset::Vec(_) => Exec::cow_fork(WORKERS).huge_pages(HugePages::Off),
        Dataset::Huge(_) => Exec::cow_fork(WORKERS),
    };
    let exec = if server { exec.fork_server() } else { exec };
    p.map("slice_sum", move |off: u64| Ok(slice_sum(&d, off)))
        .wire()
        .executor(exec);
    p.consumer("sink", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W4 pipeline runs"));
    assert_eq!(
        report.consumed,
        offsets.len() as u64,
        "W4: every item consumed"
    );
    (wall, sum.load(Ordering::Relaxed))
}

fn raw_run(data: &Dataset, offsets: &[u64]) -> (Duration, u64) {
    raw::fork_loop(offsets.len() as u64, WORKERS, |i| {
        slice_sum(data, offsets[i as usize])
    })
    .expect("raw fork loop")
}

fn raw_server_run(data: &Dataset, offsets: &[u64]) -> (Duration, u64) {
    raw::fork_server_loop(offsets.len() as u64, WORKERS, |i| {
        slice_sum(data, offsets[i as usize])
    })
    .expect("raw fork server")
}

/// Builds (makes and fills) a `Vec` and a `HugeBuf` of `len` bytes alternately, `rounds`
/// times each, dropping each at once; the times per round. The first build of fresh memory
/// includes the machine's first touch of it (on a VM, faults the host serves), whichever
/// kind comes first; later rounds reuse freed memory and show what each kind costs.
fn build_race(len: usize, rounds: usize) -> Vec<(Duration, Duration)> {
    (0..rounds)
        .map(|_| {
            let (v, d) = timed(|| Dataset::new(Memory::Vec, len).expect("Vec dataset"));
            drop(d);
            let (h, d) = timed(|| Dataset::new(Memory::Thp, len).expect("HugeBuf dataset"));
            drop(d);
            (v, h)
        })
        .collect()
}

/// Runs `f` with the PSS sampler on.
fn sampled<T>(f: impl FnOnce() -> T) -> (T, PssStats) {
    let s = PssSampler::start(SAMPLE_EVERY);
    let r = f();
    (r, s.finish())
}

pub(crate) fn run(cfg: &Cfg, memory: Memory) -> Vec<Row> {
    let len: usize = cfg.size(1 << 30, 128 << 20);
    let items: usize = cfg.size(200, 40);
    let label = match memory {
        Memory::Vec => "Vec<u8>, 4 KiB pages, huge_pages(Off)",
        Memory::Thp => "HugeBuf (THP)",
    };
    progress(format!("W4 building a {} MiB dataset ({label})", len >> 20));
    let (build, data) = timed(|| Dataset::new(memory, len).expect("allocate the W4 dataset"));
    let data = Arc::new(data);
    let me = std::process::id();
    let huge = smaps_field(me, "AnonHugePages").unwrap_or(0);
    let pss_before = smaps_field(me, "Pss").unwrap_or(0);
    let mut rng = Rng::new(0x5eed_0004);
    let offsets: Arc<Vec<u64>> = Arc::new(
        (0..items)
            .map(|_| rng.next_u64() % (len - SLICE + 1) as u64)
            .collect(),
    );
    let expect: u64 = offsets.iter().map(|&o| slice_sum(&data, o)).sum();
    let info = format!(
        "dataset {} MiB built in {:.2}s, AnonHugePages {:.0} MiB, parent PSS before run {:.0} MiB",
        len >> 20,
        build.as_secs_f64(),
        mib(huge),
        mib(pss_before)
    );
    progress(&info);

    as_after_threads();
    // The raw loop and minigun alternately.
    progress(format!(
        "W4 raw fork loop and minigun cow_fork({WORKERS}), alternately ({label})"
    ));
    let ((raw_wall, raw_sum), (wall, sum)) = best_of_pair(
        cfg.reps,
        || raw_run(&data, &offsets),
        || minigun_run(&data, &offsets, false),
    );
    assert_eq!((raw_sum, sum), (expect, expect), "W4: wrong sum");
    // With huge pages, the fork server too (children forked by a single-threaded process),
    // against the raw loop and a hand-written fork server, alternately.
    let served = (memory == Memory::Thp).then(|| {
        progress(format!(
            "W4 raw fork loop, raw fork server and minigun cow_fork({WORKERS}) with \
             fork_server, alternately ({label})"
        ));
        let ((raw_wall, raw_sum), (srv_wall, srv_sum), (wall, sum)) = best_of_three(
            cfg.reps,
            || raw_run(&data, &offsets),
            || raw_server_run(&data, &offsets),
            || minigun_run(&data, &offsets, true),
        );
        assert_eq!(
            (raw_sum, srv_sum, sum),
            (expect, expect, expect),
            "W4 fork_server: wrong sum"
        );
        (raw_wall, srv_wall, wall)
    });
    progress(format!("W4 both again with the PSS sampler ({label})"));
    let ((raw_wall_s, raw_sum_s), raw_pss) = sampled(|| raw_run(&data, &offsets));
    assert_eq!(raw_sum_s, expect, "W4 raw: wrong sum");
    let ((wall_s, sum_s), pss) = sampled(|| minigun_run(&data, &offsets, false));
    assert_eq!(sum_s, expect, "W4 minigun: wrong sum");

    let items = items as u64;
    let sampling = |wall: Duration, st: &PssStats| {
        format!(
            "{:.0} items/s while PSS was sampled ({} consistent samples, {} dropped: a child \
             forked or exited during the read)",
            items as f64 / wall.as_secs_f64(),
            st.kept,
            st.dropped
        )
    };
    let mut base = Row::new("W4", "baseline", "raw-fork-loop", WORKERS, items, raw_wall)
        .variant(label)
        .note(sampling(raw_wall_s, &raw_pss));
    base.pss_bytes = (raw_pss.kept > 0).then_some(raw_pss.max);
    let floor = base.items_per_sec;
    let cow = |wall| {
        Row::new(
            "W4",
            "minigun",
            format!("cow_fork({WORKERS})"),
            WORKERS,
            items,
            wall,
        )
    };
    let mut ours = cow(wall)
        .variant(label)
        .floor(floor)
        .note(sampling(wall_s, &pss))
        .note(info);
    ours.pss_bytes = (pss.kept > 0).then_some(pss.max);
    if memory == Memory::Thp {
        progress("W4 building a Vec and a HugeBuf of the same size, alternately");
        let race: Vec<String> = build_race(len, 3)
            .iter()
            .map(|(v, h)| {
                format!(
                    "Vec {:.2}s / HugeBuf {:.2}s",
                    v.as_secs_f64(),
                    h.as_secs_f64()
                )
            })
            .collect();
        ours = ours.note(format!(
            "made and filled alternately, round by round: {}",
            race.join(", ")
        ));
    }
    let mut rows = vec![base, ours];
    if let Some((raw_wall, srv_wall, wall)) = served {
        let floor = items as f64 / raw_wall.as_secs_f64();
        let srv = Row::new(
            "W4",
            "baseline",
            "raw-fork-server",
            WORKERS,
            items,
            srv_wall,
        )
        .variant(format!("{label}, fork_server"));
        let row = cow(wall)
            .variant(format!("{label}, fork_server"))
            .floor(floor)
            .note(format!(
                "its raw fork loop in the same alternation: {floor:.0} items/s; {:.2}x the \
                 hand-written fork server (raw::fork_server_loop, {:.0} items/s) in it",
                items as f64 / wall.as_secs_f64() / srv.items_per_sec,
                srv.items_per_sec
            ));
        rows.push(srv);
        rows.push(row);
    }
    rows
}
