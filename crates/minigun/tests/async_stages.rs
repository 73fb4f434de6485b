//! Async stages under `tasks(n)` on a real tokio runtime: concurrency exactly `n`,
//! backpressure, cancellation (fail_fast and an outside cancel drop the futures), timeouts,
//! panics, retries whose backoff blocks no thread, ordered output, routing, dead letters,
//! calls to a TCP echo server on 127.0.0.1, a runtime handle of the caller's, `run_async`,
//! the live monitor's in-flight figure, and definition errors for mis-combinations.
#![cfg(feature = "async")]
mod common;
use common::{run_bounded, wait_until};
use minigun::{
    AsyncOutput, DefinitionError, Exec, Failed, FailureKind, OnError, Pipeline, RunError,
};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Counts the futures running now and the most that ever ran at once.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    fn enter(self: &Arc<Self>) -> GaugeGuard {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        GaugeGuard(self.clone())
    }
    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Leaves the gauge when dropped (also when the future holding it is cancelled).
struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn gen(p: &Pipeline, n: u64) {
    p.producer("gen", move |out| out.emit_all(0..n).map_err(Into::into));
}

/// `items` items into a consumer "hang" under `tasks(n)` whose futures never end; the gauge
/// of its futures.
fn hanging(p: &Pipeline, items: u64, n: usize) -> Arc<Gauge> {
    let gauge = Arc::new(Gauge::default());
    let g = gauge.clone();
    gen(p, items);
    p.consumer_async("hang", move |_: u64| {
        let g = g.clone();
        async move {
            let _in = g.enter();
            std::future::pending::<()>().await;
            Ok(())
        }
    })
    .executor(Exec::tasks(n));
    gauge
}

#[test]
fn peak_concurrency_is_exactly_n() {
    for n in [1usize, 7, 64] {
        let gauge = Arc::new(Gauge::default());
        let g = gauge.clone();
        let p = Pipeline::new("peak");
        gen(&p, 400);
        p.map_async("wait", move |x: u64| {
            let g = g.clone();
            async move {
                let _in = g.enter();
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(x)
            }
        })
        .executor(Exec::tasks(n));
        p.consumer("sink", |_: u64| Ok(()));
        let r = run_bounded(p).expect("run");
        assert_eq!(gauge.peak(), n, "peak in flight under tasks({n})");
        let s = r.stage("wait").unwrap();
        assert_eq!((s.items_in, s.items_out), (400, 400));
        assert_eq!(s.executor, format!("tasks({n})"));
        // Each attempt slept 5 ms: the report's latencies are the futures' times.
        assert_eq!(s.latency.count, 400);
        assert!(s.latency.p50_us >= 5_000.0, "{:?}", s.latency);
    }
}

