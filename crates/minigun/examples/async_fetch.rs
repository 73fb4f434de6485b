//! Thousands of I/O-bound items in flight: an async stage under `tasks(n)` calls a TCP
//! server (started here, on 127.0.0.1) for each item, with a per-item timeout and retries,
//! between ordinary sync stages.
use minigun::{Exec, OnError, Pipeline};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A server that answers each line with its length, after 10 ms (a slow backend).
fn start_server(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let _ = w.write_all(format!("{}\n", line.len()).as_bytes()).await;
                }
            });
        }
    });
    addr
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = tokio::runtime::Runtime::new()?;
    let addr = start_server(&server);

    let p = Pipeline::new("async-fetch");
    p.producer("urls", |out| {
        out.emit_all((0..5_000u32).map(|i| format!("https://example.org/page/{i}")))?;
        Ok(())
    });
    // 200 requests in flight at once; each one 10 ms: about 20,000 per second at best.
    p.map_async("fetch", move |url: String| async move {
        let mut sock = TcpStream::connect(addr).await?;
        sock.write_all(format!("{url}\n").as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(&mut sock).read_line(&mut reply).await?;
        Ok(reply.trim().parse::<usize>()?)
    })
    .executor(Exec::tasks(200).timeout(Duration::from_secs(5)))
    .on_error(OnError::retry(2).backoff(Duration::from_millis(50)));
    p.consumer("total", |len: usize| {
        assert!(len > 20);
        Ok(())
    });
    let report = p.run()?;
    let fetch = report.stage("fetch").unwrap();
    assert_eq!(fetch.items_out, 5_000);
    println!("{report}");
    Ok(())
}
