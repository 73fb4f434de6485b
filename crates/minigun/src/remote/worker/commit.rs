//! The committers of a run a worker serves: the local run's tagged outputs and final
//! failures, gathered per held entry, and the atomic commit of the entries whose items all
//! have their terminal result.
//!
//! Each committer takes what the local run has ready (up to [`CHUNK`] messages), settles it
//! under one lock of the book, and commits every entry that became complete in one call
//! ([`Session::commit_many`]): under load, one round trip commits several entries.
//!
//! A complete entry stays in the book, its lease kept by the keeper, until its commit has an
//! answer; a commit that finds the broker unavailable is tried again until `max_outage`. So
//! commits refused while heartbeats get through cost no entry its lease; in an outage of the
//! whole server the leases lapse after `claim_idle` like those of every held entry, and a
//! late commit of an entry another worker took publishes nothing (`lease_lost`).

use super::{Book, Held, RunServer, Tagged};
use crate::error::FailureKind;
use crate::ipc::codec::Codec;
use crate::queue::Receiver;
use crate::remote::broker::*;
use crate::remote::wire::{self, RemoteFailure, FINISH_ID};
use crate::shared::host_name;
use crate::stage::{Failed, Wire};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Messages of the local run taken at once.
const CHUNK: usize = 1024;
/// Results committed in one call, at most (a larger entry still goes alone): one call
/// stays well inside what a broker takes in one request.
const COMMIT_BYTES: usize = 4 << 20;

/// An entry whose items all have their terminal result: ready to commit. It stays in the
/// book (`Held::committing`), its lease kept by the keeper, until its commit has an answer.
pub(super) struct Complete {
    first: u64,
    id: EntryId,
    count: u32,
    results: Vec<u8>,
}

