//! ETL with nested pipelines: extract, transform and load are sub-pipelines of one run.
use minigun::Pipeline;
use std::sync::{Arc, Mutex};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let table = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let p = Pipeline::new("etl");
    p.pipeline::<(), String>("extract", |s| {
        s.producer("read", |out| {
            for line in ["1,alpha", "2,beta", "bad line", "3,gamma"] {
                out.emit(line.to_string())?;
            }
            Ok(())
        });
        s.map("trim", |line: String| Ok(line.trim().to_string()));
    });
    p.pipeline::<String, (u64, String)>("transform", |s| {
        s.map("parse", |line: String| {
            let (id, name) = line.split_once(',').ok_or("no comma")?;
            Ok((id.parse::<u64>()?, name.to_string()))
        });
        // Uppercasing runs in forked children: the tuple is serialisable.
        s.map("upper", |(id, name): (u64, String)| {
            Ok((id, name.to_uppercase()))
        })
        .cow_fork(2);
    });
    let t = table.clone();
    p.pipeline::<(u64, String), ()>("load", |s| {
        s.before_run(|| {
            println!("load: connecting");
            Ok(())
        });
        s.batch::<(u64, String)>("rows", 2);
        s.consumer("insert", move |rows: Vec<(u64, String)>| {
            t.lock().unwrap().extend(rows);
            Ok(())
        });
    });
    let report = p.run()?;
    println!("{report}");
    let mut rows = table.lock().unwrap().clone();
    rows.sort();
    println!("loaded: {rows:?}");
    assert_eq!(rows.len(), 3);
    assert_eq!(report.stage("transform/parse").unwrap().failed, 1);
    Ok(())
}
