//! What runs inside a forked child. Nothing here returns into the parent's code: the bodies
//! return an exit code to `sys::fork_child`, which `_exit`s with it.
//!
//! The child takes no lock another parent thread could hold: it owns its pipe writer and
//! buffers, builds its own stage instance, and reports through frames only.

use crate::error::{EmitError, FailureKind};
use crate::hooks::{self, ForkHook};
use crate::ipc::codec::WireFns;
use crate::ipc::frame::Decoder;
use crate::ipc::message::{split_run, ToWorker, RUN_PREFIX};
use crate::ipc::writer::ChildOut;
use crate::ipc::{FINISH_ID, START_ID};
use crate::route::Routes;

type Enc<T> = fn(&T, &mut Vec<u8>) -> Result<(), String>;

/// What a child needs of its stage (all of it in the parent's memory, seen through
/// copy-on-write): how to make the stage, the hooks to run first, the frame limit, the route
/// table and the codec.
pub(crate) struct StageCode<'a, I, O> {
    pub(crate) factory: &'a Factory<I, O>,
    pub(crate) after_fork: &'a [ForkHook],
    pub(crate) max: usize,
    pub(crate) routes: &'a Routes,
    pub(crate) wire: WireFns<I, O>,
}

impl<'a, I, O> StageCode<'a, I, O> {
    /// The child's view of a fork stage's parts.
    pub(crate) fn new(
        parts: &'a crate::exec::parts::Parts<I, O>,
        after_fork: &'a [ForkHook],
        max: usize,
    ) -> Self {
        StageCode {
            factory: &parts.factory,
            after_fork,
            max,
            routes: &parts.router.routes,
            wire: parts.wire.expect("fork stages have a codec"),
        }
    }
}

impl<I, O> Clone for StageCode<'_, I, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I, O> Copy for StageCode<'_, I, O> {}
use crate::ipc::results_log::{ResultsLog, PROGRESS_DONE};
use crate::stage::{guarded, Factory, Output, Routed, Sink, Stage};
use quanta::Instant;
use std::os::fd::OwnedFd;
use std::time::Duration;

struct PipeSink<'a, 'b, O> {
    out: &'a mut ChildOut<'b>,
    id: u64,
    routes: &'a Routes,
    encode: Enc<O>,
}

impl<O> Sink<O> for PipeSink<'_, '_, O> {
    fn send(&mut self, item: O) -> Result<(), EmitError> {
        self.out.result(self.id, &item, self.encode)
    }
    fn route(&mut self, target: &str, routed: Routed) -> Result<(), EmitError> {
        // The same check, and the same error, as in the parent's router.
        let index = self.routes.resolve(target, &routed)?;
        let item = routed.item;
        let codec = self.routes.entries[index]
            .codec
            .ok_or_else(|| EmitError::Route(format!("route to {target:?} is not serialisable")))?;
        self.out.routed(self.id, index as u32, &*item, codec.encode)
    }
}

/// One item through the stage, reported as result frames then `done` or `error`; it starts
/// at `t0` (`None`: now). Returns when it ended.
#[allow(clippy::too_many_arguments)]
fn run_item<I: 'static, O: 'static>(
    stage: &mut dyn Stage<I, O>,
    item: I,
    id: u64,
    out: &mut ChildOut<'_>,
    finish: bool,
    routes: &Routes,
    encode: Enc<O>,
    t0: Option<Instant>,
) -> Instant {
    out.start_item();
    let t0 = t0.unwrap_or_else(Instant::now);
    let r = guarded(|| {
        let mut sink = PipeSink {
            out: &mut *out,
            id,
            routes,
            encode,
        };
        let mut output = Output::new(&mut sink);
        stage.process(item, &mut output)?;
        if finish {
            stage.finish(&mut output)?;
        }
        Ok(())
    });
    let end = Instant::now();
    match r {
        Ok(()) => out.done(id, end.duration_since(t0).as_nanos() as u64),
        Err(c) => out.error(id, c.kind, c.message),
    }
    end
}

fn start<I, O>(
    factory: &Factory<I, O>,
    after_fork: &[ForkHook],
) -> Result<Box<dyn Stage<I, O>>, String> {
    hooks::run_fork(after_fork, "after_fork")?;
    guarded(|| Ok(factory())).map_err(|c| format!("stage factory failed: {}", c.message))
}

