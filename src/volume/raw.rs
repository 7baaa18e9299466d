//! The calls on member files underneath the volume: reading a range in
//! full, finding the data ranges of a sparse file, telling whether a range
//! is allocated, and the errno mapping of the I/O path.
//!
//! Invariant: past a member file's end is a hole, and reads as zeros.

use std::io;
#[cfg(test)]
use std::path::Path;

use super::buffers::AlignedBuf;
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
    use crate::volume::ReadBuf;

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
