//! The memory that member I/O goes through: buffers aligned for `O_DIRECT`
//! ([`AlignedBuf`], for writes and unaligned reads) and the reply buffers of
//! reads ([`ReadBuf`]), and where their allocations are kept between
//! requests.
//!
//! Invariants: a [`ReadBuf`] reads as zeros until written, whatever its
//! memory held before (holes read as zeros, and no earlier request's bytes
//! can show); an [`AlignedBuf`] holds unspecified bytes and its users
//! overwrite what they hand on. Kept allocations are bounded: one per thread
//! below [`SPARE_MAX`], and at most [`BIG_KEEP_BYTES`] of longer ones for
//! writes and as much for reads, shared by all threads.

use std::alloc::{Layout, handle_alloc_error};
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::storage::DIRECT_ALIGN;

/// Reply buffers of reads this long or longer are mapped on their own, on a
/// [`HUGE_PAGE`] boundary, and asked to be backed by transparent huge pages
/// (`MADV_HUGEPAGE`; with THP `never`, or none free, they are ordinary
/// pages). The reason is the disk: an `O_DIRECT` transfer into 4 KiB pages
/// reaches it as requests of at most `max_segments` pages (254 on
/// virtio-blk, about 1 MiB), into huge pages as requests of
/// `max_sectors_kb`. fio `O_DIRECT` 4 MiB reads at depth 4 on this
/// machine: 918-1041 MiB/s from 4 KiB pages, 1306-1571 MiB/s from huge
/// pages, where a buffered read of the same file made 1001-1465
/// (docs/perf, change 12). Write buffers stay on the heap: a huge page
/// fault may compact memory, and a burst of concurrent writebacks goes past
/// the kept bound, where each request mapped and unmapped its own; the
/// longest writer stall during a capture rose, and `O_DIRECT` writes
/// gained nothing.
const MAPPED_MIN: usize = SPARE_MAX + 1;
const HUGE_PAGE: usize = 2 << 20;

/// The largest allocation a thread keeps for its next short request.
const SPARE_MAX: usize = 512 << 10;

/// Longer allocations (requests of up to `max_request=`, 16 MiB) are kept
/// in one pool shared by the workers, up to this many bytes in all: kept
/// per thread, 32 to 64 workers could each hold 4-16 MiB.
const BIG_MAX: usize = 16 << 20;
const BIG_KEEP_BYTES: usize = 64 << 20;
/// Kept long heap allocations (writes), and kept mappings (reads).
static BIG: Mutex<Vec<AlignedAlloc>> = Mutex::new(Vec::new());
static READS: Mutex<Vec<AlignedAlloc>> = Mutex::new(Vec::new());

thread_local! {
    /// The allocation of this thread's last short [`AlignedBuf`]: FUSE
    /// workers live as long as the mount, and a fresh allocation per
    /// request cost its page faults and zeroing, 15 % of the CPU of a
    /// streaming write (docs/perf).
    static SPARE: std::cell::Cell<Option<AlignedAlloc>> = const { std::cell::Cell::new(None) };
}

/// Memory aligned to [`DIRECT_ALIGN`], zeroed when made: from the heap, or
/// (reads from [`MAPPED_MIN`] on) a mapping of its own on a huge page
/// boundary.
struct AlignedAlloc {
    ptr: NonNull<u8>,
    size: usize,
    mapped: bool,
}

// SAFETY: the allocation is plain bytes owned by this value alone.
unsafe impl Send for AlignedAlloc {}

impl AlignedAlloc {
    fn zeroed(len: usize, mapped: bool) -> AlignedAlloc {
        if mapped
            && len >= MAPPED_MIN
            && let Some(a) = AlignedAlloc::mapped(len)
        {
            return a;
        }
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .unwrap_or_else(|_| handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(ptr) => AlignedAlloc {
                ptr,
                size: layout.size(),
                mapped: false,
            },
            None => handle_alloc_error(layout),
        }
    }

    /// An anonymous mapping of `len` rounded up to huge pages, starting on
    /// a huge page boundary, advised to be backed by huge pages (`None`
    /// when the kernel refuses the mapping: the heap serves instead).
    fn mapped(len: usize) -> Option<AlignedAlloc> {
        let size = len.checked_next_multiple_of(HUGE_PAGE)?;
        let span = size.checked_add(HUGE_PAGE)?;
        // SAFETY: a new private anonymous mapping; no memory of ours is
        // passed, and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p as usize;
        let start = base.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (start - base, span - (start - base) - size);
        // SAFETY: the head and tail are the parts of the mapping just made
        // outside [start, start + size), which nothing refers to; the
        // advice concerns that range, which this value owns from here on.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        Some(AlignedAlloc {
            ptr: NonNull::new(start as *mut u8)?,
            size,
            mapped: true,
        })
    }
}