/// A cow_fork child: the items came through copy-on-write memory; results go to `fd`,
/// through `buf` (made by the parent before the fork, see [`ChildOut::with_buffer`]). Each
/// item's frames leave before the next item starts; the stage instance is flushed (`finish`)
/// with the last item.
pub(crate) fn cow_child<I: 'static, O: 'static>(
    items: Vec<I>,
    ids: &[u64],
    stage: &StageCode<'_, I, O>,
    fd: OwnedFd,
    buf: Vec<u8>,
) -> i32 {
    let items = ids.iter().copied().zip(items);
    child_items(items, Ok, stage, cow_out(fd, stage.max, buf))
}

/// A child of cow_fork's fork server: like [`cow_child`], but its items came encoded
/// through the server (they stay in the server's memory, read here through copy-on-write),
/// and each is decoded just before it runs (a death while decoding is that item's; an item
/// that cannot be decoded fails with a protocol error).
pub(crate) fn served_child<'p, I: 'static, O: 'static>(
    items: impl ExactSizeIterator<Item = (u64, &'p [u8])>,
    stage: &StageCode<'_, I, O>,
    fd: OwnedFd,
    buf: Vec<u8>,
) -> i32 {
    let decode = stage.wire.decode_in;
    child_items(items, decode, stage, cow_out(fd, stage.max, buf))
}

/// A cow child's writer: its pipe ([`super::supervise::cow_pipe`]) is grown only if the child
/// has much to write.
fn cow_out(fd: OwnedFd, max: usize, buf: Vec<u8>) -> ChildOut<'static> {
    ChildOut::with_buffer(fd, max, None, buf).growing(super::supervise::PIPE_SIZE)
}

/// The items of one cow_fork child, in order, each made ready by `take` (decoded, or not)
/// when it is its turn. Returns the exit code; the process exits right after, so nothing of
/// the writer is freed or closed first.
fn child_items<I: 'static, O: 'static, J>(
    items: impl ExactSizeIterator<Item = (u64, J)>,
    take: impl Fn(J) -> Result<I, String>,
    stage: &StageCode<'_, I, O>,
    mut out: ChildOut<'_>,
) -> i32 {
    let StageCode {
        factory,
        after_fork,
        routes,
        wire,
        ..
    } = *stage;
    super::trace::enter_child();
    let last = items.len().saturating_sub(1);
    let mut code = 0;
    match start(factory, after_fork) {
        Ok(mut stage) => {
            for (k, (id, job)) in items.enumerate() {
                match take(job) {
                    Ok(item) => {
                        let finish = k == last;
                        let encode = wire.encode_out;
                        run_item(
                            &mut *stage,
                            item,
                            id,
                            &mut out,
                            finish,
                            routes,
                            encode,
                            None,
                        );
                    }
                    Err(m) => {
                        out.start_item();
                        let m = format!("cannot decode the input item: {m}");
                        out.error(id, FailureKind::Protocol, m);
                    }
                }
                if out.flush().is_err() {
                    code = 74;
                    break;
                }
            }
        }
        Err(m) => {
            for (id, _) in items {
                out.error(id, FailureKind::Start, m.clone());
            }
        }
    }
    if code == 0 && out.flush().is_err() {
        code = 74;
    }
    out.abandon();
    code
}

/// An ipc worker writes the frames of its finished items right after an item that ran at
/// least this long ...
const SLOW_ITEM: Duration = Duration::from_micros(50);
/// ... and otherwise keeps them in its results log at most this long (checked between items),
/// or until its input is empty or its log full: a stream of cheap items costs one write per
/// batch, not one per item.
const HOLD: Duration = Duration::from_micros(100);

/// How long a batched ipc worker has held committed frames.
#[derive(Default)]
struct Hold {
    /// Since when committed frames wait in the log.
    since: Option<Instant>,
    /// When the last item ended, if nothing since took time (a wait for input, a write): the
    /// hold is checked against it without another clock reading.
    last_end: Option<Instant>,
}

impl Hold {
    /// Between items: whether what waits has waited [`HOLD`] or longer (it is then to be
    /// written, and the hold starts over).
    fn due(&mut self) -> bool {
        if let (Some(held), Some(now)) = (self.since, self.last_end) {
            if now.duration_since(held) >= HOLD {
                *self = Hold::default();
                return true;
            }
        }
        false
    }

    /// An item ended at `end`; `wrote`: its frames were written (a write can block: the next
    /// item's clock starts after it); `holds`: frames still wait.
    fn item_ended(&mut self, end: Instant, wrote: bool, holds: bool) {
        self.last_end = (!wrote).then_some(end);
        if !holds {
            self.since = None;
        } else if self.since.is_none() {
            self.since = Some(end);
        }
    }

