//! W8 async stages under `tasks(n)`, each against a baseline measured in this process:
//!
//! - a) 20,000 items that each await a 20 ms timer, `tasks(1000)`, against the ideal rate
//!   n / 20 ms, with a hand-written `buffer_unordered(1000)` of the same timers as the floor
//!   a tokio program reaches; `threads(1000)` sleeping 20 ms per item beside it (and, with
//!   `--python`, asyncio with a semaphore of 1,000); and the same under
//!   `ipc_fork(2).tasks_per_worker(500)`
//!   (two forked workers, each with its own runtime), against 1,000 / 20 ms;
//! - b) 100,000 requests to a local TCP echo server this job starts (8-byte request and
//!   reply over a pool of 256 kept-alive connections), `tasks(256)`, against a hand-written
//!   `buffer_unordered(256)` loop over the same client;
//! - c) 10,000 items in flight at once (each awaits a 500 ms timer): the growth of resident
//!   memory over the run (sampled every 5 ms), against a target of 64 MiB;
//! - d) per-item cost of a trivial async map (a ready future) under `tasks(256)` against the
//!   same map inline.

use crate::common::{best_of, best_of_pair, best_of_three, progress, timed, Cfg, Row};
use futures::StreamExt;
use minigun::{Exec, Pipeline};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) fn run(cfg: &Cfg) -> Vec<Row> {
    let mut rows = w8c();
    rows.extend(w8a(cfg));
    rows.extend(w8a_ipc(cfg));
    rows.extend(w8b(cfg));
    rows.extend(w8d(cfg));
    rows
}

/// A pipeline `gen -> stage -> sum`: `stage` is added by `add`; the sum of its outputs.
fn through(items: u64, add: impl FnOnce(&Pipeline)) -> (Duration, u64) {
    let sum = Arc::new(AtomicU64::new(0));
    let s = sum.clone();
    let p = Pipeline::new("w8");
    p.producer("gen", move |out| out.emit_all(0..items).map_err(Into::into));
    add(&p);
    p.consumer("sum", move |x: u64| {
        s.fetch_add(x, Ordering::Relaxed);
        Ok(())
    });
    let (wall, report) = timed(|| p.run().expect("W8 pipeline runs"));
    assert_eq!(report.consumed, items, "W8: every item consumed");
    (wall, sum.load(Ordering::Relaxed))
}

fn w8a(cfg: &Cfg) -> Vec<Row> {
    const N: usize = 1000;
    const WAIT: Duration = Duration::from_millis(20);
    let items = cfg.size(20_000, 4_000);
    let ideal = N as f64 / WAIT.as_secs_f64();
    progress(format!(
        "W8a {items} items awaiting 20 ms: hand-written buffer_unordered({N}), tasks({N}) and threads({N}), alternately"
    ));
    // The hand-written floor: the same timers under `buffer_unordered(N)` on a multi-thread
    // runtime sized as the one `tasks(n)` makes. tokio's timer rounds each sleep up to its
    // next millisecond tick, so this is what any tokio pipeline can reach, below the ideal.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("W8a runtime");
    let ((base_wall, c), (tasks_wall, a), (threads_wall, b)) = best_of_three(
        cfg.reps,
        || {
            timed(|| {
                rt.block_on(
                    futures::stream::iter(0..items)
                        .map(|x| async move {
                            tokio::time::sleep(WAIT).await;
                            x
                        })
                        .buffer_unordered(N)
                        .fold(0u64, |s, x| async move { s + x }),
                )
            })
        },
        || {
            through(items, |p| {
                p.map_async("wait", |x: u64| async move {
                    tokio::time::sleep(WAIT).await;
                    Ok(x)
                })
                .executor(Exec::tasks(N));
            })
        },
        || {
            through(items, |p| {
                p.map("wait", |x: u64| {
                    std::thread::sleep(WAIT);
                    Ok(x)
                })
                .executor(Exec::threads(N));
            })
        },
    );
    let want = items * (items - 1) / 2;
    assert_eq!((a, b, c), (want, want, want), "W8a: wrong sums");
    let base = Row::new("W8", "baseline", "buffer_unordered", N, items, base_wall)
        .variant("a: await 20 ms timer, hand-written")
        .floor(ideal)
        .note("floor = ideal n / 20 ms");
    let hand = base.items_per_sec;
    vec![
        base,
        Row::new("W8", "minigun", format!("tasks({N})"), N, items, tasks_wall)
            .variant("a: await 20 ms timer")
            .floor(ideal)
            .note(format!(
                "floor = ideal n / 20 ms; {:.3}x the hand-written buffer_unordered({N})",
                items as f64 / tasks_wall.as_secs_f64() / hand
            )),
        Row::new(
            "W8",
            "minigun",
            format!("threads({N})"),
            N,
            items,
            threads_wall,
        )
        .variant("a: thread::sleep 20 ms")
        .floor(ideal)
        .note("floor = ideal n / 20 ms"),
    ]
}

