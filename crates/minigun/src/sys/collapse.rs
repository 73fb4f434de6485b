//! Putting the process's populated anonymous memory into transparent huge pages, in place:
//! `madvise(MADV_HUGEPAGE)` then `madvise(MADV_COLLAPSE)` (Linux 6.1+) over the 2 MiB
//! aligned parts of its anonymous private writable mappings (`[heap]`, malloc arenas and other
//! anonymous regions of `/proc/self/smaps`; not the main stack, and not a mapping the program
//! marked `MADV_NOHUGEPAGE`: advising it would undo the program's choice for good).
//!
//! Forking copies the parent's page tables: one entry per 4 KiB page, but one per 2 MiB huge
//! page. A parent holding large data in millions of small allocations forks many times faster
//! once that memory is collapsed.
//!
//! Only 2 MiB chunks at least [`MIN_PRESENT`] of whose 4 KiB pages are resident (read from
//! `/proc/self/pagemap`, whose "present" bit needs no privilege) are collapsed: collapsing
//! fills the chunk's missing pages, so this bounds the memory added to the resident memory
//! of the chunks collapsed. Sparse regions (thread stacks, fresh arenas) stay as they are.
//!
//! This is the mechanism; when to do it, and what the run reports, is `crate::huge`.

#![allow(unsafe_code)]

use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A transparent huge page on x86-64 and arm64 with 4 KiB base pages.
pub(crate) const HUGE: usize = 2 << 20;
const PAGE: usize = 4096;
const PER_HUGE: usize = HUGE / PAGE;
/// A chunk is collapsed when at least this many of its 512 base pages are resident.
pub(crate) const MIN_PRESENT: usize = PER_HUGE / 2;

/// Why memory cannot be put into huge pages here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `/sys/kernel/mm/transparent_hugepage/enabled` is missing (no THP in this kernel) or
    /// says `never`, or this process switched THP off (`PR_SET_THP_DISABLE`); carries why.
    ThpOff(String),
    /// `MADV_COLLAPSE` is unknown to this kernel (EINVAL; it came in Linux 6.1).
    NoCollapse,
    /// The kernel or a sandbox refused (EPERM, or another errno), with the error.
    Denied(String),
}

/// What one collapse did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Collapsed {
    /// Anonymous resident memory before, in bytes (`/proc/self/smaps_rollup`).
    pub(crate) anon_before: u64,
    /// Anonymous memory in huge pages before and after, in bytes.
    pub(crate) huge_before: u64,
    pub(crate) huge_after: u64,
    /// Bytes of the 2 MiB chunks asked to collapse.
    pub(crate) asked: u64,
    /// Of these, bytes that were not resident (the memory a collapse adds at most).
    pub(crate) filled: u64,
    /// Ranges the kernel could not collapse for now (EAGAIN / ENOMEM / EBUSY: no free huge
    /// page, or pages in use); they stay in 4 KiB pages.
    pub(crate) failed_ranges: u64,
    /// Wall time of the whole pass.
    pub(crate) took: Duration,
}

/// The THP mode from sysfs, e.g. `madvise`, or why there is none.
pub(crate) fn thp_mode() -> Result<String, Refused> {
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let text = std::fs::read_to_string(path)
        .map_err(|e| Refused::ThpOff(format!("cannot read {path}: {e}")))?;
    let mode = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("unknown")
        .to_string();
    if mode == "never" {
        return Err(Refused::ThpOff("THP mode is never".into()));
    }
    Ok(mode)
}

/// A field of `/proc/self/smaps_rollup` (e.g. `AnonHugePages`), in bytes.
pub(crate) fn rollup(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The anonymous private writable mappings of this process, as `(start, end)`, except those
/// marked `MADV_NOHUGEPAGE`.
fn anon_regions() -> io::Result<Vec<(usize, usize)>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(regions_of(&smaps))
}

/// [`anon_regions`] in the text of `/proc/self/smaps`: each mapping's line (as in
/// `/proc/self/maps`), then its fields, `VmFlags` last (`nh`: `MADV_NOHUGEPAGE`).
fn regions_of(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "nh") {
                current = None;
            }
        } else if is_mapping(line) {
            // A kernel without `VmFlags` lines: the mapping is taken.
            out.extend(current.take());
            current = anon_region(line);
        }
    }
    out.extend(current);
    out
}

/// Whether a line of `/proc/self/smaps` starts a mapping (`start-end perms ...`), not a field.
fn is_mapping(line: &str) -> bool {
    let first = line.split_whitespace().next().unwrap_or("");
    first.split_once('-').is_some_and(|(a, b)| {
        usize::from_str_radix(a, 16).is_ok() && usize::from_str_radix(b, 16).is_ok()
    })
}

