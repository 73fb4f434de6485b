//! While a run aborts and a child takes its time to die (it ignores SIGTERM, so it is killed
//! after the grace period), the supervisor sleeps: it must not spin on the abort signal.
#![allow(unsafe_code)] // Reads this process's CPU time; ignores SIGTERM in a child.
use minigun::{Exec, OnError, Output, Pipeline, RunError};
use std::time::Duration;

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills a zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn abort_while_a_child_lingers(exec: Exec) {
    let p = Pipeline::new("no-spin");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    p.processor("work", |x: u64, out: &mut Output<'_, u64>| {
        if x == 0 {
            // SAFETY: changes this child's own SIGTERM disposition.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            std::thread::sleep(Duration::from_secs(30));
        } else {
            std::thread::sleep(Duration::from_millis(100));
            return Err("abort the run".into());
        }
        Ok(out.emit(x)?)
    })
    .on_error(OnError::fail_fast())
    .wire()
    .executor(exec);
    p.consumer("sink", |_x: u64| Ok(()));
    let before = cpu_time();
    let started = std::time::Instant::now();
    let r = p.run();
    let (cpu, wall) = (cpu_time() - before, started.elapsed());
    assert!(matches!(r, Err(RunError::Aborted { .. })));
    // The lingering child is killed after the grace period, so the run lasts a while...
    assert!(wall >= Duration::from_millis(400), "{wall:?}");
    // ...and the parent spends that time asleep, not polling in a loop.
    assert!(cpu < wall / 3, "cpu {cpu:?} over wall {wall:?}");
}

#[test]
fn cow_fork_supervisor_sleeps_while_a_child_lingers() {
    abort_while_a_child_lingers(Exec::cow_fork(2));
}

#[test]
fn ipc_fork_supervisor_sleeps_while_a_worker_lingers() {
    abort_while_a_child_lingers(Exec::ipc_fork(2));
}
