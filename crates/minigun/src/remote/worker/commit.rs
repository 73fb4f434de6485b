//! The committers of a run a worker serves: the local run's tagged outputs and final
//! failures, gathered per held entry, and the atomic commit of an entry once every one of its
//! items has its terminal result.

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

impl<I: Wire, O: Wire, C: Codec> RunServer<'_, I, O, C> {
    /// The held entry that item `index` belongs to.
    pub(super) fn entry_of(book: &mut Book, index: u64) -> Option<(u64, &mut Held)> {
        let (&first, held) = book.held.range_mut(..=index).next_back()?;
        (index < first + held.count as u64).then_some((first, held))
    }

    /// Tagged outputs of the local run.
    pub(super) fn outputs(&self, rx: Receiver<Tagged<O>>) {
        let mut session = self.session().ok();
        let mut ready = VecDeque::new();
        while rx.recv_upto(&mut ready, 256) {
            for t in ready.drain(..) {
                match t {
                    Tagged::Out(i, o) => {
                        let mut book = self.lock();
                        if let Some((_, h)) = Self::entry_of(&mut book, i) {
                            let buf = h.frames.entry(i).or_default();
                            if let Err(e) =
                                wire::push_output::<C, O>(buf, i, &o, self.s.remote.max_frame)
                            {
                                h.broken.insert(i, e);
                            }
                        }
                    }
                    Tagged::Done(i, ns) => {
                        let f = {
                            let mut book = self.lock();
                            let broken =
                                Self::entry_of(&mut book, i).and_then(|(_, h)| h.broken.remove(&i));
                            broken.map(|e| {
                                self.failure(
                                    FailureKind::Encode,
                                    format!("cannot encode an output for the broker: {e}"),
                                    1,
                                )
                            })
                        };
                        match f {
                            Some(f) => {
                                self.terminal(&mut session, i, |buf| wire::push_failed(buf, i, &f))
                            }
                            None => {
                                self.terminal(&mut session, i, |buf| wire::push_done(buf, i, ns))
                            }
                        }
                    }
                    Tagged::Flush(o) => {
                        let mut book = self.lock();
                        if let Err(e) = wire::push_output::<C, O>(
                            &mut book.flush,
                            FINISH_ID,
                            &o,
                            self.s.remote.max_frame,
                        ) {
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
        }
    }

    /// Final failures of the local run.
    pub(super) fn failures(&self, rx: Receiver<Failed<(u64, I)>>) {
        let mut session = self.session().ok();
        let mut ready = VecDeque::new();
        while rx.recv_upto(&mut ready, 256) {
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
                self.lock().stats.failed += 1;
                self.terminal(&mut session, i, |buf| wire::push_failed(buf, i, &rf));
            }
        }
    }

    /// Item `index` reached its terminal result (written by `write`): commits its entry when
    /// that was the last one.
    pub(super) fn terminal(
        &self,
        session: &mut Option<Box<dyn Session>>,
        index: u64,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        let complete = {
            let mut book = self.lock();
            book.local = book.local.saturating_sub(1);
            let Some((first, h)) = Self::entry_of(&mut book, index) else {
                self.changed.notify_all();
                return;
            };
            write(h.frames.entry(index).or_default());
            h.left -= 1;
            if h.left > 0 {
                self.changed.notify_all();
                return;
            }
            let h = book.held.remove(&first).expect("found");
            book.suspects -= h.suspect as usize;
            (h.id, h.count, h.frames)
        };
        self.changed.notify_all();
        let (id, count, frames) = complete;
        let results: Vec<u8> = frames.into_values().flatten().collect();
        let mut tries = 0;
        let outcome = loop {
            let s = match session {
                Some(s) => s,
                None => match self.session() {
                    Ok(s) => session.insert(s),
                    Err(_) => break Err(()),
                },
            };
            match s.commit(&self.run, &self.consumer, &id, &results) {
                Ok(c) => break Ok(c),
                // A lost connection: the entry is still ours until claim_idle passes.
                Err(BrokerError::Unavailable(_))
                    if tries < 20 && !self.stop.load(Ordering::Relaxed) =>
                {
                    tries += 1;
                    *session = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The run's keys are gone (a server restart): the parent sends the entry again.
                Err(_) => break Err(()),
            }
        };
        let mut book = self.lock();
        match outcome {
            Ok(Commit::Committed) => book.stats.items += count as u64,
            Ok(Commit::LeaseLost) => {
                book.stats.lease_lost += 1;
                tracing::info!(run = %self.run, entry = %id, "another worker took the entry: its results are not published");
            }
            Err(()) => {
                tracing::warn!(run = %self.run, entry = %id, "could not commit; the entry will be reclaimed")
            }
        }
    }
}
