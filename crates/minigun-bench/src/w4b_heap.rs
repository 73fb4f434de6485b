//! W4b large ordinary heap data: the parent builds a `HashMap<String, u64>` of millions of
//! small allocations (about 1 GiB; `--quick` about 300 MiB), and each of 200 items looks up
//! 1,000 random keys in a cow_fork child, 4 at a time.
//!
//! In order, on the same heap:
//! 1. the raw fork loop and minigun with huge pages off (4 KiB pages: each fork copies the
//!    page tables of the whole heap);
//! 2. minigun with its default, which collapses the heap into transparent huge pages before
//!    its first fork (once; the collapse time is reported, and items/s counts from the end of
//!    the collapse);
//! 3. the raw fork loop and minigun on the collapsed heap, alternately (the target's ratio),
//!    then both again with the PSS sampler.

use crate::common::{best_of_pair, mib, progress, smaps_field, timed, Cfg, PssSampler, Rng, Row};
use crate::raw;
use minigun::{Exec, HugePages, HugePagesReport, HugePagesStatus, Pipeline};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WORKERS: usize = 4;
const LOOKUPS: u64 = 1_000;
/// Bytes of each key (a 48-byte malloc chunk each).
const KEY_LEN: usize = 40;

type Heap = HashMap<String, u64>;

/// Writes key `i` into `buf` without allocating (the raw loop's children must not).
fn key(i: u64, buf: &mut [u8; KEY_LEN]) -> &str {
    let mut w = &mut buf[..];
    write!(w, "key:{i:016x}:").expect("fits");
    let used = KEY_LEN - w.len();
    buf[used..].fill(b'.');
    std::str::from_utf8(buf).expect("ascii")
}

fn build(keys: u64) -> Heap {
    let mut h = Heap::new();
    let mut buf = [0u8; KEY_LEN];
    for i in 0..keys {
        h.insert(key(i, &mut buf).to_string(), i.wrapping_mul(0x9E37_79B9));
    }
    h
}

/// Item `seed`: the sum of the values of [`LOOKUPS`] keys drawn from it.
fn lookups(h: &Heap, keys: u64, seed: u64) -> u64 {
    let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut buf = [0u8; KEY_LEN];
    (0..LOOKUPS).fold(0u64, |s, _| {
        let k = key(rng.next_u64() % keys, &mut buf);
        s.wrapping_add(h.get(k).copied().unwrap_or(0))
    })
}

