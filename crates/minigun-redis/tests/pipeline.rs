//! A remote stage end to end over a real server: the parent and two workers in this
//! process (workers on threads), each with its own sessions.

use minigun::remote::{Remote, ServeOptions, ServeReport};
use minigun::{Exec, Pipeline};
use minigun_redis::testing::RedisServer;
use minigun_redis::RedisBroker;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Seen = Arc<Mutex<Vec<u64>>>;

fn define(broker: &RedisBroker, n: u64, seen: &Seen) -> Pipeline {
    let p = Pipeline::new("redis-pipeline");
    p.handle_signals(false);
    p.producer("numbers", move |out| out.emit_all(0..n).map_err(Into::into));
    let r = Remote::new(broker.clone())
        .claim_idle(Duration::from_millis(500))
        .worker_exec(Exec::threads(2))
        .batch(16);
    p.map("double", |x: u64| Ok(x * 2)).remote(r);
    let seen = seen.clone();
    p.consumer("collect", move |x: u64| {
        seen.lock().unwrap().push(x);
        Ok(())
    });
    p
}

#[test]
fn every_item_arrives_once_through_two_workers_over_redis() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let broker = server.broker();
    let seen: Seen = Arc::default();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (b, s) = (broker.clone(), seen.clone());
            let opts = ServeOptions::new().handle_signals(false);
            let stop = opts.stop_flag();
            let h = std::thread::spawn(move || define(&b, 1000, &s).serve(opts).expect("serve"));
            (stop, h)
        })
        .collect();
    let report = define(&broker, 1000, &seen).run().expect("run");
    let reports: Vec<ServeReport> = workers
        .into_iter()
        .map(|(stop, h)| {
            stop.store(true, Ordering::Relaxed);
            h.join().expect("worker thread")
        })
        .collect();
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    let want: Vec<u64> = (0..1000).map(|x| x * 2).collect();
    assert_eq!(got, want, "every item exactly once");
    let st = report.stage("double").unwrap();
    assert_eq!((st.items_in, st.items_out, st.failed), (1000, 1000, 0));
    assert_eq!(st.executor, "remote(redis)");
    let committed: u64 = reports.iter().map(|r| r.items).sum();
    assert_eq!(committed, 1000, "{reports:?}");
}
