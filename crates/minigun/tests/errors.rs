//! Error policies under every executor: skip, fail fast, retry, dead letter; panics; failing
//! producers; failing stage hooks.
mod common;
use common::{Ex, Sink};
use minigun::{Failed, FailureKind, ItemFailure, OnError, Output, Pipeline, RunError, RunReport};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A producer that emits 0, 1, 2, ... until the run stops it (emit returns an error). As a
/// safety net against a hang it gives up after 20 s and sets `gave_up`, which tests assert
/// is false.
fn endless(
    gave_up: Arc<AtomicBool>,
) -> impl FnOnce(&mut Output<'_, u64>) -> minigun::StageResult + Send + 'static {
    move |out| {
        let t0 = Instant::now();
        let mut i = 0u64;
        loop {
            if t0.elapsed() > Duration::from_secs(20) {
                gave_up.store(true, Ordering::SeqCst);
                return Ok(());
            }
            out.emit(i)?;
            i += 1;
        }
    }
}

fn numbers(n: u64) -> impl FnOnce(&mut Output<'_, u64>) -> minigun::StageResult + Send + 'static {
    move |out| {
        for i in 0..n {
            out.emit(i)?;
        }
        Ok(())
    }
}

/// Whether the executor processes items in forked children.
fn forks(ex: Ex) -> bool {
    matches!(ex, Ex::Cow | Ex::Ipc)
}

/// Checks the index a failure reports for the item whose value is `value`, when the stage
/// received the items `0..` in order. Under `threads(n)` the index is taken by whichever worker
/// counts first, so it may be off by up to the number of workers.
fn assert_index(ex: Ex, f: &ItemFailure, value: u64) {
    if ex == Ex::Threads {
        assert!(
            f.item.is_some_and(|i| i.abs_diff(value) < 4),
            "index {:?} for item {value}",
            f.item
        );
    } else {
        assert_eq!(f.item, Some(value), "{f:?}");
    }
}

/// Checks the failure's process: a forked child for fork executors, none otherwise.
fn assert_pid(ex: Ex, f: &ItemFailure) {
    if forks(ex) {
        let pid = f.pid.unwrap_or_else(|| panic!("no pid in {f:?}"));
        assert_ne!(pid, std::process::id(), "{f:?}");
    } else {
        assert_eq!(f.pid, None, "{f:?}");
    }
}

/// Per-item attempt counters that work across processes: one file per item in a fresh temp
/// directory, one byte appended per attempt (O_APPEND writes of one byte are atomic).
#[derive(Clone)]
struct Attempts {
    dir: PathBuf,
}

impl Attempts {
    fn new(tag: &str) -> (Self, DirGuard) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "minigun-errors-{}-{tag}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (Attempts { dir: dir.clone() }, DirGuard(dir))
    }

    /// Records one attempt at `item`; returns how many attempts there have been, this one
    /// included.
    fn bump(&self, item: u64) -> u64 {
        use std::io::Write;
        let path = self.dir.join(item.to_string());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open attempt counter");
        f.write_all(b"x").expect("count attempt");
        drop(f);
        std::fs::metadata(&path).unwrap().len()
    }

    fn count(&self, item: u64) -> u64 {
        std::fs::metadata(self.dir.join(item.to_string()))
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `p` in the background and waits for it to end; a run still going after 60 s is a hang
/// and fails the test (instead of blocking it forever).
fn run_or_hang(p: Pipeline) -> Result<RunReport, RunError> {
    let handle = p.spawn().expect("valid definition");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handle.is_finished() {
        assert!(Instant::now() < deadline, "the run hangs");
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.wait()
}

/// Every item a 1:1 stage received (`items_in`, which counts cancelled items too) was emitted,
/// failed or cancelled, and it received `received` items.
fn assert_accounted(report: &RunReport, stage: &str, received: u64) {
    let st = report.stage(stage).unwrap();
    assert_eq!(
        st.items_in, received,
        "{stage} did not receive every item sent to it\n{report}"
    );
    assert_eq!(
        st.items_out + st.failed + st.cancelled,
        st.items_in,
        "{stage}: items unaccounted for: {st:?}\n{report}"
    );
}

fn aborted(r: Result<RunReport, RunError>) -> (ItemFailure, RunReport) {
    match r {
        Err(RunError::Aborted { cause, report }) => (cause, *report),
        Ok(report) => panic!("expected an aborted run, got a report:\n{report}"),
        Err(other) => panic!("expected an aborted run, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// skip

matrix!(fn skip_records_failures_and_goes_on(ex) {
    let p = Pipeline::new("skip");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(20));
    let m = p
        .map("check", |x: u64| {
            if x % 5 == 3 {
                return Err(format!("bad item {x}").into());
            }
            Ok(x * 10)
        })
        .on_error(OnError::skip());
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    let bad = [3u64, 8, 13, 18];
    let expected: Vec<u64> = (0..20).filter(|x| !bad.contains(x)).map(|x| x * 10).collect();
    assert_eq!(got.sorted(), expected);
    let st = report.stage("check").unwrap();
    assert_eq!(st.items_in, 20);
    assert_eq!(st.items_out, 16);
    assert_eq!(st.failed, 4);
    assert_eq!(st.retried, 0);
    assert_eq!(st.cancelled, 0);
    assert_eq!(report.failures_total, 4);
    assert_eq!(report.failures.len(), 4);
    assert!(!report.stopped);
    let mut failures = report.failures.clone();
    failures.sort_by_key(|f| f.message.clone());
    let mut expected_msgs: Vec<String> = bad.iter().map(|x| format!("bad item {x}")).collect();
    expected_msgs.sort();
    for (f, msg) in failures.iter().zip(&expected_msgs) {
        assert_eq!(f.stage, "check");
        assert_eq!(f.kind, FailureKind::Error);
        assert_eq!(f.attempt, 1);
        assert!(f.message.contains(msg.as_str()), "{f:?} should say {msg}");
        let value: u64 = msg.rsplit(' ').next().unwrap().parse().unwrap();
        assert_index(ex, f, value);
        assert_pid(ex, f);
    }
});

// ---------------------------------------------------------------------------------------------
// fail fast

matrix!(fn fail_fast_aborts_and_accounts_for_every_item(ex) {
    let p = Pipeline::new("fail-fast");
    let gave_up = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    p.producer("src", endless(gave_up.clone()));
    let m = p
        .map("boom", |x: u64| {
            if x == 10 {
                return Err(format!("boom at {x}").into());
            }
            Ok(x)
        })
        .on_error(OnError::fail_fast());
    ex.apply(&m);
    p.consumer("sink", move |_: u64| {
        s.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let (cause, report) = aborted(run_or_hang(p));
    assert!(!gave_up.load(Ordering::SeqCst), "the producer was never stopped");
    assert_eq!(cause.stage, "boom");
    assert_eq!(cause.kind, FailureKind::Error);
    assert!(cause.message.contains("boom at 10"), "{cause:?}");
    assert_index(ex, &cause, 10);
    assert!(report.stopped);
    assert!(report.failures.contains(&cause), "{:?}", report.failures);

    let boom = report.stage("boom").unwrap();
    let sink = report.stage("sink").unwrap();
    assert_eq!(boom.failed, 1);
    assert!(boom.items_in >= 11, "item 10 was received: {boom:?}");
    assert_accounted(&report, "boom", report.produced);
    // The consumer received everything `boom` emitted, and handled or cancelled each item.
    assert_eq!(sink.items_in, boom.items_out, "{report}");
    assert_eq!(seen.load(Ordering::SeqCst) + sink.cancelled, sink.items_in, "{report}");
});

matrix!(fn fail_fast_after_retries(ex) {
    let p = Pipeline::new("retry-then-fail-fast");
    let gave_up = Arc::new(AtomicBool::new(false));
    p.producer("src", endless(gave_up.clone()));
    let m = p
        .map("boom", |x: u64| {
            if x == 4 {
                return Err(format!("still failing {x}").into());
            }
            Ok(x)
        })
        .on_error(OnError::retry(2).then_fail_fast());
    ex.apply(&m);
    p.consumer("sink", |_: u64| Ok(()));
    let (cause, report) = aborted(run_or_hang(p));
    assert!(!gave_up.load(Ordering::SeqCst), "the producer was never stopped");
    assert_eq!(cause.stage, "boom");
    assert_eq!(cause.attempt, 3);
    assert!(cause.message.contains("still failing 4"), "{cause:?}");
    let boom = report.stage("boom").unwrap();
    assert_eq!(boom.retried, 2);
    assert_eq!(boom.failed, 1);
    assert_accounted(&report, "boom", report.produced);
});

// ---------------------------------------------------------------------------------------------
// retry

matrix!(fn retry_until_success(ex) {
    let (attempts, _guard) = Attempts::new(&format!("until-success-{ex:?}"));
    let a = attempts.clone();
    let p = Pipeline::new("retry");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(12));
    let m = p
        .map("flaky", move |x: u64| {
            let n = a.bump(x);
            if x == 5 && n <= 2 {
                return Err(format!("flaky {x} attempt {n}").into());
            }
            Ok(x)
        })
        .on_error(OnError::retry(3));
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), (0..12).collect::<Vec<u64>>());
    let st = report.stage("flaky").unwrap();
    assert_eq!(st.retried, 2, "{st:?}");
    assert_eq!(st.failed, 0, "{st:?}");
    assert_eq!(st.items_in, 12);
    assert_eq!(st.items_out, 12);
    assert_eq!(report.failures_total, 0);
    assert!(report.failures.is_empty());
    assert_eq!(attempts.count(5), 3);
    for x in (0..12).filter(|&x| x != 5) {
        assert_eq!(attempts.count(x), 1, "item {x}");
    }
});

matrix!(fn retry_exhausted(ex) {
    const N: u32 = 3;
    let (attempts, _guard) = Attempts::new(&format!("exhausted-{ex:?}"));
    let a = attempts.clone();
    let p = Pipeline::new("retry-exhausted");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(10));
    let m = p
        .map("hopeless", move |x: u64| {
            let n = a.bump(x);
            if x == 7 {
                return Err(format!("always {x} (attempt {n})").into());
            }
            Ok(x)
        })
        .on_error(OnError::retry(N).backoff(Duration::from_millis(2)));
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    let expected: Vec<u64> = (0..10).filter(|&x| x != 7).collect();
    assert_eq!(got.sorted(), expected);
    let st = report.stage("hopeless").unwrap();
    assert_eq!(st.retried, u64::from(N), "{st:?}");
    assert_eq!(st.failed, 1, "{st:?}");
    assert_eq!(st.items_in, 10);
    assert_eq!(attempts.count(7), u64::from(N) + 1);
    assert_eq!(report.failures.len(), 1);
    let f = &report.failures[0];
    assert_eq!(f.stage, "hopeless");
    assert_eq!(f.attempt, N + 1);
    assert_eq!(f.kind, FailureKind::Error);
    assert!(f.message.contains("always 7 (attempt 4)"), "{f:?}");
    assert_index(ex, f, 7);
    assert_pid(ex, f);
});

matrix_local!(fn retry_counts_with_in_process_state(ex) {
    // The same counts with a plain shared counter (in-process executors only).
    let tries = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<u64, u32>::new()));
    let t = tries.clone();
    let p = Pipeline::new("retry-local");
    p.producer("src", numbers(30));
    let m = p
        .map("flaky", move |x: u64| {
            let n = {
                let mut map = t.lock().unwrap();
                let n = map.entry(x).or_insert(0);
                *n += 1;
                *n
            };
            match x {
                2 | 17 if n <= 2 => Err(format!("transient {x}").into()),
                9 => Err("permanent".into()),
                _ => Ok(x),
            }
        })
        .on_error(OnError::retry(3));
    ex.apply_local(&m);
    p.consumer("sink", |_: u64| Ok(()));
    let report = p.run().unwrap();
    let st = report.stage("flaky").unwrap();
    // 2 retries for each of the two transient items, 3 for the permanent one.
    assert_eq!(st.retried, 2 + 2 + 3);
    assert_eq!(st.failed, 1);
    assert_eq!(st.items_out, 29);
    let tries = tries.lock().unwrap();
    assert_eq!(tries[&2], 3);
    assert_eq!(tries[&17], 3);
    assert_eq!(tries[&9], 4);
    assert_eq!(tries.values().sum::<u32>(), 27 + 3 + 3 + 4);
});

// ---------------------------------------------------------------------------------------------
// dead letter

/// What a dead-letter consumer saw of one failed item.
type Letter = (u64, String, String, u32, String);

fn letter(f: Failed<u64>) -> Letter {
    (
        f.item,
        f.failure.message,
        f.failure.stage,
        f.failure.attempt,
        f.failure.kind.to_string(),
    )
}

matrix!(fn dead_letter_receives_exactly_the_failed_items(ex) {
    let p = Pipeline::new("dead-letter");
    let good = Sink::default();
    let dead: Sink<Letter> = Sink::default();
    let (g, d) = (good.clone(), dead.clone());
    p.producer("src", numbers(20));
    let parse = p.map("parse", |x: u64| {
        if x % 4 == 1 {
            return Err(format!("odd item {x}").into());
        }
        Ok(x + 100)
    });
    ex.apply(&parse);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let dl = p.consumer("dl", move |f: Failed<u64>| {
        d.push(letter(f));
        Ok(())
    });
    parse.dead_letter(&dl);
    let report = p.run().unwrap();
    let bad: Vec<u64> = (0..20).filter(|x| x % 4 == 1).collect();
    let expected_good: Vec<u64> = (0..20).filter(|x| x % 4 != 1).map(|x| x + 100).collect();
    assert_eq!(good.sorted(), expected_good);
    let letters = dead.sorted();
    assert_eq!(letters.iter().map(|l| l.0).collect::<Vec<_>>(), bad);
    for (item, message, stage, attempt, kind) in &letters {
        assert!(message.contains(&format!("odd item {item}")), "{message}");
        assert_eq!(stage, "parse");
        assert_eq!(*attempt, 1);
        assert_eq!(kind, "error");
    }
    let st = report.stage("parse").unwrap();
    assert_eq!(st.failed, 5);
    assert_eq!(st.dead_lettered, 5);
    assert_eq!(report.stage("dl").unwrap().items_in, 5);
    assert_eq!(report.stage("sink").unwrap().items_in, 15);
});

matrix!(fn dead_letter_after_retries(ex) {
    let p = Pipeline::new("dead-letter-retry");
    let dead: Sink<Letter> = Sink::default();
    let d = dead.clone();
    p.producer("src", numbers(10));
    let dl = p.consumer("dl", move |f: Failed<u64>| {
        d.push(letter(f));
        Ok(())
    });
    // dead_letter first, then the retry policy: the dead-letter target must survive.
    let m = p
        .map("parse", |x: u64| {
            if x == 3 || x == 6 {
                return Err(format!("no good {x}").into());
            }
            Ok(x)
        })
        .dead_letter(&dl)
        .on_error(OnError::retry(1));
    ex.apply(&m);
    p.consumer("sink", |_: u64| Ok(())).from(&m);
    let report = p.run().unwrap();
    let letters = dead.sorted();
    assert_eq!(letters.iter().map(|l| l.0).collect::<Vec<_>>(), [3, 6]);
    for (item, message, _, attempt, _) in &letters {
        assert!(message.contains(&format!("no good {item}")), "{message}");
        assert_eq!(*attempt, 2);
    }
    let st = report.stage("parse").unwrap();
    assert_eq!(st.retried, 2);
    assert_eq!(st.failed, 2);
    assert_eq!(st.dead_lettered, 2);
    assert_eq!(report.stage("sink").unwrap().items_in, 8);
});

// ---------------------------------------------------------------------------------------------
// panics

matrix!(fn panics_are_caught_with_message_and_location(ex) {
    let p = Pipeline::new("panics");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(8));
    let m = p.map("explode", |x: u64| {
        if x == 3 {
            panic!("kaboom {x}");
        }
        Ok(x)
    });
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), [0, 1, 2, 4, 5, 6, 7]);
    let st = report.stage("explode").unwrap();
    assert_eq!(st.failed, 1);
    assert_eq!(report.failures.len(), 1);
    let f = &report.failures[0];
    assert_eq!(f.stage, "explode");
    assert_eq!(f.kind, FailureKind::Panic);
    assert!(f.message.contains("kaboom 3"), "{f:?}");
    assert!(f.message.contains("tests/errors.rs"), "no source location in {f:?}");
    assert_index(ex, f, 3);
    assert_pid(ex, f);
});

