//! Results back, as `Pool.map` gives them: a fragile parser runs in forked children, the
//! parsed values come back in input order, the item that crashed its child is missing and
//! listed in the report; then the same pipeline folded into one number.
use minigun::{FailureKind, Pipeline};

fn define() -> Pipeline {
    let p = Pipeline::new("parse");
    p.producer("lines", |out| {
        out.emit_all((0..200u64).map(|i| format!("{i},{}", i * 3)))
            .map_err(Into::into)
    });
    p.map("parse", |line: String| {
        let (a, b) = line.split_once(',').ok_or("no comma")?;
        if a == "77" {
            std::process::abort(); // a crashing C parser would do this
        }
        Ok(a.parse::<u64>()? + b.parse::<u64>()?)
    })
    .ipc_fork(2);
    p
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let got = define().collect_ordered::<u64>()?;
    let want: Vec<u64> = (0..200u64).filter(|&i| i != 77).map(|i| i * 4).collect();
    assert_eq!(got.items, want);
    let failed = &got.report.failures;
    assert!(failed.len() == 1 && failed[0].kind == FailureKind::Signal(6));
    println!(
        "{} values back in input order; first: {:?}",
        got.items.len(),
        &got.items[..5]
    );
    println!("{}", got.report);

    let sum = define().fold(0u64, |acc, x: u64| acc + x)?;
    assert_eq!(sum.value, want.iter().sum::<u64>());
    println!("their sum: {}", sum.value);
    Ok(())
}
