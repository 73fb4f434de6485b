//! What runs inside a forked child. Nothing here returns into the parent's code: the bodies
//! return an exit code to `sys::fork_child`, which `_exit`s with it.
//!
//! The child takes no lock another parent thread could hold: it owns its pipe writer and
//! buffers, builds its own stage instance, and reports through frames only.

use crate::error::{EmitError, FailureKind};
use crate::hooks::{self, ForkHook};
use crate::ipc::frame::{self, Decoder, Kind};
use crate::ipc::protocol::{self, ChildError, Done, WireFns};
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
use crate::stage::{guarded, Factory, Output, Sink, Stage};
use crate::sys::SharedLog;
use quanta::Instant;
use std::any::Any;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// Flush the child's buffer once it holds this much, so the parent reads while we run.
const FLUSH_AT: usize = 64 << 10;

/// The size of an ipc worker's shared log (finished items' frames not yet written).
pub(crate) const LOG_BYTES: usize = 256 << 10;

/// The bit of a log's `running` word set once the item it names has ended.
pub(crate) const PROGRESS_DONE: u64 = 1 << 63;

fn write_all(fd: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < bytes.len() {
        match rustix::io::write(fd, &bytes[off..]) {
            Ok(n) => off += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The child's side of its result pipe: buffered frames, written with blocking writes.
///
/// An ipc worker also has a [`SharedLog`]: it `commit`s each finished item's frames there and
/// writes the log to the pipe in batches; a cow child writes each item's frames at once.
pub(crate) struct ChildOut<'a> {
    fd: OwnedFd,
    buf: Vec<u8>,
    max: usize,
    outputs: u64,
    /// Where the running item's only result frame starts in `buf`, while it is the last
    /// frame there (its `done` may then join it as one `result_done` frame).
    last_result: Option<usize>,
    /// Whether `done` may join a lone result (ipc workers; cow children keep two frames).
    combine: bool,
    log: Option<&'a mut SharedLog>,
}

impl<'a> ChildOut<'a> {
    pub(crate) fn new(fd: OwnedFd, max: usize, log: Option<&'a mut SharedLog>) -> Self {
        ChildOut {
            fd,
            buf: Vec::with_capacity(FLUSH_AT),
            max,
            outputs: 0,
            last_result: None,
            combine: false,
            log,
        }
    }

    /// Lets `done` join an item's only result into one `result_done` frame.
    fn combined(mut self) -> Self {
        self.combine = true;
        self
    }

    /// A new item starts: no outputs yet.
    fn start_item(&mut self) {
        self.outputs = 0;
        self.last_result = None;
    }

    /// Writes everything: the shared log first (earlier items), then the buffer.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        for rec in super::log::take() {
            let _ = protocol::encode_frame(&mut self.buf, Kind::Log, 0, &rec, self.max);
        }
        // The log is the child's while it writes (the parent may take its bytes otherwise).
        if let Some(log) = self.log.as_deref() {
            log.hold();
        }
        let r = self.write_all_held();
        if let Some(log) = self.log.as_deref() {
            log.release();
        }
        r
    }

    fn write_all_held(&mut self) -> std::io::Result<()> {
        if let Some(log) = self.log.as_deref_mut() {
            if !log.bytes().is_empty() {
                if let Err(e) = write_all(&self.fd, log.bytes()) {
                    self.buf.clear();
                    self.last_result = None;
                    return Err(e);
                }
                log.sent();
            }
        }
        let r = write_all(&self.fd, &self.buf);
        if let (Ok(()), Some(log)) = (&r, self.log.as_deref_mut()) {
            log.wrote(self.buf.len());
        }
        self.buf.clear();
        self.last_result = None;
        r
    }

    /// The current item has ended: its frames go to the shared log (which survives this
    /// process), or out at once when the log is full or there is none (`Ok(true)`: written).
    fn commit(&mut self) -> std::io::Result<bool> {
        for rec in super::log::take() {
            let _ = protocol::encode_frame(&mut self.buf, Kind::Log, 0, &rec, self.max);
        }
        let logged = match self.log.as_deref_mut() {
            Some(log) => {
                log.hold();
                let logged = log.append(&self.buf);
                log.release();
                logged
            }
            None => false,
        };
        if logged {
            self.buf.clear();
            self.last_result = None;
            return Ok(false);
        }
        self.flush().map(|()| true)
    }

    /// Whether frames wait to be written.
    fn holds(&self) -> bool {
        !self.buf.is_empty() || self.log.as_ref().is_some_and(|l| l.len() > 0)
    }

    /// Records in the shared log which item runs (a flag bit: has ended), if there is one.
    fn running(&self, word: u64) {
        if let Some(log) = &self.log {
            log.set_running(word);
        }
    }

    fn result<O>(&mut self, id: u64, value: &O, encode: Enc<O>) -> Result<(), EmitError> {
        let start = self.buf.len();
        protocol::frame_with(&mut self.buf, Kind::Result, id, self.max, |b| {
            encode(value, b)
        })
        .map_err(|e| EmitError::Encode(format!("a {}: {e}", std::any::type_name::<O>())))?;
        self.last_result = (self.outputs == 0).then_some(start);
        self.outputs += 1;
        if self.buf.len() >= FLUSH_AT {
            self.flush().map_err(|_| EmitError::Closed)?;
        }
        Ok(())
    }

    fn routed(
        &mut self,
        id: u64,
        index: u32,
        item: &(dyn Any + Send),
        encode: fn(&(dyn Any + Send), &mut Vec<u8>) -> Result<(), String>,
    ) -> Result<(), EmitError> {
        let start = frame::begin(&mut self.buf, Kind::Routed, id);
        self.buf.extend_from_slice(&index.to_le_bytes());
        if let Err(e) = encode(item, &mut self.buf) {
            self.buf.truncate(start);
            return Err(EmitError::Encode(e));
        }
        frame::finish(&mut self.buf, start, self.max)
            .map_err(|e| EmitError::Encode(e.to_string()))?;
        self.outputs += 1;
        if self.buf.len() >= FLUSH_AT {
            self.flush().map_err(|_| EmitError::Closed)?;
        }
        Ok(())
    }

    fn done(&mut self, id: u64, latency_ns: u64) {
        if let (true, 1, Some(start)) = (self.combine, self.outputs, self.last_result.take()) {
            if frame::retag(
                &mut self.buf,
                start,
                Kind::ResultDone,
                &latency_ns.to_le_bytes(),
                self.max,
            ) {
                return;
            }
        }
        let d = Done {
            latency_ns,
            outputs: self.outputs,
        };
        protocol::encode_frame(&mut self.buf, Kind::Done, id, &d, self.max)
            .expect("a done frame always encodes");
    }

    pub(crate) fn error(&mut self, id: u64, kind: FailureKind, message: String) {
        let mut e = ChildError { kind, message };
        if protocol::encode_frame(&mut self.buf, Kind::Error, id, &e, self.max).is_err() {
            let mut cut = e.message.len().min(1024);
            while !e.message.is_char_boundary(cut) {
                cut -= 1;
            }
            e.message.truncate(cut);
            let _ = protocol::encode_frame(&mut self.buf, Kind::Error, id, &e, self.max);
        }
    }
}

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
    fn route(&mut self, target: &str, item: Box<dyn Any + Send>) -> Result<(), EmitError> {
        let index = self.routes.index(target)?;
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

/// A cow_fork child: the items came through copy-on-write memory; results go to `fd`. Each
/// item's frames leave before the next item starts; the stage instance is flushed
/// (`finish`) with the last item.
pub(crate) fn cow_child<I: 'static, O: 'static>(
    items: Vec<I>,
    ids: &[u64],
    stage: &StageCode<'_, I, O>,
    fd: OwnedFd,
) -> i32 {
    let StageCode {
        factory,
        after_fork,
        max,
        routes,
        wire,
    } = *stage;
    super::log::enter_child();
    let mut out = ChildOut::new(fd, max, None);
    match start(factory, after_fork) {
        Ok(mut stage) => {
            let last = items.len().saturating_sub(1);
            for (k, (item, &id)) in items.into_iter().zip(ids).enumerate() {
                run_item(
                    &mut *stage,
                    item,
                    id,
                    &mut out,
                    k == last,
                    routes,
                    wire.encode_out,
                    None,
                );
                if out.flush().is_err() {
                    return 74;
                }
            }
        }
        Err(m) => {
            for &id in ids {
                out.error(id, FailureKind::Start, m.clone());
            }
        }
    }
    match out.flush() {
        Ok(()) => 0,
        Err(_) => 74,
    }
}

/// An ipc_fork worker: reads item frames from `input` until `shutdown` (or end of file),
/// answers each on `output`, flushes its stage instance, exits 0.
/// An ipc worker writes the frames of its finished items right after an item that ran at
/// least this long ...
const SLOW_ITEM: Duration = Duration::from_micros(50);
/// ... and otherwise keeps them in its shared log at most this long (checked between items),
/// or until its input is empty or its log full: a stream of cheap items costs one write per
/// batch, not one per item.
const HOLD: Duration = Duration::from_micros(100);

/// An ipc worker: decodes items from `input`, runs them one at a time, and writes their frames
/// to `output`: each item's before the next starts, or, with `log` (`batch_results`), through
/// the shared log (see [`SharedLog`]) in batches: if it dies, the parent still gets the frames
/// of every item it finished, so only the item it was running fails and nothing runs twice.
/// With a log it also keeps the item it runs in the log's `running` word.
pub(crate) fn ipc_worker<I: 'static, O: 'static>(
    input: OwnedFd,
    output: OwnedFd,
    log: Option<&mut SharedLog>,
    stage: &StageCode<'_, I, O>,
) -> i32 {
    let StageCode {
        factory,
        after_fork,
        max,
        routes,
        wire,
    } = *stage;
    super::log::enter_child();
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
    // Since when committed frames wait in the log.
    let mut held_since: Option<Instant> = None;
    // When the last item ended, if nothing since took time (a wait for input, a write): the
    // hold is checked against it without another clock reading.
    let mut last_end: Option<Instant> = None;
    loop {
        if let (Some(held), Some(now)) = (held_since, last_end) {
            if now.duration_since(held) >= HOLD {
                held_since = None;
                last_end = None;
                if out.flush().is_err() {
                    return 74;
                }
            }
        }
        let next = dec.next(|kind, id, payload| match kind {
            Kind::Item => {
                // From here on a death is this item's (decoding included).
                out.running(id);
                Some((id, (wire.decode_in)(payload)))
            }
            Kind::Shutdown => None,
            other => Some((
                id,
                Err(format!("unexpected {other:?} frame from the parent")),
            )),
        });
        match next {
            Ok(Some(Some((id, Ok(item))))) => {
                // Its own clock reading: the time since the last item ended went to that
                // item's frames and this item's decoding, not to stage code.
                let t0 = Instant::now();
                let end = run_item(
                    &mut *stage,
                    item,
                    id,
                    &mut out,
                    false,
                    routes,
                    wire.encode_out,
                    Some(t0),
                );
                out.running(id | PROGRESS_DONE);
                // Every item's frames are safe (written, or in the shared log) before the
                // next item starts: if the next one kills the process, the parent gets them
                // and knows exactly which item was running.
                let r = match end.duration_since(t0) >= SLOW_ITEM {
                    true => out.flush().map(|()| true),
                    false => out.commit(),
                };
                let Ok(wrote) = r else { return 74 };
                // A write can block: the next item's clock starts after it.
                last_end = (!wrote).then_some(end);
                if !out.holds() {
                    held_since = None;
                } else if held_since.is_none() {
                    held_since = Some(end);
                }
            }
            Ok(Some(Some((id, Err(m))))) => {
                out.running(id | PROGRESS_DONE);
                out.error(
                    id,
                    FailureKind::Protocol,
                    format!("cannot decode the input item: {m}"),
                );
                // Safe before the next item, like any item's frames.
                match out.commit() {
                    Ok(true) => last_end = None,
                    Ok(false) => {}
                    Err(_) => return 74,
                }
                if out.holds() && held_since.is_none() {
                    held_since = last_end.or_else(|| Some(Instant::now()));
                }
            }
            Ok(Some(None)) => break,
            Ok(None) => {
                // About to block: send what we have first.
                held_since = None;
                last_end = None;
                if out.flush().is_err() {
                    return 74;
                }
                let n = loop {
                    match dec.read_from(&input, 64 << 10) {
                        Ok(n) => break n,
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(_) => break 0,
                    }
                };
                if n == 0 {
                    break; // The parent closed our input: same as shutdown.
                }
            }
            Err(e) => {
                out.error(
                    START_ID,
                    FailureKind::Protocol,
                    format!("corrupt input stream: {e}"),
                );
                let _ = out.flush();
                return 2;
            }
        }
    }
    out.start_item();
    let r = guarded(|| {
        stage.finish(&mut Output::new(&mut PipeSink {
            routes,
            out: &mut out,
            id: FINISH_ID,
            encode: wire.encode_out,
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
