//! A remote stage end to end over a real server: the parent and two workers in this
//! process (workers on threads), each with its own sessions.

use minigun::remote::{Remote, ServeOptions, ServeReport};
use minigun::{Exec, Pipeline};
use minigun_redis::testing::RedisServer;
use minigun_redis::RedisBroker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Seen = Arc<Mutex<Vec<u64>>>;

/// What a test's pipeline is: its name, items, items per entry and time per item.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    items: u64,
    batch: usize,
    per_item: Duration,
}

/// `items` numbers, doubled by a remote stage, collected into `seen`.
fn define(broker: &RedisBroker, shape: Shape, seen: &Seen) -> Pipeline {
    let p = Pipeline::new(shape.name);
    p.handle_signals(false);
    p.producer("numbers", move |out| {
        out.emit_all(0..shape.items).map_err(Into::into)
    });
    let r = Remote::new(broker.clone())
        .claim_idle(Duration::from_millis(500))
        .worker_exec(Exec::threads(2))
        .batch(shape.batch);
    p.map("double", move |x: u64| {
        std::thread::sleep(shape.per_item);
        Ok(x * 2)
    })
    .remote(r);
    let seen = seen.clone();
    p.consumer("collect", move |x: u64| {
        seen.lock().unwrap().push(x);
        Ok(())
    });
    p
}

/// Two workers on threads, serving the same definition.
fn workers(
    broker: &RedisBroker,
    shape: Shape,
    seen: &Seen,
) -> Vec<(Arc<AtomicBool>, JoinHandle<ServeReport>)> {
    (0..2)
        .map(|_| {
            let (b, s) = (broker.clone(), seen.clone());
            let opts = ServeOptions::new().handle_signals(false);
            let stop = opts.stop_flag();
            let h = std::thread::spawn(move || define(&b, shape, &s).serve(opts).expect("serve"));
            (stop, h)
        })
        .collect()
}

fn stop(workers: Vec<(Arc<AtomicBool>, JoinHandle<ServeReport>)>) -> Vec<ServeReport> {
    workers
        .into_iter()
        .map(|(stop, h)| {
            stop.store(true, Ordering::Relaxed);
            h.join().expect("worker thread")
        })
        .collect()
}

/// Every item's result arrived exactly once.
fn assert_each_once(seen: &Seen, items: u64) {
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    let want: Vec<u64> = (0..items).map(|x| x * 2).collect();
    assert_eq!(got, want, "every item exactly once");
}

#[test]
fn every_item_arrives_once_through_two_workers_over_redis() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let broker = server.broker();
    let seen: Seen = Arc::default();
    let shape = Shape {
        name: "redis-pipeline",
        items: 1000,
        batch: 16,
        per_item: Duration::ZERO,
    };
    let ws = workers(&broker, shape, &seen);
    let report = define(&broker, shape, &seen).run().expect("run");
    let reports = stop(ws);
    assert_each_once(&seen, 1000);
    let st = report.stage("double").unwrap();
    assert_eq!((st.items_in, st.items_out, st.failed), (1000, 1000, 0));
    assert_eq!(st.executor, "remote(redis)");
    let committed: u64 = reports.iter().map(|r| r.items).sum();
    assert_eq!(committed, 1000, "{reports:?}");
}

#[test]
fn a_server_restart_without_persistence_mid_run_loses_no_item() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    let broker = server.broker();
    let seen: Seen = Arc::default();
    let shape = Shape {
        name: "redis-restart",
        items: 400,
        batch: 4,
        per_item: Duration::from_millis(2),
    };
    let ws = workers(&broker, shape, &seen);
    let (b, s) = (broker.clone(), seen.clone());
    let parent = std::thread::spawn(move || define(&b, shape, &s).run());
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(seen.lock().unwrap().len() < 400, "the restart came mid-run");
    // Everything on the server is lost: the parent re-announces and re-sends what is missing.
    server.restart();
    let report = parent.join().expect("parent thread").expect("run");
    stop(ws);
    assert_each_once(&seen, 400);
    let st = report.stage("double").unwrap();
    assert_eq!((st.items_out, st.failed), (400, 0));
}