/// A stateful stage that panics in `finish`.
struct PanicsAtEnd;

impl minigun::Stage<u64, u64> for PanicsAtEnd {
    fn process(&mut self, item: u64, out: &mut Output<'_, u64>) -> minigun::StageResult {
        out.emit(item)?;
        Ok(())
    }
    fn finish(&mut self, _out: &mut Output<'_, u64>) -> minigun::StageResult {
        panic!("finish went wrong");
    }
}

matrix_local!(fn panic_in_finish_is_caught(ex) {
    let p = Pipeline::new("finish-panic");
    p.producer("src", numbers(5));
    let s = p.stage("stateful", || PanicsAtEnd);
    ex.apply_local(&s);
    p.consumer("sink", |_: u64| Ok(()));
    let report = p.run().unwrap();
    assert_eq!(report.consumed, 5);
    assert!(report.failures_total >= 1);
    let f = &report.failures[0];
    assert_eq!(f.stage, "stateful");
    assert_eq!(f.kind, FailureKind::Panic);
    assert!(f.message.contains("finish went wrong"), "{f:?}");
    assert!(f.message.contains("tests/errors.rs"), "{f:?}");
});

// ---------------------------------------------------------------------------------------------
// failing producers

matrix!(fn failing_producer_ends_cleanly(ex) {
    let p = Pipeline::new("producer-fails");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", |out| {
        for i in 0..10u64 {
            out.emit(i)?;
        }
        Err("producer broke".into())
    });
    let m = p.map("work", |x: u64| Ok(x + 1));
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), (1..11).collect::<Vec<u64>>());
    assert_eq!(report.produced, 10);
    assert_eq!(report.consumed, 10);
    // A producer's error is an error of the stage, not of an item.
    assert_eq!(report.stage("src").unwrap().errors, 1);
    assert_eq!(report.stage("src").unwrap().failed, 0);
    assert_eq!(report.failures.len(), 1);
    let f = &report.failures[0];
    assert_eq!(f.stage, "src");
    assert_eq!(f.kind, FailureKind::Error);
    assert_eq!(f.item, None, "a producer's error has no item");
    assert!(
        !f.to_string().contains("item"),
        "a stage-wide failure prints no item: {f}"
    );
    assert!(f.message.contains("producer broke"), "{f:?}");
});

