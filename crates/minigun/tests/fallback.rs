//! Where fork is not available (here: forced with `MINIGUN_NO_FORK`), fork stages run inline
//! with the same results, and the report says which executor really ran.
use minigun::{Exec, Pipeline};

#[test]
fn fork_stages_fall_back_to_inline() {
    // Set before the first pipeline is built: the check is made once per process.
    std::env::set_var("MINIGUN_NO_FORK", "1");
    let p = Pipeline::new("fallback");
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
    p.map("cow", |x: u64| Ok(x + 1)).cow_fork(4);
    p.map("ipc", |x: u64| Ok(x * 2)).ipc_fork(4);
    p.map("threads", |x: u64| Ok(x)).executor(Exec::threads(2));
    let sum = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s = sum.clone();
    p.consumer("sum", move |x: u64| {
        s.fetch_add(x, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(report.stage("cow").unwrap().executor, "inline");
    assert_eq!(report.stage("ipc").unwrap().executor, "inline");
    assert_eq!(report.stage("threads").unwrap().executor, "threads(2)");
    assert_eq!(
        sum.load(std::sync::atomic::Ordering::Relaxed),
        (1..=100u64).map(|x| x * 2).sum()
    );
}