impl Drop for AlignedAlloc {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: the mapping made in `mapped`, of exactly this range,
            // unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
        } else {
            // SAFETY: allocated in `zeroed` with this size and alignment
            // (a valid layout then), freed once.
            unsafe {
                std::alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.size, DIRECT_ALIGN),
                )
            }
        }
    }
}

/// A kept allocation of at least `len` bytes, or a new one (`mapped`: for a
/// read, see [`MAPPED_MIN`]).
fn take_alloc(len: usize, mapped: bool) -> AlignedAlloc {
    let mapped = mapped && len >= MAPPED_MIN;
    let kept = if len > SPARE_MAX {
        let pool = if mapped { &READS } else { &BIG };
        let mut big = pool.lock().unwrap_or_else(|p| p.into_inner());
        big.iter()
            .position(|a| a.size >= len)
            .map(|i| big.swap_remove(i))
    } else {
        SPARE.with(|s| s.take())
    };
    match kept {
        Some(a) if a.size >= len => a,
        // None, or too small (dropped; the new one is kept after use).
        _ => AlignedAlloc::zeroed(len, mapped),
    }
}

/// Keeps `a` for a later request, within the bounds, or frees it.
fn keep_alloc(a: AlignedAlloc) {
    if a.size > SPARE_MAX {
        if a.size <= BIG_MAX {
            let pool = if a.mapped { &READS } else { &BIG };
            let mut big = pool.lock().unwrap_or_else(|p| p.into_inner());
            let kept: usize = big.iter().map(|k| k.size).sum();
            if kept + a.size <= BIG_KEEP_BYTES {
                big.push(a);
            }
        }
    } else {
        // Keeps the larger of this one and the spare already kept (after
        // the thread's locals are gone, the closure is dropped unrun and
        // frees it).
        let _ = SPARE.try_with(move |s| {
            let keep = match s.take() {
                Some(old) if old.size >= a.size => old,
                _ => a,
            };
            s.set(Some(keep));
        });
    }
}

/// A buffer aligned to [`DIRECT_ALIGN`], for `O_DIRECT` member I/O: FUSE
/// hands the daemon data at no particular address, so aligned writes are
/// copied through one of these. Its allocation is kept when dropped (see
/// the module doc); a buffer taken from there holds what its last user left
/// (initialised bytes, but possibly another file's data: callers overwrite
/// or zero what they hand on).
pub(super) struct AlignedBuf {
    alloc: Option<AlignedAlloc>,
    len: usize,
}

impl AlignedBuf {
    /// `len` bytes (more than 0) of unspecified content.
    pub(super) fn take(len: usize) -> AlignedBuf {
        AlignedBuf {
            alloc: Some(take_alloc(len, false)),
            len,
        }
    }

    /// [`AlignedBuf::take`] for a read's reply: mapped on huge pages when
    /// long (see [`MAPPED_MIN`]).
    fn take_for_read(len: usize) -> AlignedBuf {
        AlignedBuf {
            alloc: Some(take_alloc(len, true)),
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
        if let Some(a) = self.alloc.take() {
            keep_alloc(a);
        }
    }
}

/// The bytes a read returns: zeros until written (holes read as zeros, and
/// no earlier request's bytes can show), in memory that starts on a
/// [`DIRECT_ALIGN`] boundary when asked for, so that `O_DIRECT` member
/// reads land in it without a copy (the copy through an [`AlignedBuf`] was
/// 11 % of the CPU of a sequential read, docs/perf change 10). Long ones use
/// kept, huge-page-backed mappings, zeroed when taken.
pub struct ReadBuf {
    store: Store,
    len: usize,
}

enum Store {
    /// The bytes from `start` on.
    Heap {
        buf: Vec<u8>,
        start: usize,
    },
    Aligned(AlignedBuf),
}

impl ReadBuf {
    /// `len` zero bytes; `aligned`: starting on a [`DIRECT_ALIGN`]
    /// boundary.
    pub fn zeroed(len: usize, aligned: bool) -> ReadBuf {
        if !aligned || len == 0 {
            return ReadBuf::from(vec![0; len]);
        }
        if len >= MAPPED_MIN {
            let mut b = AlignedBuf::take_for_read(len);
            // The allocation may hold an earlier request's bytes.
            b.as_mut_slice().fill(0);
            return ReadBuf {
                store: Store::Aligned(b),
                len,
            };
        }
        let buf = vec![0u8; len + DIRECT_ALIGN - 1];
        let start = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        ReadBuf {
            store: Store::Heap { buf, start },
            len,
        }
    }

