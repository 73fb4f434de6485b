//! Awaiting a run from an application that already runs tokio: [`Runnable::run_async`] runs
//! the pipeline on a thread of its own (a run blocks: its stages are threads) and hands the
//! result back through a oneshot channel, so no worker thread of the caller's runtime waits.

use crate::error::RunError;
use crate::report::RunReport;
use crate::run::Runnable;
use crate::shared::RunShared;
use crate::Pipeline;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// A pipeline running on its own thread, as a future of its result (see
/// [`Runnable::run_async`]). Dropping it before the run ends cancels the run, as
/// [`RunHandle::cancel`](crate::RunHandle::cancel) does.
#[derive(Debug)]
#[must_use = "the run is cancelled when its future is dropped"]
pub struct RunFuture {
    result: oneshot::Receiver<Result<RunReport, RunError>>,
    shared: Arc<RunShared>,
    ended: bool,
}

impl Future for RunFuture {
    type Output = Result<RunReport, RunError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = std::task::ready!(Pin::new(&mut self.result).poll(cx));
        self.ended = true;
        Poll::Ready(r.unwrap_or_else(|_| Err(RunError::Thread("the run's thread panicked".into()))))
    }
}

impl Drop for RunFuture {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.interrupt(0);
        }
    }
}

impl Runnable {
    /// Runs the pipeline on a thread of its own and returns a future of its result, for
    /// callers on an async runtime (no runtime thread is blocked while it runs).
    ///
    /// ```
    /// use minigun::Pipeline;
    /// let rt = tokio::runtime::Runtime::new().unwrap();
    /// let report = rt.block_on(async {
    ///     let p = Pipeline::new("awaited");
    ///     p.producer("gen", |out| out.emit_all(0..5u64).map_err(Into::into));
    ///     p.consumer("sink", |_: u64| Ok(()));
    ///     p.handle_signals(false);
    ///     p.run_async().await
    /// });
    /// assert_eq!(report.unwrap().stage("sink").unwrap().items_in, 5);
    /// ```
    pub fn run_async(self) -> RunFuture {
        let shared = self.shared();
        let (tx, result) = oneshot::channel();
        let name = format!("minigun-run:{}", shared.pipeline);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _ = tx.send(self.run());
            })
            .expect("spawn run thread");
        RunFuture {
            result,
            shared,
            ended: false,
        }
    }
}

impl Pipeline {
    /// Builds the pipeline and runs it as [`Runnable::run_async`] does; a definition error
    /// is the future's result.
    pub fn run_async(self) -> RunFuture {
        match self.build() {
            Ok(r) => r.run_async(),
            Err(e) => {
                let (tx, result) = oneshot::channel();
                let _ = tx.send(Err(e.into()));
                RunFuture {
                    result,
                    shared: Arc::new(RunShared::new(true)),
                    ended: false,
                }
            }
        }
    }
}