impl<I: Wire, O: Wire, C: Codec> RunServer<'_, I, O, C> {
    /// The held entry, not yet complete, that item `index` belongs to.
    pub(super) fn entry_of(book: &mut Book, index: u64) -> Option<(u64, &mut Held)> {
        let (&first, held) = book.held.range_mut(..=index).next_back()?;
        (index < first + held.count as u64 && !held.committing).then_some((first, held))
    }

    /// Tagged outputs of the local run.
    pub(super) fn outputs(&self, rx: Receiver<Tagged<O>>) {
        let mut session = self.session().ok();
        let mut ready = VecDeque::new();
        while rx.recv_upto(&mut ready, CHUNK) {
            let mut complete = Vec::new();
            {
                let mut book = self.lock();
                for t in ready.drain(..) {
                    self.output(&mut book, t, &mut complete);
                }
            }
            self.changed.notify_all();
            self.commit_all(&mut session, complete);
        }
    }

    /// One message of the local run, under the book's lock.
    fn output(&self, book: &mut Book, t: Tagged<O>, complete: &mut Vec<Complete>) {
        let max = self.s.remote.max_frame;
        match t {
            Tagged::Out(i, o) => {
                if let Some((_, h)) = Self::entry_of(book, i) {
                    let start = h.results.len();
                    match wire::push_output::<C, O>(&mut h.results, i, &o, max) {
                        Ok(()) => h.last_output = Some((i, start)),
                        Err(e) => {
                            h.broken.insert(i, e);
                        }
                    }
                }
            }
            Tagged::Done(i, ns) => {
                let broken = Self::entry_of(book, i).and_then(|(_, h)| h.broken.remove(&i));
                let done = match broken {
                    Some(e) => {
                        let f = self.failure(
                            FailureKind::Encode,
                            format!("cannot encode an output for the broker: {e}"),
                            1,
                        );
                        Self::settle(book, i, |h| wire::push_failed(&mut h.results, i, &f))
                    }
                    // An item whose last output is the entry's last frame ends in that
                    // frame (`result_done`), as on the pipes.
                    None => Self::settle(book, i, |h| match h.last_output {
                        Some((j, start))
                            if j == i && wire::merge_done(&mut h.results, start, ns, max) => {}
                        _ => wire::push_done(&mut h.results, i, ns),
                    }),
                };
                complete.extend(done);
            }
            Tagged::Flush(o) => {
                if let Err(e) = wire::push_output::<C, O>(&mut book.flush, FINISH_ID, &o, max) {
                    let f = self.failure(
                        FailureKind::Encode,
                        format!("cannot encode a finish output: {e}"),
                        1,
                    );
                    wire::push_failed(&mut book.flush, FINISH_ID, &f);
                }
            }
        }
    }

    /// Final failures of the local run.
    pub(super) fn failures(&self, rx: Receiver<Failed<(u64, I)>>) {
        let mut session = self.session().ok();
        let mut ready = VecDeque::new();
        while rx.recv_upto(&mut ready, CHUNK) {
            let mut complete = Vec::new();
            {
                let mut book = self.lock();
                for f in ready.drain(..) {
                    let i = f.item.0;
                    if f.failure.kind == FailureKind::Cancelled {
                        continue;
                    }
                    let rf = RemoteFailure {
                        kind: f.failure.kind,
                        message: f.failure.message,
                        attempt: f.failure.attempt,
                        pid: f.failure.pid.or(Some(std::process::id())),
                        host: host_name(),
                    };
                    book.stats.failed += 1;
                    complete.extend(Self::settle(&mut book, i, |h| {
                        wire::push_failed(&mut h.results, i, &rf)
                    }));
                }
            }
            self.changed.notify_all();
            self.commit_all(&mut session, complete);
        }
    }

    /// Item `index` reached its terminal result (written by `write`): its entry's results,
    /// taken for the commit, when that was the entry's last item (the entry stays in the
    /// book, marked `committing`, until the commit has an answer).
    fn settle(book: &mut Book, index: u64, write: impl FnOnce(&mut Held)) -> Option<Complete> {
        book.local = book.local.saturating_sub(1);
        book.settled += 1;
        let (first, h) = Self::entry_of(book, index)?;
        write(h);
        h.left -= 1;
        if h.left > 0 {
            return None;
        }
        h.committing = true;
        let suspect = h.suspect;
        let complete = Complete {
            first,
            id: h.id.clone(),
            count: h.count,
            results: std::mem::take(&mut h.results),
        };
        book.suspects -= suspect as usize;
        Some(complete)
    }

    /// Commits complete entries: as many in one call as [`COMMIT_BYTES`] allows.
    fn commit_all(&self, session: &mut Option<Box<dyn Session>>, mut complete: Vec<Complete>) {
        while !complete.is_empty() {
            let n = first_call(complete.iter().map(|c| c.results.len()), COMMIT_BYTES);
            let rest = complete.split_off(n);
            self.commit_some(session, complete);
            complete = rest;
        }
    }

    /// Commits complete entries in one call.
    fn commit_some(&self, session: &mut Option<Box<dyn Session>>, complete: Vec<Complete>) {
        let done: Vec<(&EntryId, &[u8])> = complete
            .iter()
            .map(|c| (&c.id, c.results.as_slice()))
            .collect();
        // The entries stay ours (the keeper keeps their leases) through an outage shorter
        // than `max_outage`: the commit is tried again until then.
        let since = std::time::Instant::now();
        let outcome = loop {
            let s = match session {
                Some(s) => s,
                None => match self.session() {
                    Ok(s) => session.insert(s),
                    Err(_) => break Err(()),
                },
            };
            match s.commit_many(&self.run, &self.consumer, &done) {
                Ok(c) => break Ok(c),
                // A lost connection: the entries are still ours until claim_idle passes.
                Err(BrokerError::Unavailable(_))
                    if since.elapsed() < self.s.remote.max_outage
                        && !self.stop.load(Ordering::Relaxed) =>
                {
                    *session = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The run's keys are gone (a server restart): the parent sends them again.
                Err(_) => break Err(()),
            }
        };
        let mut book = self.lock();
        for c in &complete {
            if book
                .held
                .get(&c.first)
                .is_some_and(|h| h.committing && h.id == c.id)
            {
                book.held.remove(&c.first);
            }
        }
        // A stop's grace waits for the book to empty.
        self.changed.notify_all();
        let Ok(outcomes) = outcome else {
            tracing::warn!(run = %self.run, entries = complete.len(), "could not commit; the entries will be reclaimed");
            return;
        };
        for (c, o) in complete.iter().zip(outcomes) {
            match o {
                Commit::Committed => book.stats.items += c.count as u64,
                Commit::LeaseLost => {
                    book.stats.lease_lost += 1;
                    tracing::info!(run = %self.run, entry = %c.id, "another worker took the entry: its results are not published");
                }
            }
        }
    }
}

/// How many of the entries (by their results' sizes) go in the first call: as many as fit in
/// `max` bytes, and at least one.
fn first_call(sizes: impl Iterator<Item = usize>, max: usize) -> usize {
    let mut bytes = 0;
    sizes
        .take_while(|n| {
            bytes += n;
            bytes <= max
        })
        .count()
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::first_call;

    #[test]
    fn a_call_takes_what_fits_and_at_least_one_entry() {
        assert_eq!(first_call([10, 20, 30].into_iter(), 100), 3);
        assert_eq!(first_call([60, 40, 1].into_iter(), 100), 2);
        assert_eq!(
            first_call([500, 1].into_iter(), 100),
            1,
            "a large entry goes alone"
        );
        assert_eq!(first_call([1, 500].into_iter(), 100), 1);
    }
}
