//! cow_fork with several items per child: the same results, and a crash fails only the item
//! the child was running; the items after it are run again in another child.
#![allow(unsafe_code)] // Crashes a child for real.
mod common;
use common::Sink;
use minigun::{Exec, FailureKind, Output, Pipeline};

fn run(per_fork: usize, crash_on: Option<u64>) -> (Vec<u64>, minigun::RunReport) {
    let p = Pipeline::new("batched-forks");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..200u64).map_err(Into::into));
    p.processor("work", move |x: u64, out: &mut Output<'_, u64>| {
        if Some(x) == crash_on {
            // SAFETY: kills this child process, as a crash would.
            unsafe { libc::abort() };
        }
        out.emit(x * 3)?;
        Ok(())
    })
    .wire()
    .executor(Exec::cow_fork(3).items_per_fork(per_fork));
    p.consumer("sink", move |x: u64| {
        g.push(x);
        Ok(())
    });
    let report = p.run().unwrap();
    assert!(common::live_children().is_empty() && common::zombies().is_empty());
    (got.sorted(), report)
}

#[test]
fn several_items_per_child_give_the_same_results() {
    let want: Vec<u64> = (0..200).map(|x| x * 3).collect();
    for per_fork in [1, 4, 16] {
        let (got, report) = run(per_fork, None);
        assert_eq!(got, want, "items_per_fork {per_fork}");
        assert_eq!(report.stage("work").unwrap().latency.count, 200);
    }
}

#[test]
fn a_crash_fails_only_the_running_item() {
    for per_fork in [4, 16] {
        let (got, report) = run(per_fork, Some(77));
        let want: Vec<u64> = (0..200).filter(|&x| x != 77).map(|x| x * 3).collect();
        assert_eq!(got, want, "items_per_fork {per_fork}: {report}");
        let work = report.stage("work").unwrap();
        assert_eq!((work.failed, work.retried, work.items_in), (1, 0, 200));
        let f = &report.failures[0];
        assert_eq!((f.item, &f.kind), (77, &FailureKind::Signal(libc::SIGABRT)));
    }
}
