//! Type erasure, in one place.
//!
//! The definition keeps stages of many types in one list, so the linker moves typed values
//! (queue ends, senders, a stage's serde entry points, routed items) through untyped records
//! as [`Erased`]. Every edge's types are checked by `TypeId` before anything is erased, so the
//! code that knows the types again takes them back with [`take`], which cannot fail for a
//! checked definition.

use std::any::Any;

/// A typed value travelling through untyped code.
pub(crate) type Erased = Box<dyn Any + Send>;

/// Takes back a value erased as `T` (the linker checked the types before erasing it).
pub(crate) fn take<T: 'static>(b: Erased) -> T {
    *b.downcast::<T>()
        .expect("types were checked when the pipeline was built")
}
