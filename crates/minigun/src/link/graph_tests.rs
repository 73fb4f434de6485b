//! The pure wiring rules of the parent module, exhaustively.

use super::*;
use StageKind::*;

fn decl(stages: &[(&str, StageKind)]) -> Declared {
    let n = stages.len();
    Declared {
        names: stages.iter().map(|s| s.0.to_string()).collect(),
        kinds: stages.iter().map(|s| s.1).collect(),
        from: vec![vec![]; n],
        to: vec![vec![]; n],
        side: vec![],
        routes: vec![],
        sub_of: vec![],
        sub_parent: vec![],
        port_edges: vec![],
        entry: vec![],
        sealed: vec![],
        sealed_subs: vec![],
    }
}

#[test]
fn a_sub_pipeline_is_one_node_of_the_sequence() {
    // gen, [etl: extract, transform], sink
    let mut d = decl(&[
        ("gen", Producer),
        ("etl/extract", Processor),
        ("etl/transform", Processor),
        ("sink", Consumer),
    ]);
    d.sub_of = vec![None, Some(0), Some(0), None];
    d.sub_parent = vec![None];
    let w = d.wire("t").unwrap();
    assert_eq!(w.edges, vec![(1, 2), (0, 1), (2, 3)]);
    assert_eq!(
        w.subs[0],
        SubIo {
            entries: vec![1],
            exits: vec![2]
        }
    );
}

#[test]
fn marked_entries_take_the_input_in_parallel() {
    // gen, [sub: l (entry), r (entry), join from l and r], sink
    let mut d = decl(&[
        ("gen", Producer),
        ("s/l", Processor),
        ("s/r", Processor),
        ("s/j", Processor),
        ("sink", Consumer),
    ]);
    d.sub_of = vec![None, Some(0), Some(0), Some(0), None];
    d.sub_parent = vec![None];
    d.entry = vec![false, true, true, false, false];
    d.from[3] = vec![1, 2];
    let w = d.wire("t").unwrap();
    assert_eq!(
        w.subs[0],
        SubIo {
            entries: vec![1, 2],
            exits: vec![3]
        }
    );
    for e in [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)] {
        assert!(w.edges.contains(&e), "{e:?} missing in {:?}", w.edges);
    }
    assert_eq!(w.edges.len(), 5);
}

#[test]
fn three_levels_and_explicit_edges_to_a_sub_pipeline() {
    // a, [outer: [mid: [inner: x]], y], b.from(outer)
    let mut d = decl(&[
        ("a", Producer),
        ("o/m/i/x", Processor),
        ("o/y", Processor),
        ("b", Consumer),
    ]);
    d.sub_of = vec![None, Some(2), Some(0), None];
    d.sub_parent = vec![None, Some(0), Some(1)];
    d.port_edges = vec![(Port::Sub(0), Port::Stage(3))];
    let w = d.wire("t").unwrap();
    assert_eq!(
        w.subs[0],
        SubIo {
            entries: vec![1],
            exits: vec![2]
        }
    );
    assert_eq!(
        w.subs[2],
        SubIo {
            entries: vec![1],
            exits: vec![1]
        }
    );
    for e in [(0, 1), (1, 2), (2, 3)] {
        assert!(w.edges.contains(&e), "{e:?} missing in {:?}", w.edges);
    }
    assert_eq!(w.edges.len(), 3);
}

#[test]
fn a_cycle_through_a_route_is_a_loop() {
    // gen -> fetch -> extract, extract routes back to fetch.
    let mut d = decl(&[
        ("gen", Producer),
        ("fetch", Processor),
        ("extract", Processor),
        ("sink", Consumer),
    ]);
    d.side = vec![(2, 1)];
    d.routes = vec![(2, 1)];
    let w = d.wire("t").unwrap();
    assert_eq!(w.loops, vec![vec![1, 2]]);
    assert_eq!(w.order, vec![0, 1, 2, 3]);
    // A self-route is a loop of one.
    let mut d = decl(&[("gen", Producer), ("crawl", Processor)]);
    d.side = vec![(1, 1)];
    d.routes = vec![(1, 1)];
    assert_eq!(d.wire("t").unwrap().loops, vec![vec![1]]);
}

#[test]
fn a_route_from_an_earlier_stage_is_the_targets_input_and_one_back_is_not() {
    // gen -> router; router routes to "big" (defined after it); "rest" takes the
    // router's default output.
    let mut d = decl(&[
        ("gen", Producer),
        ("router", Processor),
        ("big", Consumer),
        ("rest", Consumer),
    ]);
    d.side = vec![(1, 2)];
    d.routes = vec![(1, 2)];
    let w = d.wire("t").unwrap();
    assert_eq!(w.edges, vec![(0, 1), (1, 3)]);
    assert_eq!(w.defaults, w.edges);
    // A route back (extract -> fetch, defined before it) leaves fetch fed by gen.
    let mut d = decl(&[
        ("gen", Producer),
        ("fetch", Processor),
        ("extract", Processor),
    ]);
    d.side = vec![(2, 1)];
    d.routes = vec![(2, 1)];
    assert_eq!(d.wire("t").unwrap().edges, vec![(0, 1), (1, 2)]);
}

