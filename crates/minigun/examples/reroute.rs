//! A derived pipeline: a function defines the base, another extends it and reroutes a stage.
use minigun::{Pipeline, StageResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The base definition: orders are priced and stored.
fn orders(p: &Pipeline, stored: Arc<AtomicU64>) {
    p.producer("orders", |out| out.emit_all(1..=100u64).map_err(Into::into));
    p.map("price", |qty: u64| Ok(qty * 3));
    p.consumer("store", move |_price: u64| -> StageResult {
        stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
}

/// The derived definition: priced orders also go through a fraud check (Minigun's
/// `reroute_stage :price, to: [:store, :fraud]`).
fn audited_orders(p: &Pipeline, stored: Arc<AtomicU64>, flagged: Arc<AtomicU64>) {
    orders(p, stored);
    let fraud = p.consumer("fraud", move |price: u64| {
        if price > 250 {
            flagged.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    let store = p
        .find::<u64, ()>("store")
        .expect("the base has a store stage");
    let price = p
        .find::<u64, u64>("price")
        .expect("the base has a price stage");
    price.reroute().to(&store).to(&fraud);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (stored, flagged) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let p = Pipeline::new("audited-orders");
    audited_orders(&p, stored.clone(), flagged.clone());
    let report = p.run()?;
    println!("{report}");
    let (s, f) = (
        stored.load(Ordering::Relaxed),
        flagged.load(Ordering::Relaxed),
    );
    println!("stored {s}, flagged {f}");
    assert_eq!((s, f), (100, 17));
    Ok(())
}
