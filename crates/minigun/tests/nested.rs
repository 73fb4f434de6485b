//! Nested and composed pipelines: sub-pipelines as stages, any depth, hooks and stats,
//! routing into them by name, several pipelines in one run, rerouting.
mod common;
use common::Sink;
use minigun::{DefinitionError, Output, Pipeline};
use std::sync::{Arc, Mutex};

matrix!(fn linear_sub_pipeline_between_stages(ex) {
    let p = Pipeline::new("etl");
    let got = Sink::default();
    let g = got.clone();
    p.producer("rows", |out| out.emit_all(0..100u64).map_err(Into::into));
    p.pipeline::<u64, u64>("transform", |s| {
        ex.apply(&s.map("scale", |x: u64| Ok(x * 10)));
        ex.apply(&s.map("shift", |x: u64| Ok(x + 1)));
    });
    p.consumer("load", move |x: u64| { g.push(x); Ok(()) });
    let report = p.run().unwrap();
    assert_eq!(got.sorted(), (0..100u64).map(|x| x * 10 + 1).collect::<Vec<_>>());
    assert_eq!(report.stage("transform/scale").unwrap().items_in, 100);
    assert_eq!(report.stage("transform/shift").unwrap().items_out, 100);
});

matrix!(fn three_levels_with_hooks_and_stats(ex) {
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let p = Pipeline::new("deep");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(1..=20u64).map_err(Into::into));
    let e = events.clone();
    p.pipeline::<u64, u64>("outer", |o| {
        let e1 = e.clone();
        o.before_run(move || { e1.lock().unwrap().push("outer:before_run".into()); Ok(()) });
        o.pipeline::<u64, u64>("mid", |m| {
            m.pipeline::<u64, u64>("inner", |i| {
                let e2 = e.clone();
                let e3 = e.clone();
                ex.apply(&i.map("square", |x: u64| Ok(x * x)))
                    .before(move || { e2.lock().unwrap().push("square:before".into()); Ok(()) })
                    .after(move || { e3.lock().unwrap().push("square:after".into()); Ok(()) });
            });
        });
        o.map("neg", |x: u64| Ok(1000 - x));
    });
    p.consumer("sink", move |x: u64| { g.push(x); Ok(()) });
    let report = p.run().unwrap();
    let mut want: Vec<u64> = (1..=20u64).map(|x| 1000 - x * x).collect();
    want.sort();
    assert_eq!(got.sorted(), want);
    assert_eq!(report.stage("outer/mid/inner/square").unwrap().items_in, 20);
    assert_eq!(report.stage("outer/neg").unwrap().items_out, 20);
    let ev = events.lock().unwrap().clone();
    assert_eq!(ev, vec!["outer:before_run", "square:before", "square:after"]);
});

matrix!(fn several_entries_broadcast_and_join(ex) {
    let p = Pipeline::new("entries");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..50u64).map_err(Into::into));
    p.pipeline::<u64, u64>("fan", |s| {
        let l = ex.apply(&s.map("left", |x: u64| Ok(x)).entry());
        let r = ex.apply(&s.map("right", |x: u64| Ok(x + 1000)).entry());
        s.map("join", |x: u64| Ok(x)).from(&l).from(&r);
    });
    p.consumer("sink", move |x: u64| { g.push(x); Ok(()) });
    p.run().unwrap();
    let want: Vec<u64> = (0..50).chain(1000..1050).collect();
    assert_eq!(got.sorted(), want);
});

#[test]
fn several_entries_round_robin() {
    let p = Pipeline::new("rr-entries");
    let (a, b) = (Sink::default(), Sink::default());
    let (ca, cb) = (a.clone(), b.clone());
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into))
        .round_robin();
    p.pipeline::<u64, ()>("shards", |s| {
        s.consumer("a", move |x: u64| {
            ca.push(x);
            Ok(())
        })
        .entry();
        s.consumer("b", move |x: u64| {
            cb.push(x);
            Ok(())
        })
        .entry();
    });
    p.run().unwrap();
    assert_eq!((a.len(), b.len()), (50, 50));
    let mut all = a.sorted();
    all.extend(b.sorted());
    all.sort();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
}