matrix!(fn panicking_producer_ends_cleanly(ex) {
    let p = Pipeline::new("producer-panics");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", |out| {
        for i in 0..6u64 {
            out.emit(i)?;
        }
        panic!("producer exploded");
    });
    let m = p.map("work", |x: u64| Ok(x));
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), (0..6).collect::<Vec<u64>>());
    let f = &report.failures[0];
    assert_eq!(f.stage, "src");
    assert_eq!(f.kind, FailureKind::Panic);
    assert!(f.message.contains("producer exploded"), "{f:?}");
    assert!(f.message.contains("tests/errors.rs"), "{f:?}");
});

matrix!(fn fail_fast_producer_aborts_and_downstream_ends(ex) {
    let p = Pipeline::new("producer-fail-fast");
    p.producer("src", |out| {
        for i in 0..10u64 {
            out.emit(i)?;
        }
        Err("source gone".into())
    })
    .on_error(OnError::fail_fast());
    let m = p.map("work", |x: u64| Ok(x));
    ex.apply(&m);
    p.consumer("sink", |_: u64| Ok(()));
    let (cause, report) = aborted(run_or_hang(p));
    assert_eq!(cause.stage, "src");
    assert!(cause.message.contains("source gone"), "{cause:?}");
    assert_eq!(report.produced, 10);
    assert_accounted(&report, "work", 10);
    let work = report.stage("work").unwrap();
    assert_eq!(report.stage("sink").unwrap().items_in, work.items_out, "{report}");
});

