//! The calls on member files underneath the volume: reading a range in
//! full, finding the data ranges of a sparse file, telling whether a range
//! is allocated, and the errno mapping of the I/O path.
//!
//! Invariant: past a member file's end is a hole, and reads as zeros.

use std::alloc::{Layout, handle_alloc_error};
use std::io;
#[cfg(test)]
use std::path::Path;

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

/// A heap allocation aligned to [`DIRECT_ALIGN`], zeroed when made.
struct AlignedAlloc {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is plain bytes owned by this value alone.
unsafe impl Send for AlignedAlloc {}

impl AlignedAlloc {
    fn zeroed(len: usize) -> AlignedAlloc {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .unwrap_or_else(|_| handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        match std::ptr::NonNull::new(ptr) {
            Some(ptr) => AlignedAlloc { ptr, layout },
            None => handle_alloc_error(layout),
        }
    }
}

impl Drop for AlignedAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The largest allocation a thread keeps for its next [`AlignedBuf`]: a
/// 1 MiB request's worth (the kernel's default request size).
const SPARE_MAX: usize = 1 << 20;

/// Larger allocations (requests of up to `max_request=`, 16 MiB) are kept
/// in one pool shared by the workers, at most [`BIG_KEEP`] of them: kept
/// per thread, 32 to 64 workers could each hold 4-16 MiB.
const BIG_MAX: usize = 16 << 20;
const BIG_KEEP: usize = 8;
static BIG: std::sync::Mutex<Vec<AlignedAlloc>> = std::sync::Mutex::new(Vec::new());

thread_local! {
    /// The allocation of this thread's last [`AlignedBuf`] (at most
    /// [`SPARE_MAX`]): FUSE workers live as long as the mount, and a fresh
    /// 1 MiB allocation per request cost its page faults and zeroing, 15 %
    /// of the CPU of a streaming write (docs/perf).
    static SPARE: std::cell::Cell<Option<AlignedAlloc>> = const { std::cell::Cell::new(None) };
}

/// A heap buffer aligned to [`DIRECT_ALIGN`], for `O_DIRECT` member I/O:
/// FUSE hands the daemon data at no particular address, and replies are
/// `Vec`s, so aligned requests are copied through one of these. Its
/// allocation goes back to the thread's spare when dropped; a buffer taken
/// from there holds what its last user left (initialised bytes, but
/// possibly another file's data: callers overwrite or zero what they hand
/// on).
pub(super) struct AlignedBuf {
    alloc: Option<AlignedAlloc>,
    len: usize,
}

impl AlignedBuf {
    /// `len` bytes (more than 0) of unspecified content.
    fn take(len: usize) -> AlignedBuf {
        let kept = if len > SPARE_MAX {
            let mut big = BIG.lock().unwrap_or_else(|p| p.into_inner());
            big.iter()
                .position(|a| a.layout.size() >= len)
                .map(|i| big.swap_remove(i))
        } else {
            SPARE.with(|s| s.take())
        };
        let alloc = match kept {
            Some(a) if a.layout.size() >= len => a,
            // None, or too small (dropped; the new one is kept after use).
            _ => AlignedAlloc::zeroed(len),
        };
        AlignedBuf {
            alloc: Some(alloc),
            len,
        }
    }

