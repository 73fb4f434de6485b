//! Bad bytes on the wire are one item's error, never a corrupted stream, a panic or a hang:
//! a child writes garbage, an impossible length or half a frame into its own result pipe;
//! a value that cannot be serialised or is larger than the frame limit fails its item.
#![allow(unsafe_code)] // Writes raw bytes to the child's own pipe, and _exits.
mod common;
use minigun::{Exec, FailureKind, Output, Pipeline, RunReport};
use std::os::fd::RawFd;

/// In a child: the write end of its result pipe (the only write-only pipe it holds).
fn result_pipe() -> RawFd {
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let link = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fd > 2 && link.starts_with("pipe:") && flags & libc::O_ACCMODE == libc::O_WRONLY {
            return fd;
        }
    }
    panic!("no result pipe");
}

fn write_raw(bytes: &[u8]) {
    // SAFETY: writes a live buffer to a descriptor this process owns.
    unsafe { libc::write(result_pipe(), bytes.as_ptr().cast(), bytes.len()) };
}

fn run(exec: Exec, bad: u64, act: fn()) -> RunReport {
    let p = Pipeline::new("protocol");
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    p.processor("work", move |x: u64, out: &mut Output<'_, u64>| {
        if x == bad {
            act();
        }
        out.emit(x)?;
        Ok(())
    })
    .wire()
    .executor(exec);
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    assert!(common::live_children().is_empty() && common::zombies().is_empty());
    report
}

/// ipc_fork writing each item's results at once: a corrupt stream fails exactly the item whose
/// stage code wrote into it, and nothing else (the batched default is tested further down).
fn per_item() -> Exec {
    Exec::ipc_fork(2).batch_results(false)
}

fn one_failure(report: &RunReport, item: u64, kind: FailureKind) -> String {
    let work = report.stage("work").unwrap();
    assert_eq!((work.items_out, work.failed), (19, 1), "{report}");
    let f = &report.failures[0];
    assert_eq!((f.item, &f.kind), (Some(item), &kind), "{f:?}");
    f.message.clone()
}

fn garbage() {
    write_raw(&[0xff; 64]);
}

fn huge_length() {
    write_raw(&(u32::MAX - 1).to_le_bytes());
}

fn half_a_frame_then_exit() {
    write_raw(&[40, 0, 0, 0, 2, 7]);
    // SAFETY: ends the child at once, as a crash would, with exit status 0.
    unsafe { libc::_exit(0) };
}

/// A `result_done` frame (kind 8) for item 7 whose payload is too short to end in a latency.
fn result_done_without_latency() {
    let mut frame = 12u32.to_le_bytes().to_vec();
    frame.push(8);
    frame.extend_from_slice(&7u64.to_le_bytes());
    frame.extend_from_slice(&[1, 2, 3]);
    write_raw(&frame);
}

// A frame that decodes but makes no sense (too short, or of a kind this child never sends)
// is a protocol error of the item: the child's own frames for it, read in the same chunk,
// are not trusted after it.
#[test]
fn a_result_done_frame_too_short_for_its_latency_is_a_protocol_error() {
    let m = one_failure(
        &run(per_item(), 7, result_done_without_latency),
        7,
        FailureKind::Protocol,
    );
    assert!(m.contains("result_done frame without a latency"), "{m}");
    let m = one_failure(
        &run(Exec::cow_fork(2), 7, result_done_without_latency),
        7,
        FailureKind::Protocol,
    );
    assert!(m.contains("unexpected ResultDone frame"), "{m}");
}

/// A `results` frame (kind 15) for item 7 whose one answer (latency 5, then a 3-byte
/// output) is not a `u64`'s encoding.
fn results_that_do_not_decode() {
    let mut frame = 24u32.to_le_bytes().to_vec();
    frame.push(15);
    frame.extend_from_slice(&7u64.to_le_bytes());
    frame.extend_from_slice(&5u64.to_le_bytes());
    frame.extend_from_slice(&3u32.to_le_bytes());
    frame.extend_from_slice(&[0xff, 0xff, 0xff]);
    write_raw(&frame);
}