#[test]
fn a_slow_downstream_bounds_what_is_in_flight() {
    let started = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let ahead = Arc::new(AtomicU64::new(0));
    let gauge = Arc::new(Gauge::default());
    let p = Pipeline::new("backpressure");
    gen(&p, 3_000);
    let (s, c, a, g) = (
        started.clone(),
        consumed.clone(),
        ahead.clone(),
        gauge.clone(),
    );
    p.map_async("fast", move |x: u64| {
        let (s, c, a, g) = (s.clone(), c.clone(), a.clone(), g.clone());
        async move {
            let _in = g.enter();
            let started = s.fetch_add(1, Ordering::SeqCst) + 1;
            a.fetch_max(started - c.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(x)
        }
    })
    .executor(Exec::tasks(16));
    let c = consumed.clone();
    p.consumer("slow", move |_: u64| {
        std::thread::sleep(Duration::from_micros(300));
        c.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
    .capacity(minigun::Capacity::Bounded(32));
    let r = run_bounded(p).expect("run");
    assert_eq!(r.stage("slow").unwrap().items_in, 3_000);
    assert!(gauge.peak() <= 16, "peak {}", gauge.peak());
    // Ahead of the consumer: at most the 16 in flight, the consumer's queue (32), one batch
    // held by the stage's router and one taken by the consumer (256 each): never the input.
    let ahead = ahead.load(Ordering::SeqCst);
    assert!(
        ahead <= 16 + 32 + 2 * 256 + 16,
        "{ahead} items ahead of the consumer"
    );
}

#[test]
fn fail_fast_cancels_the_futures_in_flight() {
    let gauge = Arc::new(Gauge::default());
    let g = gauge.clone();
    let p = Pipeline::new("fail-fast");
    gen(&p, 1_000);
    p.map_async("call", move |x: u64| {
        let g = g.clone();
        async move {
            let _in = g.enter();
            if x == 30 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err("item 30 is bad".into());
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(x)
        }
    })
    .executor(Exec::tasks(40))
    .on_error(OnError::fail_fast());
    p.consumer("sink", |_: u64| Ok(()));
    let t0 = Instant::now();
    let err = run_bounded(p).expect_err("fail_fast aborts");
    let RunError::Aborted { cause, report } = err else {
        panic!("{err}")
    };
    assert_eq!((cause.item, cause.stage.as_str()), (Some(30), "call"));
    assert!(cause.message.contains("item 30 is bad"), "{cause:?}");
    // Every future was dropped, its guard ran: none is left running.
    assert_eq!(gauge.now.load(Ordering::SeqCst), 0);
    assert_eq!(gauge.peak(), 40);
    let s = report.stage("call").unwrap();
    assert_eq!(s.failed, 1);
    assert!(s.cancelled >= 39, "{s:?}");
    assert_eq!(s.items_in, s.failed + s.cancelled + s.items_out);
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
}

#[test]
fn a_cancel_from_outside_drops_the_futures_and_ends_the_run() {
    let p = Pipeline::new("cancelled");
    let gauge = hanging(&p, 10_000, 100);
    let run = p.spawn().expect("valid");
    wait_until("100 in flight", Duration::from_secs(30), || {
        gauge.now.load(Ordering::SeqCst) == 100
    });
    let snap = run.monitor().snapshot();
    let row = snap.stages.iter().find(|s| s.name == "hang").unwrap();
    assert_eq!((row.in_flight, row.in_flight_limit), (100, Some(100)));
    run.cancel();
    let report = run.wait().expect("a cancelled run reports");
    assert!(report.stopped);
    assert_eq!(
        gauge.now.load(Ordering::SeqCst),
        0,
        "guards of dropped futures ran"
    );
    let s = report.stage("hang").unwrap();
    assert!(s.cancelled >= 100, "{s:?}");
    assert_eq!(s.items_in, s.cancelled);
}

#[test]
fn a_timeout_fails_the_item_and_drops_its_future() {
    let gauge = Arc::new(Gauge::default());
    let g = gauge.clone();
    let p = Pipeline::new("timeouts");
    gen(&p, 20);
    p.map_async("slow-evens", move |x: u64| {
        let g = g.clone();
        async move {
            let _in = g.enter();
            if x.is_multiple_of(2) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(x)
        }
    })
    .executor(Exec::tasks(20).timeout(Duration::from_millis(100)));
    let got = run_collect(p);
    assert_eq!(got.0, (0..20).filter(|x| x % 2 == 1).collect::<Vec<_>>());
    let r = got.1;
    assert_eq!(r.stage("slow-evens").unwrap().failed, 10);
    assert!(
        r.failures.iter().all(|f| f.kind == FailureKind::Timeout),
        "{:?}",
        r.failures
    );
    assert!(
        r.failures[0].message.contains("timeout of 100ms"),
        "{:?}",
        r.failures[0]
    );
    assert_eq!(gauge.now.load(Ordering::SeqCst), 0);
}

/// Runs `p` for the sorted items of its final stage.
fn run_collect(p: Pipeline) -> (Vec<u64>, minigun::RunReport) {
    let mut got = p.collect::<u64>().expect("run");
    got.items.sort_unstable();
    (got.items, got.report)
}

#[test]
fn a_panic_in_a_future_fails_only_its_item_with_the_message() {
    let p = Pipeline::new("panics");
    gen(&p, 50);
    p.map_async("fragile", |x: u64| async move {
        tokio::task::yield_now().await;
        if x == 3 {
            panic!("boom at item {x}");
        }
        Ok(x)
    })
    .executor(Exec::tasks(8));
    let (items, r) = run_collect(p);
    assert_eq!(items.len(), 49);
    assert!(!items.contains(&3));
    assert_eq!(r.failures.len(), 1);
    let f = &r.failures[0];
    assert_eq!((&f.kind, f.item), (&FailureKind::Panic, Some(3)));
    assert!(f.message.contains("boom at item 3"), "{}", f.message);
    assert!(
        f.message.contains("async_stages.rs"),
        "location: {}",
        f.message
    );
}

#[test]
fn retry_backoff_waits_on_the_timer_not_on_a_thread() {
    // 1,000 items fail their first attempt and back off 300 ms, on a runtime of 2 threads.
    // Had the backoff blocked a thread, at most 2 items would wait at once.
    let waiting = Arc::new(Gauge::default());
    let guards = Arc::new(Mutex::new(Vec::new()));
    let p = Pipeline::new("backoff");
    gen(&p, 1_000);
    let (w, gs) = (waiting.clone(), guards.clone());
    let tried = Arc::new(Mutex::new(std::collections::HashSet::new()));
    p.map_async("flaky", move |x: u64| {
        let (w, gs, tried) = (w.clone(), gs.clone(), tried.clone());
        async move {
            let first = tried.lock().unwrap().insert(x);
            if first {
                gs.lock().unwrap().push((x, w.enter()));
                return Err(format!("first attempt at {x}").into());
            }
            gs.lock().unwrap().retain(|(y, _)| *y != x);
            Ok(x)
        }
    })
    .executor(Exec::tasks(1_000).runtime_threads(2))
    .on_error(OnError::retry(1).backoff(Duration::from_millis(300)));
    let (items, r) = run_collect(p);
    assert_eq!(items, (0..1_000).collect::<Vec<_>>());
    let s = r.stage("flaky").unwrap();
    assert_eq!((s.retried, s.failed), (1_000, 0));
    assert!(
        waiting.peak() > 500,
        "only {} items were in their backoff at once",
        waiting.peak()
    );
}

#[test]
fn ordered_emits_in_input_order() {
    let p = Pipeline::new("ordered");
    gen(&p, 300);
    p.map_async("jitter", |x: u64| async move {
        tokio::time::sleep(Duration::from_millis((x * 7919) % 13)).await;
        Ok(x)
    })
    .executor(Exec::tasks(32).ordered());
    let got = p.collect::<u64>().expect("run");
    assert_eq!(got.items, (0..300).collect::<Vec<_>>());
}

#[test]
fn collect_ordered_keeps_order_through_an_async_stage() {
    let p = Pipeline::new("collect-ordered");
    gen(&p, 100);
    p.map_async("jitter", |x: u64| async move {
        tokio::time::sleep(Duration::from_millis((x * 31) % 7)).await;
        Ok(x * 2)
    })
    .executor(Exec::tasks(16));
    let got = p.collect_ordered::<u64>().expect("run");
    assert_eq!(got.items, (0..100).map(|x| x * 2).collect::<Vec<_>>());
}

#[test]
fn an_async_stage_routes_with_to() {
    let urgent = Arc::new(Mutex::new(Vec::new()));
    let p = Pipeline::new("routing");
    gen(&p, 30);
    let route = p
        .processor_async("route", |x: u64, out: AsyncOutput<u64>| async move {
            tokio::task::yield_now().await;
            if x.is_multiple_of(3) {
                out.to("urgent", x)?;
            } else {
                out.emit(x)?;
            }
            Ok(())
        })
        .executor(Exec::tasks(8));
    p.consumer("normal", |_: u64| Ok(()));
    let u = urgent.clone();
    let target = p.consumer("urgent", move |x: u64| {
        u.lock().unwrap().push(x);
        Ok(())
    });
    route.routes_to(&target);
    let r = p.run().expect("run");
    assert_eq!(r.stage("normal").unwrap().items_in, 20);
    let mut got = urgent.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..30u64)
            .filter(|x| x.is_multiple_of(3))
            .collect::<Vec<_>>()
    );
    assert_eq!(r.stage("route").unwrap().items_out, 30);
}

#[test]
fn an_undeclared_route_fails_the_item() {
    let p = Pipeline::new("bad-route");
    gen(&p, 3);
    p.processor_async("route", |x: u64, out: AsyncOutput<u64>| async move {
        out.to("nowhere", x)?;
        Ok(())
    })
    .executor(Exec::tasks(2));
    p.consumer("sink", |_: u64| Ok(()));
    let r = p.run().expect("skip policy");
    assert_eq!(r.stage("route").unwrap().failed, 3);
    assert!(
        r.failures[0].message.contains("nowhere"),
        "{:?}",
        r.failures
    );
}

#[test]
fn failed_items_reach_the_dead_letter_stage() {
    let dead = Arc::new(Mutex::new(Vec::new()));
    let p = Pipeline::new("dead-letters");
    gen(&p, 10);
    let s = p
        .map_async("odd-fails", |x: u64| async move {
            if x % 2 == 1 {
                Err(format!("odd {x}").into())
            } else {
                Ok(x)
            }
        })
        .executor(Exec::tasks(4))
        .on_error(OnError::retry(2));
    p.consumer("sink", |_: u64| Ok(()));
    let d = dead.clone();
    let dl = p.consumer("dead", move |f: Failed<u64>| {
        d.lock().unwrap().push((f.item, f.failure.attempt));
        Ok(())
    });
    s.dead_letter(&dl);
    let r = p.run().expect("run");
    let mut got = dead.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, [(1, 3), (3, 3), (5, 3), (7, 3), (9, 3)]);
    let st = r.stage("odd-fails").unwrap();
    assert_eq!((st.retried, st.dead_lettered), (10, 5));
}