    /// A copy of `data` (more than 0 bytes).
    pub(super) fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::take(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        match &self.alloc {
            // SAFETY: `ptr` is a live allocation of at least `len`
            // initialised bytes (zeroed when made), borrowed for as long as
            // `self`.
            Some(a) => unsafe { std::slice::from_raw_parts(a.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.alloc {
            // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
            Some(a) => unsafe { std::slice::from_raw_parts_mut(a.ptr.as_ptr(), self.len) },
            None => &mut [],
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let Some(a) = self.alloc.take() else { return };
        if a.layout.size() > SPARE_MAX {
            if a.layout.size() <= BIG_MAX {
                let mut big = BIG.lock().unwrap_or_else(|p| p.into_inner());
                if big.len() < BIG_KEEP {
                    big.push(a);
                }
            }
        } else {
            // Keeps the larger of this one and the spare already kept (after
            // the thread's locals are gone, the closure is dropped unrun and
            // frees it).
            let _ = SPARE.try_with(move |s| {
                let keep = match s.take() {
                    Some(old) if old.layout.size() >= a.layout.size() => old,
                    _ => a,
                };
                s.set(Some(keep));
            });
        }
    }
}

/// Whether a piece at `off` of `len` bytes may go to a member with
/// `O_DIRECT` (through an [`AlignedBuf`]).
pub(super) fn direct_fits(off: u64, len: usize) -> bool {
    len > 0 && off.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

/// [`read_full`], past the page cache when `direct` and the range is
/// aligned: straight into `dst` when its memory is aligned too (a
/// [`ReadBuf`]'s), else through an aligned buffer and a copy.
pub(super) fn read_full_io(f: &Handle, dst: &mut [u8], off: u64, direct: bool) -> FsResult<()> {
    if !direct || !direct_fits(off, dst.len()) {
        return read_full(f, dst, off);
    }
    let done = if (dst.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        read_direct_run(f, dst, off)?
    } else {
        let mut b = AlignedBuf::take(dst.len());
        let done = read_direct_run(f, b.as_mut_slice(), off)?;
        dst[..done].copy_from_slice(&b.as_slice()[..done]);
        done
    };
    // An unaligned rest (a short read) goes through the cache.
    read_full(f, &mut dst[done..], off + done as u64)
}

/// `O_DIRECT` reads into `buf` (aligned) from `off` until it is full, or the
/// file ends (the rest is zeroed: a reused buffer holds an earlier request's
/// bytes, and past the end is a hole), or a short read leaves an unaligned
/// rest. Returns how many bytes of `buf` are filled.
fn read_direct_run(f: &Handle, buf: &mut [u8], off: u64) -> FsResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_direct_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(buf.len());
            }
            Ok(n) if n % DIRECT_ALIGN != 0 => return Ok(done + n),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::Io(e)),
        }
    }
    Ok(done)
}

/// The bytes a read returns: fresh zeroed memory (holes read as zeros, and
/// no earlier request's bytes can show), whose window starts on a
/// [`DIRECT_ALIGN`] boundary when asked for, so that `O_DIRECT` member
/// reads land in it without a copy. The copy through an [`AlignedBuf`] was
/// 11 % of the CPU of a sequential read (docs/perf, change 10).
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl ReadBuf {
    /// `len` zero bytes; `aligned`: the window starts on a
    /// [`DIRECT_ALIGN`] boundary (the allocation holds the slack).
    pub fn zeroed(len: usize, aligned: bool) -> ReadBuf {
        if !aligned || len == 0 {
            return ReadBuf {
                buf: vec![0; len],
                start: 0,
                len,
            };
        }
        let buf = vec![0u8; len + DIRECT_ALIGN - 1];
        let start = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        ReadBuf { buf, start, len }
    }

    /// The bytes as a `Vec` (a move when the window starts at 0, the
    /// unaligned case; else one copy).
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.start != 0 {
            self.buf.copy_within(self.start..self.start + self.len, 0);
        }
        self.buf.truncate(self.len);
        self.buf
    }
}

impl From<Vec<u8>> for ReadBuf {
    fn from(buf: Vec<u8>) -> ReadBuf {
        let len = buf.len();
        ReadBuf { buf, start: 0, len }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadBuf({} bytes)", self.len)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{OpenMode, Storage, sim::SimStorage};

    #[test]
    fn a_thread_reuses_its_aligned_buffer() {
        let first = AlignedBuf::copy_of(&[1u8; 8192]);
        let p = first.as_slice().as_ptr();
        assert_eq!(p as usize % DIRECT_ALIGN, 0);
        drop(first);
        let b = AlignedBuf::copy_of(&[2u8; 4096]);
        assert_eq!(b.as_slice().as_ptr(), p, "the spare was not reused");
        assert_eq!(b.as_slice(), &[2u8; 4096][..]);
        drop(b);
        // Larger than the spare: a new allocation.
        let big = AlignedBuf::copy_of(&[3u8; 16384]);
        assert_eq!(big.as_slice(), &[3u8; 16384][..]);
    }

    /// Buffers of long requests (over a thread's spare) are shared and
    /// bounded: reused with the new bytes in them, never more than
    /// [`BIG_KEEP`] kept.
    #[test]
    fn long_request_buffers_are_shared_and_bounded() {
        let bufs: Vec<AlignedBuf> = (0..BIG_KEEP + 4)
            .map(|i| AlignedBuf::copy_of(&vec![i as u8; 4 << 20]))
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b.as_slice().len(), 4 << 20);
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
        }
        drop(bufs);
        assert!(BIG.lock().unwrap().len() <= BIG_KEEP);
        // Reused (another test may take some meanwhile): the new bytes only.
        let b = AlignedBuf::copy_of(&vec![0xEEu8; 3 << 20]);
        assert!(b.as_slice().iter().all(|&x| x == 0xEE));
        assert_eq!((b.as_slice().as_ptr() as usize) % DIRECT_ALIGN, 0);
        // Over the largest request: allocated, and not kept.
        drop(AlignedBuf::copy_of(&vec![1u8; BIG_MAX + 4096]));
        assert!(
            BIG.lock()
                .unwrap()
                .iter()
                .all(|a| a.layout.size() <= BIG_MAX)
        );
    }

