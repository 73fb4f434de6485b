//! cow_fork: children read a large dataset built in the parent, with no input serialisation.
//!
//! The fast path: a fork copies the parent's page tables, so its cost grows with the parent's
//! memory (about 20 us per MiB in 4 KiB pages). The dataset lives in a `HugeBuf<u64>`
//! (transparent huge pages: 512 times fewer page-table entries), and each child sums several
//! chunks (`items_per_fork`), so a fork's cost is shared. Data spread over many small
//! allocations (maps, strings) is put into huge pages by the stage itself before its first
//! fork, when the parent holds at least 256 MiB (`HugePages`; the report's last lines say
//! what it did).
use minigun::{Exec, HugeBuf, Pipeline};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// A slice of the shared dataset. Not `Serialize`: under cow_fork the item reaches the child
/// through copy-on-write memory, and only the output crosses the pipe.
#[derive(Clone)]
struct Chunk {
    data: Arc<HugeBuf<u64>>,
    start: usize,
    end: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const LEN: usize = 8 << 20; // 64 MiB of u64, built once in the parent
    const CHUNKS: usize = 64;
    let mut buf = HugeBuf::<u64>::zeroed(LEN)?;
    for (i, x) in buf.iter_mut().enumerate() {
        *x = i as u64 % 1_000;
    }
    let data = Arc::new(buf);
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
    // Forked children, at most 4 alive, each given up to 4 chunks; each chunk's result is
    // (sum, the child's pid).
    p.map("sum", |c: Chunk| {
        let sum: u64 = c.data[c.start..c.end].iter().sum();
        Ok((sum, std::process::id()))
    })
    .cow_fork(4)
    .executor(Exec::cow_fork(4).items_per_fork(4));
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