// ---------------------------------------------------------------------------------------------
// failing hooks

matrix!(fn failing_before_hook_aborts_without_hanging(ex) {
    let p = Pipeline::new("before-fails");
    let gave_up = Arc::new(AtomicBool::new(false));
    let called = Arc::new(AtomicBool::new(false));
    let c = called.clone();
    p.producer("src", endless(gave_up.clone()));
    let m = p
        .map("guarded", |x: u64| Ok(x))
        .before(|| Err("no database".into()));
    ex.apply(&m);
    p.consumer("sink", move |_: u64| {
        c.store(true, Ordering::SeqCst);
        Ok(())
    });
    let (cause, report) = aborted(run_or_hang(p));
    assert!(!gave_up.load(Ordering::SeqCst), "the producer was never stopped");
    assert_eq!(cause.stage, "guarded");
    assert_eq!(cause.kind, FailureKind::Start);
    assert!(cause.message.contains("no database"), "{cause:?}");
    assert!(report.stopped);
    // Every item sent to the stage that never started was received and cancelled.
    let st = report.stage("guarded").unwrap();
    assert_eq!(st.items_in, report.produced, "{report}");
    assert_eq!(st.cancelled, report.produced, "{report}");
    assert_eq!(st.items_out, 0, "{report}");
    assert_eq!(report.stage("sink").unwrap().items_in, 0);
    assert!(!called.load(Ordering::SeqCst));
});

