//! Huge pages for the parent's heap before forking: children of a collapsed parent read the
//! right data, a parent's write after the collapse is not seen by a child already forked, the
//! switch decides (pipeline and stage), and a system without THP says why.
//!
//! Where THP cannot work here, each test checks the reason the report gives against what the
//! system says, instead of passing silently.
#![allow(unsafe_code)] // mkfifo, for a gate between the parent and a child.
mod common;
use minigun::bytemuck::{Pod, Zeroable};
use minigun::{Exec, HugeBuf, HugePages, HugePagesReport, HugePagesStatus, Pipeline};
use std::collections::HashMap;
use std::sync::Arc;

/// What this machine allows: `Ok(())` if collapsing should work, else the words the report's
/// reason must contain.
fn expected_here() -> Result<(), &'static str> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    match mode {
        Err(_) => Err("cannot read"),
        Ok(m) if m.contains("[never]") => Err("never"),
        Ok(_) => {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            let mut v = release
                .split(['.', '-'])
                .map(|x| x.parse::<u32>().unwrap_or(0));
            let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
            if (major, minor) < (6, 1) {
                Err("MADV_COLLAPSE")
            } else {
                Ok(())
            }
        }
    }
}

/// Asserts the report of a stage that was asked to collapse.
fn assert_collapsed_or_explained(r: &HugePagesReport) {
    match expected_here() {
        Ok(()) => {
            assert_eq!(r.status, HugePagesStatus::Collapsed, "{r:?}");
            assert!(
                r.asked_bytes >= 16 << 20,
                "the heap's dense chunks were asked: {r:?}"
            );
            // The kernel may have no free huge page for some ranges at that moment (memory
            // fragmented by other work): then the report says so.
            match r.reason.as_deref() {
                None => assert!(r.huge_after >= r.huge_before + (16 << 20), "{r:?}"),
                Some(m) => assert!(m.contains("stayed in 4 KiB pages"), "{r:?}"),
            }
            assert!(r.secs > 0.0, "{r:?}");
        }
        Err(words) => {
            assert_eq!(r.status, HugePagesStatus::Unavailable, "{r:?}");
            let reason = r.reason.as_deref().unwrap_or_default();
            assert!(reason.contains(words), "{words:?} in {reason:?}");
        }
    }
}

/// About 60 MiB of ordinary heap data: 400,000 small strings in a map.
fn heap_map() -> Arc<HashMap<String, u64>> {
    Arc::new(
        (0..400_000u64)
            .map(|i| (format!("key-{i:08}-{}", "x".repeat(100)), i * 7))
            .collect(),
    )
}

fn lookup(m: &HashMap<String, u64>, i: u64) -> u64 {
    m[&format!("key-{i:08}-{}", "x".repeat(100))]
}

/// Runs `exec` over items 0..n that look up key `i * 997 % 400,000`; returns the results
/// sorted and the huge-page reports.
fn run_lookups(p: Pipeline, exec: Exec, n: u64) -> (Vec<u64>, Vec<HugePagesReport>) {
    let m = heap_map();
    let got = common::Sink::default();
    p.producer("keys", move |out| out.emit_all(0..n).map_err(Into::into));
    let stage = p.map("look", move |i: u64| Ok(lookup(&m, i * 997 % 400_000)));
    match exec {
        Exec::IpcFork(_) => stage.ipc_fork(2).executor(exec),
        _ => stage.cow_fork(2).executor(exec),
    };
    got.consume(&p);
    let report = p.run().expect("runs");
    (got.sorted(), report.huge_pages)
}

fn expected(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(|i| i * 997 % 400_000 * 7).collect();
    v.sort_unstable();
    v
}

#[test]
fn children_of_a_collapsed_parent_read_its_heap() {
    let exec = Exec::cow_fork(2).huge_pages(HugePages::ON);
    let (got, reports) = run_lookups(Pipeline::new("collapsed"), exec, 40);
    assert_eq!(got, expected(40));
    assert_eq!(reports.len(), 1, "one fork stage: {reports:?}");
    assert_eq!(reports[0].stage, "look");
    assert_collapsed_or_explained(&reports[0]);
}