#[test]
fn accumulators_cannot_be_in_a_loop() {
    let mut d = decl(&[("gen", Producer), ("a", Processor), ("b", Accumulator)]);
    d.side = vec![(2, 1)];
    d.routes = vec![(2, 1)];
    assert!(
        matches!(d.wire("t"), Err(DefinitionError::AccumulatorInLoop { stage }) if stage == "b")
    );
}

#[test]
fn components_of_a_figure_eight() {
    let c = components(5, &[(0, 1), (1, 0), (1, 2), (2, 3), (3, 2), (3, 4)]);
    assert_eq!(c[0], c[1]);
    assert_eq!(c[2], c[3]);
    assert_ne!(c[0], c[2]);
    assert_ne!(c[4], c[2]);
}

#[test]
fn sequential_chain() {
    let d = decl(&[
        ("p", Producer),
        ("a", Processor),
        ("b", Accumulator),
        ("c", Consumer),
    ]);
    let w = d.wire("t").unwrap();
    assert_eq!(w.edges, vec![(0, 1), (1, 2), (2, 3)]);
    assert_eq!(w.order, vec![0, 1, 2, 3]);
}

#[test]
fn several_producers_feed_next_stage() {
    let d = decl(&[("p1", Producer), ("p2", Producer), ("a", Processor)]);
    assert_eq!(d.wire("t").unwrap().edges, vec![(0, 2), (1, 2)]);
}

#[test]
fn explicit_diamond_adds_no_default_edges() {
    let mut d = decl(&[
        ("p", Producer),
        ("l", Processor),
        ("r", Processor),
        ("j", Consumer),
    ]);
    d.from[1] = vec![0];
    d.from[2] = vec![0];
    d.from[3] = vec![1, 2];
    let w = d.wire("t").unwrap();
    assert_eq!(w.edges, vec![(0, 1), (0, 2), (1, 3), (2, 3)]);
}

#[test]
fn forward_to_reference() {
    let mut d = decl(&[("p", Producer), ("a", Processor), ("b", Consumer)]);
    d.to[0] = vec![2];
    d.from[1] = vec![0];
    d.to[1] = vec![2];
    assert_eq!(d.wire("t").unwrap().edges, vec![(0, 1), (0, 2), (1, 2)]);
}

#[test]
fn duplicate_name() {
    let d = decl(&[("p", Producer), ("p", Processor)]);
    assert_eq!(
        d.wire("t"),
        Err(DefinitionError::DuplicateName {
            pipeline: "t".into(),
            name: "p".into()
        })
    );
}

#[test]
fn unfed_stage() {
    let d = decl(&[("a", Processor), ("p", Producer)]);
    assert_eq!(
        d.wire("t"),
        Err(DefinitionError::Unfed { stage: "a".into() })
    );
    // A consumer does not feed the next stage by default.
    let d = decl(&[("p", Producer), ("c", Consumer), ("x", Processor)]);
    assert_eq!(
        d.wire("t"),
        Err(DefinitionError::Unfed { stage: "x".into() })
    );
}

#[test]
fn producer_with_input() {
    let mut d = decl(&[("p", Producer), ("q", Producer)]);
    d.to[0] = vec![1];
    assert!(matches!(
        d.wire("t"),
        Err(DefinitionError::ProducerHasInput { .. })
    ));
}

#[test]
fn cycle_is_named() {
    let mut d = decl(&[
        ("p", Producer),
        ("a", Processor),
        ("b", Processor),
        ("c", Processor),
    ]);
    d.from[1] = vec![0, 3];
    d.from[2] = vec![1];
    d.from[3] = vec![2];
    match d.wire("t") {
        Err(DefinitionError::Cycle { stages }) => {
            assert_eq!(stages.len(), 3);
            for s in ["a", "b", "c"] {
                assert!(stages.contains(&s.to_string()), "{stages:?}");
            }
        }
        other => panic!("expected a cycle, got {other:?}"),
    }
}

#[test]
fn self_loop_is_a_cycle() {
    let mut d = decl(&[("p", Producer), ("a", Processor)]);
    d.from[1] = vec![0, 1];
    assert_eq!(
        d.wire("t"),
        Err(DefinitionError::Cycle {
            stages: vec!["a".into()]
        })
    );
}

#[test]
fn dead_letter_edge_feeds_its_target() {
    let mut d = decl(&[("p", Producer), ("a", Processor), ("dl", Consumer)]);
    d.from[1] = vec![0];
    d.side = vec![(1, 2)];
    let w = d.wire("t").unwrap();
    assert_eq!(w.edges, vec![(0, 1)]);
    assert_eq!(w.order, vec![0, 1, 2]);
}
