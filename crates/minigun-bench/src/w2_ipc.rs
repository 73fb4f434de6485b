//! W2 IPC throughput: many small u64 items, f(x) = 2x on persistent ipc_fork workers, against
//! raw pipes to forked echo workers that move 4096 u64 per write.

use crate::common::{best_of, best_of_pair, progress, timed, Cfg, Row};
use crate::raw::{self, Workers};
use minigun::{Exec, Pipeline};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// u64 per write in the raw baseline.
const BATCH: usize = 4096;

/// minigun's default per-worker window: chosen by the executor (`Some(most)`), or fixed.
pub(crate) fn default_in_flight() -> (bool, usize) {
    match Exec::ipc_fork(1) {
        Exec::IpcFork(o) => (o.in_flight_auto, o.in_flight),
        _ => (false, 1),
    }
}

/// How the map stage runs.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// ipc_fork with the default window.
    Default,
    /// ipc_fork with this window.
    InFlight(usize),
    /// ipc_fork with one write per item's results (`batch_results(false)`), default window.
    PerItem,
    /// No fork at all: the cost of the in-process part of the same pipeline.
    Inline,
}

/// Items per chunk when the pipeline batches explicitly before the ipc stage.
const CHUNK: usize = 1000;

/// The same work with the items grouped by an accumulator: the ipc stage maps chunks of
/// `CHUNK` items and a processor flattens them again (what a user does for tiny items).
fn chunked_run(items: u64, workers: usize) -> (Duration, u64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new("w2-chunked");
    p.producer("gen", move |out| {
        for i in 0..items {
            out.emit(i)?;
        }
        Ok(())
    });
    p.batch::<u64>("chunk", CHUNK);
    p.map("double", |xs: Vec<u64>| {
        Ok(xs.into_iter().map(|x| x * 2).collect::<Vec<u64>>())
    })
    .ipc_fork(workers);
    p.processor(
        "flatten",
        |xs: Vec<u64>, out: &mut minigun::Output<'_, u64>| {
            out.emit_all(xs)?;
            Ok(())
        },
    );
    p.consumer("sink", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W2 chunked pipeline runs"));
    assert_eq!(report.consumed, items, "W2 chunked: every item consumed");
    (wall, sum.load(Ordering::Relaxed))
}

fn minigun_run(items: u64, workers: usize, mode: Mode) -> (Duration, u64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new("w2");
    p.producer("gen", move |out| {
        for i in 0..items {
            out.emit(i)?;
        }
        Ok(())
    });
    let m = p.map("double", |x: u64| Ok(x * 2));
    match mode {
        Mode::Default => m.ipc_fork(workers).stage(),
        Mode::InFlight(k) => m.ipc_fork(workers).in_flight(k).stage(),
        Mode::PerItem => m.ipc_fork(workers).batch_results(false).stage(),
        Mode::Inline => m.executor(Exec::inline()),
    };
    p.consumer("sink", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W2 pipeline runs"));
    assert_eq!(report.consumed, items, "W2: every item consumed");
    (wall, sum.load(Ordering::Relaxed))
}

/// The echo worker: reads u64s, writes 2x back, batch by batch.
fn echo_worker(input: i32, output: i32) -> i32 {
    let mut buf = [0u8; BATCH * 8];
    let mut have = 0usize;
    loop {
        let n = match raw::read_some(input, &mut buf[have..]) {
            Ok(0) => return 0,
            Ok(n) => n,
            Err(_) => return 1,
        };
        have += n;
        let whole = have / 8 * 8;
        for c in buf[..whole].chunks_exact_mut(8) {
            let x = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            c.copy_from_slice(&(x * 2).to_le_bytes());
        }
        if raw::write_all(output, &buf[..whole]).is_err() {
            return 1;
        }
        buf.copy_within(whole..have, 0);
        have -= whole;
    }
}

pub(crate) fn raw_run(items: u64, workers: usize) -> (Duration, u64) {
    let t0 = Instant::now();
    let w = Workers::spawn(workers, echo_worker).expect("fork echo workers");
    let inputs = w.inputs.clone();
    let sum = std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; BATCH * 8];
            let mut next = 0u64;
            let mut k = 0usize;
            while next < items {
                let n = (items - next).min(BATCH as u64) as usize;
                for (j, c) in buf[..n * 8].chunks_exact_mut(8).enumerate() {
                    c.copy_from_slice(&(next + j as u64).to_le_bytes());
                }
                raw::write_all(inputs[k], &buf[..n * 8]).expect("write to an echo worker");
                next += n as u64;
                k = (k + 1) % inputs.len();
            }
            for &fd in &inputs {
                raw::close(fd);
            }
        });
        w.sum_u64s(BATCH * 8 * 4).expect("read echo results")
    });
    (t0.elapsed(), sum)
}