/// W8a under `ipc_fork(2).tasks_per_worker(500)`: the same 20 ms timers, 500 in flight in
/// each of two forked workers (each with its own current-thread runtime), against the ideal
/// rate 1,000 / 20 ms.
fn w8a_ipc(cfg: &Cfg) -> Vec<Row> {
    const WORKERS: usize = 2;
    const N: usize = 500;
    const WAIT: Duration = Duration::from_millis(20);
    let items = cfg.size(20_000, 4_000);
    let ideal = (WORKERS * N) as f64 / WAIT.as_secs_f64();
    progress(format!(
        "W8a {items} items awaiting 20 ms: ipc_fork({WORKERS}).tasks_per_worker({N})"
    ));
    let (wall, sum) = best_of(cfg.reps, || {
        through(items, |p| {
            p.map_async("wait", |x: u64| async move {
                tokio::time::sleep(WAIT).await;
                Ok(x)
            })
            .ipc_fork(WORKERS)
            .tasks_per_worker(N);
        })
    });
    assert_eq!(sum, items * (items - 1) / 2, "W8a ipc_fork: wrong sum");
    let exec = format!("ipc_fork({WORKERS}).tasks_per_worker({N})");
    vec![Row::new("W8", "minigun", exec, WORKERS * N, items, wall)
        .variant("a: await 20 ms timer, in forked workers")
        .floor(ideal)
        .note("floor = ideal 2 x 500 / 20 ms")]
}

/// A pool of kept-alive connections to the echo server; at most one request on each.
struct Client {
    conns: Mutex<Vec<TcpStream>>,
    permits: tokio::sync::Semaphore,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, n: usize) -> Arc<Client> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let c = TcpStream::connect(addr)
                .await
                .expect("connect to echo server");
            c.set_nodelay(true).expect("nodelay");
            conns.push(c);
        }
        Arc::new(Client {
            conns: Mutex::new(conns),
            permits: tokio::sync::Semaphore::new(n),
        })
    }

    /// Sends `x` on a free connection; the echoed value.
    async fn request(&self, x: u64) -> std::io::Result<u64> {
        let _permit = self.permits.acquire().await.expect("open semaphore");
        let mut c = self.conns.lock().unwrap().pop().expect("a free connection");
        let r = async {
            c.write_all(&x.to_le_bytes()).await?;
            let mut back = [0u8; 8];
            c.read_exact(&mut back).await?;
            Ok(u64::from_le_bytes(back))
        }
        .await;
        self.conns.lock().unwrap().push(c);
        r
    }
}

