//! Huge pages for the parent's heap before a fork stage forks: the setting ([`HugePages`]),
//! what a run reports about it ([`HugePagesReport`]), and the once-per-run decision.
//!
//! A fork copies the parent's page tables: one entry per 4 KiB page of resident memory
//! (about 20 us per MiB here), one per 2 MiB huge page. A parent whose large data lives in
//! millions of small allocations (maps, strings, structs) therefore forks slowly, and
//! `HugeBuf` only helps data that is one buffer. Before the first fork of the run (a
//! `cow_fork` stage's first child, an `ipc_fork` stage's workers), the library collapses the
//! parent's populated anonymous memory into transparent huge pages in place
//! (`madvise(MADV_HUGEPAGE)`, then `madvise(MADV_COLLAPSE)`, Linux 6.1+), once per run;
//! memory the program marked `MADV_NOHUGEPAGE` is left as it is.
//!
//! What it costs and changes (measured on a 2-vCPU VM whose CPU others were also using):
//!
//! - **Time, once**: the kernel copies each collapsed 2 MiB into a fresh huge page: 0.77 s
//!   for a 270 MiB heap of 3 M strings, 7.7 to 19 s for 1 GiB of 10 M (the benchmark's
//!   W4b), about as long as 30 to 80 forks of the uncollapsed parent; the report gives it per
//!   run as [`HugePagesReport::secs`]. Memory already in huge pages costs almost nothing
//!   (0.02 s for that 1 GiB in a later run), so a new run redoes it cheaply.
//! - **Memory**: only 2 MiB chunks with at least half of their pages resident are collapsed;
//!   their missing pages become resident ([`HugePagesReport::filled_bytes`]), so resident
//!   memory grows by at most what those chunks held.
//! - **Later writes by the parent**: while a child shares a huge page, a parent's write to
//!   it splits it back into 4 KiB pages (copying 4 KiB, about 13 us), so regions the parent
//!   keeps writing fork at 4 KiB cost again. Measured on 512 MiB: a fork took 110 ms in 4 KiB
//!   pages, 1.8 ms once collapsed (2.0 s), and 9.6 ms after one write into each 2 MiB of half
//!   of it while a child lived (huge pages 508 -> 252 MiB). Data the parent only reads stays
//!   huge. The collapse is done once per run (later forks, ipc_fork replacements included,
//!   do not redo it).

use crate::shared::RunShared;
use serde::Serialize;
use std::sync::Mutex;

/// Whether a fork stage puts the parent's heap into transparent huge pages before it forks
/// (see [`Exec::huge_pages`](crate::Exec::huge_pages) and
/// [`Pipeline::huge_pages`](crate::Pipeline::huge_pages)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum HugePages {
    /// Never.
    Off,
    /// When the parent's anonymous resident memory is at least this many bytes.
    Above(u64),
}

impl HugePages {
    /// Always (whatever the parent's size).
    pub const ON: HugePages = HugePages::Above(0);
    /// The default threshold of `cow_fork` stages: 256 MiB of anonymous resident memory.
    /// Below it a fork costs at most about 5 ms more than an empty parent's and the
    /// collapse would not pay back within a few hundred forks.
    pub const COW_DEFAULT: HugePages = HugePages::Above(256 << 20);
    /// The default of `ipc_fork` stages: off (their workers are forked once, so the fork's
    /// cost is paid a few times per run, less than the collapse costs).
    pub const IPC_DEFAULT: HugePages = HugePages::Off;
}

/// What a run did about huge pages before a fork stage first forked (one per fork stage, in
/// the order they forked).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HugePagesReport {
    /// The stage before whose first fork this was decided.
    pub stage: String,
    /// What happened.
    pub status: HugePagesStatus,
    /// Why it did not collapse, or which ranges failed, in words.
    pub reason: Option<String>,
    /// The parent's anonymous resident memory before, in bytes.
    pub anon_bytes: u64,
    /// The parent's anonymous memory in huge pages before and after, in bytes.
    pub huge_before: u64,
    /// See [`HugePagesReport::huge_before`].
    pub huge_after: u64,
    /// Bytes of the 2 MiB chunks asked to collapse (dense enough: at least half resident).
    pub asked_bytes: u64,
    /// Of these, bytes that were not resident before: the memory the collapse added at most.
    pub filled_bytes: u64,
    /// Wall time of the collapse, in seconds (paid once, before the first fork).
    pub secs: f64,
}

impl HugePagesReport {
    fn nothing(stage: &str) -> Self {
        HugePagesReport {
            stage: stage.to_string(),
            status: HugePagesStatus::Off,
            reason: None,
            anon_bytes: 0,
            huge_before: 0,
            huge_after: 0,
            asked_bytes: 0,
            filled_bytes: 0,
            secs: 0.0,
        }
    }
}

