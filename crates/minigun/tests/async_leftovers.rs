//! A run with async stages leaves no thread and no descriptor behind: the stage's runtime
//! (its workers, its I/O driver's descriptors), its feeder and the sockets its futures
//! opened are all gone when `run()` returns.
//!
//! One test in this binary, so that no other test's threads or descriptors are counted.
#![cfg(feature = "async")]
mod common;
use common::{open_fds, threads};
use minigun::{Exec, Pipeline};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 300 items, each a connection to a TCP echo server on 127.0.0.1 that a plain thread
/// serves; a retried failure and a timeout on the way.
fn run_once(addr: std::net::SocketAddr) {
    let p = Pipeline::new("async-leftovers");
    p.producer("gen", |out| out.emit_all(0..300u64).map_err(Into::into));
    p.map_async("echo", move |x: u64| async move {
        if x == 7 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.write_all(&x.to_le_bytes()).await?;
        let mut back = [0u8; 8];
        sock.read_exact(&mut back).await?;
        Ok(u64::from_le_bytes(back))
    })
    .executor(Exec::tasks(50).timeout(Duration::from_millis(500)));
    p.consumer("sink", |_: u64| Ok(()));
    let report = p.run().expect("run");
    let s = report.stage("echo").unwrap();
    assert_eq!((s.items_out, s.failed), (299, 1));
}

#[test]
fn async_runs_leave_no_thread_and_no_descriptor() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::Builder::new()
        .name("echo-server".into())
        .spawn(move || {
            use std::io::{Read, Write};
            for mut sock in listener.incoming().map_while(Result::ok) {
                let mut buf = [0u8; 8];
                if sock.read_exact(&mut buf).is_ok() {
                    let _ = sock.write_all(&buf);
                }
            }
        })
        .unwrap();
    // The first run creates the process-wide signal watcher's pipe and the clock: warm up.
    run_once(addr);
    let (tasks, fds) = (threads(), open_fds());
    for round in 0..3 {
        run_once(addr);
        // The server thread closes its side of the last socket on its own time.
        common::wait_until("descriptors back", Duration::from_secs(10), || {
            open_fds() == fds
        });
        assert_eq!(threads(), tasks, "threads after run {round}");
        assert_eq!(open_fds(), fds, "descriptors after run {round}");
    }
}