#[test]
fn a_fork_server_is_forked_from_a_collapsed_parent() {
    // The server is forked once, before any child: the heap is collapsed before it, so the
    // server's children are forked from huge pages too.
    let m = heap_map();
    let got = common::Sink::<u64>::default();
    let p = Pipeline::new("collapsed-served");
    p.producer("keys", move |out| {
        out.emit_all(0..40u64).map_err(Into::into)
    });
    p.map("look", move |i: u64| Ok(lookup(&m, i * 997 % 400_000)))
        .cow_fork(2)
        .fork_server()
        .huge_pages(HugePages::ON);
    got.consume(&p);
    let report = p.run().expect("runs");
    assert_eq!(got.sorted(), expected(40));
    assert_eq!(report.huge_pages.len(), 1, "{:?}", report.huge_pages);
    assert_eq!(report.huge_pages[0].stage, "look");
    assert_collapsed_or_explained(&report.huge_pages[0]);
}

#[test]
fn ipc_workers_of_a_collapsed_parent_read_its_heap() {
    let exec = Exec::ipc_fork(2).huge_pages(HugePages::ON);
    let (got, reports) = run_lookups(Pipeline::new("collapsed-ipc"), exec, 200);
    assert_eq!(got, expected(200));
    assert_collapsed_or_explained(&reports[0]);
}

#[test]
fn off_on_the_pipeline_means_no_collapse_and_the_stage_setting_wins() {
    let p = Pipeline::new("off");
    p.huge_pages(HugePages::Off);
    let (got, reports) = run_lookups(p, Exec::cow_fork(2), 10);
    assert_eq!(got, expected(10));
    assert_eq!(reports[0].status, HugePagesStatus::Off, "{reports:?}");
    assert_eq!((reports[0].asked_bytes, reports[0].secs), (0, 0.0));

    let p = Pipeline::new("stage-wins");
    p.huge_pages(HugePages::Off);
    let (_, reports) = run_lookups(p, Exec::cow_fork(2).huge_pages(HugePages::ON), 10);
    assert_collapsed_or_explained(&reports[0]);

    let p = Pipeline::new("threshold");
    let exec = Exec::cow_fork(2).huge_pages(HugePages::Above(u64::MAX));
    let (_, reports) = run_lookups(p, exec, 10);
    assert_eq!(
        reports[0].status,
        HugePagesStatus::BelowThreshold,
        "{reports:?}"
    );
    assert!(
        reports[0].anon_bytes > 50 << 20,
        "the parent's size was read: {reports:?}"
    );
}

#[test]
fn ipc_fork_is_off_by_default_and_the_report_says_so() {
    let (got, reports) = run_lookups(Pipeline::new("ipc-default"), Exec::ipc_fork(2), 10);
    assert_eq!(got, expected(10));
    assert_eq!(reports[0].status, HugePagesStatus::Off, "{reports:?}");
    let text = {
        let p = Pipeline::new("shown");
        let (_, r) = run_lookups(p, Exec::cow_fork(2).huge_pages(HugePages::Off), 2);
        format!("{r:?}")
    };
    assert!(text.contains("Off"), "{text}");
}

/// A named pipe: opening it for writing waits until a reader has it open, so the parent
/// knows the child exists (was forked) before it writes to the shared data.
fn fifo(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("gate");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path and mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path
}

#[test]
fn a_parent_write_after_the_collapse_is_not_seen_by_a_child() {
    let dir = std::env::temp_dir().join(format!("mg-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gate = fifo(&dir);
    // 32 MiB of counters on the heap, collapsed before the child is forked.
    let data: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..4u64 << 20)
            .map(std::sync::atomic::AtomicU64::new)
            .collect(),
    );
    let (d, g) = (data.clone(), gate);
    let writer = std::thread::spawn({
        let (data, gate) = (data.clone(), g.clone());
        move || {
            // Returns once the child opened the gate: it is forked, then the parent writes.
            let mut w = std::fs::OpenOptions::new().write(true).open(&gate).unwrap();
            for (i, x) in data.iter().enumerate().step_by(512) {
                x.store(u64::MAX - i as u64, std::sync::atomic::Ordering::Relaxed);
            }
            std::io::Write::write_all(&mut w, b"w").unwrap();
        }
    });
    let p = Pipeline::new("cow-write");
    p.producer("one", |out| out.emit(0u64).map_err(Into::into));
    p.map("read", move |_: u64| {
        let mut r = std::fs::File::open(&g)?;
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut r, &mut b)?;
        // The parent has written by now; this child still sees the values of the fork.
        let changed = d
            .iter()
            .enumerate()
            .filter(|(i, x)| x.load(std::sync::atomic::Ordering::Relaxed) != *i as u64)
            .count();
        Ok(changed as u64)
    })
    .cow_fork(1)
    .executor(Exec::cow_fork(1).huge_pages(HugePages::ON));
    let got = common::Sink::<u64>::default();
    got.consume(&p);
    let report = p.run().expect("runs");
    writer.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        got.sorted(),
        vec![0],
        "the child saw none of the parent's writes"
    );
    let written = data
        .iter()
        .enumerate()
        .filter(|(i, x)| x.load(std::sync::atomic::Ordering::Relaxed) != *i as u64)
        .count();
    assert_eq!(written, (4 << 20) / 512, "the parent sees its own writes");
    assert_collapsed_or_explained(&report.huge_pages[0]);
}

