//! Any executor feeds any other: chains across process boundaries, fork stages in fan-out
//! and fan-in, and fork stages inside nested pipelines.
mod common;
use common::Sink;
use minigun::{Exec, Pipeline};

fn expected(n: u64, f: impl Fn(u64) -> u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(f).collect();
    v.sort();
    v
}

#[test]
fn thread_to_ipc_to_thread() {
    let p = Pipeline::new("t-i-t");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..500u64).map_err(Into::into));
    p.map("a", |x: u64| Ok(x + 1)).executor(Exec::threads(3));
    p.map("b", |x: u64| Ok(x * 2)).ipc_fork(2);
    p.map("c", |x: u64| Ok(x + 7)).executor(Exec::threads(2));
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    p.run().unwrap();
    assert_eq!(got.sorted(), expected(500, |x| (x + 1) * 2 + 7));
}

#[test]
fn cow_to_ipc_and_ipc_to_cow_multi_hop() {
    let p = Pipeline::new("hops");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..200u64).map_err(Into::into));
    p.map("cow1", |x: u64| Ok(x + 1)).cow_fork(3);
    p.map("ipc1", |x: u64| Ok(x * 3)).ipc_fork(2);
    p.map("cow2", |x: u64| Ok(x + 5)).cow_fork(2);
    p.map("ipc2", |x: u64| Ok(x * 2)).ipc_fork(3);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), expected(200, |x| ((x + 1) * 3 + 5) * 2));
    for s in ["cow1", "ipc1", "cow2", "ipc2"] {
        assert_eq!(report.stage(s).unwrap().items_out, 200, "{s}");
    }
}

#[test]
fn fork_stages_in_fan_out_and_fan_in() {
    let p = Pipeline::new("diamond");
    let got = Sink::default();
    let g = got.clone();
    let src = p.producer("gen", |out| out.emit_all(0..300u64).map_err(Into::into));
    let l = p.map("left", |x: u64| Ok(x * 2)).cow_fork(2).from(&src);
    let r = p
        .map("right", |x: u64| Ok(x * 2 + 1))
        .ipc_fork(2)
        .from(&src);
    let join = p.map("join", |x: u64| Ok(x)).ipc_fork(2).from(&l).from(&r);
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    })
    .from(&join);
    p.run().unwrap();
    assert_eq!(got.sorted(), (0..600).collect::<Vec<_>>());
}

#[test]
fn fork_stages_inside_a_nested_pipeline() {
    let p = Pipeline::new("nested-forks");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
    p.pipeline::<u64, u64>("work", |s| {
        s.map("c", |x: u64| Ok(x + 1)).cow_fork(2);
        s.pipeline::<u64, u64>("deeper", |d| {
            d.map("i", |x: u64| Ok(x * 10)).ipc_fork(2);
        });
    });
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), expected(100, |x| (x + 1) * 10));
    assert_eq!(
        report.stage("work/deeper/i").unwrap().executor,
        "ipc_fork(2)"
    );
}
