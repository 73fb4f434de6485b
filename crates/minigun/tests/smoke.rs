use minigun::{Exec, Pipeline};
use std::sync::{Arc, Mutex};

fn run(exec: &str) -> Vec<u64> {
    let p = Pipeline::new("smoke");
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    p.producer("gen", |out| {
        for i in 0..1000u64 {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p.processor("double", |x: u64, out: &mut minigun::Output<'_, u64>| {
        out.emit(x * 2)?;
        if x % 10 == 0 {
            out.emit(x)?;
        }
        Ok(())
    });
    match exec {
        "inline" => {
            s.executor(Exec::inline());
        }
        "threads" => {
            s.executor(Exec::threads(4));
        }
        "cow" => {
            s.cow_fork(4);
        }
        "ipc" => {
            s.ipc_fork(4);
        }
        _ => unreachable!(),
    }
    p.consumer("collect", move |x: u64| {
        g.lock().unwrap().push(x);
        Ok(())
    });
    let r = p.run().unwrap();
    println!("{r}");
    let mut v = got.lock().unwrap().clone();
    v.sort();
    v
}

#[test]
fn all_executors_agree() {
    let oracle = run("inline");
    assert_eq!(oracle.len(), 1100);
    for e in ["threads", "cow", "ipc"] {
        assert_eq!(run(e), oracle, "{e}");
    }
}
