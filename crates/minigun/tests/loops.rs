//! Routing loops: a stage routes items back upstream (a crawler with a bounded depth). The
//! loop ends exactly when no item is queued or in process in it, under every executor.
mod common;
use common::Sink;
use minigun::{Output, Pipeline};

/// Each page links to 3 pages one level deeper; pages at depth 3 are leaves.
/// Per seed: 1 + 3 + 9 + 27 = 40 pages.
fn crawl(ex: common::Ex, seeds: u64) -> (Vec<u64>, minigun::RunReport) {
    let p = Pipeline::new("crawler");
    let got = Sink::default();
    let g = got.clone();
    p.producer("seeds", move |out| {
        out.emit_all((1..=seeds).map(|s| (s, 0u32)))
            .map_err(Into::into)
    });
    let fetch = p.map("fetch", |(page, depth): (u64, u32)| Ok((page, depth)));
    let extract = p.processor(
        "extract",
        |(page, depth): (u64, u32), out: &mut Output<'_, u64>| {
            if depth < 3 {
                for k in 0..3 {
                    out.to("fetch", (page * 10 + k, depth + 1))?;
                }
            }
            out.emit(page)?;
            Ok(())
        },
    );
    ex.apply(&fetch);
    ex.apply(&extract);
    extract.routes_to(&fetch);
    p.consumer("store", move |page: u64| {
        g.push(page);
        Ok(())
    });
    let report = p.run().unwrap();
    (got.sorted(), report)
}

/// The pages `crawl` should store, computed without the library: every seed, and the 3
/// links of every page above depth 3; sorted.
fn every_page(seeds: u64) -> Vec<u64> {
    let mut pages = Vec::new();
    let mut level: Vec<u64> = (1..=seeds).collect();
    for _depth in 0..=3 {
        let links = level
            .iter()
            .flat_map(|page| (0..3).map(move |k| page * 10 + k))
            .collect();
        pages.append(&mut level);
        level = links;
    }
    pages.sort();
    pages
}

matrix!(fn crawler_loop_ends_with_every_page(ex) {
    let expected = every_page(5);
    assert_eq!(expected.len(), 5 * 40);
    let (pages, report) = crawl(ex, 5);
    assert_eq!(pages, expected);
    assert_eq!(report.stage("fetch").unwrap().items_in, 200);
    assert_eq!(report.stage("extract").unwrap().items_in, 200);
    assert_eq!(report.failures_total, 0);
});

matrix!(fn empty_input_closes_the_loop(ex) {
    let (pages, _) = crawl(ex, 0);
    assert!(pages.is_empty());
});

#[test]
fn a_self_loop_counts_down() {
    // A stage that routes to itself until the counter reaches zero.
    let p = Pipeline::new("countdown");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all([3u64, 5, 0]).map_err(Into::into));
    let tick = p.processor("tick", |n: u64, out: &mut Output<'_, u64>| {
        if n > 0 {
            out.to("tick", n - 1)?;
        }
        out.emit(n)?;
        Ok(())
    });
    tick.routes_to(&tick);
    p.consumer("sink", move |n: u64| {
        g.push(n);
        Ok(())
    });
    let report = p.run().unwrap();
    assert_eq!(report.failures_total, 0, "{report}");
    assert_eq!(got.sorted(), vec![0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5]);
}

#[test]
fn a_static_cycle_is_still_a_definition_error() {
    let p = Pipeline::new("static");
    p.producer("gen", |out| out.emit_all(0..1u64).map_err(Into::into));
    let a = p.map("a", |x: u64| Ok(x));
    let b = p.map("b", |x: u64| Ok(x)).from(&a);
    a.from(&b);
    a.from_name("gen");
    assert!(matches!(
        p.build(),
        Err(minigun::DefinitionError::Cycle { .. })
    ));
}

/// A loop member whose queue is declared small still cannot block on itself: loop queues are
/// unbounded (the loop's work counter bounds what is in it).
#[test]
fn a_loop_with_a_small_declared_capacity_does_not_deadlock() {
    let p = Pipeline::new("fanout-loop");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all([4u64]).map_err(Into::into));
    let tick = p
        .processor("tick", |n: u64, out: &mut Output<'_, u64>| {
            if n > 0 {
                for _ in 0..3 {
                    out.to("tick", n - 1)?;
                }
            }
            out.emit(n)?;
            Ok(())
        })
        .capacity(minigun::Capacity::Bounded(4));
    tick.routes_to(&tick);
    p.consumer("sink", move |n: u64| {
        g.push(n);
        Ok(())
    });
    p.run().unwrap();
    assert_eq!(got.len(), 1 + 3 + 9 + 27 + 81);
}

/// Declaring the same route twice (a base and a derived definition) keeps the loop's
/// accounting exact.
#[test]
fn a_route_declared_twice_does_not_close_the_loop_early() {
    let p = Pipeline::new("twice");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all([0u64]).map_err(Into::into));
    let a = p.processor("a", |x: u64, out: &mut Output<'_, u64>| {
        out.to("fetch", x)?;
        Ok(out.emit(x)?)
    });
    let sink = p.consumer("sink", |_x: u64| Ok(()));
    a.to(&sink);
    let fetch = p.map("fetch", |x: u64| Ok(x));
    a.routes_to(&fetch).routes_to(&fetch);
    let extract = p.processor("extract", move |x: u64, out: &mut Output<'_, u64>| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        g.push(x);
        if x < 2 {
            out.to("fetch", x + 1)?;
        }
        Ok(())
    });
    extract.routes_to(&fetch);
    let report = p.run().unwrap();
    assert_eq!(report.stage("extract").unwrap().items_in, 3, "{report}");
    assert_eq!(got.sorted(), vec![0, 1, 2]);
}

/// An ordered fork stage in a loop: outputs held back for ordering are sent while their item
/// still counts as in the loop, so the loop cannot close under them.
#[test]
fn an_ordered_fork_stage_in_a_loop_loses_nothing() {
    for exec in [
        minigun::Exec::cow_fork(4).ordered(),
        minigun::Exec::ipc_fork(3).ordered(),
    ] {
        let p = Pipeline::new("ordered-loop");
        let got = Sink::default();
        let g = got.clone();
        p.producer("seeds", |out| {
            out.emit_all((0..6u64).map(|s| (s, 0u32)))
                .map_err(Into::into)
        });
        let fetch = p
            .map("fetch", |(x, d): (u64, u32)| {
                // Later items finish first, so outputs are held for order.
                std::thread::sleep(std::time::Duration::from_millis(20 - (x % 4) * 5));
                Ok((x, d))
            })
            .wire()
            .executor(exec.clone());
        let extract = p.processor(
            "extract",
            move |(x, d): (u64, u32), out: &mut Output<'_, u64>| {
                g.push(x);
                if d < 2 {
                    out.to("fetch", (x * 10 + 1, d + 1))?;
                }
                Ok(out.emit(x)?)
            },
        );
        extract.routes_to(&fetch);
        p.consumer("sink", |_x: u64| Ok(()));
        let report = p.run().unwrap();
        assert_eq!(got.len(), 18, "{exec}: {report}");
    }
}
