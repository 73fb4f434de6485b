//! The same small pipeline under every executor gives the items computed here without it.
mod common;
use common::{Ex, Sink};
use minigun::{Output, Pipeline};

fn run(ex: Ex) -> Vec<u64> {
    let p = Pipeline::new("smoke");
    let got = Sink::default();
    p.producer("gen", |out| {
        for i in 0..1000u64 {
            out.emit(i)?;
        }
        Ok(())
    });
    let s = p.processor("double", |x: u64, out: &mut Output<'_, u64>| {
        out.emit(x * 2)?;
        if x.is_multiple_of(10) {
            out.emit(x)?;
        }
        Ok(())
    });
    ex.apply(&s);
    Sink::<u64>::consume(&got, &p);
    p.run().unwrap();
    got.sorted()
}

/// What `run` should collect, computed without the library: every x of `0..1000` doubled,
/// and every tenth x once more as itself; sorted.
fn expected() -> Vec<u64> {
    let mut v: Vec<u64> = (0..1000u64)
        .map(|x| x * 2)
        .chain((0..1000).step_by(10))
        .collect();
    v.sort();
    v
}

matrix!(fn same_as_computed(ex) {
    let expected = expected();
    assert_eq!(expected.len(), 1100);
    assert_eq!(run(ex), expected);
});
