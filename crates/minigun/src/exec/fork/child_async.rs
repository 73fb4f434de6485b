//! An ipc worker of an async stage (`ipc_fork(k).tasks_per_worker(n)`): what runs inside the
//! forked worker. Like every child body it never returns into the parent's code: it returns an
//! exit code to `sys::fork_child`, which `_exit`s with it.
//!
//! In order: the `after_fork` hooks; a current-thread tokio runtime, built here, after the
//! fork (a runtime is threads, fds and locks: one inherited from the parent would be a copy
//! with none of its threads); the stage instance, made inside the runtime (so its factory can
//! make clients bound to it); then, on the runtime, one loop:
//!
//! - it takes items off its input while fewer than `n` run: each is counted in the `started`
//!   word the parent shares (before it is decoded: a death from then on is that item's), then
//!   decoded and spawned as a task, under the per-item `timeout` (the future is dropped when
//!   it passes) with a panic caught as the item's failure. Items it has not taken yet stay in
//!   the pipe: if the worker dies, the parent sends those elsewhere;
//! - each item that ends is answered at once, with all its frames together (`result` or
//!   `routed` frames, then `done`, or an `error`), named by its id: answers come in the order
//!   items end, not the order they came. What ended during one wake-up leaves in one write,
//!   before the loop waits again;
//! - `shutdown` (or the end of its input) stops the intake; once every item has been
//!   answered, the stage's `finish` runs (its outputs named [`FINISH_ID`]) and the worker
//!   exits 0.
//!
//! One thread does all of it, so `tracing` records of stage code reach the parent through the
//! child's switch (`trace`), as in a sync worker.

use crate::async_stage::{AsyncFactory, AsyncOutput, ErasedAsync, RoutedItems};
use crate::error::{EmitError, FailureKind};
use crate::exec::tasks::{attempt, CatchPanic};
use crate::hooks::{self, ForkHook};
use crate::ipc::codec::WireFns;
use crate::ipc::frame::Decoder;
use crate::ipc::message::ToWorker;
use crate::ipc::writer::ChildOut;
use crate::ipc::{FINISH_ID, START_ID};
use crate::route::Routes;
use crate::stage::{catch_panic, caught_error, Caught, Item};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::task::JoinSet;

/// What an async worker needs of its stage (all of it in the parent's memory, seen through
/// copy-on-write), and the word it counts its started items in.
pub(crate) struct AsyncCode<'a, I, O> {
    pub(crate) factory: &'a AsyncFactory<I, O>,
    pub(crate) after_fork: &'a [ForkHook],
    pub(crate) max: usize,
    pub(crate) routes: &'a Routes,
    pub(crate) wire: WireFns<I, O>,
    /// Items running at once, at most.
    pub(crate) tasks: usize,
    /// Per-item time limit.
    pub(crate) timeout: Option<Duration>,
    /// Items taken off the input so far, in memory shared with the parent.
    pub(crate) started: &'a AtomicU64,
}

/// An item that ended in the worker.
struct Ended<O> {
    id: u64,
    latency_ns: u64,
    result: Result<(), Caught>,
    outs: Vec<O>,
    routed: RoutedItems,
}

/// What the worker's loop woke for.
enum Woke<O> {
    Ended(Result<Ended<O>, tokio::task::JoinError>),
    Readable(std::io::Result<()>),
}

/// Reads once from the input into the decoder.
fn read(dec: &mut Decoder, input: &pipe::Receiver) -> std::io::Result<usize> {
    dec.read_from(input, 64 << 10).map_err(std::io::Error::from)
}

/// Exit code of a worker whose result pipe broke.
const BROKEN_PIPE: i32 = 74;

