//! A run in the background: an endless producer, stopped from outside after some items.
use minigun::Pipeline;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();

    let p = Pipeline::new("endless");
    p.producer("ticks", |out| {
        // Never ends on its own: emit returns EmitError::Stopped once the run is stopping.
        for i in 0u64.. {
            out.emit(i)?;
        }
        Ok(())
    });
    p.map("square", |x: u64| Ok(x.wrapping_mul(x)));
    p.consumer("count", move |_x: u64| {
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });

    let handle = p.spawn()?;
    while seen.load(Ordering::Relaxed) < 50_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.stop();
    let report = handle.wait()?;

    println!("stopped: {}", report.stopped);
    println!("produced {}, consumed {}", report.produced, report.consumed);
    // stop() ends the producer; items already emitted are still processed.
    assert!(report.stopped);
    assert_eq!(report.consumed, report.produced);
    assert_eq!(report.consumed, seen.load(Ordering::Relaxed));
    println!("{report}");
    Ok(())
}
