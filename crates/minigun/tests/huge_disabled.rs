//! A process that switched transparent huge pages off for itself (`PR_SET_THP_DISABLE`, as
//! some databases and their launchers do): a fork stage asked to collapse the heap reports
//! why it cannot, in those words, and runs its items. (Its own test binary: the switch holds
//! for the whole process and every child it forks.)
#![allow(unsafe_code)] // prctl, to switch THP off for this process.
mod common;
use minigun::{Exec, HugePages, HugePagesStatus, Pipeline};

#[test]
fn a_process_with_thp_disabled_is_told_so_not_that_its_kernel_is_old() {
    // Some dense heap, so that there is a range to collapse.
    let data: Vec<u64> = (0..(32u64 << 20) / 8).collect();
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1) only changes this process's THP policy.
    let set = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    for served in [false, true] {
        let p = Pipeline::new("thp-disabled");
        let got = common::Sink::<u64>::default();
        common::gen(&p, 4);
        let exec = Exec::cow_fork(2).huge_pages(HugePages::ON);
        let exec = if served { exec.fork_server() } else { exec };
        let sum: u64 = data.iter().sum();
        p.map("work", move |x: u64| Ok(x + sum))
            .wire()
            .executor(exec);
        got.consume(&p);
        let report = common::run_bounded(p).expect("the run succeeds");
        assert_eq!(got.sorted(), (0..4).map(|x| x + sum).collect::<Vec<_>>());
        let r = &report.huge_pages[0];
        assert_eq!(r.status, HugePagesStatus::Unavailable, "{r:?}");
        let reason = r.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("PR_SET_THP_DISABLE") && !reason.contains("Linux 6.1"),
            "served {served}: {reason:?}"
        );
    }
    assert!(std::hint::black_box(&data)[1] == 1);
}
