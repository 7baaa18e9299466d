//! The calls on member files underneath the volume: reading a range in
//! full, finding the data ranges of a sparse file, telling whether a range
//! is allocated, and the errno mapping of the I/O path.
//!
//! Invariant: past a member file's end is a hole, and reads as zeros.

use std::io;

use crate::error::{FsError, FsResult};
use crate::storage::Handle;

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