#[test]
fn named_pipelines_wired_and_isolated() {
    let p = Pipeline::new("many");
    let (x, y) = (Sink::default(), Sink::default());
    let (cx, cy) = (x.clone(), y.clone());
    // Two self-contained pipelines: they must not feed each other.
    p.pipeline::<(), ()>("first", |s| {
        s.producer("gen", |out| out.emit_all(0..5u64).map_err(Into::into));
        s.consumer("sink", move |v: u64| {
            cx.push(v);
            Ok(())
        });
    });
    p.pipeline::<(), ()>("second", |s| {
        s.producer("gen", |out| out.emit_all(100..103u64).map_err(Into::into));
        s.consumer("sink", move |v: u64| {
            cy.push(v);
            Ok(())
        });
    });
    // Two more, wired to each other with `to`.
    let z = Sink::default();
    let cz = z.clone();
    let up = p.pipeline::<(), u64>("up", |s| {
        s.producer("gen", |out| out.emit_all(7..9u64).map_err(Into::into));
        s.map("inc", |v: u64| Ok(v + 1));
    });
    let down = p.pipeline::<u64, ()>("down", |s| {
        s.consumer("sink", move |v: u64| {
            cz.push(v);
            Ok(())
        });
    });
    up.to(&down);
    p.run().unwrap();
    assert_eq!(x.sorted(), vec![0, 1, 2, 3, 4]);
    assert_eq!(y.sorted(), vec![100, 101, 102]);
    assert_eq!(z.sorted(), vec![8, 9]);
}

matrix!(fn routes_into_a_sub_pipeline_by_name(ex) {
    let p = Pipeline::new("route-in");
    let (hi, lo) = (Sink::default(), Sink::default());
    let (ch, cl) = (hi.clone(), lo.clone());
    p.producer("gen", |out| out.emit_all(0..40u64).map_err(Into::into));
    let r = p.processor("router", |x: u64, out: &mut Output<'_, u64>| {
        if x >= 30 { out.to("vip", x)?; } else { out.emit(x)?; }
        Ok(())
    });
    ex.apply(&r);
    p.consumer("normal", move |x: u64| { cl.push(x); Ok(()) });
    p.pipeline::<u64, ()>("special", |s| {
        s.consumer("vip", move |x: u64| { ch.push(x); Ok(()) });
    });
    r.routes_to_name::<u64>("vip");
    p.run().unwrap();
    assert_eq!(hi.sorted(), (30..40).collect::<Vec<_>>());
    assert_eq!(lo.sorted(), (0..30).collect::<Vec<_>>());
});

#[test]
fn an_ambiguous_name_lists_the_candidates() {
    let p = Pipeline::new("ambiguous");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    let r = p.map("router", |x: u64| Ok(x));
    p.pipeline::<u64, ()>("a", |s| {
        s.consumer("sink", |_: u64| Ok(()));
    });
    p.pipeline::<u64, ()>("b", |s| {
        s.consumer("sink", |_: u64| Ok(())).from_name("router");
    });
    r.routes_to_name::<u64>("sink");
    match p.build() {
        Err(DefinitionError::AmbiguousReference {
            reference,
            candidates,
            ..
        }) => {
            assert_eq!(reference, "sink");
            assert_eq!(candidates, vec!["a/sink".to_string(), "b/sink".to_string()]);
        }
        other => panic!("expected an ambiguity, got {other:?}"),
    }
}

#[test]
fn sub_pipeline_types_are_checked() {
    let p = Pipeline::new("types");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    p.pipeline::<u64, String>("sub", |s| {
        s.map("same", |x: u64| Ok(x));
    });
    p.consumer("sink", |_: String| Ok(()));
    match p.build() {
        Err(DefinitionError::TypeMismatch { from, to, .. }) => {
            assert_eq!((from.as_str(), to.as_str()), ("sub/same", "sub"));
        }
        other => panic!("expected a type mismatch, got {other:?}"),
    }
}

/// A base definition, extended by composition.
fn base(p: &Pipeline, got: Sink<u64>) {
    p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
    p.map("double", |x: u64| Ok(x * 2));
    p.consumer("store", move |x: u64| {
        got.push(x);
        Ok(())
    });
}

matrix!(fn reroute_in_an_extended_definition(ex) {
    let (stored, audited) = (Sink::default(), Sink::default());
    let p = Pipeline::new("derived");
    base(&p, stored.clone());
    let a = audited.clone();
    let audit = p.map("audit", |x: u64| Ok(x + 1));
    ex.apply(&audit);
    let audit_sink = p.consumer("audit-sink", move |x: u64| { a.push(x); Ok(()) });
    let double = p.find::<u64, u64>("double").unwrap();
    ex.apply(&double);
    let store = p.find::<u64, ()>("store").unwrap();
    double.reroute().to(&store).to(&audit);
    audit.to(&audit_sink);
    p.run().unwrap();
    assert_eq!(stored.sorted(), (0..10).map(|x| x * 2).collect::<Vec<_>>());
    assert_eq!(audited.sorted(), (0..10).map(|x| x * 2 + 1).collect::<Vec<_>>());
});