/// The worker's body (see the module docs). Returns its exit code.
pub(crate) fn worker<I: Item, O: Item>(
    input: OwnedFd,
    output: OwnedFd,
    code: &AsyncCode<'_, I, O>,
) -> i32 {
    super::trace::enter_child();
    let mut out = ChildOut::new(output, code.max, None).combined();
    let (rt, stage, input) = match start(code, input) {
        Ok(s) => s,
        Err(m) => {
            out.error(START_ID, FailureKind::Start, m);
            let _ = out.flush();
            return 1;
        }
    };
    let exit = rt.block_on(serve(input, &mut out, stage, code));
    // Tasks the stage spawned itself and left running are dropped without being waited for.
    rt.shutdown_background();
    exit
}

type Started<I, O> = (
    tokio::runtime::Runtime,
    Arc<dyn ErasedAsync<I, O>>,
    pipe::Receiver,
);

/// The hooks, the runtime, the stage instance and the input registered with the runtime.
fn start<I, O>(code: &AsyncCode<'_, I, O>, input: OwnedFd) -> Result<Started<I, O>, String> {
    hooks::run_fork(code.after_fork, "after_fork")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the worker's tokio runtime: {e}"))?;
    let stage = {
        let _in = rt.enter();
        catch_panic(|| (code.factory)())
            .map_err(|c| format!("stage factory failed: {}", c.message))?
    };
    let input = {
        let _in = rt.enter();
        // Registered with the runtime; made non-blocking.
        pipe::Receiver::from_owned_fd(input)
            .map_err(|e| format!("cannot watch the worker's input: {e}"))?
    };
    Ok((rt, stage, input))
}

/// The worker's loop (see the module docs). Returns its exit code.
async fn serve<I: Item, O: Item>(
    input: pipe::Receiver,
    out: &mut ChildOut<'_>,
    stage: Arc<dyn ErasedAsync<I, O>>,
    code: &AsyncCode<'_, I, O>,
) -> i32 {
    let mut dec = Decoder::new(code.max);
    let mut running: JoinSet<Ended<O>> = JoinSet::new();
    let (mut eof, mut shutdown) = (false, false);
    loop {
        while !shutdown && running.len() < code.tasks {
            let next = dec.next(|kind, id, payload| match ToWorker::decode(kind, payload) {
                Ok(ToWorker::Item(payload)) => {
                    // Read by the parent once this process is gone (after it was reaped).
                    code.started.fetch_add(1, Ordering::Relaxed);
                    Some(Ok((id, (code.wire.decode_in)(payload))))
                }
                Ok(ToWorker::Shutdown) => None,
                // The parent sends an async worker its items one by one.
                Ok(ToWorker::Items(_)) => Some(Err("unexpected Items frame".to_string())),
                Err(e) => Some(Err(e.to_string())),
            });
            match next {
                Ok(None) => break,
                Ok(Some(None)) => shutdown = true,
                Ok(Some(Some(Ok((id, Ok(item)))))) => {
                    let task = run_item(stage.clone(), item, id, code.routes.clone(), code.timeout);
                    running.spawn(task);
                }
                Ok(Some(Some(Ok((id, Err(m)))))) => {
                    out.start_item();
                    let m = format!("cannot decode the input item: {m}");
                    out.error(id, FailureKind::Protocol, m);
                }
                Ok(Some(Some(Err(m)))) => return corrupt_input(out, m),
                Err(e) => return corrupt_input(out, e.to_string()),
            }
        }
        let more_input = !shutdown && !eof;
        if running.is_empty() && !more_input {
            break;
        }
        // About to wait: what ended goes to the parent first.
        if out.holds() && out.flush().is_err() {
            return BROKEN_PIPE;
        }
        let room = more_input && running.len() < code.tasks;
        let woke = std::future::poll_fn(|cx| {
            if let Poll::Ready(Some(ended)) = running.poll_join_next(cx) {
                return Poll::Ready(Woke::Ended(ended));
            }
            match room {
                true => input.poll_read_ready(cx).map(Woke::Readable),
                false => Poll::Pending,
            }
        })
        .await;
        match woke {
            Woke::Ended(ended) => {
                // Every task catches its future's panic: a task that fails anyway cannot
                // be answered, and the parent fails the items still running.
                let Ok(ended) = ended else { return 70 };
                if answer(out, ended, code).is_err() {
                    return BROKEN_PIPE;
                }
                while let Some(ended) = running.try_join_next() {
                    let Ok(ended) = ended else { return 70 };
                    if answer(out, ended, code).is_err() {
                        return BROKEN_PIPE;
                    }
                }
            }
            Woke::Readable(Err(_)) => eof = true,
            // Would block: the runtime clears the readiness, and the loop waits again.
            Woke::Readable(Ok(())) => match input.try_io(|| read(&mut dec, &input)) {
                // The parent closed the input: the same as `shutdown`.
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => eof = true,
            },
        }
    }
    finish_worker(out, &*stage, code).await
}

