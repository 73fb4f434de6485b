//! A diamond: one producer broadcasts every item to two branches, which fan in to one consumer.
use minigun::Pipeline;
use std::sync::{Arc, Mutex};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();

    let p = Pipeline::new("diamond");
    let words = p.producer("words", |out| {
        for w in ["copy", "on", "write", "fork", "pipeline"] {
            out.emit(w.to_string())?;
        }
        Ok(())
    });
    // Two stages reading from the same upstream: each receives every word (broadcast).
    let upper = p
        .map("upper", |w: String| Ok(w.to_uppercase()))
        .from(&words);
    let length = p
        .map("length", |w: String| {
            Ok(format!("{w} has {} letters", w.len()))
        })
        .from(&words);
    // One stage reading from both branches: it ends once both have ended (fan-in).
    p.consumer("collect", move |line: String| {
        seen.lock().unwrap().push(line);
        Ok(())
    })
    .from(&upper)
    .from(&length);

    let report = p.run()?;
    let mut lines = lines.lock().unwrap().clone();
    lines.sort();
    assert_eq!(lines.len(), 10, "each word arrives once per branch");
    for line in &lines {
        println!("{line}");
    }
    println!("{report}");
    Ok(())
}
