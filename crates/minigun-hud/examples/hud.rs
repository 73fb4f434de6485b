//! The live dashboard on a mixed pipeline: producer -> threads -> cow_fork -> ipc_fork -> batch -> consumer.
//!
//! Runs for 45 seconds, or as many as the first argument or `HUD_SECS` says; `q` stops it
//! early. The dashboard shows when stderr is a terminal (`MINIGUN_HUD=0` for progress lines
//! instead); the report goes to stdout when the run ends.
//!
//! ```text
//! cargo run -p minigun-hud --example hud
//! cargo run -p minigun-hud --example hud -- 10
//! MINIGUN_HUD=0 HUD_SECS=5 cargo run -p minigun-hud --example hud
//! ```
use minigun::{Exec, Output, Pipeline, Stage, StageResult};
use minigun_hud::Options;
use std::time::{Duration, Instant};

/// Orders emitted per second.
const RATE: u64 = 300;
/// Orders emitted per tick (RATE / TICKS_PER_SEC).
const PER_TICK: u64 = 3;

/// An ipc_fork worker: scores orders, keeps a running count in its own process, and rejects
/// some (every 101st order id) to show failures.
struct Scorer {
    seen: u64,
}

impl Stage<(u64, u64), (u64, u64)> for Scorer {
    fn process(
        &mut self,
        (id, price): (u64, u64),
        out: &mut Output<'_, (u64, u64)>,
    ) -> StageResult {
        self.seen += 1;
        std::thread::sleep(Duration::from_millis(3));
        if id % 101 == 100 {
            return Err(format!("order {id}: score out of range").into());
        }
        Ok(out.emit((id, price * 7 % 1000 + self.seen % 3))?)
    }
}

fn seconds() -> u64 {
    std::env::args()
        .nth(1)
        .or_else(|| std::env::var("HUD_SECS").ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(45)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    minigun_hud::init_logging();
    let secs = seconds();
    let total = RATE * secs;

    let p = Pipeline::new("mixed");
    p.producer("orders", move |out| {
        let start = Instant::now();
        let tick = Duration::from_millis(1000 * PER_TICK / RATE);
        let mut id = 0u64;
        while id < total {
            for _ in 0..PER_TICK {
                out.emit(id)?;
                id += 1;
            }
            // Paced: the next tick is due at a fixed time, however long emitting took.
            let due = start + tick * (id / PER_TICK) as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        Ok(())
    })
    // Declared, so progress shows a percentage and the time left.
    .total(total);
    p.map("parse", |id: u64| {
        std::thread::sleep(Duration::from_millis(4));
        Ok((id, id * 37 % 997))
    })
    .executor(Exec::threads(4));
    // One forked child per item: it sees the parent's memory, only its result is sent back.
    p.map("price", |(id, base): (u64, u64)| {
        std::thread::sleep(Duration::from_millis(6));
        Ok((id, base + 100))
    })
    .cow_fork(4);
    p.stage("score", || Scorer { seen: 0 }).ipc_fork(3);
    p.batch::<(u64, u64)>("batch", 50);
    p.consumer("store", |batch: Vec<(u64, u64)>| {
        std::thread::sleep(Duration::from_millis(20));
        assert!(batch.len() <= 50);
        Ok(())
    });

    let options = Options::default().dashboard(true);
    let report = minigun_hud::run_with(p, options)?;
    println!("{report}");
    Ok(())
}
