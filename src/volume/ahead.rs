//! The daemon's read-ahead of a sequential reader's next requests.
//!
//! Why: the kernel reads a mount ahead in windows of requests, and before it
//! sends a window it allocates its 4 KiB pages (about 1 ms per 4 MiB request
//! on this kernel). Meanwhile no member read is in flight: in a cold 1 GiB
//! read the member disk idled for a third of the time (docs/perf, change
//! 20). So after a worker answers a long read that continues a stream, it
//! reads the range the kernel will ask for next ([`Volume::read_ahead`]),
//! into a slot; the request for exactly that range takes the slot
//! ([`Volume::read_stream`]), waiting for it if it is still being read.
//!
//! Invariant: a slot is served only if no change to the file's blocks or
//! extent map began after its read started (the volume's change count,
//! bumped under every exclusive stripe lock and every change of the map, is
//! the one the slot took before reading) and the file's size is the one it
//! was read at. A change that began before it holds the blocks' stripes
//! exclusively, so the slot's read, which takes them shared, sees all of it.
//! A slot therefore holds exactly what a read would return now; any other
//! slot is dropped and the request reads the members itself.
//!
//! Bounds: [`SLOTS`] slots per file, each one request long, and
//! [`AHEAD_BYTES`] held by the slots of all files together; the slots of a
//! file are dropped when its last handle closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

use super::buffers::ReadBuf;
use super::{Volume, clip};
use crate::error::FsResult;
use crate::pool::Pool;

/// Requests read ahead per file: two keep a member read in flight across the
/// kernel's pause between windows (one left gaps; docs/perf, change 20).
pub const SLOTS: usize = 2;

/// Bytes held by the slots of every file at once: 16 streams of 4 MiB
/// requests.
pub const AHEAD_BYTES: usize = 128 << 20;

/// Ends of the last requests remembered: a request starting at one of them
/// continues a stream (the kernel's requests of one window reach the
/// workers in any order).
const RECENT: usize = 8;

/// A request starting at most this many requests before the furthest one
/// seen belongs to the same stream (one window of the kernel's requests,
/// answered in any order); one elsewhere starts a new stream.
const NEAR: u64 = 8;

static HELD: AtomicUsize = AtomicUsize::new(0);

/// A file's read-ahead state.
#[derive(Default)]
pub(super) struct Ahead {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// End of the furthest request seen or read ahead.
    frontier: u64,
    /// Ends of the last requests, newest last.
    recent: Vec<u64>,
    slots: Vec<Arc<Slot>>,
}

struct Slot {
    off: u64,
    len: usize,
    /// The file's size when the read started.
    size: u64,
    /// The volume's change count taken before the read.
    changes: u64,
    fill: Mutex<Fill>,
    ready: Condvar,
}

enum Fill {
    Reading,
    Done(ReadBuf),
    /// The read failed or was not wanted: the request reads itself, and
    /// reports the error if there is one.
    Empty,
}

impl Slot {
    /// Waits for the read; the buffer, or `None` if there is none.
    fn wait(&self) -> Option<ReadBuf> {
        let mut f = self.fill.lock();
        while matches!(*f, Fill::Reading) {
            self.ready.wait(&mut f);
        }
        match std::mem::replace(&mut *f, Fill::Empty) {
            Fill::Done(b) => Some(b),
            _ => None,
        }
    }

    fn finish(&self, buf: Option<ReadBuf>) {
        *self.fill.lock() = buf.map_or(Fill::Empty, Fill::Done);
        self.ready.notify_all();
    }
}

/// A slot's claim on [`AHEAD_BYTES`], given back when the slot is dropped
/// (taken, overtaken or forgotten).
impl Drop for Slot {
    fn drop(&mut self) {
        HELD.fetch_sub(self.len, Ordering::AcqRel);
    }
}

impl Volume {
    /// A long read of a cached open (the kernel's readahead): served from
    /// the slot read ahead for exactly this range if there is one and
    /// nothing changed since it was read, else from the members like
    /// [`Volume::read_io`] with `direct`.
    pub fn read_stream(&self, pool: &Pool, off: u64, len: usize, size: u64) -> FsResult<ReadBuf> {
        let len = clip(off, len, size);
        let slot = {
            let mut s = self.ahead.state.lock();
            let end = off + len as u64;
            let hit = s
                .slots
                .iter()
                .position(|x| x.off == off && x.len == len && x.size == size);
            let slot = hit.map(|i| s.slots.swap_remove(i));
            let near = off <= s.frontier && s.frontier - off <= NEAR * len as u64;
            if slot.is_some() || s.recent.contains(&off) || near {
                s.frontier = s.frontier.max(end);
                // A slot this request overlaps, or that the reader has
                // passed, will not be asked for.
                s.slots.retain(|x| x.off >= end);
            } else {
                // Somewhere else: a new stream may start here.
                s.frontier = end;
                s.slots.clear();
            }
            if s.recent.len() == RECENT {
                s.recent.remove(0);
            }
            s.recent.push(end);
            slot
        };
        if let Some(slot) = slot
            && let Some(buf) = slot.wait()
            && self.changes() == slot.changes
        {
            return Ok(buf);
        }
        self.read_io(pool, off, len, size, true)
    }

    /// After a long read at `off` of `len` bytes was answered: if it
    /// continued a stream, reads the next request's range into a slot (see
    /// the module's notes), here, in the worker that answered.
    pub fn read_ahead(&self, pool: &Pool, off: u64, len: usize, size: u64) {
        let len = clip(off, len, size);
        if len == 0 {
            return;
        }
        let slot = {
            let mut s = self.ahead.state.lock();
            let end = off + len as u64;
            let stream = s.recent.contains(&off);
            let pos = s.frontier.max(end);
            let n = clip(pos, len, size);
            if !stream || n == 0 || s.slots.len() >= SLOTS {
                return;
            }
            if HELD.fetch_add(n, Ordering::AcqRel) + n > AHEAD_BYTES {
                HELD.fetch_sub(n, Ordering::AcqRel);
                return;
            }
            let slot = Arc::new(Slot {
                off: pos,
                len: n,
                size,
                changes: self.changes(),
                fill: Mutex::new(Fill::Reading),
                ready: Condvar::new(),
            });
            s.slots.push(slot.clone());
            s.frontier = pos + n as u64;
            slot
        };
        let buf = self.read_io(pool, slot.off, slot.len, size, true).ok();
        slot.finish(buf);
    }

    /// Drops the file's slots (its last handle closed).
    pub fn forget_read_ahead(&self) {
        let mut s = self.ahead.state.lock();
        s.slots.clear();
        s.recent.clear();
        s.frontier = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::{AHEAD_BYTES, SLOTS};

    /// docs/design.md ("Read-ahead in the daemon") states the bounds.
    #[test]
    fn the_design_states_the_bounds() {
        crate::util::assert_design_says(&[
            format!("{SLOTS} slots per file"),
            format!("{} MiB for all files", AHEAD_BYTES >> 20),
        ]);
    }
}
