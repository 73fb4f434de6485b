//! Error policies: skip (the default), retry with backoff, dead-letter, and fail-fast.
use minigun::{Failed, OnError, Pipeline, RunError};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let p = Pipeline::new("policies");
    p.producer("numbers", |out| out.emit_all(0..100u64).map_err(Into::into));
    // Skip: a failed item is counted, logged and kept in the report; the run goes on.
    p.map("parse", |x: u64| match x % 10 {
        3 => Err(format!("{x} ends in 3").into()),
        _ => Ok(x),
    });
    // Retry: every multiple of 5 fails on its first attempt only, and succeeds 1 ms later.
    let tried = Mutex::new(HashSet::new());
    p.map("flaky", move |x: u64| {
        let first_try = tried.lock().unwrap().insert(x);
        match x.is_multiple_of(5) && first_try {
            true => Err("temporarily unavailable".into()),
            false => Ok(x),
        }
    })
    .on_error(OnError::retry(3).backoff(Duration::from_millis(1)));
    // Dead-letter: items that finally fail go, with their failure, to another stage.
    let strict = p.map("strict", |x: u64| match x % 25 {
        0 => Err("multiple of 25".into()),
        _ => Ok(x),
    });
    p.consumer("sink", |_x: u64| Ok(()));
    let dead = p.consumer("dead_letters", |f: Failed<u64>| {
        println!("dead letter: item {} ({})", f.item, f.failure.message);
        Ok(())
    });
    strict.dead_letter(&dead);

    let report = p.run()?;
    println!("{report}");
    assert_eq!(report.stage("parse").unwrap().failed, 10);
    assert_eq!(report.stage("flaky").unwrap().retried, 20);
    assert_eq!(report.stage("strict").unwrap().dead_lettered, 4);

    // Fail-fast: the first failure aborts the run; run() returns the cause and a partial report.
    let p = Pipeline::new("fail_fast");
    p.producer("numbers", |out| {
        out.emit_all(0..10_000u64).map_err(Into::into)
    });
    p.map("check", |x: u64| match x {
        500 => Err("item 500 is corrupt".into()),
        _ => Ok(x),
    })
    .on_error(OnError::fail_fast());
    p.consumer("sink", |_x: u64| Ok(()));
    match p.run() {
        Err(RunError::Aborted { cause, report }) => {
            let cancelled: u64 = report.stages.iter().map(|s| s.cancelled).sum();
            println!("aborted as expected: {cause}; {cancelled} queued items cancelled");
            println!("{report}");
        }
        Ok(_) => return Err("the fail-fast run was expected to abort".into()),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
