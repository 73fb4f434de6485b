//! ipc_fork: persistent forked workers, each with its own state made by a stage factory.
use minigun::{Output, Pipeline, Stage, StageResult};
use std::sync::{Arc, Mutex};

/// Counts the items one worker process handles; reports the count when the stream ends.
struct Counter {
    pid: u32,
    items: u64,
    sum: u64,
}

impl Counter {
    fn new() -> Self {
        // The factory runs in the worker, after fork: this is the worker's pid.
        Counter {
            pid: std::process::id(),
            items: 0,
            sum: 0,
        }
    }
}

impl Stage<u64, (u32, u64, u64)> for Counter {
    fn process(&mut self, item: u64, _out: &mut Output<'_, (u32, u64, u64)>) -> StageResult {
        self.items += 1;
        self.sum += item;
        Ok(())
    }
    fn finish(&mut self, out: &mut Output<'_, (u32, u64, u64)>) -> StageResult {
        Ok(out.emit((self.pid, self.items, self.sum))?)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counts = Arc::new(Mutex::new(Vec::new()));
    let sink = counts.clone();

    let p = Pipeline::new("ipc_fork");
    p.producer("numbers", |out| {
        out.emit_all(0..20_000u64).map_err(Into::into)
    });
    p.stage("count", Counter::new).ipc_fork(4);
    p.consumer("collect", move |c: (u32, u64, u64)| {
        sink.lock().unwrap().push(c);
        Ok(())
    });

    let report = p.run()?;
    let counts = counts.lock().unwrap();
    for (pid, items, sum) in counts.iter() {
        println!("worker pid {pid}: {items} items, sum {sum}");
    }
    assert_eq!(counts.len(), 4, "one count per worker");
    assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 20_000);
    assert_eq!(
        counts.iter().map(|c| c.2).sum::<u64>(),
        (0..20_000u64).sum()
    );
    println!("{report}");
    Ok(())
}