    /// An item that could not be decoded was answered; `wrote` and `holds` as above.
    fn undecodable(&mut self, wrote: bool, holds: bool) {
        if wrote {
            self.last_end = None;
        }
        if holds && self.since.is_none() {
            self.since = self.last_end.or_else(|| Some(Instant::now()));
        }
    }
}

/// An ipc worker: decodes items from `input`, runs them one at a time, and writes their frames
/// to `output`: each item's before the next starts, or, with `log` (`batch_results`), through
/// the results log (see [`ResultsLog`]) in batches: if it dies, the parent still gets the frames
/// of every item it finished, so only the item it was running fails and nothing runs twice.
/// With a log it also keeps the item it runs in the log's `running` word. Reads until
/// `shutdown` (or end of file), then flushes its stage instance and exits 0.
pub(crate) fn ipc_worker<I: 'static, O: 'static>(
    input: OwnedFd,
    output: OwnedFd,
    log: Option<&mut ResultsLog>,
    stage: &StageCode<'_, I, O>,
) -> i32 {
    let StageCode {
        factory,
        after_fork,
        max,
        routes,
        wire,
    } = *stage;
    super::trace::enter_child();
    let mut out = ChildOut::new(output, max, log).combined();
    let mut stage = match start(factory, after_fork) {
        Ok(s) => s,
        Err(m) => {
            out.error(START_ID, FailureKind::Start, m);
            let _ = out.flush();
            return 1;
        }
    };
    let mut dec = Decoder::new(max);
    let mut hold = Hold::default();
    // The rest of the last `items` frame: its items run before the next frame is read.
    let mut run = Run::default();
    loop {
        if hold.due() && out.flush().is_err() {
            return 74;
        }
        let next = match run.next() {
            Some(Ok((id, payload))) => {
                // From here on a death is this item's (decoding included).
                out.running(id);
                Ok(Input::Item(id, (wire.decode_in)(payload)))
            }
            Some(Err(())) => Err(format!("malformed run of items after item {}", run.id)),
            None => match dec.next(|kind, id, payload| match ToWorker::decode(kind, payload) {
                Ok(ToWorker::Item(payload)) => {
                    out.running(id);
                    Input::Item(id, (wire.decode_in)(payload))
                }
                Ok(ToWorker::Items(payload)) => {
                    run.start(id, payload);
                    Input::Run
                }
                Ok(ToWorker::Shutdown) => Input::Shutdown,
                Err(e) => Input::Item(id, Err(e.to_string())),
            }) {
                Ok(Some(input)) => Ok(input),
                Ok(None) => Ok(Input::Empty),
                Err(e) => Err(e.to_string()),
            },
        };
        let r = match next {
            Ok(Input::Item(id, Ok(item))) => {
                let encode = wire.encode_out;
                ipc_item(&mut *stage, item, id, &mut out, routes, encode, &mut hold)
            }
            Ok(Input::Item(id, Err(m))) => undecodable(id, m, &mut out, &mut hold),
            Ok(Input::Run) => Ok(()),
            Ok(Input::Shutdown) => break,
            Ok(Input::Empty) => match refill(&mut dec, &input, &mut out, &mut hold) {
                Ok(true) => Ok(()),
                // The parent closed our input: same as shutdown.
                Ok(false) => break,
                Err(e) => Err(e),
            },
            Err(e) => {
                out.error(
                    START_ID,
                    FailureKind::Protocol,
                    format!("corrupt input stream: {e}"),
                );
                let _ = out.flush();
                return 2;
            }
        };
        if r.is_err() {
            return 74;
        }
    }
    finish_worker(&mut *stage, &mut out, routes, wire.encode_out)
}

/// What an ipc worker takes from its input next.
enum Input<I> {
    /// An item (or why it cannot be decoded).
    Item(u64, Result<I, String>),
    /// An `items` frame: its items are next.
    Run,
    /// `shutdown`.
    Shutdown,
    /// Nothing whole is buffered: read more.
    Empty,
}

/// The items of an `items` frame not yet taken: copied out of the decoder's buffer, so the
/// decoder may read on.
#[derive(Default)]
struct Run {
    bytes: Vec<u8>,
    /// Where the next item starts in `bytes`.
    at: usize,
    /// The next item's id.
    id: u64,
}

impl Run {
    fn start(&mut self, id: u64, payload: &[u8]) {
        self.bytes.clear();
        self.bytes.extend_from_slice(payload);
        (self.at, self.id) = (0, id);
    }