#[test]
fn settings_that_do_not_fit_a_sub_pipeline_are_errors() {
    let p = Pipeline::new("misuse");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    let s = p.pipeline::<u64, u64>("sub", |s| {
        s.map("x", |x: u64| Ok(x));
    });
    s.on_error(minigun::OnError::fail_fast());
    p.consumer("sink", |_: u64| Ok(()));
    assert!(
        matches!(p.build(), Err(DefinitionError::SettingOnSubPipeline { sub, setting: "on_error" }) if sub == "sub")
    );
}

#[test]
fn a_dead_letter_stage_inside_a_sub_pipeline_is_not_an_entry() {
    let p = Pipeline::new("dlq-inside");
    let (ok, dead) = (Sink::default(), Sink::default());
    let (o, d) = (ok.clone(), dead.clone());
    p.producer("gen", |out| out.emit_all(0..6u64).map_err(Into::into));
    p.pipeline::<u64, u64>("s", |s| {
        let m = s.map("m", |x: u64| if x == 3 { Err("bad".into()) } else { Ok(x) });
        let dlq = s.consumer("dlq", move |f: minigun::Failed<u64>| {
            d.push(f.item);
            Ok(())
        });
        m.dead_letter(&dlq);
    });
    p.consumer("sink", move |x: u64| {
        o.push(x);
        Ok(())
    });
    p.run().unwrap();
    assert_eq!(ok.sorted(), vec![0, 1, 2, 4, 5]);
    assert_eq!(dead.sorted(), vec![3]);
}

#[test]
fn a_rerouted_stage_inside_a_sub_pipeline_is_not_an_exit() {
    let p = Pipeline::new("reroute-inside");
    let (sunk, audited) = (Sink::default(), Sink::default());
    let (s1, a1) = (sunk.clone(), audited.clone());
    p.producer("gen", |out| out.emit_all(0..4u64).map_err(Into::into));
    p.pipeline::<u64, u64>("s", |s| {
        s.map("a", |x: u64| Ok(x));
        s.map("b", |x: u64| Ok(x));
    });
    p.consumer("sink", move |x: u64| {
        s1.push(x);
        Ok(())
    });
    let audit = p.consumer("audit", move |x: u64| {
        a1.push(x);
        Ok(())
    });
    p.find::<u64, u64>("b").unwrap().reroute().to(&audit);
    match p.build() {
        // "sink" lost its only upstream: that is the definition's problem to fix, reported.
        Err(DefinitionError::Unfed { stage }) => assert_eq!(stage, "sink"),
        other => panic!("expected sink to be unfed, got {other:?}"),
    }
    let _ = (sunk, audited);
}

#[test]
fn find_prefers_the_exact_name() {
    let p = Pipeline::new("find");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    p.pipeline::<u64, u64>("sub", |s| {
        s.map("double", |x: u64| Ok(x * 2));
    });
    p.map("double", |x: u64| Ok(x * 2));
    p.consumer("sink", |_x: u64| Ok(()));
    assert_eq!(p.find::<u64, u64>("double").unwrap().name(), "double");
    assert_eq!(
        p.find::<u64, u64>("sub/double").unwrap().name(),
        "sub/double"
    );
}

#[test]
fn the_innermost_of_a_sub_default_and_an_execution_block_wins() {
    let p = Pipeline::new("precedence");
    p.producer("gen", |out| out.emit_all(0..4u64).map_err(Into::into));
    p.with_executor(minigun::Exec::threads(3), |p| {
        p.pipeline::<u64, u64>("s", |s| {
            s.default_executor(minigun::Exec::threads(2));
            s.map("sub_default", |x: u64| Ok(x));
            s.with_executor(minigun::Exec::threads(8), |s| {
                s.map("inner_block", |x: u64| Ok(x));
            });
        });
    });
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    // The outer block is outside the sub-pipeline: the sub's default wins over it...
    assert_eq!(
        report.stage("s/sub_default").unwrap().executor,
        "threads(2)"
    );
    // ...and a block opened inside the sub-pipeline wins over the sub's default.
    assert_eq!(
        report.stage("s/inner_block").unwrap().executor,
        "threads(8)"
    );
}
