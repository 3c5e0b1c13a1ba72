//! Weight storage that streams well: anonymous memory that the kernel is asked to back with
//! huge pages, so that reading every weight once per token does not also walk a page table
//! entry every 4 KiB.

use std::ops::{Deref, DerefMut};

/// A zero-initialised byte buffer in its own anonymous mapping (huge pages where the
/// system allows them: Linux transparent huge pages in `madvise` or `always` mode).
pub struct LargeBuffer {
    map: memmap2::MmapMut,
    len: usize,
}

impl LargeBuffer {
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        // A mapping cannot be empty.
        let map = memmap2::MmapOptions::new().len(len.max(1)).map_anon()?;
        #[cfg(target_os = "linux")]
        {
            // Only a hint: without huge pages the buffer works the same, a little slower.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(LargeBuffer { map, len })
    }

    pub fn from_slice(bytes: &[u8]) -> std::io::Result<Self> {
        let mut b = Self::zeroed(bytes.len())?;
        b.copy_from_slice(bytes);
        Ok(b)
    }
}

impl Deref for LargeBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl DerefMut for LargeBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

impl Clone for LargeBuffer {
    fn clone(&self) -> Self {
        Self::from_slice(self).expect("cannot map memory for a copy of a weight buffer")
    }
}

impl std::fmt::Debug for LargeBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LargeBuffer({} bytes)", self.len)
    }
}

/// Types whose all-zero bytes are a valid value (0.0 for the floats).
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` zero bytes must be a valid `Self`, and `Self`
/// must have no padding and no drop glue.
pub unsafe trait ZeroIsValid: Copy + 'static {}

// SAFETY: plain IEEE floats: zero bytes are +0.0, no padding.
unsafe impl ZeroIsValid for f32 {}
// SAFETY: as above (a u16 inside).
unsafe impl ZeroIsValid for half::f16 {}
// SAFETY: as above (a u16 inside).
unsafe impl ZeroIsValid for half::bf16 {}

/// A zero-initialised array of `T` on a [`LargeBuffer`]: for the KV cache, whose blocks are
/// read a few KiB at a time from scattered places, so that each read does not also miss
/// the TLB (a page walk is slow, and slower under a hypervisor).
pub struct LargeArray<T: ZeroIsValid> {
    buf: LargeBuffer,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: ZeroIsValid> LargeArray<T> {
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, "array size overflows")
        })?;
        Ok(LargeArray {
            buf: LargeBuffer::zeroed(bytes)?,
            len,
            _values: std::marker::PhantomData,
        })
    }
}

impl<T: ZeroIsValid> Deref for LargeArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the mapping is page-aligned (enough for any `T` here), holds `len` values'
        // bytes, and zero bytes or values written through `deref_mut` are valid `T`s.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const T, self.len) }
    }
}

impl<T: ZeroIsValid> DerefMut for LargeArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut T, self.len) }
    }
}
