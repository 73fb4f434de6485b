//! `tracing` across the fork: records from stage code in a child reach the parent's subscriber
//! as `log` frames.
//!
//! The child must not take a lock that another parent thread may have held at the instant of
//! fork, and installing a subscriber takes `tracing`'s global registry lock. So the switch is
//! installed in the parent, on the thread that forks ([`install`], a scoped default that
//! forwards everything to the parent's own dispatcher), and the child only flips a thread-local
//! flag ([`enter_child`]): from then on the same subscriber keeps records in a thread-local
//! queue (the child has one thread), which the child's pipe writer drains into frames.

use crate::ipc::message::LogRecord;
use std::cell::RefCell;
use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Level, Metadata, Subscriber};

thread_local! {
    static QUEUE: RefCell<Vec<LogRecord>> = const { RefCell::new(Vec::new()) };
    /// Whether [`QUEUE`] may hold records: a child that logged nothing never touches the
    /// queue (its first use registers a thread-local destructor: an allocation and several
    /// pages written in a child that would otherwise not write them).
    static QUEUED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Takes the records logged so far in this (child) thread.
pub(crate) fn take() -> Vec<LogRecord> {
    if !QUEUED.with(|q| q.replace(false)) {
        return Vec::new();
    }
    QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()))
}

thread_local! {
    static CHILD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// In a forked child: record events into the queue from now on. Takes no lock.
pub(crate) fn enter_child() {
    CHILD.with(|c| c.set(true));
}

fn in_child() -> bool {
    CHILD.with(|c| c.get())
}

/// Installs the switch on this (forking) thread, forwarding to the current dispatcher.
pub(crate) fn install() -> Installed {
    // The panic hook's one-time set-up must not first run in a child either.
    crate::stage::install_panic_hook();
    let _fork = crate::sys::fork_lock();
    let parent = tracing::dispatcher::get_default(|d| d.clone());
    let max = LevelFilter::current();
    Installed(Some(tracing::subscriber::set_default(Switch {
        parent,
        max,
    })))
}

/// Keeps the switch installed on this thread; removing it also happens under the fork lock.
pub(crate) struct Installed(Option<tracing::subscriber::DefaultGuard>);

impl Drop for Installed {
    fn drop(&mut self) {
        let _fork = crate::sys::fork_lock();
        drop(self.0.take());
    }
}

/// Forwards to the parent's dispatcher; in a child, queues records instead.
struct Switch {
    parent: Dispatch,
    /// The most verbose level any subscriber wanted when the switch was installed.
    max: LevelFilter,
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(
                self.0,
                "{}{value:?}",
                if self.0.is_empty() { "" } else { " " }
            );
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(
                self.0,
                "{}{value}",
                if self.0.is_empty() { "" } else { " " }
            );
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

fn level_u8(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        _ => 4,
    }
}

impl Subscriber for Switch {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.parent.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        if in_child() {
            metadata.level() <= &self.max
        } else {
            self.parent.enabled(metadata)
        }
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        if in_child() {
            Id::from_u64(1)
        } else {
            self.parent.new_span(span)
        }
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        if !in_child() {
            self.parent.record(span, values)
        }
    }
    fn record_follows_from(&self, span: &Id, follows: &Id) {
        if !in_child() {
            self.parent.record_follows_from(span, follows)
        }
    }
    fn event(&self, event: &Event<'_>) {
        if !in_child() {
            return self.parent.event(event);
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        let rec = LogRecord {
            level: level_u8(event.metadata().level()),
            target: event.metadata().target().to_string(),
            message: text.0,
        };
        QUEUED.with(|q| q.set(true));
        QUEUE.with(|q| q.borrow_mut().push(rec));
    }
    fn enter(&self, span: &Id) {
        if !in_child() {
            self.parent.enter(span)
        }
    }
    fn exit(&self, span: &Id) {
        if !in_child() {
            self.parent.exit(span)
        }
    }
    fn clone_span(&self, id: &Id) -> Id {
        if in_child() {
            id.clone()
        } else {
            self.parent.clone_span(id)
        }
    }
    fn try_close(&self, id: Id) -> bool {
        !in_child() && self.parent.try_close(id)
    }
}

/// Parent side: re-emits a child's record into the parent's subscriber.
pub(crate) fn emit(stage: &str, pid: i32, r: &LogRecord) {
    let (t, m) = (r.target.as_str(), r.message.as_str());
    match r.level {
        0 => tracing::error!(target: "minigun::child", stage, pid, child_target = t, "{m}"),
        1 => tracing::warn!(target: "minigun::child", stage, pid, child_target = t, "{m}"),
        2 => tracing::info!(target: "minigun::child", stage, pid, child_target = t, "{m}"),
        3 => tracing::debug!(target: "minigun::child", stage, pid, child_target = t, "{m}"),
        _ => tracing::trace!(target: "minigun::child", stage, pid, child_target = t, "{m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
    use std::sync::MutexGuard;
    use std::time::Duration;

    /// Asserts that `done` says nothing while this thread holds the fork lock, then that it
    /// does once the lock is released: what the other thread does waits for the lock.
    fn waits_for_the_fork_lock(held: MutexGuard<'static, ()>, done: &Receiver<()>, what: &str) {
        // Nothing can arrive while the lock is held, however slow the other thread is.
        assert_eq!(
            done.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout),
            "{what} did not wait for the fork lock"
        );
        drop(held);
        done.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{what} did not end once the fork lock was free: {e}"));
    }

    /// No child may be forked while a thread installs or removes its switch (both take
    /// tracing's global registry lock): both wait while another thread holds the fork lock,
    /// as a forking thread does.
    #[test]
    fn installing_and_removing_the_switch_wait_for_the_fork_lock() {
        let (installed_tx, installed) = channel();
        let (remove_tx, remove) = channel::<()>();
        let (removed_tx, removed) = channel();
        let held = crate::sys::fork_lock();
        let other = std::thread::spawn(move || {
            let switch = install();
            let _ = installed_tx.send(());
            let _ = remove.recv();
            drop(switch);
            let _ = removed_tx.send(());
        });
        waits_for_the_fork_lock(held, &installed, "install");
        let held = crate::sys::fork_lock();
        remove_tx.send(()).unwrap();
        waits_for_the_fork_lock(held, &removed, "removing the switch");
        other.join().unwrap();
    }
}
