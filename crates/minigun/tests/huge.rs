//! HugeBuf: large data in transparent-huge-page memory, read by cow_fork children.
use minigun::{HugeBuf, Pipeline};
use std::sync::Arc;

fn anon_huge_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn children_read_a_huge_page_dataset() {
    let before = anon_huge_kib();
    let mut buf = HugeBuf::new(64 << 20).unwrap();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !thp.contains("[never]") {
        // The kernel backs (most of) the touched buffer with 2 MiB pages.
        assert!(
            anon_huge_kib() >= before + 32 * 1024,
            "AnonHugePages {} KiB",
            anon_huge_kib()
        );
    }
    let data = Arc::new(buf);
    let expected: Vec<u64> = (0..16)
        .map(|k| data[k << 22..(k + 1) << 22].iter().map(|&b| b as u64).sum())
        .collect();
    let p = Pipeline::new("huge");
    p.producer("slices", |out| out.emit_all(0..16usize).map_err(Into::into));
    let d = data.clone();
    p.map("sum", move |k: usize| {
        Ok((
            k,
            d[k << 22..(k + 1) << 22]
                .iter()
                .map(|&b| b as u64)
                .sum::<u64>(),
        ))
    })
    .cow_fork(4);
    let got = Arc::new(std::sync::Mutex::new(vec![0u64; 16]));
    let g = got.clone();
    p.consumer("collect", move |(k, s): (usize, u64)| {
        g.lock().unwrap()[k] = s;
        Ok(())
    });
    p.run().unwrap();
    assert_eq!(*got.lock().unwrap(), expected);
}

#[test]
fn an_impossible_size_is_an_error_not_a_wrapped_mapping() {
    for len in [usize::MAX, usize::MAX - 5, isize::MAX as usize] {
        let e = HugeBuf::new(len).expect_err("no such mapping");
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM), "{len}");
    }
}