    /// The bytes as a `Vec` (a move when they start at 0, the unaligned
    /// case; else one copy).
    pub fn into_vec(self) -> Vec<u8> {
        match self.store {
            Store::Heap { mut buf, start } => {
                if start != 0 {
                    buf.copy_within(start..start + self.len, 0);
                }
                buf.truncate(self.len);
                buf
            }
            Store::Aligned(b) => b.as_slice().to_vec(),
        }
    }
}

impl From<Vec<u8>> for ReadBuf {
    fn from(buf: Vec<u8>) -> ReadBuf {
        let len = buf.len();
        ReadBuf {
            store: Store::Heap { buf, start: 0 },
            len,
        }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.store {
            Store::Heap { buf, start } => &buf[*start..*start + self.len],
            Store::Aligned(b) => b.as_slice(),
        }
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Heap { buf, start } => &mut buf[*start..*start + self.len],
            Store::Aligned(b) => b.as_mut_slice(),
        }
    }
}

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The figures design section 2 gives.
    #[test]
    fn buffer_bounds_are_as_documented() {
        assert_eq!(SPARE_MAX, 512 << 10);
        assert_eq!(MAPPED_MIN, SPARE_MAX + 1);
        assert_eq!(HUGE_PAGE, 2 << 20);
        assert_eq!(BIG_KEEP_BYTES, 64 << 20);
        assert_eq!(BIG_MAX, 16 << 20, "the largest max_request=");
    }

    /// Buffers of long writes (over a thread's spare) are shared and
    /// bounded: reused with the new bytes in them, never more than
    /// [`BIG_KEEP_BYTES`] kept; they are heap memory, not mappings.
    #[test]
    fn long_request_buffers_are_shared_and_bounded() {
        let n = BIG_KEEP_BYTES / (4 << 20) + 4;
        let bufs: Vec<AlignedBuf> = (0..n)
            .map(|i| AlignedBuf::copy_of(&vec![i as u8; 4 << 20]))
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b.as_slice().len(), 4 << 20);
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
            assert!(!b.alloc.as_ref().unwrap().mapped);
        }
        drop(bufs);
        let kept = |big: &Vec<AlignedAlloc>| big.iter().map(|a| a.size).sum::<usize>();
        assert!(kept(&BIG.lock().unwrap()) <= BIG_KEEP_BYTES);
        // Reused (another test may take some meanwhile): the new bytes only.
        let b = AlignedBuf::copy_of(&vec![0xEEu8; 3 << 20]);
        assert!(b.as_slice().iter().all(|&x| x == 0xEE));
        assert_eq!((b.as_slice().as_ptr() as usize) % DIRECT_ALIGN, 0);
        // Over the largest request: allocated, and not kept.
        drop(AlignedBuf::copy_of(&vec![1u8; BIG_MAX + 4096]));
        let big = BIG.lock().unwrap();
        assert!(big.iter().all(|a| a.size <= BIG_MAX));
        assert!(kept(&big) <= BIG_KEEP_BYTES);
    }

    /// A long read buffer whose memory an earlier request filled reads as
    /// zeros (its allocation is reused); it is mapped on a huge page
    /// boundary, and the kept mappings are bounded.
    #[test]
    fn a_long_read_buffer_reads_zeros_whatever_its_memory_held() {
        for len in [MAPPED_MIN, 4 << 20, (4 << 20) + 4096] {
            // Fill the kept mappings with other bytes.
            let fill: Vec<AlignedBuf> = (0..4)
                .map(|_| {
                    let mut b = AlignedBuf::take_for_read(len);
                    b.as_mut_slice().fill(0xA5);
                    b
                })
                .collect();
            drop(fill);
            let mut b = ReadBuf::zeroed(len, true);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0), "{len}: stale bytes");
            assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
            b[len - 1] = 7;
            let v = b.into_vec();
            assert_eq!(v.len(), len);
            assert_eq!(v[len - 1], 7);
        }
        let reads = READS.lock().unwrap();
        assert!(reads.iter().map(|a| a.size).sum::<usize>() <= BIG_KEEP_BYTES);
        assert!(reads.iter().all(|a| a.mapped));
    }
}
