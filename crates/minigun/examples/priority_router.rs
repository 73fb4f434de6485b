//! Dynamic routing by item field: urgent jobs go to a fast lane, the rest to the normal lane.
use minigun::{Exec, Output, Pipeline};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    id: u64,
    priority: u8,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (urgent_done, normal_done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let p = Pipeline::new("priority");
    p.producer("jobs", |out| {
        for id in 0..10_000u64 {
            out.emit(Job {
                id,
                priority: (id % 10) as u8,
            })?;
        }
        Ok(())
    });
    // The router runs in forked workers; routed jobs cross the pipe with their target.
    let router = p.processor("route", |job: Job, out: &mut Output<'_, Job>| {
        if job.priority >= 8 {
            out.to("urgent", job)?;
        } else {
            out.emit(job)?;
        }
        Ok(())
    });
    router.ipc_fork(2);
    let n = normal_done.clone();
    p.consumer("normal", move |_job: Job| {
        n.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    let u = urgent_done.clone();
    let urgent = p
        .consumer("urgent", move |_job: Job| {
            u.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .executor(Exec::threads(4));
    router.routes_to(&urgent);
    let report = p.run()?;
    println!("{report}");
    let (u, n) = (
        urgent_done.load(Ordering::Relaxed),
        normal_done.load(Ordering::Relaxed),
    );
    println!("urgent: {u}, normal: {n}");
    assert_eq!((u, n), (2_000, 8_000));
    Ok(())
}