/// An echo server on 127.0.0.1 (one line back per line), on `rt`; its address.
fn echo_server(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg` to the echo server at `addr` on a new connection; the line it sends back.
async fn call(addr: std::net::SocketAddr, msg: String) -> minigun::StageResult<String> {
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(format!("{msg}\n").as_bytes()).await?;
    let mut back = String::new();
    BufReader::new(&mut sock).read_line(&mut back).await?;
    Ok(back.trim_end().to_string())
}

#[test]
fn an_async_stage_calls_a_local_tcp_server() {
    let server = tokio::runtime::Runtime::new().unwrap();
    let addr = echo_server(&server);
    let p = Pipeline::new("echo");
    gen(&p, 500);
    p.map_async("call", move |x: u64| call(addr, format!("item {x}")))
        .executor(Exec::tasks(64));
    let mut got = p.collect::<String>().expect("run").items;
    got.sort();
    let mut want: Vec<String> = (0..500).map(|x| format!("item {x}")).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn a_stage_runs_on_the_callers_runtime_handle() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("callers-rt")
        .enable_all()
        .build()
        .unwrap();
    let addr = echo_server(&rt);
    let names = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let n = names.clone();
    let p = Pipeline::new("handle");
    gen(&p, 200);
    p.map_async("call", move |x: u64| {
        let n = n.clone();
        async move {
            let me = std::thread::current().name().unwrap_or("").to_string();
            n.lock().unwrap().insert(me);
            call(addr, x.to_string())
                .await?
                .parse::<u64>()
                .map_err(Into::into)
        }
    })
    .executor(Exec::tasks(32).runtime(rt.handle().clone()));
    let (items, _) = run_collect(p);
    assert_eq!(items, (0..200).collect::<Vec<_>>());
    assert_eq!(
        names.lock().unwrap().iter().collect::<Vec<_>>(),
        ["callers-rt"],
        "futures ran on the caller's runtime only"
    );
}

#[test]
fn run_async_blocks_no_thread_of_the_callers_runtime() {
    // A runtime of one thread, and a stage whose futures run on that same runtime: the run
    // can only end if awaiting it leaves that thread free.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        let p = Pipeline::new("awaited");
        gen(&p, 100);
        p.map_async("tick", |x: u64| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(x)
        })
        .executor(Exec::tasks(10).runtime(tokio::runtime::Handle::current()));
        p.consumer("sink", |_: u64| Ok(()));
        p.handle_signals(false);
        tokio::time::timeout(Duration::from_secs(60), p.run_async())
            .await
            .expect("the awaited run ends")
    });
    assert_eq!(report.expect("run").stage("sink").unwrap().items_in, 100);
}

#[test]
fn dropping_the_run_future_cancels_the_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ended = Arc::new(AtomicBool::new(false));
    let e = ended.clone();
    let p = Pipeline::new("dropped");
    let gauge = hanging(&p, 1_000, 10);
    p.after_run(move || {
        e.store(true, Ordering::SeqCst);
        Ok(())
    });
    p.handle_signals(false);
    rt.block_on(async {
        let run = p.run_async();
        let started = tokio::time::timeout(Duration::from_millis(300), run).await;
        assert!(started.is_err(), "the run cannot end by itself");
    });
    wait_until("the dropped run ends", Duration::from_secs(30), || {
        ended.load(Ordering::SeqCst)
    });
    assert_eq!(gauge.now.load(Ordering::SeqCst), 0);
}

#[test]
fn mis_combinations_are_definition_errors_naming_the_stage() {
    let async_under = |exec: Exec| {
        let p = Pipeline::new("bad");
        gen(&p, 1);
        p.map_async("fetch", |x: u64| async move { Ok(x) })
            .executor(exec);
        p.build().unwrap_err()
    };
    for exec in [
        Exec::threads(2),
        Exec::cow_fork(2),
        Exec::ipc_fork(2),
        Exec::Inline,
    ] {
        let name = exec.to_string();
        match async_under(exec) {
            DefinitionError::AsyncStageNeedsTasks { stage, executor } => {
                assert_eq!((stage.as_str(), executor), ("fetch", name));
            }
            other => panic!("{other}"),
        }
    }
    let p = Pipeline::new("bad");
    gen(&p, 1);
    p.map("sync", |x: u64| Ok(x)).executor(Exec::tasks(4));
    let e = p.build().unwrap_err();
    assert!(
        matches!(&e, DefinitionError::TasksNeedAsyncStage { stage, .. } if stage == "sync"),
        "{e}"
    );
    assert!(e.to_string().contains("map_async"), "{e}");
    let p = Pipeline::new("bad");
    gen(&p, 1);
    p.map("sync", |x: u64| Ok(x))
        .executor(Exec::threads(2).runtime_threads(2));
    let e = p.build().unwrap_err();
    assert!(
        matches!(
            &e,
            DefinitionError::OptionNotForExecutor {
                option: "runtime_threads",
                ..
            }
        ),
        "{e}"
    );
    let p = Pipeline::new("bad");
    gen(&p, 1);
    p.map_async("zero", |x: u64| async move { Ok(x) })
        .executor(Exec::tasks(0));
    assert!(matches!(
        p.build().unwrap_err(),
        DefinitionError::NoWorkers { .. }
    ));
}

#[test]
fn inherited_settings_are_translated_for_async_and_sync_stages() {
    let p = Pipeline::new("inherited");
    p.default_executor(Exec::tasks(8));
    gen(&p, 10);
    p.map("sync", |x: u64| Ok(x));
    p.map_async("async", |x: u64| async move { Ok(x) });
    p.with_executor(Exec::threads(3), |p| {
        p.map_async("in-block", |x: u64| async move { Ok(x) });
    });
    p.consumer("sink", |_: u64| Ok(()));
    let r = p.run().expect("run");
    let exec = |s: &str| r.stage(s).unwrap().executor.clone();
    assert_eq!(exec("sync"), "inline");
    assert_eq!(exec("async"), "tasks(8)");
    assert_eq!(exec("in-block"), "tasks(3)");
    assert_eq!(r.stage("sink").unwrap().items_in, 10);
}

#[test]
fn async_and_sync_stages_mix_in_one_pipeline_with_hooks() {
    let before = Arc::new(AtomicBool::new(false));
    let after = Arc::new(AtomicBool::new(false));
    let (b, a) = (before.clone(), after.clone());
    let p = Pipeline::new("mixed");
    gen(&p, 200);
    p.map("double", |x: u64| Ok(x * 2))
        .executor(Exec::threads(2));
    p.map_async("plus-one", |x: u64| async move { Ok(x + 1) })
        .executor(Exec::tasks(16))
        .before(move || {
            b.store(true, Ordering::SeqCst);
            Ok(())
        })
        .after(move || {
            a.store(true, Ordering::SeqCst);
            Ok(())
        });
    p.batch::<u64>("batch", 50);
    p.map("sum", |b: Vec<u64>| Ok(b.iter().sum::<u64>()));
    let got = p.collect::<u64>().expect("run");
    assert_eq!(
        got.items.iter().sum::<u64>(),
        (0..200).map(|x| x * 2 + 1).sum()
    );
    assert!(before.load(Ordering::SeqCst) && after.load(Ordering::SeqCst));
}

#[test]
fn an_async_stage_runs_inside_a_nested_pipeline() {
    let p = Pipeline::new("outer");
    gen(&p, 50);
    p.pipeline::<u64, u64>("enrich", |s| {
        s.map_async("lookup", |x: u64| async move {
            tokio::task::yield_now().await;
            Ok(x * 10)
        })
        .executor(Exec::tasks(8));
        s.map("check", |x: u64| Ok(x + 1));
    });
    let (items, r) = run_collect(p);
    assert_eq!(items, (0..50).map(|x| x * 10 + 1).collect::<Vec<_>>());
    assert_eq!(r.stage("enrich/lookup").unwrap().executor, "tasks(8)");
}
