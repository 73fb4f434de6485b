//! A flight: items on their way through a worker, one item or a run of them, and how a run
//! is taken apart (the parts of a run are runs, or single items without their length).

use crate::ipc::frame::Kind;
use crate::ipc::message::{run_offset, split_run, RUN_PREFIX};
use crate::ipc::outbox::Payload;
use std::time::Instant;

/// Items on their way through a worker: one item, or a run of `count` items with
/// consecutive indices from `index` on, sent in one `items` frame and tracked as one. Only a
/// run's first item can be running; when it ends the run moves on to the next
/// ([`Worker::front_done`]), and whenever an item fails, dies or goes back to the queue it is
/// taken out of its run first ([`Worker::split_front`]), so what happens to an item still
/// happens to it alone. An async stage's flights are single items (its feeder makes no runs).
///
/// [`Worker::front_done`]: super::worker::Worker::front_done
/// [`Worker::split_front`]: super::worker::Worker::split_front
pub(super) struct Flight {
    /// The (first) item's index in the stage's input.
    pub(super) index: u64,
    /// Items in the flight, at least 1.
    pub(super) count: u32,
    pub(super) attempt: u32,
    /// A single item's encoding; a run's items, each behind its length (`message::split_run`).
    pub(super) payload: Payload,
    pub(super) not_before: Option<Instant>,
    /// Its place among the items handed to its worker (0 for the first); an async worker
    /// has started it once its count of started items is past this.
    pub(super) seq: u64,
}

impl Flight {
    /// One item, encoded.
    pub(super) fn one(index: u64, payload: Payload) -> Self {
        Flight {
            index,
            count: 1,
            attempt: 1,
            payload,
            not_before: None,
            seq: 0,
        }
    }

    /// The flight's items `from..to` as a flight of their own (sharing its buffer).
    pub(super) fn part(&self, from: usize, to: usize) -> Flight {
        debug_assert!(from < to && to <= self.count as usize);
        let at = match self.count {
            1 => 0,
            _ => run_offset(&self.payload, from),
        };
        let payload = match (self.count, to - from) {
            (1, _) => self.payload.clone(),
            (_, 1) => {
                let (item, _) = split_run(&self.payload[at..]).expect("a well-formed run");
                self.payload
                    .slice(at + RUN_PREFIX, at + RUN_PREFIX + item.len())
            }
            _ => {
                let end = match to == self.count as usize {
                    true => self.payload.len(),
                    false => at + run_offset(&self.payload[at..], to - from),
                };
                self.payload.slice(at, end)
            }
        };
        Flight {
            index: self.index + from as u64,
            count: (to - from) as u32,
            attempt: self.attempt,
            payload,
            not_before: self.not_before,
            seq: self.seq,
        }
    }

    /// The first `n` items (fewer than `count`) and the rest, as two flights.
    pub(super) fn split(self, n: usize) -> (Flight, Flight) {
        (self.part(0, n), self.part(n, self.count as usize))
    }

    /// The frame kind it travels in.
    pub(super) fn kind(&self) -> Kind {
        match self.count {
            1 => Kind::Item,
            _ => Kind::Items,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A run of `items` (encoded as the feeder does) from index `first` on.
    pub(in crate::exec::fork::ipc) fn run(first: u64, items: &[&[u8]]) -> Flight {
        let mut buf = Vec::new();
        for item in items {
            crate::ipc::message::push_run_item(&mut buf, item);
        }
        Flight {
            count: items.len() as u32,
            ..Flight::one(first, Payload::own(buf))
        }
    }

    #[test]
    fn a_run_splits_into_parts_that_are_valid_runs_or_single_items() {
        let r = run(0, &[b"x", b"yy", b"zzz", b"w"]);
        let (head, rest) = r.split(1);
        assert_eq!(
            (head.index, head.count, &head.payload[..]),
            (0, 1, &b"x"[..])
        );
        assert_eq!((rest.index, rest.count), (1, 3));
        let (mid, last) = rest.split(2);
        assert_eq!((mid.index, mid.count), (1, 2));
        assert_eq!(
            &mid.payload[..],
            &[2, 0, 0, 0, b'y', b'y', 3, 0, 0, 0, b'z', b'z', b'z'][..]
        );
        assert_eq!(
            (last.index, last.count, &last.payload[..]),
            (3, 1, &b"w"[..])
        );
    }
}
