//! The sender: the stage's items into batched entries, under the bound of items in flight.
//!
//! Complete entries wait in an outbox and go to the broker together, in one call, when
//! [`SEND_MAX`] are there or before the sender would wait (for items or for room): under
//! load one round trip carries many entries, and a lone item still goes at once.

use super::{send_dead_letter, Link, Open, Shared};
use crate::ctx::StageCtx;
use crate::error::FailureKind;
use crate::ipc::codec::Codec;
use crate::policy::Verdict;
use crate::queue::QueueTx;
use crate::remote::broker::{NewEntry, Session, StageRun};
use crate::remote::options::Remote;
use crate::remote::wire;
use crate::stage::{Failed, Wire};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Entries sent in one call, at most.
const SEND_MAX: usize = 32;

pub(super) struct Sender<'a, I, C> {
    pub(super) ctx: &'a StageCtx,
    pub(super) remote: &'a Remote,
    pub(super) link: &'a Link<'a>,
    pub(super) run: &'a StageRun,
    pub(super) shared: &'a Shared<I>,
    pub(super) keep: bool,
    pub(super) dead_letter: Option<QueueTx<Failed<I>>>,
    pub(super) next: u64,
    pub(super) _c: std::marker::PhantomData<fn() -> C>,
}

impl<I: Wire, C: Codec> Sender<'_, I, C> {
    /// Items from the stage queue into entries, until the input ends or the stage is over.
    pub(super) fn run(
        &mut self,
        input: &crate::queue::Receiver<I>,
        session: &mut Box<dyn Session>,
    ) {
        let mut ready = VecDeque::new();
        let mut entry = Vec::new();
        let mut outbox = Vec::new();
        let mut opening = Vec::new();
        let mut count = 0u32;
        let mut first = 0u64;
        let mut opened: Option<Instant> = None;
        loop {
            if !outbox.is_empty() && (input.len() == 0 || self.credit_now() == 0) {
                self.flush(session, &mut outbox);
            }
            let Some(credit) = self.credit(count > 0) else {
                break;
            };
            if credit == 0 {
                // No room for more items: the partial entry goes now (its items are what
                // holds the credit, so waiting for its linger would wait for ever).
                self.close(&mut entry, first, &mut count, &mut outbox);
                self.flush(session, &mut outbox);
                opened = None;
                continue;
            }
            let room = credit.min(self.remote.batch - count as usize).max(1);
            let more = match opened {
                None => Some(input.recv_upto(&mut ready, room)),
                Some(t) => input.recv_upto_until(&mut ready, room, t + self.remote.linger),
            };
            match more {
                Some(false) => break,
                None => {
                    // The linger passed: send the partial entry.
                    self.close(&mut entry, first, &mut count, &mut outbox);
                    opened = None;
                    continue;
                }
                Some(true) => {}
            }
            if self.ctx.run.aborting() {
                self.ctx.received_cancelled(ready.len() as u64);
                ready.clear();
                continue;
            }
            self.ctx
                .stats
                .items_in
                .fetch_add(ready.len() as u64, Ordering::Relaxed);
            for item in ready.drain(..) {
                let index = self.next;
                self.next += 1;
                if count == 0 {
                    first = index;
                    opened = Some(Instant::now());
                }
                match wire::push_item::<C, I>(&mut entry, index, &item, self.remote.max_frame) {
                    Ok(()) => {
                        count += 1;
                        opening.push((index, item));
                    }
                    Err(e) => {
                        // Not sendable: this item fails here, alone. An entry holds items
                        // of consecutive indexes, so the one open ends before it.
                        self.close(&mut entry, first, &mut count, &mut outbox);
                        opened = None;
                        self.unsendable(index, item, e);
                    }
                }
                if count as usize >= self.remote.batch || entry.len() >= self.remote.batch_bytes {
                    self.close(&mut entry, first, &mut count, &mut outbox);
                    opened = None;
                }
            }
            // Recorded before any entry holding them is sent.
            self.opened(&mut opening);
            if self.remote.linger.is_zero() {
                self.close(&mut entry, first, &mut count, &mut outbox);
                opened = None;
            }
            if outbox.len() >= SEND_MAX {
                self.flush(session, &mut outbox);
            }
        }
        self.close(&mut entry, first, &mut count, &mut outbox);
        self.flush(session, &mut outbox);
        let mut book = self.shared.lock();
        book.total = Some(self.next);
        drop(book);
        self.shared.changed.notify_all();
        // Wait for the collector to finish every item (or give up).
        let mut book = self.shared.lock();
        while !book.over {
            book = self
                .shared
                .changed
                .wait(book)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Free room for items (waits for it, unless a partial entry is waiting to be sent:
    /// then `Some(0)`); `None` once the stage is over. The outbox is empty when it waits.
    fn credit(&self, partial: bool) -> Option<usize> {
        let mut book = self.shared.lock();
        loop {
            if book.over {
                return None;
            }
            let free = self.remote.max_in_flight.saturating_sub(book.in_flight);
            if free > 0 || self.ctx.run.aborting() {
                return Some(free.max(1));
            }
            if partial {
                return Some(0);
            }
            book = self
                .shared
                .changed
                .wait(book)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Free room for items now.
    fn credit_now(&self) -> usize {
        let book = self.shared.lock();
        self.remote.max_in_flight.saturating_sub(book.in_flight)
    }

    /// Items on their way, by index.
    fn opened(&self, items: &mut Vec<(u64, I)>) {
        let mut book = self.shared.lock();
        book.in_flight += items.len();
        for (index, item) in items.drain(..) {
            book.open.insert(index);
            if self.keep {
                book.kept.insert(index, item);
            }
        }
    }

    /// Item `index` cannot be encoded: it fails here with `Encode` (the collector is told,
    /// so that `ordered` releases the items after it).
    fn unsendable(&self, index: u64, item: I, e: String) {
        self.shared.lock().unsent.push(index);
        let m = format!("cannot encode the item for the broker: {e}");
        let attempt = self.ctx.policy.retries + 1;
        if let Verdict::DeadLetter(failure) =
            self.ctx
                .failure(index, attempt, FailureKind::Encode, m, None)
        {
            send_dead_letter(self.ctx, self.dead_letter.as_ref(), item, failure);
        }
        self.ctx.items_done(1);
    }

    /// Closes the entry being built (if any): recorded, and into the outbox.
    fn close(&self, entry: &mut Vec<u8>, first: u64, count: &mut u32, outbox: &mut Vec<NewEntry>) {
        if *count == 0 {
            entry.clear();
            return;
        }
        let e = NewEntry {
            first,
            count: *count,
            attempts: 0,
            payload: std::mem::take(entry),
        };
        *count = 0;
        let mut book = self.shared.lock();
        book.sent += 1;
        let open = Open {
            entry: e.clone(),
            left: e.count,
            sent: Instant::now(),
        };
        book.entries.insert(first, open);
        drop(book);
        outbox.push(e);
    }

    /// Sends the outbox's entries in one call.
    fn flush(&self, session: &mut Box<dyn Session>, outbox: &mut Vec<NewEntry>) {
        if outbox.is_empty() {
            return;
        }
        if let Err(err) = self.link.call(session, |s| s.send(self.run, outbox)) {
            // The outage lasted too long: the stage fails; the collector ends it.
            self.ctx.stage_failed(
                FailureKind::Error,
                format!("remote stage lost its broker: {err}"),
            );
        }
        outbox.clear();
    }
}
