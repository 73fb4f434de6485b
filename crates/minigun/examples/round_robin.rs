//! Round-robin fan-out: each item goes to exactly one of three shards, in turn.
use minigun::Pipeline;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());

    let p = Pipeline::new("round_robin");
    let jobs = p
        .producer("jobs", |out| {
            for i in 0..3_000u64 {
                out.emit(i)?;
            }
            Ok(())
        })
        .round_robin();
    let collect = p.consumer("collect", |_shard: usize| Ok(()));
    for shard in 0..3 {
        let counts = counts.clone();
        p.map(format!("shard_{shard}"), move |_job: u64| {
            counts[shard].fetch_add(1, Ordering::Relaxed);
            Ok(shard)
        })
        .from(&jobs)
        .to(&collect);
    }

    let report = p.run()?;
    for (shard, n) in counts.iter().enumerate() {
        println!("shard_{shard} handled {} jobs", n.load(Ordering::Relaxed));
    }
    let total: u64 = counts.iter().map(|n| n.load(Ordering::Relaxed)).sum();
    assert_eq!(total, 3_000, "round-robin delivers each job once");
    assert_eq!(report.stage("collect").map(|s| s.items_in), Some(3_000));
    println!("{report}");
    Ok(())
}
