//! A web-crawler-like loop: fetched pages yield links that are routed back to the fetcher,
//! up to a depth limit. The loop ends by itself when no page is left in it.
use minigun::{Exec, Output, Pipeline};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Page {
    url: String,
    depth: u32,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let p = Pipeline::new("crawler");
    p.producer("seeds", |out| {
        for site in ["a.test", "b.test"] {
            out.emit(Page {
                url: format!("https://{site}/"),
                depth: 0,
            })?;
        }
        Ok(())
    });
    // "Fetching" happens in persistent forked workers (each could hold its own client).
    let fetch = p.map("fetch", |page: Page| {
        Ok((page.clone(), format!("<html>{}</html>", page.url)))
    });
    fetch.ipc_fork(2);
    let s = seen.clone();
    let extract = p.processor(
        "extract",
        move |(page, _html): (Page, String), out: &mut Output<'_, String>| {
            if !s.lock().unwrap().insert(page.url.clone()) {
                return Ok(()); // Already crawled.
            }
            if page.depth < 3 {
                for i in 0..3 {
                    let url = format!("{}{i}/", page.url);
                    out.to(
                        "fetch",
                        Page {
                            url,
                            depth: page.depth + 1,
                        },
                    )?;
                }
            }
            out.emit(page.url)?;
            Ok(())
        },
    );
    extract.executor(Exec::inline()).routes_to(&fetch);
    p.consumer("index", |_url: String| Ok(()));
    let report = p.run()?;
    println!("{report}");
    let pages = seen.lock().unwrap().len();
    println!("crawled {pages} pages");
    assert_eq!(pages, 2 * (1 + 3 + 9 + 27));
    Ok(())
}
