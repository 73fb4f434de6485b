//! Results in input order, for the executors that can finish items out of order (the fork
//! executors and remote stages): [`Release`].

use crate::route::Router;
use crate::stage::{Item, Sink};
use std::collections::BTreeMap;

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