    /// The next item, `Err` if the rest is not a whole item.
    fn next(&mut self) -> Option<Result<(u64, &[u8]), ()>> {
        if self.at == self.bytes.len() {
            return None;
        }
        let Some((item, _)) = split_run(&self.bytes[self.at..]) else {
            self.at = self.bytes.len();
            return Some(Err(()));
        };
        let id = self.id;
        self.at += RUN_PREFIX + item.len();
        self.id += 1;
        let end = self.at;
        Some(Ok((id, &self.bytes[end - item.len()..end])))
    }
}

/// One item through an ipc worker's stage. Every item's frames are safe (written, or in the
/// results log) before the next item starts: if the next one kills the process, the parent
/// gets them and knows exactly which item was running. `Err`: the pipe is gone.
fn ipc_item<I: 'static, O: 'static>(
    stage: &mut dyn Stage<I, O>,
    item: I,
    id: u64,
    out: &mut ChildOut<'_>,
    routes: &Routes,
    encode: Enc<O>,
    hold: &mut Hold,
) -> std::io::Result<()> {
    // Its own clock reading: the time since the last item ended went to that item's frames
    // and this item's decoding, not to stage code.
    let t0 = Instant::now();
    let end = run_item(stage, item, id, out, false, routes, encode, Some(t0));
    out.running(id | PROGRESS_DONE);
    let wrote = match end.duration_since(t0) >= SLOW_ITEM {
        true => out.flush().map(|()| true),
        false => out.commit(),
    }?;
    hold.item_ended(end, wrote, out.holds());
    Ok(())
}

/// An item that cannot be decoded fails with a protocol error, answered like any item.
fn undecodable(id: u64, m: String, out: &mut ChildOut<'_>, hold: &mut Hold) -> std::io::Result<()> {
    out.running(id | PROGRESS_DONE);
    out.error(
        id,
        FailureKind::Protocol,
        format!("cannot decode the input item: {m}"),
    );
    // Safe before the next item, like any item's frames.
    let wrote = out.commit()?;
    hold.undecodable(wrote, out.holds());
    Ok(())
}

/// About to block on the input: sends what waits first, then reads. `Ok(false)`: the input
/// has ended.
fn refill(
    dec: &mut Decoder,
    input: &OwnedFd,
    out: &mut ChildOut<'_>,
    hold: &mut Hold,
) -> std::io::Result<bool> {
    *hold = Hold::default();
    out.flush()?;
    let n = loop {
        match dec.read_from(input, 64 << 10) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break 0,
        }
    };
    Ok(n > 0)
}

/// The end of the input: the stage instance is flushed (`Stage::finish`) as the reserved
/// item [`FINISH_ID`], and everything is written. Returns the worker's exit code.
fn finish_worker<I: 'static, O: 'static>(
    stage: &mut dyn Stage<I, O>,
    out: &mut ChildOut<'_>,
    routes: &Routes,
    encode: Enc<O>,
) -> i32 {
    out.start_item();
    let r = guarded(|| {
        stage.finish(&mut Output::new(&mut PipeSink {
            routes,
            out: &mut *out,
            id: FINISH_ID,
            encode,
        }))
    });
    match r {
        Ok(()) => out.done(FINISH_ID, 0),
        Err(c) => out.error(FINISH_ID, c.kind, c.message),
    }
    match out.flush() {
        Ok(()) => 0,
        Err(_) => 74,
    }
}

#[cfg(test)]
mod tests {
    use super::Run;
    use crate::ipc::message::push_run_item;

    #[test]
    fn a_run_gives_its_items_with_consecutive_ids_and_refuses_a_malformed_rest() {
        let mut payload = Vec::new();
        for item in [&b"one"[..], b"", b"three"] {
            push_run_item(&mut payload, item);
        }
        let mut run = Run::default();
        run.start(7, &payload);
        let mut got = Vec::new();
        while let Some(next) = run.next() {
            let (id, bytes) = next.expect("well formed");
            got.push((id, bytes.to_vec()));
        }
        assert_eq!(
            got,
            [
                (7, b"one".to_vec()),
                (8, Vec::new()),
                (9, b"three".to_vec())
            ]
        );
        // A length past the end: refused once, then nothing more.
        payload.extend_from_slice(&100u32.to_le_bytes());
        payload.extend_from_slice(b"short");
        run.start(0, &payload);
        for _ in 0..3 {
            assert!(matches!(run.next(), Some(Ok(_))));
        }
        assert_eq!(run.next().map(|r| r.is_err()), Some(true));
        assert!(run.next().is_none());
        // Three bytes cannot even hold a length.
        run.start(0, &[1, 0, 0]);
        assert_eq!(run.next().map(|r| r.is_err()), Some(true));
    }
}