/// An echo server of 8-byte messages on 127.0.0.1, on `rt`.
fn echo_server(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the echo server");
    let addr = listener.local_addr().expect("address");
    rt.spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 8];
                while sock.read_exact(&mut buf).await.is_ok() {
                    if sock.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn w8b(cfg: &Cfg) -> Vec<Row> {
    const N: usize = 256;
    let items = cfg.size(100_000, 10_000);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("w8-echo")
        .enable_all()
        .build()
        .expect("server runtime");
    let addr = echo_server(&server);
    // The client's runtime: the stage's work runs on it in both variants.
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let client = client_rt.block_on(Client::connect(addr, N));
    progress(format!(
        "W8b {items} echo requests: hand-written buffer_unordered({N}) and tasks({N}), alternately"
    ));
    let want = items * (items - 1) / 2;
    let ((base_wall, a), (wall, b)) = best_of_pair(
        cfg.reps,
        || {
            let c = client.clone();
            timed(|| {
                client_rt.block_on(
                    futures::stream::iter(0..items)
                        .map(|x| {
                            let c = c.clone();
                            async move { c.request(x).await.expect("echo") }
                        })
                        .buffer_unordered(N)
                        .fold(0u64, |s, x| async move { s + x }),
                )
            })
        },
        || {
            let c = client.clone();
            let handle = client_rt.handle().clone();
            through(items, move |p| {
                p.map_async("call", move |x: u64| {
                    let c = c.clone();
                    async move { Ok(c.request(x).await?) }
                })
                .executor(Exec::tasks(N).runtime(handle));
            })
        },
    );
    assert_eq!((a, b), (want, want), "W8b: wrong sums");
    let base = Row::new("W8", "baseline", "buffer_unordered", N, items, base_wall)
        .variant("b: TCP echo, hand-written");
    let floor = base.items_per_sec;
    vec![
        base,
        Row::new("W8", "minigun", format!("tasks({N})"), N, items, wall)
            .variant("b: TCP echo")
            .floor(floor),
    ]
}

/// Resident memory of this process now, in bytes.
fn rss_now() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn w8c() -> Vec<Row> {
    const N: usize = 10_000;
    let items = N as u64;
    progress(format!("W8c {N} items in flight at once, RSS sampled"));
    // A first, smaller run: the runtime's and the allocator's one-off costs are not growth.
    through(1000, |p| {
        p.map_async("wait", |x: u64| async move { Ok(x) })
            .executor(Exec::tasks(1000));
    });
    let before = rss_now();
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_now(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let live = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (l, m) = (live.clone(), most.clone());
    let (wall, sum) = through(items, move |p| {
        p.map_async("hold", move |x: u64| {
            let (l, m) = (l.clone(), m.clone());
            async move {
                m.fetch_max(l.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(500)).await;
                l.fetch_sub(1, Ordering::SeqCst);
                Ok(x)
            }
        })
        .executor(Exec::tasks(N));
    });
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert_eq!(sum, items * (items - 1) / 2, "W8c: wrong sum");
    let most = most.load(Ordering::SeqCst);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(before);
    let mut row = Row::new("W8", "minigun", format!("tasks({N})"), N, items, wall)
        .variant("c: 10,000 in flight, RSS")
        .note(format!(
            "RSS growth {:.1} MiB with {most} in flight at once (target <= 64 MiB)",
            growth as f64 / (1 << 20) as f64
        ));
    row.rss_growth_bytes = Some(growth);
    vec![row]
}

fn w8d(cfg: &Cfg) -> Vec<Row> {
    const N: usize = 256;
    let items = cfg.size(500_000, 50_000);
    progress(format!(
        "W8d {items} items through a trivial map: inline and async under tasks({N}), alternately"
    ));
    let ((inline_wall, a), (wall, b)) = best_of_pair(
        cfg.reps,
        || {
            through(items, |p| {
                p.map("inc", |x: u64| Ok(x + 1));
            })
        },
        || {
            through(items, |p| {
                p.map_async("inc", |x: u64| async move { Ok(x + 1) })
                    .executor(Exec::tasks(N));
            })
        },
    );
    let want = items * (items + 1) / 2;
    assert_eq!((a, b), (want, want), "W8d: wrong sums");
    let per = |d: Duration| d.as_nanos() as f64 / items as f64;
    let base = Row::new("W8", "baseline", "inline", 1, items, inline_wall)
        .variant("d: trivial map, sync")
        .note(format!("{:.0} ns per item", per(inline_wall)));
    let floor = base.items_per_sec;
    vec![
        base,
        Row::new("W8", "minigun", format!("tasks({N})"), N, items, wall)
            .variant("d: trivial map, ready future")
            .floor(floor)
            .note(format!(
                "{:.0} ns per item, {:+.0} ns against inline",
                per(wall),
                per(wall) - per(inline_wall)
            )),
    ]
}