/// The outcome in a [`HugePagesReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum HugePagesStatus {
    /// The parent's dense anonymous memory was collapsed (some ranges may have failed:
    /// see `reason`).
    Collapsed,
    /// An earlier stage of this run collapsed it already.
    Earlier,
    /// Switched off for this stage ([`HugePages::Off`]).
    Off,
    /// The parent was smaller than the threshold.
    BelowThreshold,
    /// Not possible here: THP is `never` or missing, switched off for the process
    /// (`PR_SET_THP_DISABLE`), the kernel has no `MADV_COLLAPSE`, or the system refused (see
    /// `reason`).
    Unavailable,
}

/// The run's huge-page decisions: its pipeline-wide setting and what each stage did.
#[derive(Debug, Default)]
pub(crate) struct RunHuge {
    /// The pipeline's setting (`None`: each stage's default).
    pub(crate) setting: Option<HugePages>,
    reports: Mutex<Vec<HugePagesReport>>,
}

impl RunHuge {
    pub(crate) fn new(setting: Option<HugePages>) -> Self {
        RunHuge {
            setting,
            reports: Mutex::default(),
        }
    }

    /// What the run did, per fork stage.
    pub(crate) fn reports(&self) -> Vec<HugePagesReport> {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Called by a fork stage before its first fork: decides (stage setting, else the
/// pipeline's, else `default`), collapses if this run has not yet, logs and records it.
pub(crate) fn before_fork(
    run: &RunShared,
    stage: &str,
    setting: Option<HugePages>,
    default: HugePages,
) {
    // Held across the collapse: a second fork stage waits for it, then forks faster too.
    let mut reports = run.huge.reports.lock().unwrap_or_else(|e| e.into_inner());
    let setting = setting.or(run.huge.setting).unwrap_or(default);
    let mut r = HugePagesReport::nothing(stage);
    match setting {
        HugePages::Off => {}
        _ if reports
            .iter()
            .any(|r| r.status == HugePagesStatus::Collapsed) =>
        {
            r.status = HugePagesStatus::Earlier
        }
        HugePages::Above(min) => collapse(&mut r, min),
    }
    reports.push(r);
}

#[cfg(target_os = "linux")]
fn collapse(r: &mut HugePagesReport, min: u64) {
    use crate::sys::collapse::{self as sys, Refused};
    r.anon_bytes = sys::rollup("Anonymous");
    if r.anon_bytes < min {
        r.status = HugePagesStatus::BelowThreshold;
        return;
    }
    match sys::collapse() {
        Ok(c) => {
            r.status = HugePagesStatus::Collapsed;
            (r.anon_bytes, r.huge_before, r.huge_after) =
                (c.anon_before, c.huge_before, c.huge_after);
            (r.asked_bytes, r.filled_bytes) = (c.asked, c.filled);
            r.secs = c.took.as_secs_f64();
            if c.failed_ranges > 0 {
                r.reason = Some(format!(
                    "{} ranges stayed in 4 KiB pages (no free huge page, or pages in use)",
                    c.failed_ranges
                ));
            }
            tracing::info!(
                stage = %r.stage,
                "huge pages: collapsed {:.0} MiB of the parent's heap in {:.2}s before forking \
                 ({:.0} -> {:.0} MiB in huge pages, {:.0} MiB filled)",
                mib(r.asked_bytes),
                r.secs,
                mib(r.huge_before),
                mib(r.huge_after),
                mib(r.filled_bytes)
            );
        }
        Err(why) => {
            let reason = match why {
                Refused::ThpOff(m) => format!("transparent huge pages unavailable: {m}"),
                Refused::NoCollapse => {
                    "this kernel has no MADV_COLLAPSE (Linux 6.1 or newer needed)".to_string()
                }
                Refused::Denied(m) => format!("refused by the system: {m}"),
            };
            tracing::warn!(
                stage = %r.stage,
                "huge pages: cannot put the parent's heap into huge pages, so each fork copies \
                 its page tables at 4 KiB granularity: {reason}"
            );
            r.status = HugePagesStatus::Unavailable;
            r.reason = Some(reason);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn collapse(r: &mut HugePagesReport, _min: u64) {
    r.status = HugePagesStatus::Unavailable;
    r.reason = Some("transparent huge pages are a Linux feature".into());
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Collapses this process's dense anonymous memory into huge pages now, as a fork stage does
/// before its first fork (for a program that forks by other means, or wants the cost paid at
/// a moment it chooses). Returns what it did; `status` is `Collapsed` or `Unavailable`.
pub fn collapse_heap() -> HugePagesReport {
    let mut r = HugePagesReport::nothing("");
    collapse(&mut r, 0);
    r
}
