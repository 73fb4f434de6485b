//! W5 CPU-bound: items of ~5 ms of pure CPU (a calibrated spin loop) on ipc_fork(2).
//! Floor: the ideal rate, workers / 5 ms. For context, a raw row runs the same spins in two
//! forked processes that split the items statically (no IPC at all).

use crate::common::{progress, timed, Cfg, Row};
use crate::raw;
use minigun::Pipeline;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET: Duration = Duration::from_millis(5);
const WORKERS: usize = 2;

/// `iters` dependent steps of xor-shift then wrapping multiplication (a chain the compiler
/// can neither vectorise nor fold, unlike a plain affine `x * a + c`).
#[inline(never)]
pub(crate) fn spin(seed: u64, iters: u64) -> u64 {
    let mut x = black_box(seed) | 1;
    for _ in 0..black_box(iters) {
        x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    black_box(x)
}

/// Iterations that take `TARGET`, and the measured time of one call with them.
fn calibrate() -> (u64, Duration) {
    // The fastest of several runs is the time on an undisturbed CPU (load from elsewhere on
    // the machine then counts against the measured run, not in favour of it).
    let measure = |iters: u64| {
        (0..7)
            .map(|i| timed(|| spin(i, iters)).0)
            .min()
            .expect("seven runs")
    };
    let mut iters = 1_000_000u64;
    let mut t = measure(iters);
    // Rescale until one call is within 1% of the target.
    for _ in 0..10 {
        let err = t.as_secs_f64() / TARGET.as_secs_f64();
        if (err - 1.0).abs() < 0.01 {
            break;
        }
        iters = ((iters as f64 / err) as u64).max(1);
        t = measure(iters);
    }
    (iters, t)
}

fn minigun_run(items: u64, iters: u64) -> (Duration, f64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new("w5");
    p.producer("gen", move |out| {
        for i in 0..items {
            out.emit(i)?;
        }
        Ok(())
    });
    p.map("spin", move |x: u64| Ok(spin(x, iters)))
        .ipc_fork(WORKERS);
    p.consumer("sink", move |x: u64| {
        s.fetch_xor(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W5 pipeline runs"));
    assert_eq!(report.consumed, items, "W5: every item consumed");
    let mean_us = report
        .stage("spin")
        .map(|s| s.latency.mean_us)
        .unwrap_or(0.0);
    (wall, mean_us)
}

/// Two forked processes, each spinning its half of the items; no IPC.
fn raw_run(items: u64, iters: u64) -> Duration {
    let t0 = Instant::now();
    let pids: Vec<_> = (0..WORKERS as u64)
        .map(|w| {
            raw::fork(|| {
                let mut x = 0;
                for i in (w..items).step_by(WORKERS) {
                    x ^= spin(i, iters);
                }
                black_box(x);
                0
            })
            .expect("fork a spinner")
        })
        .collect();
    for pid in pids {
        raw::wait(pid).expect("spinner exits 0");
    }
    t0.elapsed()
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let items: u64 = cfg.size(2_000, 100);
    progress("W5 calibrating the 5 ms spin");
    let (iters, one) = calibrate();
    let calib = format!(
        "spin calibrated to {iters} iterations = {:.3} ms alone",
        one.as_secs_f64() * 1e3
    );
    progress(&calib);
    // Ideal rate: every worker busy all the time with items of the calibrated length.
    let ideal = WORKERS as f64 / one.as_secs_f64();

    progress("W5 raw: two forked spinners, static split");
    let raw_wall = raw_run(items, iters);
    progress(format!("W5 minigun ipc_fork({WORKERS})"));
    let (wall, mean_us) = minigun_run(items, iters);

    let base = Row::new(
        "W5",
        "baseline",
        "raw-fork-static",
        WORKERS,
        items,
        raw_wall,
    )
    .variant("no IPC, items split in halves")
    .floor(ideal)
    .note(calib.clone());
    let ours = Row::new(
        "W5",
        "minigun",
        format!("ipc_fork({WORKERS})"),
        WORKERS,
        items,
        wall,
    )
    .variant("5 ms spin per item")
    .floor(ideal)
    .note(format!(
        "floor = ideal: {WORKERS} workers / calibrated item time; wall = {:.3}x ideal; \
         {:.3}x the raw no-IPC spinners' rate; mean per-item time in the workers {:.3} ms; \
         {calib}",
        ideal / (items as f64 / wall.as_secs_f64()),
        raw_wall.as_secs_f64() / wall.as_secs_f64(),
        mean_us / 1e3
    ));
    vec![base, ours]
}