// A `results` frame (the answers of a run of items) that cannot be made out is a protocol
// error of the item it would answer; a cow child never sends one.
#[test]
fn a_results_frame_that_does_not_decode_is_a_protocol_error() {
    let m = one_failure(
        &run(per_item(), 7, results_that_do_not_decode),
        7,
        FailureKind::Protocol,
    );
    assert!(m.contains("cannot decode a result"), "{m}");
    let m = one_failure(
        &run(Exec::cow_fork(2), 7, results_that_do_not_decode),
        7,
        FailureKind::Protocol,
    );
    assert!(m.contains("unexpected Results frame"), "{m}");
}

#[test]
fn cow_fork_garbage_is_a_protocol_error_of_that_item() {
    let m = one_failure(
        &run(Exec::cow_fork(3), 3, garbage),
        3,
        FailureKind::Protocol,
    );
    assert!(m.contains("frame"), "{m}");
}

#[test]
fn ipc_fork_garbage_kills_only_that_worker() {
    let m = one_failure(&run(per_item(), 5, garbage), 5, FailureKind::Protocol);
    assert!(m.contains("frame"), "{m}");
}

#[test]
fn an_impossible_length_is_refused_not_allocated() {
    let m = one_failure(
        &run(Exec::cow_fork(2), 4, huge_length),
        4,
        FailureKind::Protocol,
    );
    assert!(m.contains("exceeds the maximum"), "{m}");
    let m = one_failure(&run(per_item(), 4, huge_length), 4, FailureKind::Protocol);
    assert!(m.contains("exceeds the maximum"), "{m}");
}

#[test]
fn half_a_frame_is_truncated() {
    let m = one_failure(
        &run(Exec::cow_fork(2), 6, half_a_frame_then_exit),
        6,
        FailureKind::Truncated,
    );
    assert!(m.contains("middle of a frame"), "{m}");
    let r = run(Exec::ipc_fork(2), 6, half_a_frame_then_exit);
    one_failure(&r, 6, FailureKind::Truncated);
}

/// A value whose serialisation fails.
#[derive(Clone, Debug)]
struct Unserialisable(u64);
impl serde::Serialize for Unserialisable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(format!(
            "value {} refuses to be serialised",
            self.0
        )))
    }
}
impl<'de> serde::Deserialize<'de> for Unserialisable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(Unserialisable)
    }
}

#[test]
fn an_unserialisable_output_fails_its_item() {
    for exec in [Exec::cow_fork(2), Exec::ipc_fork(2)] {
        let p = Pipeline::new("unserialisable");
        p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
        p.processor("work", |x: u64, out: &mut Output<'_, Unserialisable>| {
            // Item 7's output cannot be serialised; the others are plain numbers.
            if x == 7 {
                out.emit(Unserialisable(x))?;
            }
            Ok(())
        })
        .wire()
        .executor(exec);
        p.consumer("sink", |_x: Unserialisable| Ok(()));
        let report = p.run().unwrap();
        let f = &report.failures[0];
        assert_eq!(
            (report.failures_total, f.item, &f.kind),
            (1, Some(7), &FailureKind::Encode),
            "{report}"
        );
        // The message names the type and keeps the serialiser's own words.
        assert!(
            f.message.contains(
                "cannot serialise output: a fork_protocol::Unserialisable: \
                 value 7 refuses to be serialised"
            ),
            "{}",
            f.message
        );
    }
}

#[test]
fn an_unserialisable_ipc_input_fails_its_item() {
    let p = Pipeline::new("bad-input");
    p.producer("gen", |out| {
        out.emit_all((0..10u64).map(Unserialisable))
            .map_err(Into::into)
    });
    p.map("work", |x: Unserialisable| Ok(x.0)).ipc_fork(2);
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    assert_eq!(report.stage("work").unwrap().failed, 10);
    assert_eq!(report.failures[0].kind, FailureKind::Encode);
}

