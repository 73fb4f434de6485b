//! cow_fork: children read a large dataset built in the parent, with no input serialisation.
use minigun::Pipeline;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// A slice of the shared dataset. Not `Serialize`: under cow_fork the item reaches the child
/// through copy-on-write memory, and only the output crosses the pipe.
#[derive(Clone)]
struct Chunk {
    data: Arc<Vec<u64>>,
    start: usize,
    end: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const LEN: usize = 8 << 20; // 64 MiB of u64, built once in the parent
    const CHUNKS: usize = 64;
    let data: Arc<Vec<u64>> = Arc::new((0..LEN as u64).map(|x| x % 1_000).collect());
    let expected: u64 = data.iter().sum();
    let results = Arc::new(Mutex::new(Vec::new()));
    let sink = results.clone();

    let p = Pipeline::new("cow_fork");
    let dataset = data.clone();
    p.producer("chunks", move |out| {
        let step = LEN / CHUNKS;
        for start in (0..LEN).step_by(step) {
            let (data, end) = (dataset.clone(), start + step);
            out.emit(Chunk { data, start, end })?;
        }
        Ok(())
    });
    // One forked child per chunk, at most 4 alive; each returns (sum, its pid).
    p.map("sum", |c: Chunk| {
        let sum: u64 = c.data[c.start..c.end].iter().sum();
        Ok((sum, std::process::id()))
    })
    .cow_fork(4);
    p.consumer("collect", move |r: (u64, u32)| {
        sink.lock().unwrap().push(r);
        Ok(())
    });

    let report = p.run()?;
    let results = results.lock().unwrap();
    let total: u64 = results.iter().map(|r| r.0).sum();
    let pids: BTreeSet<u32> = results.iter().map(|r| r.1).collect();
    let parent = std::process::id();
    println!("{} chunks summed in {} children", results.len(), pids.len());
    println!("total {total} (expected {expected}), parent pid {parent}");
    assert_eq!(total, expected);
    assert!(!pids.contains(&parent), "the work ran in children");
    println!("{report}");
    Ok(())
}
