//! Dynamic routing (`Output::to` to declared targets) under every executor.
mod common;
use common::Sink;
use minigun::{DefinitionError, FailureKind, Output, Pipeline};
use std::time::Duration;

matrix!(fn routes_by_item_field(ex) {
    let p = Pipeline::new("priority");
    let (urgent, normal) = (Sink::default(), Sink::default());
    let (u, n) = (urgent.clone(), normal.clone());
    p.producer("jobs", |out| out.emit_all(0..300u64).map_err(Into::into));
    let router = p.processor("route", |job: u64, out: &mut Output<'_, u64>| {
        if job.is_multiple_of(5) {
            out.to("urgent", job)?;
        } else {
            out.emit(job)?;
        }
        Ok(())
    });
    ex.apply(&router);
    p.consumer("normal", move |j: u64| { n.push(j); Ok(()) });
    let target = p.consumer("urgent", move |j: u64| { u.push(j); Ok(()) });
    router.routes_to(&target);
    let report = p.run().unwrap();
    assert_eq!(urgent.sorted(), (0..300).filter(|j| j % 5 == 0).collect::<Vec<_>>());
    assert_eq!(normal.sorted(), (0..300).filter(|j| j % 5 != 0).collect::<Vec<_>>());
    assert_eq!(report.stage("route").unwrap().items_out, 300);
    assert_eq!(report.failures_total, 0);
});

matrix!(fn fast_and_slow_sources_both_arrive(ex) {
    // The original ended a dynamically fed stage when its first source ended: the slow
    // source's items were lost.
    let p = Pipeline::new("two-sources");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..20u64).map_err(Into::into));
    let fast = p.processor("fast", |x: u64, out: &mut Output<'_, u64>| Ok(out.to("target", x)?));
    let slow = p.processor("slow", |x: u64, out: &mut Output<'_, u64>| {
        std::thread::sleep(Duration::from_millis(10));
        Ok(out.to("target", 1000 + x)?)
    });
    fast.from_name("gen");
    slow.from_name("gen");
    ex.apply(&fast);
    ex.apply(&slow);
    let target = p.consumer("target", move |x: u64| { g.push(x); Ok(()) });
    fast.routes_to(&target);
    slow.routes_to(&target);
    p.run().unwrap();
    let mut want: Vec<u64> = (0..20).chain(1000..1020).collect();
    want.sort();
    assert_eq!(got.sorted(), want);
});

matrix!(fn target_reached_only_late(ex) {
    let p = Pipeline::new("late");
    let got = Sink::default();
    let g = got.clone();
    p.producer("gen", |out| out.emit_all(0..10u64).map_err(Into::into));
    let s = p.processor("mostly-pass", |x: u64, out: &mut Output<'_, u64>| {
        if x == 9 {
            std::thread::sleep(Duration::from_millis(200));
            out.to("late", x)?;
        }
        Ok(())
    });
    ex.apply(&s);
    let late = p.consumer("late", move |x: u64| { g.push(x); Ok(()) });
    s.routes_to(&late);
    p.run().unwrap();
    assert_eq!(got.sorted(), vec![9]);
});

matrix!(fn undeclared_target_is_an_item_error(ex) {
    let p = Pipeline::new("undeclared");
    p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    let s = p.processor("route", |x: u64, out: &mut Output<'_, u64>| Ok(out.to("nowhere", x)?));
    ex.apply(&s);
    p.consumer("sink", |_x: u64| Ok(()));
    let report = p.run().unwrap();
    assert_eq!(report.stage("route").unwrap().failed, 3);
    let f = &report.failures[0];
    assert_eq!(f.stage, "route");
    assert_eq!(f.kind, FailureKind::Error);
    assert!(f.message.contains("\"nowhere\"") && f.message.contains("not a declared route"), "{}", f.message);
});

// An item of the wrong type is a route error naming the route and both types, the same
// under every executor (from a forked child it was an encode failure).
matrix!(fn wrong_item_type_at_run_time_is_a_route_error(ex) {
    let p = Pipeline::new("wrong-type");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    let s = p.processor("route", |x: u64, out: &mut Output<'_, u64>| {
        Ok(out.to("words", x)?)
    });
    ex.apply(&s);
    let words = p.consumer("words", |_w: String| Ok(()));
    s.routes_to(&words);
    p.consumer("sink", |_x: u64| Ok(())).from(&s);
    let report = p.run().unwrap();
    assert_eq!(report.stage("route").unwrap().failed, 2);
    let f = &report.failures[0];
    assert_eq!(f.kind, FailureKind::Error, "{f}");
    assert_eq!(
        f.message,
        "cannot route: route \"route\" -> \"words\": the target takes alloc::string::String, \
         not u64"
    );
});

#[test]
fn declared_route_type_is_checked_at_build() {
    let p = Pipeline::new("typed");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    let s = p.map("route", |x: u64| Ok(x));
    p.consumer("sink", |_x: u64| Ok(()));
    s.routes_to_name::<u64>("words");
    p.consumer("words", |_w: String| Ok(()));
    match p.build() {
        Err(DefinitionError::TypeMismatch { from, to, .. }) => {
            assert_eq!((from.as_str(), to.as_str()), ("route", "words"));
        }
        other => panic!("expected a type mismatch, got {other:?}"),
    }
}

#[test]
fn local_routes_cannot_run_in_a_fork_stage() {
    #[derive(Clone)]
    struct NotSerde;
    let p = Pipeline::new("local");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    let s = p.map("route", |x: u64| Ok(x)).cow_fork(2);
    p.consumer("sink", |_x: u64| Ok(()));
    let t = p.consumer("local", |_x: NotSerde| Ok(()));
    s.routes_to_local(&t);
    assert!(
        matches!(p.build(), Err(DefinitionError::LocalRouteAcrossProcess { stage, .. }) if stage == "route")
    );
}

#[test]
fn unknown_route_name_is_a_definition_error() {
    let p = Pipeline::new("unknown");
    p.producer("gen", |out| out.emit_all(0..2u64).map_err(Into::into));
    p.map("route", |x: u64| Ok(x))
        .routes_to_name::<u64>("missing");
    p.consumer("sink", |_x: u64| Ok(()));
    assert!(
        matches!(p.build(), Err(DefinitionError::UnknownReference { reference, .. }) if reference == "missing")
    );
}