matrix!(fn failing_after_hook_aborts_after_processing(ex) {
    let p = Pipeline::new("after-fails");
    let got = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(10));
    let m = p
        .map("work", |x: u64| Ok(x))
        .after(|| Err("flush failed".into()));
    ex.apply(&m);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let (cause, report) = aborted(run_or_hang(p));
    assert_eq!(cause.stage, "work");
    assert!(cause.message.contains("flush failed"), "{cause:?}");
    let work = report.stage("work").unwrap();
    assert_eq!(work.items_in, 10, "{report}");
    assert_eq!(work.items_out, 10, "{report}");
    // The abort may come while `sink` still has items queued: those are cancelled, not lost.
    let sink = report.stage("sink").unwrap();
    assert_eq!(sink.items_in, 10, "{report}");
    assert_eq!(got.len() as u64 + sink.cancelled, 10, "{report}");
});

/// Whole-stage errors are not items: a retry policy does not retry them (nothing to retry),
/// and they do not count as failed items.
#[test]
fn a_producer_error_is_not_retried_and_aborts_under_fail_fast() {
    let p = Pipeline::new("stage-errors");
    p.producer("gen", |o| {
        o.emit(1u64)?;
        Err("db down".into())
    })
    .on_error(OnError::retry(2).then_fail_fast());
    p.consumer("sink", |_x: u64| Ok(()));
    match p.run() {
        Err(RunError::Aborted { cause, report }) => {
            assert_eq!(
                (cause.stage.as_str(), cause.message.as_str()),
                ("gen", "db down")
            );
            let gen = report.stage("gen").unwrap();
            assert_eq!((gen.errors, gen.failed, gen.retried), (1, 0, 0));
        }
        other => panic!("expected the fail-fast producer error to abort, got {other:?}"),
    }
}

#[test]
fn a_finish_error_is_a_stage_error_not_a_failed_item() {
    struct Flaky;
    impl minigun::Stage<u64, u64> for Flaky {
        fn process(&mut self, x: u64, out: &mut minigun::Output<'_, u64>) -> minigun::StageResult {
            Ok(out.emit(x)?)
        }
        fn finish(&mut self, _: &mut minigun::Output<'_, u64>) -> minigun::StageResult {
            Err("flush failed".into())
        }
    }
    let p = Pipeline::new("finish-error");
    p.producer("gen", |o| o.emit_all(0..10u64).map_err(Into::into));
    p.stage("flaky", || Flaky).on_error(OnError::retry(1));
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    let flaky = report.stage("flaky").unwrap();
    assert_eq!(
        (flaky.errors, flaky.failed, flaky.retried, flaky.items_out),
        (1, 0, 0, 10)
    );
    assert_eq!(report.consumed, 10);
    assert!(report.failures[0].message.contains("flush failed"));
}
