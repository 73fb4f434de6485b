//! Quick start: a producer, a processor on 4 threads, batches of 100, and a consumer.
use minigun::{Exec, Output, Pipeline};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total = Arc::new(AtomicU64::new(0));
    let sum = total.clone();

    let p = Pipeline::new("quick_start");
    p.producer("numbers", |out| {
        for i in 0..100_000u64 {
            out.emit(i)?;
        }
        Ok(())
    });
    // Called once per item, up to four items at once; emits 0 or 1 items per input.
    p.processor("square_evens", |x: u64, out: &mut Output<'_, u64>| {
        if x.is_multiple_of(2) {
            out.emit(x * x)?;
        }
        Ok(())
    })
    .executor(Exec::threads(4));
    p.batch::<u64>("batch", 100);
    p.consumer("sum", move |batch: Vec<u64>| {
        total.fetch_add(batch.iter().sum::<u64>(), Ordering::Relaxed);
        Ok(())
    });

    let report = p.run()?;
    let expected: u64 = (0..100_000u64).step_by(2).map(|x| x * x).sum();
    assert_eq!(sum.load(Ordering::Relaxed), expected);
    println!("sum of the squares of the even numbers below 100000: {expected}");
    println!("{report}");
    Ok(())
}