/// Round trips of one item at a time through ipc_fork(2) (the producer emits the next item
/// only once the consumer has the last): each round trip's time, sorted.
fn lone_items_minigun(items: u64) -> Vec<Duration> {
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let rx = std::sync::Mutex::new(rx);
    let times = Arc::new(std::sync::Mutex::new(Vec::with_capacity(items as usize)));
    let t = times.clone();
    let p = Pipeline::new("w2-lone");
    p.producer("gen", move |out| {
        let rx = rx.lock().expect("one producer");
        let mut times = t.lock().expect("one producer");
        for i in 0..items {
            let t0 = Instant::now();
            out.emit(i)?;
            let got = rx.recv().map_err(|e| e.to_string())?;
            times.push(t0.elapsed());
            assert_eq!(got, i * 2, "W2 lone items: wrong result");
        }
        Ok(())
    });
    p.map("double", |x: u64| Ok(x * 2)).ipc_fork(2).stage();
    p.consumer("sink", move |x: u64| {
        tx.send(x).map_err(|e| e.to_string())?;
        Ok(())
    });
    p.run().expect("W2 lone items run");
    let mut times = std::mem::take(&mut *times.lock().expect("the run ended"));
    times.sort_unstable();
    times
}

/// The same round trips through a raw pipe to a forked echo worker: each round trip's time,
/// sorted.
fn lone_items_raw(items: u64) -> Vec<Duration> {
    let w = Workers::spawn(1, echo_worker).expect("fork an echo worker");
    let mut times = Vec::with_capacity(items as usize);
    let mut buf = [0u8; 8];
    for i in 0..items {
        let t0 = Instant::now();
        raw::write_all(w.inputs[0], &i.to_le_bytes()).expect("write to the echo worker");
        raw::read_full(w.outputs[0], &mut buf).expect("read the echo");
        times.push(t0.elapsed());
        assert_eq!(
            u64::from_le_bytes(buf),
            i * 2,
            "W2 raw lone items: wrong echo"
        );
    }
    raw::close(w.inputs[0]);
    w.drain(64, |_, _| {}).expect("reap the echo worker");
    times.sort_unstable();
    times
}

