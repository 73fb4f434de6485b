//! Connecting the wired graph: one input queue per stage, one work counter per routing loop,
//! and one sender per edge (static, dead-letter, route), each into its stage's
//! [`StagePlan`].

use super::graph::Wired;
use super::resolve::Edges;
use super::StagePlan;
use crate::erased::Erased;
use crate::loops::{Loop, Membership, Unit};
use crate::node::TxMaker;
use crate::queue::Capacity;
use crate::route::RouteEntry;
use std::sync::Arc;

/// A stage's input queue while the graph is connected.
pub(super) struct Queue {
    /// Makes one more sender into the queue; dropped once every edge has its sender (a live
    /// maker would keep the queue open for ever).
    maker: Option<TxMaker>,
    /// The receiver, until the stage's node takes it.
    pub(super) rx: Option<Erased>,
    pub(super) capacity: Capacity,
}

/// Makes every stage's input queue. A routing loop's members feed each other: with bounded
/// queues a member could block on its own full queue for ever, so their queues are unbounded
/// (the loop's work counter, not a capacity, bounds what is in it). Returns the closers of
/// the loop members' queues.
pub(super) fn queues(
    plans: &mut [StagePlan],
    wired: &Wired,
    default: Capacity,
) -> Vec<Option<crate::loops::Closer>> {
    let mut closers = Vec::with_capacity(plans.len());
    for (v, plan) in plans.iter_mut().enumerate() {
        if plan.chained_to.is_some() {
            // Its upstream's router calls it: no queue.
            closers.push(None);
            continue;
        }
        let in_loop = wired.loops.iter().any(|m| m.contains(&v));
        let capacity = match in_loop {
            true => Capacity::Unbounded,
            false => plan.def.capacity.unwrap_or(default),
        };
        match plan.def.node.make_queue(capacity, plan.stats.clone()) {
            Some((maker, rx, closer)) => {
                plan.queue = Some(Queue {
                    maker: Some(maker),
                    rx: Some(rx),
                    capacity,
                });
                closers.push(Some(closer));
            }
            None => closers.push(None),
        }
    }
    closers
}

/// One work counter per routing loop, with its members' queues to close.
pub(super) fn loops(
    plans: &mut [StagePlan],
    wired: &Wired,
    mut closers: Vec<Option<crate::loops::Closer>>,
) -> Vec<Arc<Loop>> {
    let mut loops = Vec::new();
    for members in &wired.loops {
        let lp = Loop::new();
        for &m in members {
            plans[m].lp = Some(lp.clone());
            if let Some(close) = closers[m].take() {
                lp.member(close);
            }
        }
        loops.push(lp);
    }
    loops
}

/// One sender per edge, each held by its upstream's plan; then the queues' makers are
/// dropped. A sender from outside a loop into it holds one unit of the loop's work (taken
/// when it is made).
pub(super) fn senders(plans: &mut [StagePlan], wired: &Wired, edges: &Edges) {
    let sender = |plans: &[StagePlan], u: usize, v: usize| {
        let membership = match &plans[v].lp {
            None => Membership::default(),
            Some(lp) => Membership {
                lp: Some(lp.clone()),
                unit: match &plans[u].lp {
                    Some(own) if Arc::ptr_eq(own, lp) => None,
                    _ => Some(Arc::new(Unit::new(lp.clone()))),
                },
            },
        };
        let queue = plans[v].queue.as_ref();
        let maker = queue.and_then(|q| q.maker.as_ref());
        (maker.expect("a stage fed by an edge has a queue"))(membership)
    };
    for &(u, v) in &wired.edges {
        if plans[v].chained_to == Some(u) {
            // The edge is the chain (made when the tasks are).
            continue;
        }
        let tx = sender(plans, u, v);
        plans[u].outputs.push(tx);
    }
    for &(u, v) in &edges.dead {
        let tx = sender(plans, u, v);
        plans[u].dead_letter = Some(tx);
    }
    for &(u, v, k) in &edges.routes {
        let tx = sender(plans, u, v);
        let decl = &plans[u].def.routes[k].1;
        let entry = RouteEntry {
            name: plans[v].def.name.clone(),
            ty: decl.ty,
            send: (decl.make)(tx),
            codec: decl.codec,
        };
        plans[u].routes.push(entry);
    }
    for plan in plans {
        if let Some(q) = &mut plan.queue {
            q.maker = None;
        }
    }
}