/// One line of `/proc/self/maps`, if it is an anonymous private writable mapping.
fn anon_region(line: &str) -> Option<(usize, usize)> {
    let mut f = line.split_whitespace();
    let (range, perms, _off, _dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let name = f.next().unwrap_or("");
    let anonymous =
        inode == "0" && (name.is_empty() || name == "[heap]" || name.starts_with("[anon:"));
    if !perms.starts_with("rw") || !perms.ends_with('p') || !anonymous {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

/// The 2 MiB aligned chunks of `regions` dense enough to collapse, merged into ranges, with
/// the count of their pages that are not resident.
fn dense_ranges(regions: &[(usize, usize)]) -> io::Result<(Vec<(usize, usize)>, u64)> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; PER_HUGE * 8];
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut missing = 0u64;
    for &(start, end) in regions {
        let mut at = start.next_multiple_of(HUGE);
        while at + HUGE <= end {
            let present = match pagemap.read_exact_at(&mut entries, (at / PAGE * 8) as u64) {
                Ok(()) => entries.chunks_exact(8).filter(|e| e[7] & 0x80 != 0).count(),
                // The mapping went away meanwhile (another thread unmapped it).
                Err(_) => 0,
            };
            if present >= MIN_PRESENT {
                missing += (PER_HUGE - present) as u64;
                match ranges.last_mut() {
                    Some(last) if last.1 == at => last.1 = at + HUGE,
                    _ => ranges.push((at, at + HUGE)),
                }
            }
            at += HUGE;
        }
    }
    Ok((ranges, missing))
}

fn madvise(start: usize, len: usize, advice: libc::c_int) -> Result<(), i32> {
    // SAFETY: madvise with MADV_HUGEPAGE or MADV_COLLAPSE changes how existing anonymous
    // memory is backed, never its contents or its mapping: every address stays valid with the
    // same bytes, so no reference into this memory (held by any thread) is affected. A range
    // that was unmapped meanwhile makes the call fail (ENOMEM), which the caller handles.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Whether the kernel knows `MADV_COLLAPSE`: advice on an empty range at a page-aligned
/// `at` succeeds if the advice is known (EINVAL otherwise), and touches nothing.
fn knows_collapse(at: usize) -> bool {
    madvise(at, 0, libc::MADV_COLLAPSE).is_ok()
}

/// Whether this process has THP switched off (`PR_SET_THP_DISABLE`; inherited across fork).
fn thp_disabled() -> bool {
    // SAFETY: PR_GET_THP_DISABLE only reads this process's flag; it takes no pointer.
    let r = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    r > 0
}

/// Collapses this process's dense anonymous memory into huge pages (see the module docs).
pub(crate) fn collapse() -> Result<Collapsed, Refused> {
    let t0 = Instant::now();
    thp_mode()?;
    let mut done = Collapsed {
        anon_before: rollup("Anonymous"),
        huge_before: rollup("AnonHugePages"),
        ..Collapsed::default()
    };
    let denied = |e: io::Error| Refused::Denied(e.to_string());
    let (ranges, missing) = dense_ranges(&anon_regions().map_err(denied)?).map_err(denied)?;
    done.filled = missing * PAGE as u64;
    let mut any_ok = false;
    // Ranges where the kernel had no huge page free at once (compaction is under way):
    // tried once more at the end, when it often has (measured: 448 of 984 MiB on the first
    // pass, the rest on a second).
    let mut again = Vec::new();
    for (start, end) in ranges {
        let len = end - start;
        done.asked += len as u64;
        let advised = madvise(start, len, libc::MADV_HUGEPAGE)
            .and_then(|()| madvise(start, len, libc::MADV_COLLAPSE));
        match advised {
            Ok(()) => any_ok = true,
            // On the first range: the kernel does not know the advice, or this process has
            // THP switched off; stop.
            Err(libc::EINVAL) if !any_ok && !knows_collapse(start) => {
                return Err(Refused::NoCollapse)
            }
            Err(libc::EINVAL) if !any_ok && thp_disabled() => {
                return Err(Refused::ThpOff(
                    "switched off for this process (PR_SET_THP_DISABLE)".into(),
                ))
            }
            // Otherwise: this range is unsuitable (a mapping changed meanwhile).
            Err(libc::EINVAL) => done.failed_ranges += 1,
            Err(libc::EPERM) => {
                return Err(Refused::Denied(
                    "madvise(MADV_COLLAPSE) refused (EPERM)".into(),
                ))
            }
            // This range only: no huge page free now, pages pinned or unmapped meanwhile.
            Err(libc::EAGAIN | libc::ENOMEM | libc::EBUSY) => again.push((start, len)),
            Err(e) => {
                return Err(Refused::Denied(format!(
                    "madvise(MADV_COLLAPSE): {}",
                    io::Error::from_raw_os_error(e)
                )))
            }
        }
    }
    for (start, len) in again {
        if madvise(start, len, libc::MADV_COLLAPSE).is_err() {
            done.failed_ranges += 1;
        }
    }
    done.huge_after = rollup("AnonHugePages");
    done.took = t0.elapsed();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_anonymous_private_writable_mappings_are_taken() {
        let take = |l: &str| anon_region(l);
        assert_eq!(
            take("55d0c0a00000-55d0c0c00000 rw-p 00000000 00:00 0                          [heap]"),
            Some((0x55d0c0a00000, 0x55d0c0c00000))
        );
        assert_eq!(
            take("7f0000000000-7f0000200000 rw-p 00000000 00:00 0 "),
            Some((0x7f0000000000, 0x7f0000200000))
        );
        assert!(take("7f0000000000-7f0000200000 rw-p 00000000 00:00 0  [anon:x]").is_some());
        assert!(take("7ffd0000-7ffe0000 rw-p 00000000 00:00 0   [stack]").is_none());
        assert!(
            take("7f00-7f10 r--p 00000000 00:00 0 ").is_none(),
            "read-only"
        );
        assert!(
            take("7f00-7f10 rw-s 00000000 00:01 12 /dev/zero").is_none(),
            "shared"
        );
        assert!(
            take("7f00-7f10 rw-p 00001000 08:01 1234 /usr/lib/libc.so").is_none(),
            "file"
        );
        assert!(take("garbage").is_none());
    }

    #[test]
    fn mappings_marked_nohugepage_are_left_alone() {
        let smaps = "\
55d0c0a00000-55d0c0c00000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Size:               2048 kB
VmFlags: rd wr mr mw me ac nh
7f0000400000-7f0000600000 rw-p 00001000 08:01 1234 /usr/lib/libc.so
VmFlags: rd wr mr mw me ac
7f0000800000-7f0000a00000 rw-p 00000000 00:00 0
Size:               2048 kB
VmFlags: rd wr mr mw me ac hg
";
        assert_eq!(
            regions_of(smaps),
            vec![
                (0x55d0c0a00000, 0x55d0c0c00000),
                (0x7f0000800000, 0x7f0000a00000)
            ]
        );
        let no_flags = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0\nSize: 4 kB\n\
                        7f0000400000-7f0000600000 rw-p 00000000 00:00 0\n";
        assert_eq!(regions_of(no_flags).len(), 2, "kernels without VmFlags");
    }

    #[test]
    fn a_resident_region_counts_as_dense_and_an_untouched_one_does_not() {
        let len = 8 * HUGE;
        let mut v = vec![0u8; len];
        let base = v.as_ptr() as usize;
        let region = [(base, base + len)];
        let (ranges, _) = dense_ranges(&region).unwrap();
        assert!(ranges.is_empty(), "calloc'd, never touched: {ranges:x?}");
        for b in v.iter_mut().step_by(PAGE) {
            *b = 1;
        }
        let (ranges, missing) = dense_ranges(&region).unwrap();
        let asked: usize = ranges.iter().map(|r| r.1 - r.0).sum();
        assert!(
            asked >= 7 * HUGE,
            "every aligned chunk inside is dense: {ranges:x?}"
        );
        assert_eq!(missing, 0);
        assert!(std::hint::black_box(&v)[0] == 1);
    }

    /// The memory cost: a region with a quarter of its pages never touched is filled in.
    #[test]
    fn collapsing_fills_the_missing_pages_of_dense_chunks_and_says_how_much() {
        let len = 32 * HUGE;
        let mut v = vec![0u8; len];
        for (i, b) in v.iter_mut().enumerate().step_by(PAGE) {
            if (i / PAGE) % 4 != 3 {
                *b = 1;
            }
        }
        let rss_before = rollup("Anonymous");
        match collapse() {
            Ok(c) => {
                let rss_after = rollup("Anonymous");
                eprintln!(
                    "asked {} KiB, filled {} KiB, huge pages {} -> {} KiB, anonymous RSS {} -> \
                     {} KiB, in {:?}",
                    c.asked >> 10,
                    c.filled >> 10,
                    c.huge_before >> 10,
                    c.huge_after >> 10,
                    rss_before >> 10,
                    rss_after >> 10,
                    c.took
                );
                assert!(c.filled >= (len as u64 / 4) - 2 * HUGE as u64, "{c:?}");
                assert!(c.asked >= (len - HUGE) as u64, "{c:?}");
                if c.failed_ranges == 0 {
                    assert!(c.huge_after >= (len - HUGE) as u64, "{c:?}");
                }
            }
            Err(Refused::ThpOff(m)) => assert!(thp_mode().is_err() || thp_disabled(), "{m}"),
            Err(Refused::NoCollapse) => {
                let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
                let v: Vec<u32> = release
                    .split(['.', '-'])
                    .take(2)
                    .map(|x| x.parse().unwrap_or(0))
                    .collect();
                assert!(v < vec![6, 1], "MADV_COLLAPSE unknown to Linux {release}");
            }
            Err(Refused::Denied(m)) => assert!(m.contains("madvise") || m.contains("proc"), "{m}"),
        }
        assert!(std::hint::black_box(&v)[0] == 1);
    }
}
