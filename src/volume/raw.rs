//! The calls on member files underneath the volume: reading a range in
//! full, finding the data ranges of a sparse file, telling whether a range
//! is allocated, and the errno mapping of the I/O path.
//!
//! Invariant: past a member file's end is a hole, and reads as zeros.

use std::alloc::{Layout, handle_alloc_error};
use std::io;

use crate::error::{FsError, FsResult};
use crate::storage::{DIRECT_ALIGN, Handle};

/// The data ranges of `f` within `[lo, hi)` by SEEK_DATA/SEEK_HOLE.
pub(super) fn seek_data_ranges(f: &Handle, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = lo;
    while pos < hi {
        let Some(d) = f.seek_data(pos)? else {
            break;
        };
        if d >= hi {
            break;
        }
        let h = f.seek_hole(d)?.unwrap_or(hi).min(hi);
        out.push((d, h));
        pos = h.max(d + 1);
    }
    Ok(out)
}

/// Byte ranges sorted by start, widened to whole blocks of `bs` and merged.
pub(super) fn widen_merge(
    ranges: impl IntoIterator<Item = (u64, u64)>,
    bs: u64,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (d, h) in ranges {
        let (ds, de) = (d / bs * bs, h.div_ceil(bs) * bs);
        match out.last_mut() {
            Some((_, e)) if *e >= ds => *e = (*e).max(de),
            _ => out.push((ds, de)),
        }
    }
    out
}

/// A zeroed heap buffer aligned to [`DIRECT_ALIGN`], for `O_DIRECT` member
/// I/O: FUSE hands the daemon data at no particular address, and replies are
/// `Vec`s, so aligned requests are copied through one of these.
pub(super) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain bytes owned by this value alone.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes (more than 0) of zeros.
    pub(super) fn zeroed(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .unwrap_or_else(|_| handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        match std::ptr::NonNull::new(ptr) {
            Some(ptr) => AlignedBuf { ptr, layout },
            None => handle_alloc_error(layout),
        }
    }

    /// A copy of `data` (more than 0 bytes).
    pub(super) fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` initialised
        // (zeroed) bytes, borrowed for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Whether a piece at `off` of `len` bytes may go to a member with
/// `O_DIRECT` (through an [`AlignedBuf`]).
pub(super) fn direct_fits(off: u64, len: usize) -> bool {
    len > 0 && off.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

/// [`read_full`], past the page cache when `direct` and the range is
/// aligned (read into an aligned buffer, then copied to `dst`).
pub(super) fn read_full_io(f: &Handle, dst: &mut [u8], off: u64, direct: bool) -> FsResult<()> {
    if !direct || !direct_fits(off, dst.len()) {
        return read_full(f, dst, off);
    }
    let mut b = AlignedBuf::zeroed(dst.len());
    let buf = b.as_mut_slice();
    let mut done = 0;
    while done < buf.len() {
        match f.read_direct_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            // A short read ends the file, or leaves an unaligned rest:
            // that goes through the cache.
            Ok(n) if n % DIRECT_ALIGN != 0 => {
                done += n;
                dst[..done].copy_from_slice(&buf[..done]);
                return read_full(f, &mut dst[done..], off + done as u64);
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::Io(e)),
        }
    }
    dst.copy_from_slice(buf);
    Ok(())
}

/// Fills `dst` from `f` at `off`; past the member file's end is a hole (zeros).
pub(super) fn read_full(f: &Handle, dst: &mut [u8], off: u64) -> FsResult<()> {
    let mut done = 0;
    while done < dst.len() {
        match f.read_at(&mut dst[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::Io(e)),
        }
    }
    Ok(())
}

pub(super) fn eio() -> FsError {
    FsError::Io(io::Error::from_raw_os_error(libc::EIO))
}

pub(super) fn map_write_err(e: io::Error) -> FsError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        FsError::NoSpace
    } else {
        FsError::Io(e)
    }
}

/// Whether `[off, off+len)` of `f` is already fully allocated (writing it needs no space).
pub(super) fn fully_allocated(f: &Handle, off: u64, len: u64) -> io::Result<bool> {
    match f.seek_hole(off)? {
        Some(h) => Ok(h >= off + len),
        None => Ok(false),
    }
}
