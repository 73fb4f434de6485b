//! Process hygiene of the fork executors: children are reaped and fds closed, children cannot
//! change the parent's memory, cow_fork inputs need no serde, fork hooks run where and when
//! they should, child output survives a piped stdout, and forking while other threads hold
//! locks (allocator, stdout, channels) never leaves a child hanging.
mod common;
use common::{assert_no_children, run_bounded, Fork};
use common::{open_fds, Sink, TempDir};
use minigun::{Exec, Output, Pipeline, RunReport};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Appends one line to a file (created if missing).
fn append(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}

/// FNV-1a over the bytes.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// 200 items through a map under `fk`; item 13 fails with an error, item 17 aborts its
/// process, and with `hang` item 19 hangs until the timeout kills it.
fn messy_run(fk: Fork, hang: bool) -> RunReport {
    let p = Pipeline::new("messy");
    p.producer("gen", |out| {
        for i in 0..200u64 {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p.map("work", move |x: u64| {
        match x {
            13 => return Err("unlucky".into()),
            17 => std::process::abort(),
            19 if hang => loop {
                std::thread::sleep(Duration::from_millis(50));
            },
            _ => {}
        }
        Ok(x + 1)
    });
    fk.apply(&s, 4);
    if hang {
        let t = Duration::from_millis(800);
        s.executor(match fk {
            Fork::Cow => Exec::cow_fork(4).timeout(t),
            Fork::Ipc => Exec::ipc_fork(4).timeout(t),
        });
    }
    p.consumer("sink", |_: u64| Ok(()));
    let r = run_bounded(p).expect("run succeeds (skip policy)");
    let s = r.stage("work").unwrap();
    // Exact failure accounting is fork_crashes.rs's business; here: nothing lost.
    let bad = if hang { 3 } else { 2 };
    assert_eq!(s.items_in, 200);
    assert_eq!(s.items_out + s.failed, 200, "{:?}", r.failures);
    assert!(s.failed >= bad, "{:?}", r.failures);
    r
}

both!(fn no_zombies_no_children_no_leaked_fds(fk) {
    // The first run of a process creates the process-wide signal watcher (a self-pipe that
    // lives as long as the process, by design): do that with an inline run before measuring.
    let p = Pipeline::new("warm-up");
    p.producer("gen", |out| out.emit(1u64).map_err(Into::into));
    p.consumer("sink", |_: u64| Ok(()));
    run_bounded(p).expect("warm-up run");

    let before = open_fds();
    for round in 0..3 {
        messy_run(fk, false);
        assert_no_children();
        assert_eq!(open_fds(), before, "fds after clean-ish run {round}");
    }
    // A run in which a hung child is killed on its timeout.
    messy_run(fk, true);
    assert_no_children();
    assert_eq!(open_fds(), before, "fds after a run with a timeout");
});

/// Parent memory the children write to; one slot per executor.
static TOUCHED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

both!(fn child_writes_do_not_reach_the_parent(fk) {
    let slot = fk as usize;
    TOUCHED[slot].store(42, Ordering::SeqCst);
    let shared = Arc::new(Mutex::new(vec![1u64, 2, 3]));
    let n = 60u64;
    let p = Pipeline::new("cow-memory");
    let got = Sink::default();
    common::gen(&p, n);
    let sh = shared.clone();
    let s = p.map("touch", move |x: u64| {
        let before = TOUCHED[slot].fetch_add(1000, Ordering::SeqCst);
        let mut v = sh.lock().unwrap();
        v.push(x);
        Ok((std::process::id(), before, v.len() as u64, x))
    });
    fk.apply(&s, 3);
    Sink::<(u32, u64, u64, u64)>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    assert_eq!(r.stage("touch").unwrap().items_out, n);

    // The parent is untouched.
    assert_eq!(TOUCHED[slot].load(Ordering::SeqCst), 42);
    assert_eq!(*shared.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(Arc::strong_count(&shared), 1, "the stage closure was dropped");

    let got = got.sorted();
    assert_eq!(got.len() as u64, n);
    assert!(got.iter().all(|t| t.0 != std::process::id()));
    match fk {
        // Each child starts from the parent's memory as it was: 42 and three elements.
        Fork::Cow => assert!(
            got.iter().all(|t| t.1 == 42 && t.2 == 4),
            "{got:?}"
        ),
        // A worker keeps its own copy across items: per process, its k-th item (k = 0, 1, ..)
        // sees 42 + 1000 k and 3 + k + 1 elements.
        Fork::Ipc => {
            let mut per_pid: std::collections::BTreeMap<u32, Vec<(u64, u64)>> =
                Default::default();
            for t in &got {
                per_pid.entry(t.0).or_default().push((t.1, t.2));
            }
            for (pid, mut seen) in per_pid {
                seen.sort();
                for (k, (before, len)) in seen.iter().enumerate() {
                    assert_eq!(
                        (*before, *len),
                        (42 + 1000 * k as u64, 4 + k as u64),
                        "worker {pid}: {seen:?}"
                    );
                }
            }
        }
    }
    assert_no_children();
});

/// Deliberately not `Serialize`: cow_fork hands it to the child through copy-on-write memory.
#[derive(Clone)]
struct Big(Vec<u8>);

#[test]
fn cow_fork_input_needs_no_serde() {
    let n = 40u64;
    // Large read-only data in the parent, read by every child without a copy being sent.
    let table: Arc<Vec<u64>> = Arc::new((0..1_000_000u64).map(|i| i * i).collect());
    let p = Pipeline::new("no-serde");
    let got = Sink::default();
    p.producer("gen", move |out| {
        for i in 0..n {
            out.emit(Big(vec![i as u8; 64 << 10]))?;
        }
        Ok(())
    });
    let t = table.clone();
    p.map("work", move |b: Big| {
        let i = u64::from(b.0[0]);
        Ok((i, b.0.len(), checksum(&b.0), t[(i * 1000) as usize]))
    })
    .cow_fork(2);
    Sink::<(u64, usize, u64, u64)>::consume(&got, &p);
    let r = run_bounded(p).expect("run succeeds");
    let expected: Vec<(u64, usize, u64, u64)> = (0..n)
        .map(|i| {
            let v = vec![i as u8; 64 << 10];
            (i, v.len(), checksum(&v), (i * 1000) * (i * 1000))
        })
        .collect();
    assert_eq!(got.sorted(), expected);
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (n, n, 0));
    assert_eq!(s.executor, "cow_fork(2)");
    assert_no_children();
}

both!(fn fork_hooks_where_and_in_order(fk) {
    // Pipeline-level hooks before stage-level ones; before_fork in the parent, once, before
    // the first fork; after_fork in every child (per item for cow_fork, per worker for
    // ipc_fork) before it handles items. Children record what they ran in a file of their own.
    let dir = TempDir::new("hooks");
    let children = dir.path().join("children");
    std::fs::create_dir(&children).unwrap();
    let bf_marker = dir.path().join("before-fork-ran");
    let parent_log: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let (n, workers) = (30u64, 3usize);

    let p = Pipeline::new("hooks");
    let own_file = {
        let children = children.clone();
        move || children.join(format!("child-{}", std::process::id()))
    };
    {
        let log = parent_log.clone();
        p.before_fork(move || {
            log.lock().unwrap().push(("pipeline".into(), std::process::id()));
            Ok(())
        });
        let f = own_file.clone();
        p.after_fork(move || {
            append(&f(), "pipeline after_fork")?;
            Ok(())
        });
    }
    common::gen(&p, n);
    let f = own_file.clone();
    let s = p.map("work", move |x: u64| {
        append(&f(), &format!("item {x}"))?;
        Ok(x)
    });
    fk.apply(&s, workers);
    {
        let log = parent_log.clone();
        let marker = bf_marker.clone();
        s.before_fork(move || {
            std::fs::write(&marker, b"yes")?;
            log.lock().unwrap().push(("stage".into(), std::process::id()));
            Ok(())
        });
        let f = own_file.clone();
        let marker = bf_marker.clone();
        s.after_fork(move || {
            if !marker.exists() {
                return Err("after_fork ran before the stage's before_fork".into());
            }
            append(&f(), "stage after_fork")?;
            Ok(())
        });
    }
    p.consumer("sink", |_: u64| Ok(()));
    let r = run_bounded(p).expect("run succeeds");
    let st = r.stage("work").unwrap();
    assert_eq!((st.items_in, st.items_out, st.failed), (n, n, 0), "{:?}", r.failures);

    // before_fork: in the parent (it changed the parent's memory), once, pipeline first.
    let me = std::process::id();
    assert_eq!(
        *parent_log.lock().unwrap(),
        vec![("pipeline".to_string(), me), ("stage".to_string(), me)]
    );

    // after_fork: one file per child process.
    let mut files = Vec::new();
    for e in std::fs::read_dir(&children).unwrap() {
        let e = e.unwrap();
        let pid: u32 = e.file_name().to_str().unwrap()["child-".len()..].parse().unwrap();
        assert_ne!(pid, me, "hooks and items ran in children");
        files.push(std::fs::read_to_string(e.path()).unwrap());
    }
    let expected_children = match fk {
        Fork::Cow => n as usize,
        Fork::Ipc => workers,
    };
    assert_eq!(files.len(), expected_children, "after_fork per child: {files:?}");
    let mut items = Vec::new();
    for content in &files {
        let lines: Vec<&str> = content.lines().collect();
        assert!(
            lines.len() >= 2
                && lines[0] == "pipeline after_fork"
                && lines[1] == "stage after_fork",
            "hooks first, pipeline before stage: {content:?}"
        );
        for l in &lines[2..] {
            let x: u64 = l.strip_prefix("item ").expect("only items after the hooks").parse().unwrap();
            items.push(x);
        }
        if fk == Fork::Cow {
            assert_eq!(lines.len(), 3, "one item per cow child: {content:?}");
        }
    }
    items.sort();
    assert_eq!(items, (0..n).collect::<Vec<_>>());
    assert_no_children();
});

#[test]
fn before_fork_once_per_fork_stage() {
    let count = Arc::new(AtomicU64::new(0));
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let p = Pipeline::new("two-fork-stages");
    {
        let (c, l) = (count.clone(), log.clone());
        p.before_fork(move || {
            c.fetch_add(1, Ordering::SeqCst);
            l.lock().unwrap().push("pipeline");
            Ok(())
        });
    }
    p.producer("gen", |out| {
        for i in 0..50u64 {
            out.emit(i)?;
        }
        Ok(())
    });
    let l = log.clone();
    p.map("a", |x: u64| Ok(x + 1))
        .cow_fork(2)
        .before_fork(move || {
            l.lock().unwrap().push("a");
            Ok(())
        });
    let l = log.clone();
    p.map("b", |x: u64| Ok(x * 2))
        .ipc_fork(2)
        .before_fork(move || {
            l.lock().unwrap().push("b");
            Ok(())
        });
    p.map("c", |x: u64| Ok(x)); // inline: no fork hooks
    p.consumer("sink", |_: u64| Ok(()));
    let r = run_bounded(p).expect("run succeeds");
    assert_eq!(r.stage("c").unwrap().items_in, 50);
    assert_eq!(count.load(Ordering::SeqCst), 2, "once per fork stage");
    // Each stage-level hook follows a pipeline-level run of its own.
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 4, "{log:?}");
    let mut pending = 0;
    for e in &log {
        match *e {
            "pipeline" => pending += 1,
            _ => {
                assert!(pending > 0, "stage hook before the pipeline hook: {log:?}");
                pending -= 1;
            }
        }
    }
    assert!(log.contains(&"a") && log.contains(&"b"), "{log:?}");
    assert_no_children();
}

/// Set in the re-executed test binary: run the printing pipeline instead of checking.
const INNER: &str = "MINIGUN_FORK_HYGIENE_PRINT_INNER";

#[test]
fn child_println_survives_a_piped_stdout() {
    if std::env::var_os(INNER).is_some() {
        return print_from_children();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_println_survives_a_piped_stdout",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER, "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inner run failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |needle: &str| stdout.matches(needle).count();
    for x in 0..200u64 {
        assert_eq!(count(&format!("<cow-line {x}>")), 1, "cow child {x}");
        assert_eq!(count(&format!("<ipc-line {x}>")), 1, "ipc worker, item {x}");
        if x.is_multiple_of(10) {
            // Printed without a newline just before the child exits.
            assert_eq!(count(&format!("<cow-tail {x}>")), 1, "cow child {x} tail");
        }
    }
    // The parent's half line, pending while children were forked, is printed once: children
    // did not inherit it to print it again.
    assert_eq!(count("<parent-partial>"), 1, "{stdout}");
    assert_eq!(count("<parent-end>"), 1);
    assert_eq!(count("<inner-done>"), 1);
}

/// The inner run: children print to the inherited stdout, a pipe.
fn print_from_children() {
    let p = Pipeline::new("print");
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    p.producer("gen", move |out| {
        // A half line stays in the parent's stdout buffer while cow children are forked.
        print!("<parent-partial>");
        for i in 0..200u64 {
            out.emit(i)?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while d.load(Ordering::SeqCst) < 100 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("<parent-end>");
        Ok(())
    });
    p.processor("cow", |x: u64, out: &mut Output<'_, u64>| {
        println!("<cow-line {x}>");
        if x.is_multiple_of(10) {
            print!("<cow-tail {x}>");
        }
        out.emit(x)?;
        Ok(())
    })
    .cow_fork(4);
    p.processor("ipc", |x: u64, out: &mut Output<'_, u64>| {
        println!("<ipc-line {x}>");
        out.emit(x)?;
        Ok(())
    })
    .ipc_fork(3);
    p.consumer("sink", move |_: u64| {
        done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let r = run_bounded(p).expect("inner run succeeds");
    assert_eq!(r.stage("ipc").unwrap().items_out, 200);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    println!("<inner-done>");
}

#[test]
fn fork_storm_while_other_threads_allocate_print_and_use_channels() {
    let n = 2_000u64;
    let stop = Arc::new(AtomicBool::new(false));
    let mut noise = Vec::new();
    for t in 0..3u64 {
        let stop = stop.clone();
        noise.push(std::thread::spawn(move || {
            let (ctx, crx) = crossbeam_channel::bounded::<Vec<u8>>(8);
            let (stx, srx) = std::sync::mpsc::sync_channel::<String>(8);
            let mut i = 0u64;
            let mut kept: Vec<Vec<u8>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let v = vec![(i % 251) as u8; 1 + (i as usize * 7919) % 8192];
                ctx.send(v).unwrap();
                let v = crx.recv().unwrap();
                stx.send(format!("{t}:{i}:{}", v.len())).unwrap();
                let s = srx.recv().unwrap();
                kept.push(v);
                if kept.len() > 64 {
                    kept.clear();
                }
                if i.is_multiple_of(64) {
                    println!("noise {s}");
                }
            }
            i
        }));
    }
    let p = Pipeline::new("storm");
    let got = Sink::default();
    common::gen(&p, n);
    let s = p.processor("work", |x: u64, out: &mut Output<'_, (u64, usize)>| {
        // Allocate and print in the child: both use locks other parent threads were using.
        let v: Vec<String> = (0..(x % 50)).map(|k| format!("{x}-{k}")).collect();
        println!("<storm child {x}>");
        out.emit((x, v.len()))?;
        Ok(())
    });
    s.cow_fork(4);
    // A hung child would become a Timeout failure (and fail the checks) instead of a hang.
    s.executor(Exec::cow_fork(4).timeout(Duration::from_secs(20)));
    Sink::<(u64, usize)>::consume(&got, &p);
    let r = run_bounded(p);
    stop.store(true, Ordering::Relaxed);
    let iterations: Vec<u64> = noise.into_iter().map(|h| h.join().unwrap()).collect();
    let r = r.expect("run succeeds");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let s = r.stage("work").unwrap();
    assert_eq!((s.items_in, s.items_out, s.failed), (n, n, 0));
    let expected: Vec<(u64, usize)> = (0..n).map(|x| (x, (x % 50) as usize)).collect();
    assert_eq!(got.sorted(), expected);
    assert!(
        iterations.iter().all(|&i| i > 0),
        "noise threads ran: {iterations:?}"
    );
    assert_no_children();
}
