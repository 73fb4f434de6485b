//! Accumulators: flush on size, final partial flush, flush on time (`max_wait`), and the same
//! batches under every executor upstream.
mod common;
use common::{Ex, Sink};
use minigun::{Output, Pipeline};
use std::time::Duration;

fn numbers(n: u64) -> impl FnOnce(&mut Output<'_, u64>) -> minigun::StageResult + Send + 'static {
    move |out| {
        for i in 0..n {
            out.emit(i)?;
        }
        Ok(())
    }
}

/// Runs `src -> batch(size) -> sink` over `0..n` (everything inline) and returns the batches in
/// the order the consumer received them, with the report.
fn batches_of(n: u64, size: usize) -> (Vec<Vec<u64>>, minigun::RunReport) {
    let p = Pipeline::new("batches");
    let got: Sink<Vec<u64>> = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(n));
    p.batch::<u64>("batch", size);
    p.consumer("sink", move |b: Vec<u64>| {
        g.push(b);
        Ok(())
    });
    let report = p.run().unwrap();
    let batches = got.0.lock().unwrap().clone();
    (batches, report)
}

#[test]
fn flush_on_size() {
    let (batches, report) = batches_of(30, 10);
    assert_eq!(
        batches,
        vec![
            (0..10).collect::<Vec<u64>>(),
            (10..20).collect(),
            (20..30).collect()
        ]
    );
    let st = report.stage("batch").unwrap();
    assert_eq!(st.items_in, 30);
    assert_eq!(st.items_out, 3);
    assert_eq!(report.stage("sink").unwrap().items_in, 3);
}

#[test]
fn final_partial_flush_at_end_of_stream() {
    let (batches, report) = batches_of(25, 10);
    assert_eq!(
        batches,
        vec![
            (0..10).collect::<Vec<u64>>(),
            (10..20).collect(),
            (20..25).collect()
        ]
    );
    assert_eq!(report.stage("batch").unwrap().items_out, 3);

    // Fewer items than one batch: one partial batch.
    let (batches, _) = batches_of(7, 10);
    assert_eq!(batches, vec![(0..7).collect::<Vec<u64>>()]);
}

#[test]
fn no_empty_batch_when_the_stream_ends_on_a_boundary() {
    let (batches, _) = batches_of(20, 5);
    assert_eq!(batches.len(), 4);
    assert!(batches.iter().all(|b| b.len() == 5), "{batches:?}");
    let (batches, _) = batches_of(0, 5);
    assert!(batches.is_empty(), "{batches:?}");
}

#[test]
fn batch_of_one() {
    let (batches, _) = batches_of(4, 1);
    assert_eq!(batches, vec![vec![0], vec![1], vec![2], vec![3]]);
}

/// Emits 0, 1, 2, pauses 300 ms, then emits 3, 4, 5, through `batch(100)` with an optional
/// `max_wait`.
fn paused_batches(max_wait: Option<Duration>) -> Vec<Vec<u64>> {
    let p = Pipeline::new("paused");
    let got: Sink<Vec<u64>> = Sink::default();
    let g = got.clone();
    p.producer("src", |out| {
        out.emit_all(0..3u64)?;
        std::thread::sleep(Duration::from_millis(300));
        out.emit_all(3..6u64)?;
        Ok(())
    });
    let b = p.batch::<u64>("batch", 100);
    if let Some(w) = max_wait {
        b.max_wait(w);
    }
    p.consumer("sink", move |b: Vec<u64>| {
        g.push(b);
        Ok(())
    });
    p.run().unwrap();
    let batches = got.0.lock().unwrap().clone();
    batches
}

#[test]
fn flush_on_time_with_max_wait() {
    let batches = paused_batches(Some(Duration::from_millis(50)));
    assert!(batches.len() >= 2, "expected a time flush: {batches:?}");
    // Nothing lost, nothing duplicated, order kept (one inline producer).
    let flat: Vec<u64> = batches.iter().flatten().copied().collect();
    assert_eq!(flat, (0..6).collect::<Vec<u64>>());
    assert!(batches.iter().all(|b| !b.is_empty()), "{batches:?}");
    // The 300 ms pause is far longer than max_wait: no batch spans it.
    for b in &batches {
        let before = b.iter().any(|&x| x < 3);
        let after = b.iter().any(|&x| x >= 3);
        assert!(!(before && after), "a batch spans the pause: {batches:?}");
    }
}

#[test]
fn without_max_wait_only_size_and_end_flush() {
    let batches = paused_batches(None);
    assert_eq!(batches, vec![(0..6).collect::<Vec<u64>>()]);
}

/// `src -> work (under ex) -> batch(size) -> sink` over `0..n`: the batches received.
fn batches_after(ex: Ex, n: u64, size: usize) -> Vec<Vec<u64>> {
    let p = Pipeline::new("after-fork");
    let got: Sink<Vec<u64>> = Sink::default();
    let g = got.clone();
    p.producer("src", numbers(n));
    let w = p.map("work", |x: u64| Ok(x * 3));
    ex.apply(&w);
    p.batch::<u64>("batch", size);
    p.consumer("sink", move |mut b: Vec<u64>| {
        b.sort();
        g.push(b);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(report.stage("batch").unwrap().items_in, n);
    let batches = got.0.lock().unwrap().clone();
    batches
}

matrix!(fn same_batches_under_every_executor(ex) {
    let got = batches_after(ex, 43, 8);
    // Batch sizes as a multiset: five full batches and the final partial one.
    let mut sizes: Vec<usize> = got.iter().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, [3, 8, 8, 8, 8, 8], "{got:?}");
    // The last batch received is the partial one (the end-of-stream flush).
    assert_eq!(got.last().unwrap().len(), 3, "{got:?}");
    // The items, as a multiset, are `work`'s results computed here.
    let mut items: Vec<u64> = got.iter().flatten().copied().collect();
    items.sort();
    assert_eq!(items, (0..43).map(|x| x * 3).collect::<Vec<u64>>());
});

matrix!(fn max_wait_after_a_fork_stage(ex) {
    // A slow-ish upstream under the executor, batch(1000) with max_wait: batches are flushed by
    // time and at the end; every item arrives exactly once.
    let p = Pipeline::new("max-wait-fork");
    let got: Sink<Vec<u64>> = Sink::default();
    let g = got.clone();
    p.producer("src", |out| {
        out.emit_all(0..4u64)?;
        std::thread::sleep(Duration::from_millis(300));
        out.emit_all(4..8u64)?;
        Ok(())
    });
    let w = p.map("work", |x: u64| Ok(x + 1));
    ex.apply(&w);
    p.batch::<u64>("batch", 1000).max_wait(Duration::from_millis(50));
    p.consumer("sink", move |b: Vec<u64>| {
        g.push(b);
        Ok(())
    });
    p.run().unwrap();
    let batches = got.0.lock().unwrap().clone();
    assert!(batches.len() >= 2, "expected a time flush: {batches:?}");
    let mut flat: Vec<u64> = batches.iter().flatten().copied().collect();
    flat.sort();
    assert_eq!(flat, (1..9).collect::<Vec<u64>>());
    for b in &batches {
        assert!(!b.is_empty());
        let before = b.iter().any(|&x| x <= 4);
        let after = b.iter().any(|&x| x > 4);
        assert!(!(before && after), "a batch spans the pause: {batches:?}");
    }
});
