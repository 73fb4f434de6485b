//! `init_logging`: tracing output to stderr, filtered by `MINIGUN_LOG`, held back while the
//! dashboard owns the terminal (a log line would tear the picture) and printed after it.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;

/// Whether the dashboard owns the terminal (raw mode, alternate screen): log lines are held
/// back meanwhile. Set and cleared by the dashboard.
pub(crate) static TERMINAL_OWNED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The environment variable read by [`init_logging`].
pub const LOG_ENV: &str = "MINIGUN_LOG";

/// Log lines held while the dashboard is shown; the oldest go first past this many.
const HOLD: usize = 10_000;

/// Held log records, and how many were dropped because too many were held.
static HELD: Mutex<(VecDeque<Vec<u8>>, u64)> = Mutex::new((VecDeque::new(), 0));

/// Installs a global `tracing` subscriber that writes to stderr, filtered by the environment
/// variable `MINIGUN_LOG`, and returns whether it was installed (`false`: a global
/// subscriber was already set, and that one stays).
///
/// `MINIGUN_LOG` takes [`EnvFilter`] directives: a level (`error`, `warn`, `info`, `debug`,
/// `trace`), or levels per target, e.g. `MINIGUN_LOG=debug` or
/// `MINIGUN_LOG=warn,minigun=debug`. Unset, only warnings and errors are printed; invalid
/// directives are reported and skipped.
///
/// While the dashboard is on screen, log lines are held back and printed once it closes
/// (at most the last 10 000; the number dropped is said).
///
/// ```no_run
/// minigun_hud::init_logging();
/// tracing::info!("shown with MINIGUN_LOG=info");
/// ```
pub fn init_logging() -> bool {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .with_env_var(LOG_ENV)
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(HeldStderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init()
        .is_ok()
}

/// Writes each log record to stderr, or holds it while the dashboard is shown.
#[derive(Debug, Clone, Copy)]
struct HeldStderr;

impl<'a> MakeWriter<'a> for HeldStderr {
    type Writer = Record;
    fn make_writer(&'a self) -> Record {
        Record(Vec::new())
    }
}

/// One formatted record, written out (or held) when dropped.
#[derive(Debug)]
struct Record(Vec<u8>);

impl Write for Record {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        // The flag is read under the lock: the dashboard clears it before it takes the lock
        // to print what is held, so a line is either held and printed then, or printed here.
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if TERMINAL_OWNED.load(std::sync::atomic::Ordering::SeqCst) {
            hold(&mut held, std::mem::take(&mut self.0));
            return;
        }
        drop(held);
        let _ = io::stderr().lock().write_all(&self.0);
    }
}

fn hold(held: &mut (VecDeque<Vec<u8>>, u64), record: Vec<u8>) {
    if held.0.len() >= HOLD {
        held.0.pop_front();
        held.1 += 1;
    }
    held.0.push_back(record);
}

/// Prints the held log lines (called when the dashboard gives the terminal back; never
/// blocks, as it may run in a panic hook).
pub(crate) fn flush_held() {
    // Not a blocking lock: this also runs from the panic hook, maybe on a thread that holds
    // it. A thread holding a line holds the lock only while it stores it: wait for that.
    let mut tries = 0;
    let mut held = loop {
        match HELD.try_lock() {
            Ok(held) => break held,
            Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if tries < 1000 => {
                tries += 1;
                std::thread::yield_now();
            }
            Err(std::sync::TryLockError::WouldBlock) => return,
        }
    };
    let lines = std::mem::take(&mut held.0);
    let dropped = std::mem::take(&mut held.1);
    drop(held);
    let mut err = io::stderr().lock();
    if dropped > 0 {
        let _ = writeln!(err, "({dropped} earlier log lines were dropped)");
    }
    for line in lines {
        let _ = err.write_all(&line);
    }
}