#[test]
fn an_output_over_the_frame_limit_fails_its_item() {
    for exec in [
        Exec::cow_fork(2).max_frame(4096),
        Exec::ipc_fork(2).max_frame(4096),
    ] {
        let p = Pipeline::new("oversized");
        p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
        p.map("work", |x: u64| {
            Ok(vec![0u8; if x == 2 { 10_000 } else { 100 }])
        })
        .wire()
        .executor(exec);
        p.consumer("sink", |_v: Vec<u8>| Ok(()));
        let report = p.run().unwrap();
        let f = &report.failures[0];
        assert_eq!(
            (report.failures_total, f.item, &f.kind),
            (1, Some(2), &FailureKind::Encode),
            "{report}"
        );
        assert!(f.message.contains("exceeds the maximum"), "{}", f.message);
        assert_eq!(report.stage("work").unwrap().items_out, 9);
    }
}

// An item's only result and its `done` travel as one frame when both fit the frame limit,
// as two when only the result does, and in a batched worker's `results` frame when its
// answer fits one: results right at each limit arrive whole either way.
#[test]
fn results_at_the_frame_limit_arrive_whole() {
    const MAX: usize = 4096;
    // A frame's length field counts kind + id (9) + payload, and a Vec<u8> is its bytes: a
    // `result` frame of n bytes is at the limit for n = MAX - 9, a `result_done` (8 bytes of
    // latency more) for n = MAX - 17, a `results` frame of one answer (12 bytes before it)
    // for n = MAX - 21.
    let sizes: Vec<usize> = (0..24).map(|k| MAX - 9 - k).collect();
    for exec in [
        Exec::ipc_fork(2).max_frame(MAX),
        Exec::ipc_fork(2).max_frame(MAX).batch_results(false),
    ] {
        let p = Pipeline::new("at-the-limit");
        let s = sizes.clone();
        p.producer("gen", move |out| {
            out.emit_all(s.clone()).map_err(Into::into)
        });
        p.map("work", |n: usize| Ok(vec![n as u8; n]))
            .wire()
            .executor(exec);
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        p.consumer("sink", move |v: Vec<u8>| {
            g.lock().unwrap().push(v);
            Ok(())
        });
        let report = p.run().unwrap();
        assert_eq!(report.failures_total, 0, "{report}");
        let mut got = std::mem::take(&mut *got.lock().unwrap());
        got.sort_by_key(Vec::len);
        let mut want: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![n as u8; n]).collect();
        want.sort_by_key(Vec::len);
        assert!(got == want, "results differ from what the stage returned");
    }
}

#[test]
fn an_ipc_input_over_the_frame_limit_fails_its_item() {
    let p = Pipeline::new("oversized-input");
    p.producer("gen", |out| {
        out.emit_all((0..5u64).map(|x| vec![x as u8; if x == 1 { 10_000 } else { 10 }]))
            .map_err(Into::into)
    });
    p.map("work", |v: Vec<u8>| Ok(v.len() as u64))
        .wire()
        .executor(Exec::ipc_fork(2).max_frame(4096));
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    let f = &report.failures[0];
    assert_eq!(
        (report.failures_total, f.item, &f.kind),
        (1, Some(1), &FailureKind::Encode),
        "{report}"
    );
    assert!(
        f.message.contains("exceeds the maximum frame size"),
        "{}",
        f.message
    );
}

// With batched results (the default), a worker's finished items can wait in shared memory when stage code
// corrupts the stream. A corrupt stream is a stage error; the worker's items run again on a
// replacement that writes each item's results before the next, where the repeat fails
// exactly the item that does it. Every other item arrives exactly once.
#[test]
fn batched_results_corruption_fails_the_writer_and_loses_nothing() {
    for (act, kind) in [
        (garbage as fn(), FailureKind::Protocol),
        (huge_length, FailureKind::Protocol),
        (half_a_frame_then_exit, FailureKind::Truncated),
    ] {
        let r = run(Exec::ipc_fork(2), 7, act);
        let work = r.stage("work").unwrap();
        assert_eq!((work.items_out, work.failed), (19, 1), "{r}");
        let items: Vec<_> = r.failures.iter().filter(|f| f.item.is_some()).collect();
        assert_eq!(items.len(), 1, "{r}");
        assert_eq!(
            (items[0].item, &items[0].kind),
            (Some(7), &kind),
            "{:?}",
            items[0]
        );
        let errors = work.errors;
        match kind {
            FailureKind::Protocol => assert!(errors >= 1, "the corrupt stream is reported: {r}"),
            _ => assert_eq!(errors, 0, "{r}"),
        }
    }
}