/// The median and 99th percentile of sorted round trips, in ms.
fn percentiles(times: &[Duration]) -> (f64, f64) {
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// One item in flight at a time: its round trip through ipc_fork(2) against a raw pipe.
fn lone_rows(cfg: &Cfg) -> Vec<Row> {
    let items: u64 = cfg.size(5_000, 500);
    progress(format!(
        "W2 one item at a time ({items} round trips), raw pipe and ipc_fork(2)"
    ));
    let raw = lone_items_raw(items);
    let ours = lone_items_minigun(items);
    let row = |runner: &str, executor: &str, times: &[Duration]| {
        let wall = times.iter().sum();
        let mut r = Row::new("W2", runner, executor, 1, items, wall).variant("one item at a time");
        (r.p50_ms, r.p99_ms) = {
            let (p50, p99) = percentiles(times);
            (Some(p50), Some(p99))
        };
        r
    };
    let base = row("baseline", "raw-pipe", &raw);
    let (raw_p50, _) = percentiles(&raw);
    let (p50, p99) = percentiles(&ours);
    let mine = row("minigun", "ipc_fork(2)", &ours)
        .floor(base.items_per_sec)
        .note(format!(
            "round trip p50 {:.1} us (raw pipe {:.1} us), p99 {:.1} us",
            p50 * 1e3,
            raw_p50 * 1e3,
            p99 * 1e3
        ));
    vec![base, mine]
}

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let items: u64 = cfg.size(1_000_000, 200_000);
    let expect = items * (items - 1);
    let (auto, most) = default_in_flight();
    let default = match auto {
        true => format!("auto, at most {most}"),
        false => most.to_string(),
    };
    let sweep: Vec<usize> = if cfg.quick {
        vec![64, 1024]
    } else {
        vec![16, 64, 256, 1024, 4096]
    };
    let mut rows = Vec::new();
    for workers in [2usize, 4] {
        progress(format!(
            "W2 raw echo pipes and minigun ipc_fork({workers}) with the default \
             in_flight={default}, alternately"
        ));
        let ((raw_wall, raw_sum), (wall, sum)) = best_of_pair(
            cfg.reps,
            || raw_run(items, workers),
            || minigun_run(items, workers, Mode::Default),
        );
        assert_eq!(raw_sum, expect, "W2 raw: wrong sum");
        assert_eq!(sum, expect, "W2 minigun: wrong sum");
        let base = Row::new("W2", "baseline", "raw-pipes", workers, items, raw_wall)
            .variant(format!("{BATCH} u64 per write"));
        let floor = base.items_per_sec;
        rows.push(base);

        let mut results = Vec::new();
        for &k in &sweep {
            progress(format!("W2 minigun ipc_fork({workers}), in_flight={k}"));
            let (wall, sum) = minigun_run(items, workers, Mode::InFlight(k));
            assert_eq!(sum, expect, "W2 minigun: wrong sum");
            results.push((k, wall));
        }
        let rate = |w: &Duration| format!("{:.0}/s", items as f64 / w.as_secs_f64());
        let sweep_note = std::iter::once(format!("default ({default}):{}", rate(&wall)))
            .chain(results.iter().map(|(k, w)| format!("{k}:{}", rate(w))))
            .collect::<Vec<_>>()
            .join(" ");
        let (best_k, _) = *results
            .iter()
            .min_by_key(|(_, w)| *w)
            .expect("at least one result");
        // Re-measure the best window (best of reps) so it is not a one-off.
        let (best_wall, sum) = best_of(cfg.reps, || {
            minigun_run(items, workers, Mode::InFlight(best_k))
        });
        assert_eq!(sum, expect, "W2 minigun: wrong sum");
        let ours = |wall: Duration, variant: &str, in_flight: Option<usize>| {
            let mut r = Row::new(
                "W2",
                "minigun",
                format!("ipc_fork({workers})"),
                workers,
                items,
                wall,
            )
            .variant(variant)
            .floor(floor);
            r.in_flight = in_flight;
            r
        };
        let fixed = (!auto).then_some(most);
        rows.push(ours(wall, &format!("default in_flight ({default})"), fixed));
        rows.push(
            ours(best_wall, "best fixed in_flight", Some(best_k))
                .note(format!("in_flight sweep (single runs): {sweep_note}")),
        );
        progress(format!(
            "W2 minigun ipc_fork({workers}) with batch_results(false)"
        ));
        let (wall, sum) = best_of(cfg.reps, || minigun_run(items, workers, Mode::PerItem));
        assert_eq!(sum, expect, "W2 minigun batched: wrong sum");
        rows.push(ours(wall, "results per item", fixed));
        progress(format!(
            "W2 minigun ipc_fork({workers}) on chunks of {CHUNK} (accumulator before it)"
        ));
        let (wall, sum) = best_of(cfg.reps, || chunked_run(items, workers));
        assert_eq!(sum, expect, "W2 minigun chunked: wrong sum");
        rows.push(ours(wall, &format!("chunks of {CHUNK} items"), fixed));
    }
    rows.extend(lone_rows(cfg));
    progress("W2 minigun, same pipeline with the map inline (no fork, no IPC)");
    let (wall, sum) = best_of(cfg.reps, || minigun_run(items, 1, Mode::Inline));
    assert_eq!(sum, expect, "W2 minigun inline: wrong sum");
    rows.push(
        Row::new("W2", "minigun", "inline", 1, items, wall)
            .variant("no fork: in-process part only")
            .note(
                "the same 3-stage pipeline with the map inline: an upper bound for the \
                 ipc_fork rows, whose items take the same queue hops plus feeder, supervisor \
                 and pipes",
            ),
    );
    rows
}
