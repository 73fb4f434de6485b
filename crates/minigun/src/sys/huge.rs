//! Large read-only data for fork stages, in transparent-huge-page memory.
//!
//! Forking copies the parent's page tables: about 20 us per MiB of touched memory with 4 KiB
//! pages, so a 1 GiB dataset makes every fork cost ~20 ms. The same data in 2 MiB pages
//! needs 512 times fewer entries. Build the dataset in a [`HugeBuf`] before the run, then read
//! it from `cow_fork` children through copy-on-write.

#![allow(unsafe_code)]

use std::io;

/// A zero-initialised byte buffer backed by transparent huge pages where the system allows
/// them (ordinary pages otherwise), for large data shared with forked children.
///
/// ```
/// use minigun::HugeBuf;
/// let mut data = HugeBuf::new(8 << 20).unwrap();
/// data[..4].copy_from_slice(b"abcd");
/// assert_eq!(&data[..4], b"abcd");
/// assert_eq!(data.len(), 8 << 20);
/// ```
pub struct HugeBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    mapped: usize,
}

impl std::fmt::Debug for HugeBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} bytes)", self.len)
    }
}

// SAFETY: the buffer owns its mapping exclusively, like a `Vec<u8>`: it can move to
// another thread.
unsafe impl Send for HugeBuf {}
// SAFETY: shared references only give `&[u8]` (reads); writes need `&mut HugeBuf`.
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    /// Maps `len` zeroed bytes.
    pub fn new(len: usize) -> std::io::Result<Self> {
        let (ptr, mapped) = map_huge(len)?;
        Ok(HugeBuf { ptr, len, mapped })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for HugeBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is this buffer's live mapping of at least `len` bytes, zero-initialised
        // by the kernel; the borrow is tied to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` / `mapped` come from `map_huge` in `new`, and nothing borrows the
        // buffer any more (we are in its destructor).
        unsafe { unmap_huge(self.ptr, self.mapped) }
    }
}

/// An anonymous private mapping of `len` bytes (rounded up to 2 MiB), 2 MiB aligned,
/// advised to use transparent huge pages. Zero-filled. Returns (pointer, mapped length).
fn map_huge(len: usize) -> io::Result<(std::ptr::NonNull<u8>, usize)> {
    const HUGE: usize = 2 << 20;
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
    // SAFETY: both trimmed ranges lie inside the mapping made above and are not used.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let end = start + span;
        if end > aligned + size {
            libc::munmap((aligned + size) as *mut libc::c_void, end - aligned - size);
        }
        // Best effort: without THP support the memory works with normal pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    let ptr = std::ptr::NonNull::new(aligned as *mut u8).expect("mmap never returns null");
    Ok((ptr, size))
}

/// Unmaps memory from [`map_huge`].
///
/// # Safety
///
/// `ptr` and `size` must come from one `map_huge` call, and the memory must not be used after.
unsafe fn unmap_huge(ptr: std::ptr::NonNull<u8>, size: usize) {
    // SAFETY: the caller passes a mapping from `map_huge` that is no longer used.
    unsafe { libc::munmap(ptr.as_ptr().cast(), size) };
}
