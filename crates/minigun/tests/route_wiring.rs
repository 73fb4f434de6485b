//! Default wiring around declared routes: a route from an earlier stage is the target's input
//! (it takes nothing by definition order); a route back to an earlier stage (a loop) is not;
//! a mis-wiring by definition order says how to fix it.
mod common;
use common::Sink;
use minigun::{DefinitionError, Output, Pipeline};

#[test]
fn a_route_target_defined_after_its_router_takes_nothing_by_definition_order() {
    // "big" is declared as a route target of "router": it receives only the routed items, and
    // "rest" (the next stage that takes input) receives the router's default output.
    let p = Pipeline::new("route-fed");
    let (big, rest) = (Sink::default(), Sink::default());
    let (b, r) = (big.clone(), rest.clone());
    p.producer("gen", |out| out.emit_all(0..100u64).map_err(Into::into));
    let router = p.processor("router", |x: u64, out: &mut Output<'_, u64>| {
        if x >= 90 {
            out.to("big", x)?;
        } else {
            out.emit(x)?;
        }
        Ok(())
    });
    let target = p.consumer("big", move |x: u64| {
        b.push(x);
        Ok(())
    });
    p.consumer("rest", move |x: u64| {
        r.push(x);
        Ok(())
    });
    router.routes_to(&target);
    let report = p.run().unwrap();
    assert_eq!(big.sorted(), (90..100).collect::<Vec<_>>());
    assert_eq!(rest.sorted(), (0..90).collect::<Vec<_>>());
    assert_eq!(report.stage("big").unwrap().items_in, 10);
}

#[test]
fn route_targets_of_a_producer_may_take_other_types_than_it_emits() {
    // The producer only routes; its first target takes a String, not its u64 output.
    let p = Pipeline::new("producer-routes");
    let (words, numbers) = (Sink::default(), Sink::default());
    let (w, n) = (words.clone(), numbers.clone());
    let gen = p.producer("gen", |out: &mut Output<'_, u64>| {
        for i in 0..10u64 {
            if i % 2 == 0 {
                out.to("numbers", i)?;
            } else {
                out.to("words", format!("w{i}"))?;
            }
        }
        Ok(())
    });
    p.consumer("words", move |s: String| {
        w.push(s);
        Ok(())
    });
    p.consumer("numbers", move |x: u64| {
        n.push(x);
        Ok(())
    });
    gen.routes_to_name::<String>("words")
        .routes_to_name::<u64>("numbers");
    p.run().unwrap();
    assert_eq!(words.sorted(), ["w1", "w3", "w5", "w7", "w9"]);
    assert_eq!(numbers.sorted(), [0, 2, 4, 6, 8]);
}

#[test]
fn a_loop_entry_routed_back_to_is_still_fed_by_the_stage_before_it() {
    let p = Pipeline::new("loop-entry");
    let out = Sink::default();
    let o = out.clone();
    p.producer("seeds", |out| out.emit_all([1u64, 2]).map_err(Into::into));
    let grow = p.map("grow", |x: u64| Ok(x * 10));
    p.processor("again", |x: u64, out: &mut Output<'_, u64>| {
        if x < 1000 {
            out.to("grow", x)?;
        } else {
            out.emit(x)?;
        }
        Ok(())
    })
    .routes_to(&grow);
    p.consumer("done", move |x: u64| {
        o.push(x);
        Ok(())
    });
    p.run().unwrap();
    assert_eq!(out.sorted(), [1000, 2000]);
}

#[test]
fn a_type_mismatch_of_the_default_wiring_says_how_to_wire_otherwise() {
    let p = Pipeline::new("by-order");
    p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    p.map("format", |x: u64| Ok(x.to_string()));
    p.consumer("count", |_: u64| Ok(()));
    let e = p.build().unwrap_err();
    match &e {
        DefinitionError::DefaultEdgeMismatch {
            from,
            to,
            output,
            input,
        } => {
            assert_eq!((from.as_str(), to.as_str()), ("format", "count"));
            assert!(output.contains("String") && *input == "u64", "{e}");
        }
        other => panic!("expected DefaultEdgeMismatch, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("definition order") && msg.contains(".from(&stage)"),
        "{msg}"
    );

    // A mismatch on an explicit edge is the plain one, naming the edge.
    let p = Pipeline::new("explicit");
    p.producer("gen", |out| out.emit_all(0..3u64).map_err(Into::into));
    p.consumer("count", |_: String| Ok(())).from_name("gen");
    assert!(
        matches!(p.build(), Err(DefinitionError::TypeMismatch { from, to, .. }) if from == "gen" && to == "count")
    );
}
