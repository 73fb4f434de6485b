//! Children never outlive their parent, and the library never reaps children it did not fork.
#![allow(unsafe_code)] // Sends real signals.
mod common;
use common::DieWithParent;
use minigun::{Exec, Pipeline};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

const ROLE: &str = "MINIGUN_SUPERVISION_TEST_ROLE";

/// Inner side: a run whose fork workers are busy; prints their pids, then waits to be killed.
#[test]
fn inner_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let p = common::endless_forked("orphans", &role, "sleepy", 3, Duration::from_secs(60));
    p.consumer("sink", |_x: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::live_children().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids: Vec<String> = common::live_children().iter().map(u32::to_string).collect();
    println!("PIDS {}", pids.join(" "));
    let _ = handle.wait();
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(false)
}

fn children_die_with_parent(role: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["inner_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .die_with_parent()
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("PIDS "))
        .expect("inner printed its children");
    let list = &line[line.find("PIDS ").unwrap() + 5..];
    let pids: Vec<u32> = list
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{line}");
    assert!(pids.iter().all(|&p| alive(p)));
    // SIGKILL: the parent runs no code at all; only the kernel can take the children down.
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "children outlived their parent: {left:?}");
}

#[test]
fn cow_fork_children_die_with_the_parent() {
    children_die_with_parent("cow");
}

#[test]
fn ipc_fork_workers_die_with_the_parent() {
    children_die_with_parent("ipc");
}

/// A child the host program started itself is still its own to wait for after a fork run.
#[test]
fn host_children_are_not_reaped_by_the_library() {
    let mut host_child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
    // It has exited (a zombie) before the run, so that a waitpid(-1) anywhere would steal
    // its status.
    let zombie = host_child.id();
    common::wait_until("the host's child to exit", Duration::from_secs(10), || {
        common::zombies().contains(&zombie)
    });
    for exec in [Exec::cow_fork(2), Exec::ipc_fork(2)] {
        let p = Pipeline::new("host");
        p.producer("gen", |out| out.emit_all(0..50u64).map_err(Into::into));
        p.map("work", |x: u64| Ok(x)).wire().executor(exec);
        p.consumer("sink", |_x: u64| Ok(()));
        assert_eq!(p.run().unwrap().stage("work").unwrap().items_out, 50);
    }
    let status = host_child
        .wait()
        .expect("the host's child is still ours to reap");
    assert_eq!(status.code(), Some(7));
}
