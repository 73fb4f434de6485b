//! The same small pipeline under every executor gives the inline result.
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

matrix!(fn same_as_inline(ex) {
    let oracle = run(Ex::Inline);
    assert_eq!(oracle.len(), 1100);
    assert_eq!(run(ex), oracle);
});