#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Point {
    x: f64,
    y: f64,
    id: u32,
    tag: u32,
}

#[test]
fn a_typed_huge_buf_round_trips_and_children_read_it() {
    let points: Vec<Point> = (0..200_000u32)
        .map(|i| Point {
            x: i as f64 * 0.5,
            y: -(i as f64),
            id: i,
            tag: i % 7,
        })
        .collect();
    let buf = HugeBuf::from_slice(&points).unwrap();
    assert_eq!(&buf[..], &points[..]);
    assert_eq!(buf.len(), points.len());
    let bytes: &[u8] = buf.as_ref();
    assert_eq!(bytes.len(), points.len() * size_of::<Point>());
    assert_eq!(bytes, minigun::bytemuck::cast_slice::<Point, u8>(&points));
    let back: &[Point] = minigun::bytemuck::cast_slice(bytes);
    assert_eq!(back, &points[..]);

    let data = Arc::new(buf);
    let d = data.clone();
    let p = Pipeline::new("typed");
    p.producer("ids", |out| {
        out.emit_all((0..200_000u32).step_by(10_007))
            .map_err(Into::into)
    });
    p.map("read", move |i: u32| {
        let pt = d[i as usize];
        Ok((pt.id, pt.x.to_bits(), pt.tag))
    })
    .cow_fork(2);
    let got = common::Sink::<(u32, u64, u32)>::default();
    got.consume(&p);
    p.run().expect("runs");
    let want: Vec<(u32, u64, u32)> = (0..200_000u32)
        .step_by(10_007)
        .map(|i| (i, (i as f64 * 0.5).to_bits(), i % 7))
        .collect();
    assert_eq!(got.sorted(), want);
}

/// The `VmFlags` and `AnonHugePages` lines of the mapping that holds `start`, from
/// `/proc/self/smaps`.
fn mapping_lines(start: usize) -> (String, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut inside, mut flags, mut huge_kib) = (false, String::new(), 0);
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            // The mapping holding `start`: the kernel may have merged it with a neighbour
            // of the same flags since it was made, so it need not begin there.
            let (a, b) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16));
            inside = matches!((a, b), (Ok(a), Ok(b)) if a <= start && start < b);
        } else if inside && l.starts_with("VmFlags:") {
            flags = l.to_string();
        } else if inside && l.starts_with("AnonHugePages:") {
            huge_kib = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    (flags, huge_kib)
}

#[test]
fn memory_the_program_marked_nohugepage_keeps_its_small_pages() {
    // 32 MiB the program keeps out of huge pages itself (as allocators of memory they return
    // page by page do), fully resident: dense enough to collapse, were it not marked.
    let len = 32usize << 20;
    // SAFETY: a fresh anonymous mapping, used only through the slice below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED);
    // SAFETY: advice on the mapping just made.
    assert_eq!(unsafe { libc::madvise(raw, len, libc::MADV_NOHUGEPAGE) }, 0);
    // SAFETY: the mapping is `len` bytes, readable and writable, and only used here.
    let small = unsafe { std::slice::from_raw_parts_mut(raw.cast::<u64>(), len / 8) };
    for (i, x) in small.iter_mut().enumerate() {
        *x = i as u64;
    }
    let (flags, _) = mapping_lines(raw as usize);
    assert!(flags.split_whitespace().any(|f| f == "nh"), "{flags}");
    // A stage that collapses the rest of the heap (the map is ordinary heap memory).
    let exec = Exec::cow_fork(2).huge_pages(HugePages::ON);
    let (got, reports) = run_lookups(Pipeline::new("nohugepage"), exec, 10);
    assert_eq!(got, expected(10));
    assert_collapsed_or_explained(&reports[0]);
    let (flags, huge_kib) = mapping_lines(raw as usize);
    assert!(
        flags.split_whitespace().any(|f| f == "nh") && !flags.contains(" hg"),
        "the program's MADV_NOHUGEPAGE was undone: {flags}"
    );
    assert_eq!(huge_kib, 0, "its memory went into huge pages");
    assert!(small.iter().enumerate().all(|(i, &x)| x == i as u64));
    // SAFETY: unmaps the mapping made above; `small` is not used after.
    unsafe { libc::munmap(raw, len) };
}
