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