// With batched results, an item that had results delivered before it corrupted the stream
// (its own writes mid-item) fails once and is not run again: none of its results arrive twice.
#[test]
fn batched_results_partial_item_then_corruption_is_not_duplicated() {
    let p = Pipeline::new("partial");
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
        if x == 7 {
            // Far more than one buffer of results: some leave while the item runs.
            for k in 0..20_000u64 {
                out.emit(1_000_000 + k)?;
            }
            garbage();
        }
        out.emit(x)?;
        Ok(())
    })
    .wire()
    .executor(Exec::ipc_fork(2));
    let got = common::Sink::default();
    let g = got.clone();
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let r = p.run().unwrap();
    let items: Vec<_> = r.failures.iter().filter(|f| f.item.is_some()).collect();
    assert_eq!(items.len(), 1, "{r}");
    assert_eq!(
        (items[0].item, &items[0].kind),
        (Some(7), &FailureKind::Protocol),
        "{r}"
    );
    let got = got.sorted();
    let twice = got.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(
        twice,
        0,
        "results arrived twice ({} results in all)",
        got.len()
    );
    let plain: Vec<u64> = got.iter().copied().filter(|&x| x < 1_000_000).collect();
    let expected: Vec<u64> = (0..20).filter(|&x| x != 7).collect();
    assert_eq!(plain, expected, "every other item exactly once");
    assert!(common::live_children().is_empty() && common::zombies().is_empty());
}

// After a corrupt batched stream, the item that corrupted it runs again only on a worker
// that writes each item's results at once: the other batched workers get no more items and
// are replaced once they have answered theirs. So it runs exactly twice and the corrupt
// stream is one stage error, not one per batched worker it lands on. Items the corrupt worker
// finished after the garbage lost their results in it and run again; nothing arrives twice.
#[test]
fn a_corrupt_batched_stream_reruns_only_on_workers_that_write_per_item() {
    let events = common::capture_events(tracing::Level::DEBUG);
    let n = 200u64;
    let bad = 57u64;
    let runs = common::TempDir::new("corrupt-rerun");
    let dir = runs.path().to_path_buf();
    let p = Pipeline::new("corrupt-rerun");
    common::gen(&p, n);
    p.processor("work", move |x: u64, out: &mut Output<'_, u64>| {
        // Long items now and then, so the parent also takes results from busy workers (the
        // others stay fast: their results wait in the log).
        if x % 10 == 7 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if x == bad {
            std::fs::write(dir.join(format!("{x}-{}", std::process::id())), b"")?;
            garbage();
        }
        out.emit(x)?;
        Ok(())
    })
    .wire()
    .executor(Exec::ipc_fork(2));
    let got: common::Sink<u64> = common::Sink::default();
    got.consume(&p);
    let r = p.run().unwrap();
    let work = r.stage("work").unwrap();
    assert_eq!(
        (work.items_out, work.failed, work.errors),
        (n - 1, 1, 1),
        "{r}"
    );
    let items: Vec<_> = r.failures.iter().filter(|f| f.item.is_some()).collect();
    assert_eq!(
        (items[0].item, &items[0].kind),
        (Some(bad), &FailureKind::Protocol)
    );
    let want: Vec<u64> = (0..n).filter(|&x| x != bad).collect();
    assert_eq!(got.sorted(), want, "every other item arrives exactly once");
    let bad_runs = std::fs::read_dir(runs.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with(&format!("{bad}-"))
        })
        .count();
    assert_eq!(
        bad_runs, 2,
        "the corrupting item runs once more, on a per-item worker"
    );
    assert!(
        events.count(common::TOOK_FROM_BUSY_WORKER) > 0,
        "the parent never took results from a busy worker"
    );
    assert!(common::live_children().is_empty() && common::zombies().is_empty());
}
