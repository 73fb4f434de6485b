//! A spin lock around a value ([`SpinLock`]), for data that one thread takes at nearly every
//! step and others only rarely and briefly (a producer's run of items, see
//! `queue::RunSender`): taking it is one atomic read-modify-write and releasing it one plain
//! store, where a `Mutex` pays a read-modify-write for each. A thread that finds it taken
//! spins, then yields (it never sleeps): only for data held for a few instructions.

use crossbeam_utils::Backoff;
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

/// A value that one thread at a time may use, through [`SpinLock::lock`].
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock lets one thread at a time reach the value (a guard exists only while
// `locked` is held, see `lock`), so sharing the lock moves the value between threads, no
// more: what `T: Send` allows. It is `Send` by itself (both fields are, for `T: Send`).
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub(crate) fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Waits (spinning, then yielding) until the value is free, and takes it.
    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        SpinGuard {
            lock: self,
            _value: PhantomData,
        }
    }

    #[cold]
    fn lock_contended(&self) {
        let backoff = Backoff::new();
        loop {
            while self.locked.load(Ordering::Relaxed) {
                backoff.snooze();
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

/// The value of a [`SpinLock`], taken; released when dropped. Shared between threads only
/// as a `&mut T` could be (the marker), since it gives the value out by reference.
pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
    _value: PhantomData<&'a mut T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock (taken in `lock`, released only in its `drop`),
        // so no other reference to the value exists while the returned one lives.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_thread_at_a_time_changes_the_value() {
        let lock = Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        // A read and a write apart: lost updates show if two overlap.
                        let mut v = lock.lock();
                        let seen = *v;
                        std::hint::spin_loop();
                        *v = seen + 1;
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(*lock.lock(), 40_000);
    }
}
