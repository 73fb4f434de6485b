//! Fan-out to fork stages and fan-in back: one source, a cow_fork and an ipc_fork branch,
//! joined in one stage.
use minigun::Pipeline;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total = Arc::new(AtomicU64::new(0));
    let p = Pipeline::new("fork-fan");
    let src = p.producer("numbers", |out| {
        out.emit_all(1..=1_000u64).map_err(Into::into)
    });
    // Each branch gets every number (broadcast); each runs in its own kind of child process.
    let squares = p.map("square", |x: u64| Ok(x * x)).cow_fork(4).from(&src);
    let cubes = p.map("cube", |x: u64| Ok(x * x * x)).ipc_fork(2).from(&src);
    let t = total.clone();
    p.consumer("sum", move |x: u64| {
        t.fetch_add(x, Ordering::Relaxed);
        Ok(())
    })
    .from(&squares)
    .from(&cubes);
    let report = p.run()?;
    println!("{report}");
    let want: u64 = (1..=1_000u64).map(|x| x * x + x * x * x).sum();
    println!(
        "sum of squares and cubes: {}",
        total.load(Ordering::Relaxed)
    );
    assert_eq!(total.load(Ordering::Relaxed), want);
    Ok(())
}
