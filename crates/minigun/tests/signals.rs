//! SIGINT / SIGTERM during a run with fork stages: the run stops, every child is terminated
//! and reaped, the report names the signal, and the previous signal handlers are restored.
//!
//! The pipeline runs in a re-executed copy of this test binary, so that the signal is real.
#![allow(unsafe_code)] // Sends real signals and reads real dispositions.
mod common;
use common::DieWithParent;
use minigun::Pipeline;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use std::time::Duration;

const ROLE: &str = "MINIGUN_SIGNAL_TEST_ROLE";

/// The inner side: runs an endless pipeline whose items take 100 ms in forked children.
#[test]
fn inner_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let p = common::endless_forked("signals", &role, "slow", 2, Duration::from_millis(100));
    let seen = std::sync::atomic::AtomicBool::new(false);
    p.consumer("sink", move |_x: u64| {
        if !seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
            println!("READY");
        }
        Ok(())
    });
    let report = p
        .run()
        .expect("an interrupted run still returns its report");
    // SAFETY: querying the current disposition with a null new action changes nothing.
    let restored = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old);
        old.sa_sigaction == libc::SIG_DFL
    };
    let slow = report.stage("slow").unwrap();
    println!(
        "SIGNAL={:?} STOPPED={} LIVE={} ZOMBIES={} RESTORED={restored} ACCOUNTED={}",
        report.signal,
        report.stopped,
        common::live_children().len(),
        common::zombies().len(),
        slow.items_in == slow.items_out + slow.failed + slow.cancelled,
    );
}

fn interrupt(role: &str, signal: i32) -> String {
    signal_inner(role, signal, false)
}

/// Runs the inner side in a process group of its own and sends `signal` to the group once
/// it is ready (as a terminal, `timeout` or a service manager does): the run's processes
/// all get it, its forked ones too. Returns the inner side's summary line.
fn signal_inner(role: &str, signal: i32, group: bool) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["inner_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .die_with_parent();
    if group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("READY"));
    assert!(ready, "the inner run never became ready");
    let target = if group {
        -(child.id() as i32)
    } else {
        child.id() as i32
    };
    // SAFETY: sends a signal to our own child process (or to the process group it leads).
    unsafe { libc::kill(target, signal) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "inner run failed: {status:?} {rest:?}");
    rest.into_iter()
        .find(|l| l.starts_with("SIGNAL="))
        .expect("inner printed its summary")
}

fn check(line: &str, signal: i32) {
    assert!(line.contains(&format!("SIGNAL=Some({signal})")), "{line}");
    for part in [
        "STOPPED=true",
        "LIVE=0",
        "ZOMBIES=0",
        "RESTORED=true",
        "ACCOUNTED=true",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
}

/// With `handle_signals(false)` the run leaves SIGINT alone: the host's disposition (here:
/// ignore) stays in place during the run.
#[test]
fn signal_handling_can_be_left_to_the_host() {
    // SAFETY: sets and reads this test process's own SIGINT disposition.
    let during = unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        let p = Pipeline::new("host-signals");
        p.handle_signals(false);
        p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
        p.consumer("peek", |_x: u64| {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old);
            assert_eq!(old.sa_sigaction, libc::SIG_IGN);
            Ok(())
        });
        let r = p.run().unwrap();
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        r
    };
    assert_eq!(during.stage("peek").unwrap().items_in, 3);
    assert_eq!(during.failures_total, 0, "{during}");
}

#[test]
fn sigint_stops_a_cow_fork_run() {
    check(&interrupt("cow", libc::SIGINT), libc::SIGINT);
}

#[test]
fn sigterm_stops_an_ipc_fork_run() {
    check(&interrupt("ipc", libc::SIGTERM), libc::SIGTERM);
}

#[test]
fn sigterm_stops_a_cow_fork_run_with_a_fork_server() {
    check(&interrupt("cow-served", libc::SIGTERM), libc::SIGTERM);
}

// SIGTERM to the whole process group reaches the fork server too: the run is interrupted
// (its report returned, the signal named), not failed because its fork server died.
#[test]
fn sigterm_to_the_process_group_stops_a_run_with_a_fork_server() {
    check(
        &signal_inner("cow-served", libc::SIGTERM, true),
        libc::SIGTERM,
    );
}
