//! Snapshot tests of the dashboard, rendered with ratatui's `TestBackend`.
//!
//! Each scene comes from a real run: small pipelines are run and `monitor.snapshot()` is
//! taken either at the end or while the producer is held at a gate (so counts, queues and
//! statuses are settled). Only the values that change from run to run (elapsed time,
//! throughput, latencies, pids, memory, ages) are then replaced by fixed ones.
use minigun::{Exec, Pipeline, RunHandle, StageStatus};
use minigun_hud::{draw, Scene, ViewState};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn render(scene: &Scene, state: &ViewState, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| draw(f, scene, state)).unwrap();
    terminal.backend().to_string()
}

/// Replaces the values that differ from run to run with fixed ones.
fn normalise(scene: &mut Scene) {
    scene.elapsed_secs = 10.0;
    let mut pid = 4100;
    for (i, st) in scene.stages.iter_mut().enumerate() {
        st.throughput = st.counted() as f64 / 10.0;
        let base = 100.0 * (i as f64 + 1.0);
        // Whether a latency was merged yet depends on timing (workers merge every 1024 items or
        // 250 ms): decide it from the counts, which the gated runs make stable.
        let measured = st.kind != minigun::StageKind::Producer && st.items_in > 0;
        st.p50_us = if measured { base } else { 0.0 };
        st.p99_us = if measured { base * 4.0 } else { 0.0 };
        for (k, c) in st.children.iter_mut().enumerate() {
            c.pid = pid;
            pid += 1;
            c.rss_bytes = (8 + k as u64) << 20;
            c.age_secs = 5.0 + k as f64;
        }
    }
    scene.rate = scene
        .stages
        .iter()
        .filter(|s| s.kind == minigun::StageKind::Producer)
        .map(|s| s.throughput)
        .sum();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Holds a producer after its items until opened.
#[derive(Clone, Default)]
struct Gate(Arc<AtomicBool>);

impl Gate {
    fn wait(&self) {
        while !self.0.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits until `settled` holds for a snapshot taken after a pause (so that no stage counts
/// as active for items it handled before the previous snapshot), and returns that scene.
fn settled_scene(handle: &RunHandle, settled: impl Fn(&Scene) -> bool) -> Scene {
    let monitor = handle.monitor();
    let mut scene = None;
    wait_until("the run to settle", || {
        let _ = monitor.snapshot();
        std::thread::sleep(Duration::from_millis(20));
        let s = Scene::from(&monitor.snapshot());
        let ok = settled(&s);
        scene = Some(s);
        ok
    });
    scene.unwrap()
}

fn status(scene: &Scene, name: &str) -> StageStatus {
    scene
        .stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name}"))
        .status
}

/// gen -> parse (4 threads) -> enrich -> batch -> sink, run to the end.
fn linear_scene() -> Scene {
    let p = Pipeline::new("linear");
    p.producer("gen", |out| out.emit_all(0..1000u64).map_err(Into::into));
    p.map("parse", |x: u64| Ok(x * 2))
        .executor(Exec::threads(4));
    p.map("enrich", |x: u64| Ok(x + 1));
    p.batch::<u64>("batch", 100);
    p.consumer("sink", |_: Vec<u64>| Ok(()));
    let handle = p.spawn().unwrap();
    let monitor = handle.monitor();
    let report = handle.wait().unwrap();
    assert_eq!(report.produced, 1000);
    let mut scene = Scene::from(&monitor.snapshot());
    scene.total = Some(1000);
    assert!(scene.finished);
    normalise(&mut scene);
    scene
}

#[test]
fn linear_pipeline_finished() {
    let scene = linear_scene();
    insta::assert_snapshot!("linear", render(&scene, &ViewState::default(), 100, 24));
}

#[test]
fn an_async_stage_shows_its_items_in_flight_beside_its_limit() {
    let gate = Gate::default();
    let held = gate.clone();
    let p = Pipeline::new("async");
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    p.consumer_async("fetch", move |_: u64| {
        let held = held.clone();
        async move {
            while !held.0.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        }
    })
    .executor(Exec::tasks(8));
    let handle = p.spawn().unwrap();
    let mut scene = settled_scene(&handle, |s| s.stages[1].in_flight == 8);
    normalise(&mut scene);
    let screen = render(&scene, &ViewState::default(), 120, 16);
    assert!(screen.contains("in flight"), "{screen}");
    let row = screen
        .lines()
        .find(|l| l.contains("fetch") && l.contains("tasks(8)"))
        .expect(&screen);
    assert!(row.split_whitespace().any(|cell| cell == "8/8"), "{screen}");
    gate.open();
    handle.wait().unwrap();
}

#[test]
fn diamond_running_with_bottleneck() {
    let gate = Gate::default();
    let held = gate.clone();
    let p = Pipeline::new("diamond");
    let gen = p.producer("gen", move |out| {
        out.emit_all(0..200u64)?;
        held.wait();
        Ok(())
    });
    let left = p
        .map("left", |x: u64| Ok(x + 1))
        .executor(Exec::threads(2))
        .from(&gen);
    let right = p
        .map("right", |x: u64| {
            std::thread::sleep(Duration::from_millis(2));
            Ok(x * 3)
        })
        .from(&gen);
    p.consumer("join", |_: u64| Ok(())).from(&left).from(&right);
    let handle = p.spawn().unwrap();
    let mut scene = settled_scene(&handle, |s| {
        s.stages[3].items_in == 400
            && status(s, "left") == StageStatus::Idle
            && status(s, "right") == StageStatus::Idle
            && status(s, "join") == StageStatus::Idle
    });
    gate.open();
    handle.wait().unwrap();
    assert!(
        scene.stages[2].bottleneck,
        "the sleeping branch is the bottleneck"
    );
    normalise(&mut scene);
    insta::assert_snapshot!("diamond", render(&scene, &ViewState::default(), 100, 26));
    // The same moment, paused, with the help overlay.
    let state = ViewState {
        paused: true,
        help: true,
        ..ViewState::default()
    };
    insta::assert_snapshot!("diamond_help", render(&scene, &state, 100, 26));
}

/// A file that forked children wait for (they cannot see the parent's memory change).
struct GateFile(PathBuf);

impl GateFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "minigun-hud-{name}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let _ = std::fs::remove_file(&path);
        GateFile(path)
    }
    fn open(&self) {
        std::fs::write(&self.0, b"open").unwrap();
    }
}

impl Drop for GateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn fork_stages_list_their_children() {
    let gate = Gate::default();
    let held = gate.clone();
    let file = GateFile::new("fork");
    let path = file.0.clone();
    let p = Pipeline::new("forks");
    p.producer("gen", move |out| {
        out.emit_all(0..4u64)?;
        held.wait();
        Ok(())
    });
    // Two persistent workers, dealt two items each (round robin).
    p.map("parse", |x: u64| Ok(x + 1)).ipc_fork(2);
    // One child per item, two at once: both stay alive until the gate file appears (the
    // other two items wait in the stage).
    p.map("render", move |x: u64| {
        while !path.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(x)
    })
    .cow_fork(2);
    p.consumer("sink", |_: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let mut scene = settled_scene(&handle, |s| {
        let parse = &s.stages[1];
        let render = &s.stages[2];
        parse.children.len() == 2
            && parse.children.iter().map(|c| c.items).sum::<u64>() == 4
            && render.children.len() == 2
            && render.items_in == 4
            && status(s, "parse") == StageStatus::Idle
            && status(s, "sink") == StageStatus::Idle
    });
    file.open();
    gate.open();
    let report = handle.wait().unwrap();
    assert_eq!(report.consumed, 4);
    normalise(&mut scene);
    // Wide: the children panel beside the table.
    insta::assert_snapshot!("forks_wide", render(&scene, &ViewState::default(), 120, 24));
    // Narrower: the panel below the table.
    insta::assert_snapshot!(
        "forks_narrow",
        render(&scene, &ViewState::default(), 90, 28)
    );
}

#[test]
fn failing_stage_shows_error() {
    let gate = Gate::default();
    let held = gate.clone();
    let p = Pipeline::new("validation");
    p.producer("gen", move |out| {
        out.emit_all(0..20u64)?;
        held.wait();
        Ok(())
    });
    p.map("validate", |x: u64| {
        if x % 2 == 1 {
            Err(format!("item {x} is odd").into())
        } else {
            Ok(x)
        }
    });
    p.consumer("sink", |_: u64| Ok(()));
    let handle = p.spawn().unwrap();
    let mut scene = settled_scene(&handle, |s| {
        s.stages[1].failed == 10
            && s.stages[2].items_in == 10
            && status(s, "validate") == StageStatus::Error
            && status(s, "sink") == StageStatus::Idle
    });
    gate.open();
    let report = handle.wait().unwrap();
    assert_eq!(report.failures_total, 10);
    normalise(&mut scene);
    // Which stage has the most busy time so far depends on scheduling (on a loaded machine
    // the sink's ten items can outweigh the failing stage's twenty): fix it on the failing
    // stage, whose error status shows instead.
    for st in &mut scene.stages {
        st.bottleneck = st.name == "validate";
    }
    assert_eq!(scene.failures_total, 10);
    insta::assert_snapshot!("failing", render(&scene, &ViewState::default(), 80, 20));
}

#[test]
fn too_small_terminal() {
    let scene = linear_scene();
    let state = ViewState::default();
    insta::assert_snapshot!("too_small_narrow", render(&scene, &state, 59, 12));
    insta::assert_snapshot!("too_small_short", render(&scene, &state, 80, 9));
    // The smallest size that draws the dashboard.
    insta::assert_snapshot!("smallest", render(&scene, &state, 60, 10));
}