/// One item's task: its attempt, timed, and what it emitted (nothing if it failed).
async fn run_item<I, O>(
    stage: Arc<dyn ErasedAsync<I, O>>,
    item: I,
    id: u64,
    routes: Routes,
    timeout: Option<Duration>,
) -> Ended<O> {
    let out = AsyncOutput::new(routes);
    let t0 = quanta::Instant::now();
    let result = attempt(&*stage, item, out.clone(), timeout).await;
    let latency_ns = t0.elapsed().as_nanos() as u64;
    let (outs, routed) = out.close();
    Ended {
        id,
        latency_ns,
        result,
        outs,
        routed,
    }
}

/// An item's frames, all together: its outputs, then `done`; or `error` (an output that
/// cannot be encoded fails the item: the parent drops the frames of an item that failed).
/// `Err`: the pipe is gone.
fn answer<I, O>(
    out: &mut ChildOut<'_>,
    e: Ended<O>,
    code: &AsyncCode<'_, I, O>,
) -> std::io::Result<()> {
    out.start_item();
    let emitted = e.result.map_err(Some).and_then(|()| {
        for o in &e.outs {
            out.result(e.id, o, code.wire.encode_out)
                .map_err(emit_failed)?;
        }
        for (index, item) in &e.routed {
            let entry = &code.routes.entries[*index];
            let Some(codec) = entry.codec else {
                let m = format!("route to {:?} is not serialisable", entry.name);
                return Err(emit_failed(EmitError::Route(m)));
            };
            out.routed(e.id, *index as u32, &**item, codec.encode)
                .map_err(emit_failed)?;
        }
        Ok(())
    });
    match emitted {
        Ok(()) => out.done(e.id, e.latency_ns),
        Err(Some(c)) => out.error(e.id, c.kind, c.message),
        Err(None) => return Err(std::io::ErrorKind::BrokenPipe.into()),
    }
    Ok(())
}

/// Why an output could not be written: the item's failure, or `None` when the result pipe is
/// closed (the worker then ends).
fn emit_failed(e: EmitError) -> Option<Caught> {
    match e {
        EmitError::Closed => None,
        e => Some(caught_error(Box::new(e))),
    }
}

/// The input cannot be read as frames: the worker reports it (as a start-up failure, as a
/// sync worker does) and exits.
fn corrupt_input(out: &mut ChildOut<'_>, m: String) -> i32 {
    let m = format!("corrupt input stream: {m}");
    out.error(START_ID, FailureKind::Protocol, m);
    let _ = out.flush();
    2
}

/// Every item has been answered: the stage's `finish` (its outputs named [`FINISH_ID`]),
/// then everything is written. Returns the exit code.
async fn finish_worker<I, O>(
    out: &mut ChildOut<'_>,
    stage: &dyn ErasedAsync<I, O>,
    code: &AsyncCode<'_, I, O>,
) -> i32 {
    let emit = AsyncOutput::new(code.routes.clone());
    let result = match catch_panic(|| stage.finish(emit.clone())) {
        Ok(fut) => CatchPanic(fut).await,
        Err(c) => Err(c),
    };
    let (outs, routed) = emit.close();
    let ended = Ended {
        id: FINISH_ID,
        latency_ns: 0,
        result,
        outs,
        routed,
    };
    match answer(out, ended, code).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(_) => BROKEN_PIPE,
    }
}
