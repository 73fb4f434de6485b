//! Large read-only data for fork stages, in transparent-huge-page memory.
//!
//! Forking copies the parent's page tables: about 20 us per MiB of touched memory with 4 KiB
//! pages, so a 1 GiB dataset makes every fork cost ~20 ms. The same data in 2 MiB pages
//! needs 512 times fewer entries. Build the dataset in a [`HugeBuf`] before the run, then read
//! it from `cow_fork` children through copy-on-write. (For data spread over many small
//! allocations, see [`HugePages`](crate::HugePages): the library collapses the parent's heap
//! before it forks.)

#![allow(unsafe_code)]

use bytemuck::Pod;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;

const HUGE: usize = 2 << 20;

/// A zero-initialised buffer of plain-old-data values (`u8` by default) backed by
/// transparent huge pages where the system allows them (ordinary pages otherwise), for large
/// data shared with forked children. It derefs to `[T]` and gives its bytes with
/// [`as_bytes`](HugeBuf::as_bytes) / `AsRef<[u8]>`.
///
/// Its memory is populated when it is made (`MADV_POPULATE_WRITE`, Linux 5.14+: the kernel
/// zeroes each 2 MiB page once, without a first-touch fault per page, which made building
/// 1 GiB about 3x slower than a `Vec`), so filling it afterwards runs at memory speed.
/// Measured for 1 GiB on a busy 2-vCPU VM: 1.3 to 2.8 s made and filled, against 1.0 to 3.2 s
/// for a `Vec`: each huge page needs a free 2 MiB block, so it depends on how fragmented the
/// machine's memory is. On a VM, free 2 MiB blocks are often memory the guest has never
/// touched, and the host's first touch dominates: populating 1 GiB took 2.5-3.9 s from such
/// memory and 0.07-0.12 s from memory an earlier process had freed (whatever the number of
/// threads populating); a `Vec` reuses fragmented 4 KiB pages and avoids that first touch.
///
/// ```
/// use minigun::HugeBuf;
/// let mut data = HugeBuf::new(8 << 20).unwrap();
/// data[..4].copy_from_slice(b"abcd");
/// assert_eq!(&data[..4], b"abcd");
/// assert_eq!(data.len(), 8 << 20);
///
/// // Typed contents: any `bytemuck::Pod` type (re-exported as `minigun::bytemuck`).
/// let squares = HugeBuf::<u64>::from_slice(&[1, 4, 9]).unwrap();
/// assert_eq!(squares.iter().sum::<u64>(), 14);
/// assert_eq!(squares.as_bytes().len(), 24);
/// ```
pub struct HugeBuf<T: Pod = u8> {
    ptr: NonNull<T>,
    len: usize,
    mapped: usize,
    _owns: PhantomData<T>,
}

impl<T: Pod> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HugeBuf<{}>({} values)",
            std::any::type_name::<T>(),
            self.len
        )
    }
}

// SAFETY: the buffer owns its mapping exclusively, like a `Vec<T>`: it can move to another
// thread when `T` can.
unsafe impl<T: Pod + Send> Send for HugeBuf<T> {}
// SAFETY: shared references only give `&[T]` (reads); writes need `&mut HugeBuf`.
unsafe impl<T: Pod + Sync> Sync for HugeBuf<T> {}

impl HugeBuf {
    /// Maps `len` zeroed bytes (rounded up to 2 MiB). For other values:
    /// [`HugeBuf::zeroed`], [`HugeBuf::from_slice`].
    pub fn new(len: usize) -> io::Result<Self> {
        Self::zeroed(len)
    }
}

