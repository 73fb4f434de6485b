//! Results in input order, for the executors that can finish items out of order (the fork
//! executors and remote stages): [`Release`]; and for the workers of `threads(n)` when the
//! stage must keep input order ([`Shared`], with [`Held`] collecting one item's outputs);
//! and, for the fork executors, the outputs a child has sent for the item it runs, held
//! until the item's `done` ([`Partial`]).

use crate::erased::Erased;
use crate::error::EmitError;
use crate::route::Router;
use crate::stage::{Item, Sink};
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// Routes results downstream, in input order when asked: results of item `i` are held until
/// every item before `i` has finished (succeeded or finally failed).
pub(crate) struct Release<O> {
    ordered: bool,
    next: u64,
    held: BTreeMap<u64, (Vec<O>, bool)>,
}

impl<O: Item> Release<O> {
    pub(crate) fn new(ordered: bool) -> Self {
        Release {
            ordered,
            next: 0,
            held: BTreeMap::new(),
        }
    }
    pub(crate) fn emit(&mut self, index: u64, o: O, router: &mut Router<O>) {
        if !self.ordered || index == self.next {
            let _ = router.send(o);
        } else {
            self.held.entry(index).or_default().0.push(o);
        }
    }
    /// Item `index` will produce nothing more.
    pub(crate) fn finished(&mut self, index: u64, router: &mut Router<O>) {
        if !self.ordered {
            return;
        }
        self.held.entry(index).or_default().1 = true;
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != self.next || !entry.get().1 {
                break;
            }
            for o in entry.remove().0 {
                let _ = router.send(o);
            }
            self.next += 1;
        }
    }
    /// End of the stage: whatever is still held goes out, in order (nothing is lost even if
    /// an item in between never finished, e.g. on abort).
    pub(crate) fn release_all(&mut self, router: &mut Router<O>) {
        for (_, (outs, _)) in std::mem::take(&mut self.held) {
            for o in outs {
                let _ = router.send(o);
            }
        }
    }
}

/// One [`Release`] (in order) with the stage's router, shared by the workers of
/// `threads(n)`: each hands over an item's outputs when the item is done.
pub(crate) struct Shared<O> {
    inner: Mutex<(Release<O>, Router<O>)>,
    /// Outputs of the instances' `finish`, until the stage ends.
    tail: Mutex<Vec<O>>,
}

impl<O: Item> Shared<O> {
    pub(crate) fn new(router: Router<O>) -> Self {
        Shared {
            inner: Mutex::new((Release::new(true), router)),
            tail: Mutex::new(Vec::new()),
        }
    }
    /// Item `index` is done and emitted `outs`.
    pub(crate) fn done(&self, index: u64, outs: Vec<O>) {
        self.with(|release, router| {
            for o in outs {
                release.emit(index, o, router);
            }
            release.finished(index, router);
        });
    }
    /// Outputs that belong to no item (a stage instance's `finish`): they follow every
    /// item's outputs, as under `inline`, so they wait for the end of the stage (another
    /// worker may still run, or hold the outputs of, items before them).
    pub(crate) fn send(&self, outs: Vec<O>) {
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(outs);
    }
    /// The end of the stage: whatever is still held goes out, then the `finish` outputs.
    pub(crate) fn end(&self) {
        let tail = std::mem::take(&mut *self.tail.lock().unwrap_or_else(PoisonError::into_inner));
        self.with(|release, router| {
            release.release_all(router);
            for o in tail {
                let _ = router.send(o);
            }
        });
    }
    fn with(&self, f: impl FnOnce(&mut Release<O>, &mut Router<O>)) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (release, router) = &mut *g;
        f(release, router)
    }
}

/// Collects what one item emits, for [`Shared::done`], and the items it routes (their order
/// is not the stage's: they go out through the worker's router when the item is done,
/// [`Held::send_routed`]). A failed attempt's are dropped ([`Held::clear`]).
pub(crate) struct Held<'r, O> {
    pub(crate) outs: Vec<O>,
    routed: Vec<(usize, Erased)>,
    router: &'r Router<O>,
}

impl<'r, O> Held<'r, O> {
    pub(crate) fn new(router: &'r Router<O>) -> Self {
        Held {
            outs: Vec::new(),
            routed: Vec::new(),
            router,
        }
    }

    /// The attempt failed: what it emitted is dropped.
    pub(crate) fn clear(&mut self) {
        self.outs.clear();
        self.routed.clear();
    }
}

impl<O: Item> Held<'_, O> {
    /// The item is done: its routed items go to their stages.
    pub(crate) fn send_routed(&mut self) {
        for (i, item) in self.routed.drain(..) {
            // Refused only by a closed target (the run is aborting).
            let _ = self.router.route_index(i, item);
        }
    }
}

impl<O: Clone> Sink<O> for Held<'_, O> {
    fn send(&mut self, item: O) -> Result<(), EmitError> {
        self.outs.push(item);
        Ok(())
    }
    fn route(&mut self, target: &str, item: crate::stage::Routed) -> Result<(), EmitError> {
        let i = self.router.routes.resolve(target, &item)?;
        self.routed.push((i, item.item));
        Ok(())
    }
}

/// The outputs a forked child has sent for the item it runs, held in the parent until the
/// item's `done`:
/// an attempt that fails (an error, a crash, a kill, a timeout, a broken stream) delivers
/// none of them, so a retry never delivers an output twice and a skipped or dead-lettered
/// item delivers nothing. The buffers are kept from item to item; an item whose only output
/// comes with its `done` (`result_done`) never touches them.
pub(crate) struct Partial<O> {
    pub(crate) outs: Vec<O>,
    pub(crate) routed: Vec<(usize, Erased)>,
}

impl<O> Default for Partial<O> {
    fn default() -> Self {
        Partial {
            outs: Vec::new(),
            routed: Vec::new(),
        }
    }
}

impl<O: Item> Partial<O> {
    /// How many outputs are held.
    pub(crate) fn len(&self) -> usize {
        self.outs.len() + self.routed.len()
    }

    /// The attempt failed: its outputs are dropped.
    pub(crate) fn clear(&mut self) {
        self.outs.clear();
        self.routed.clear();
    }

    /// Item `index` is done: its held outputs, then `last`, go downstream (in input order
    /// with `ordered`), and its routed ones to their stages.
    pub(crate) fn deliver(
        &mut self,
        index: u64,
        last: Option<O>,
        release: &mut Release<O>,
        router: &mut Router<O>,
        routes: &Router<O>,
    ) {
        if self.len() == 0 {
            // The common item: one output, in its `done` frame.
            if let Some(o) = last {
                release.emit(index, o, router);
            }
            return;
        }
        for o in self.outs.drain(..).chain(last) {
            release.emit(index, o, router);
        }
        for (i, t) in self.routed.drain(..) {
            let _ = routes.route_index(i, t);
        }
    }
}
