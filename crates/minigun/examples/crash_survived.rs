//! Crash isolation: items that abort, panic, exit or hang kill only their own forked child;
//! the run goes on and the report lists each failure with its kind.
use minigun::{FailureKind, Pipeline};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let p = Pipeline::new("crash_survived");
    p.producer("items", |out| out.emit_all(0..60u64).map_err(Into::into));
    p.map("fragile", |x: u64| {
        match x {
            13 => std::process::abort(), // SIGABRT, as a crashing C library would
            27 => panic!("item {x} is poisoned"),
            42 => std::process::exit(3),
            50 => std::thread::sleep(Duration::from_secs(60)), // killed by the timeout
            _ => {}
        }
        Ok(x * 10)
    })
    .cow_fork(4)
    .timeout(Duration::from_secs(1));
    p.consumer("sink", |_x: u64| Ok(()));

    let report = p.run()?;
    for f in &report.failures {
        println!("{f} (pid {})", f.pid.unwrap_or_default());
    }
    let mut kinds: Vec<(u64, FailureKind)> = report
        .failures
        .iter()
        .filter_map(|f| Some((f.item?, f.kind.clone())))
        .collect();
    kinds.sort_by_key(|k| k.0);
    assert_eq!(
        kinds,
        [
            (13, FailureKind::Signal(6)),
            (27, FailureKind::Panic),
            (42, FailureKind::Exit(3)),
            (50, FailureKind::Timeout)
        ]
    );
    assert_eq!(report.consumed, 56, "every other item went through");
    println!("{report}");
    Ok(())
}