impl<T: Pod> HugeBuf<T> {
    /// Maps `len` zeroed values (`len * size_of::<T>()` bytes, rounded up to 2 MiB).
    pub fn zeroed(len: usize) -> io::Result<Self> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "HugeBuf of {len} values of {} bytes overflows",
                    size_of::<T>()
                ),
            )
        })?;
        if align_of::<T>() > HUGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "HugeBuf values aligned to {} bytes (at most 2 MiB)",
                    align_of::<T>()
                ),
            ));
        }
        let (ptr, mapped) = map_huge(bytes)?;
        Ok(HugeBuf {
            ptr: ptr.cast(),
            len,
            mapped,
            _owns: PhantomData,
        })
    }

    /// A buffer holding a copy of `values`.
    pub fn from_slice(values: &[T]) -> io::Result<Self> {
        let mut b = Self::zeroed(values.len())?;
        b.copy_from_slice(values);
        Ok(b)
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values' bytes.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }

    /// The values' bytes, writable (any bytes are valid values of a `Pod` type).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(self)
    }
}

impl<T: Pod> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` is this buffer's live mapping of at least `len * size_of::<T>()`
        // bytes, aligned for `T` (2 MiB aligned, checked in `new`), zero-initialised by the
        // kernel, and any bytes are a valid `T` (`Pod`); the borrow is tied to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Pod> std::ops::DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Pod> AsRef<[u8]> for HugeBuf<T> {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<T: Pod> AsMut<[u8]> for HugeBuf<T> {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
}

impl<T: Pod> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` / `mapped` come from `map_huge` in `new`, and nothing borrows the
        // buffer any more (we are in its destructor).
        unsafe { unmap_huge(self.ptr.cast(), self.mapped) }
    }
}

/// An anonymous private mapping of `len` bytes (rounded up to 2 MiB), 2 MiB aligned,
/// advised to use transparent huge pages and populated. Zero-filled. Returns (pointer,
/// mapped length).
fn map_huge(len: usize) -> io::Result<(NonNull<u8>, usize)> {
    let too_big = || io::Error::from_raw_os_error(libc::ENOMEM);
    if len > isize::MAX as usize - 2 * HUGE {
        return Err(too_big());
    }
    let size = len.max(1).div_ceil(HUGE) * HUGE;
    // Map one huge page more, to align the start on a huge-page boundary.
    let span = size.checked_add(HUGE).ok_or_else(too_big)?;
    // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.div_ceil(HUGE) * HUGE;
    // SAFETY: both trimmed ranges lie inside the mapping made above and are not used; the
    // advice only changes how the (still unused) memory is backed.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let end = start + span;
        if end > aligned + size {
            libc::munmap((aligned + size) as *mut libc::c_void, end - aligned - size);
        }
        // Without THP support (EINVAL) the memory works with normal pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        // Populate now: one zeroing per 2 MiB page in the kernel, instead of a first-touch
        // fault per page later. Before Linux 5.14 (EINVAL) pages fault in as they are touched.
        libc::madvise(
            aligned as *mut libc::c_void,
            size,
            libc::MADV_POPULATE_WRITE,
        );
    }
    let ptr = NonNull::new(aligned as *mut u8).expect("mmap never returns null");
    Ok((ptr, size))
}

/// Unmaps memory from [`map_huge`].
///
/// # Safety
///
/// `ptr` and `size` must come from one `map_huge` call, and the memory must not be used after.
unsafe fn unmap_huge(ptr: NonNull<u8>, size: usize) {
    // SAFETY: the caller passes a mapping from `map_huge` that is no longer used.
    unsafe { libc::munmap(ptr.as_ptr().cast(), size) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_contents_round_trip_through_their_bytes() {
        let values: Vec<u32> = (0..100_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let mut b = HugeBuf::<u32>::from_slice(&values).unwrap();
        assert_eq!(&b[..], &values[..]);
        assert_eq!(b.as_bytes().len(), values.len() * 4);
        assert_eq!(b.as_ref(), bytemuck::cast_slice::<u32, u8>(&values));
        b.as_bytes_mut()[..4].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(b[0], 7);
        assert_eq!(b.as_ptr() as usize % HUGE, 0, "2 MiB aligned");
    }

    #[test]
    fn an_impossible_size_is_an_error_not_a_panic() {
        let e = HugeBuf::<u64>::zeroed(usize::MAX / 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let empty = HugeBuf::<u64>::zeroed(0).unwrap();
        assert!(empty.is_empty());
        assert_eq!(&empty[..], &[] as &[u64]);
    }
}