    /// A direct read that ends at the member file's end leaves the rest of
    /// the reused buffer as the last request left it: it must read zeros.
    #[test]
    fn a_direct_read_past_the_end_reads_zeros_from_a_reused_buffer() {
        let s = SimStorage::new(1);
        s.create_dir(Path::new("/m")).unwrap();
        let f = s.open(Path::new("/m/x"), OpenMode::CREATE).unwrap();
        f.write_all_at(&[7u8; 4096], 0).unwrap();
        // The thread's spare now holds another request's bytes.
        drop(AlignedBuf::copy_of(&[0xAAu8; 16384]));
        let mut dst = vec![0x55u8; 16384];
        read_full_io(&f, &mut dst, 0, true).unwrap();
        assert_eq!(&dst[..4096], &[7u8; 4096][..]);
        assert!(
            dst[4096..].iter().all(|&x| x == 0),
            "bytes past the end must read as zeros"
        );
    }

    /// An aligned [`ReadBuf`] is read into without the bounce buffer, and
    /// gets the same bytes: the file's, then zeros past its end, whatever
    /// the window held before.
    #[test]
    fn a_direct_read_into_an_aligned_read_buffer_reads_the_file_then_zeros() {
        let s = SimStorage::new(1);
        s.create_dir(Path::new("/m")).unwrap();
        let f = s.open(Path::new("/m/x"), OpenMode::CREATE).unwrap();
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        for len in [4096, 12288, 16384, 1 << 20] {
            let mut b = ReadBuf::zeroed(len, true);
            assert_eq!(b.len(), len);
            assert!((b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN), "{len}");
            b.fill(0x55);
            // The thread's spare holds other bytes; it must not be used.
            drop(AlignedBuf::copy_of(&vec![0xAAu8; len]));
            read_full_io(&f, &mut b, 0, true).unwrap();
            let n = len.min(data.len());
            assert_eq!(&b[..n], &data[..n], "{len}");
            assert!(b[n..].iter().all(|&x| x == 0), "{len}: past the end");
            let v = b.into_vec();
            assert_eq!(v.len(), len);
            assert_eq!(&v[..n], &data[..n]);
        }
        // Unaligned: a plain zeroed vector, moved out as it is.
        let b = ReadBuf::zeroed(100, false);
        assert_eq!(b.into_vec(), vec![0u8; 100]);
        assert_eq!(ReadBuf::from(vec![1, 2, 3]).into_vec(), vec![1, 2, 3]);
        assert!(ReadBuf::zeroed(0, true).is_empty());
    }
}