/// One minigun run: (wall, wall after the collapse, sum, what it did about huge pages).
fn minigun_run(
    h: &Arc<Heap>,
    keys: u64,
    items: u64,
    huge: Option<HugePages>,
    tune: fn(Exec) -> Exec,
) -> (Duration, (Duration, u64, HugePagesReport)) {
    let sum = Arc::new(AtomicU64::new(0));
    let (s, d) = (sum.clone(), h.clone());
    let p = Pipeline::new("w4b");
    p.producer("seeds", move |out| {
        out.emit_all(0..items).map_err(Into::into)
    });
    let exec = Exec::cow_fork(WORKERS);
    let exec = match huge {
        Some(setting) => exec.huge_pages(setting),
        None => exec,
    };
    let exec = tune(exec);
    // `wire` records that the input and output cross a process (the fork server sends the
    // input over a pipe); `executor` sets the options.
    p.map("lookups", move |seed: u64| Ok(lookups(&d, keys, seed)))
        .wire()
        .executor(exec);
    p.consumer("sink", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W4b pipeline runs"));
    assert_eq!(report.consumed, items, "W4b: every item consumed");
    let hp = report.huge_pages.first().cloned().expect("one fork stage");
    let after = wall.saturating_sub(Duration::from_secs_f64(hp.secs));
    (after, (wall, sum.load(Ordering::Relaxed), hp))
}

/// The stage's executor as the run's variant leaves it.
fn same(e: Exec) -> Exec {
    e
}

/// With the fork server.
fn with_server(e: Exec) -> Exec {
    e.fork_server()
}

/// With the fork server and several items per child.
fn with_server_auto(e: Exec) -> Exec {
    e.fork_server().items_per_fork_auto(AUTO_MAX)
}

/// The bound of the automatic items per child.
const AUTO_MAX: usize = 8;

fn raw_run(h: &Heap, keys: u64, items: u64) -> (Duration, u64) {
    raw::fork_loop(items, WORKERS, |i| lookups(h, keys, i)).expect("raw fork loop")
}

fn huge_note(hp: &HugePagesReport) -> String {
    match hp.status {
        HugePagesStatus::Collapsed => {
            format!(
            "collapse before the first fork: {:.0} MiB in {:.2}s (huge pages {:.0} -> {:.0} MiB, \
             {:.0} MiB filled); items/s counted after it",
            mib(hp.asked_bytes),
            hp.secs,
            mib(hp.huge_before),
            mib(hp.huge_after),
            mib(hp.filled_bytes)
        ) + &hp
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(" ({r})"))
        }
        s => format!("huge pages {s:?}: {}", hp.reason.as_deref().unwrap_or("")),
    }
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let keys: u64 = cfg.size(10_000_000, 3_000_000);
    let items: u64 = cfg.size(200, 40);
    let me = std::process::id();
    progress(format!(
        "W4b building a HashMap<String, u64> of {keys} keys"
    ));
    let (build_time, heap) = timed(|| build(keys));
    let heap = Arc::new(heap);
    let anon = smaps_field(me, "Anonymous").unwrap_or(0);
    let expect: u64 = (0..items).map(|i| lookups(&heap, keys, i)).sum();
    let info = format!(
        "{keys} keys, {:.0} MiB anonymous memory, built in {:.2}s",
        mib(anon),
        build_time.as_secs_f64()
    );
    progress(&info);
    let row = |runner: &str, exec: &str, variant: &str, wall: Duration| {
        Row::new("W4b", runner, exec, WORKERS, items, wall).variant(variant)
    };
    let cow = format!("cow_fork({WORKERS})");

    progress("W4b on 4 KiB pages: raw fork loop, minigun with huge_pages(Off)");
    let (raw4k, raw_sum) = raw_run(&heap, keys, items);
    assert_eq!(raw_sum, expect, "W4b raw: wrong sum");
    let (off, (_, sum, hp_off)) = minigun_run(&heap, keys, items, Some(HugePages::Off), same);
    assert_eq!(sum, expect, "W4b minigun: wrong sum");
    assert_eq!(hp_off.status, HugePagesStatus::Off);
    let base4k = row("baseline", "raw-fork-loop", "4 KiB pages", raw4k);
    let off_row =
        row("minigun", &cow, "huge_pages(Off), 4 KiB pages", off).floor(base4k.items_per_sec);

    progress("W4b minigun with its default (collapses the heap before its first fork)");
    let (first, (first_wall, sum, hp)) = minigun_run(&heap, keys, items, None, same);
    assert_eq!(sum, expect, "W4b minigun: wrong sum");
    progress(huge_note(&hp));
    let huge = smaps_field(me, "AnonHugePages").unwrap_or(0);
    let first_row = row("minigun", &cow, "default, first run (collapses)", first)
        .note(huge_note(&hp))
        .note(format!(
            "{:.0} items/s counting the collapse",
            items as f64 / first_wall.as_secs_f64()
        ));

    progress("W4b on the collapsed heap: raw fork loop and minigun, alternately");
    let ((raw_wall, raw_sum), (wall, (_, sum, hp_again))) = best_of_pair(
        cfg.reps,
        || raw_run(&heap, keys, items),
        || minigun_run(&heap, keys, items, None, same),
    );
    assert_eq!((raw_sum, sum), (expect, expect), "W4b: wrong sum");
    progress("W4b on the collapsed heap: raw fork loop and minigun with fork_server, alternately");
    let ((raw_served, raw_sum), (served, (_, sum, _))) = best_of_pair(
        cfg.reps,
        || raw_run(&heap, keys, items),
        || minigun_run(&heap, keys, items, None, with_server),
    );
    assert_eq!(
        (raw_sum, sum),
        (expect, expect),
        "W4b fork_server: wrong sum"
    );
    progress("W4b both again with the PSS sampler");
    let s = PssSampler::start(Duration::from_millis(20));
    let _ = raw_run(&heap, keys, items);
    let raw_pss = s.finish();
    let s = PssSampler::start(Duration::from_millis(20));
    let _ = minigun_run(&heap, keys, items, None, same);
    let pss = s.finish();

    let mut base = row(
        "baseline",
        "raw-fork-loop",
        "huge pages (collapsed)",
        raw_wall,
    );
    base.pss_bytes = (raw_pss.kept > 0).then_some(raw_pss.max);
    let mut ours = row("minigun", &cow, "default, heap collapsed", wall)
        .floor(base.items_per_sec)
        .note(info)
        .note(format!(
            "AnonHugePages {:.0} MiB after the first collapse; later runs: {}",
            mib(huge),
            huge_note(&hp_again)
        ));
    ours.pss_bytes = (pss.kept > 0).then_some(pss.max);
    let floor = items as f64 / raw_served.as_secs_f64();
    let served_row = row("minigun", &cow, "fork_server, heap collapsed", served)
        .floor(floor)
        .note(format!(
            "its raw fork loop in the same alternation: {floor:.0} items/s"
        ));
    progress("W4b on the collapsed heap: minigun with fork_server and items_per_fork_auto");
    let (shared, (_, sum, _)) = minigun_run(&heap, keys, items, None, with_server_auto);
    assert_eq!(sum, expect, "W4b items_per_fork_auto: wrong sum");
    let shared_row = row(
        "minigun",
        &cow,
        &format!("fork_server, items_per_fork_auto({AUTO_MAX}), heap collapsed"),
        shared,
    )
    .note("several items per child: not a per-item fork, so no ratio to the raw loop");
    vec![
        base4k, off_row, first_row, base, ours, served_row, shared_row,
    ]
}
