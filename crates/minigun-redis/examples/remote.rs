//! A remote stage on Redis Streams: a driver and its workers, all this same program.
//!
//! With `MINIGUN_REDIS_URL` set, this process is the driver (or, with `MINIGUN_WORKER=1`, a
//! worker). Without it, the example starts a private `redis-server` and two workers itself.
use minigun::remote::{serve_if_worker, Remote};
use minigun::{Exec, Pipeline};
use minigun_redis::RedisBroker;
use std::process::{Child, Command, Stdio};

/// The definition, built the same way by the driver and by every worker.
fn define() -> Pipeline {
    let broker = RedisBroker::from_env().expect("MINIGUN_REDIS_URL names the server");
    let p = Pipeline::new("collatz");
    p.producer("numbers", |out| {
        out.emit_all(1..=20_000u64).map_err(Into::into)
    });
    let remote = Remote::new(broker).batch(64).worker_exec(Exec::ipc_fork(2));
    p.map("steps", |mut n: u64| {
        let mut steps = 0u64;
        while n != 1 {
            n = if n.is_multiple_of(2) {
                n / 2
            } else {
                3 * n + 1
            };
            steps += 1;
        }
        Ok(steps)
    })
    .remote(remote);
    p.batch::<u64>("batch", 1_000);
    p.consumer("report", |b: Vec<u64>| {
        println!(
            "{} items, longest {} steps",
            b.len(),
            b.iter().max().unwrap_or(&0)
        );
        Ok(())
    });
    p
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    serve_if_worker(define)?;
    let mut started: Vec<Child> = Vec::new();
    if std::env::var_os("MINIGUN_REDIS_URL").is_none() {
        // Terminal 1 of the README, in one program: a server and two workers.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("minigun-remote-{port}"));
        std::fs::create_dir_all(&dir)?;
        let server = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()?;
        started.push(server);
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::env::set_var("MINIGUN_REDIS_URL", format!("redis://127.0.0.1:{port}/0"));
        for _ in 0..2 {
            let worker = Command::new(std::env::current_exe()?)
                .env("MINIGUN_WORKER", "1")
                .spawn()?;
            started.push(worker);
        }
    }
    let report = define().run();
    for mut child in started.into_iter().rev() {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!("{}", report?);
    Ok(())
}
