//! ipc_fork's window: by default each worker holds about `Exec::IN_FLIGHT_AHEAD` of work by
//! the items' measured time, so slow items do not wait behind a busy worker while another
//! one idles; a fixed `in_flight(n)` is what it says.
mod common;
use common::Sink;
use minigun::{Exec, Pipeline};
use std::time::Duration;

/// Item 0 takes 1.5 s, items 1..=60 take 10 ms each, on 2 workers. Returns how many of the
/// quick items ran in the worker that ran item 0.
fn behind_the_slow_item(exec: Option<Exec>) -> usize {
    let p = Pipeline::new("window");
    let sink = Sink::<(u32, u64)>::default();
    p.producer("gen", |out| out.emit_all(0..=60u64).map_err(Into::into));
    let stage = p.map("work", |x: u64| {
        let ms = if x == 0 { 1500 } else { 10 };
        std::thread::sleep(Duration::from_millis(ms));
        Ok((std::process::id(), x))
    });
    let stage = stage.ipc_fork(2);
    if let Some(exec) = exec {
        stage.executor(exec);
    }
    sink.consume(&p);
    let report = p.run().expect("runs");
    assert_eq!(report.stage("work").unwrap().items_out, 61);
    let got = sink.sorted();
    assert_eq!(got.len(), 61, "every item once");
    let slow = got.iter().find(|(_, x)| *x == 0).expect("item 0 ran").0;
    let pids: std::collections::BTreeSet<u32> = got.iter().map(|(pid, _)| *pid).collect();
    assert_eq!(pids.len(), 2, "both workers ran items: {got:?}");
    got.iter()
        .filter(|(pid, x)| *pid == slow && *x != 0)
        .count()
}

#[test]
fn slow_items_do_not_pile_up_behind_a_busy_worker() {
    // The default: the window follows the items' time (10 ms items: one running, one
    // waiting), so the other worker takes the quick items while item 0 runs.
    let behind = behind_the_slow_item(None);
    assert!(
        behind <= 3,
        "{behind} quick items ran in the worker busy with the slow one"
    );
    // A fixed window of 256 hands the items round-robin up front: half of them wait behind
    // the slow item (what the old default did).
    let behind = behind_the_slow_item(Some(Exec::ipc_fork(2).in_flight(256)));
    assert!(
        behind >= 20,
        "with in_flight(256), {behind} quick items ran behind the slow one"
    );
}

#[test]
fn the_default_window_is_chosen_and_in_flight_fixes_it() {
    let (auto, most) = match Exec::ipc_fork(2) {
        Exec::IpcFork(o) => (o.in_flight_auto, o.in_flight),
        e => panic!("not ipc_fork: {e:?}"),
    };
    assert!(auto);
    assert_eq!(most, 4096);
    let (auto, most) = match Exec::ipc_fork(2).in_flight(8) {
        Exec::IpcFork(o) => (o.in_flight_auto, o.in_flight),
        e => panic!("not ipc_fork: {e:?}"),
    };
    assert!(!auto);
    assert_eq!(most, 8);
}
