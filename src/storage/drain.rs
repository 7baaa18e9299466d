//! Write-behind drain: waits, off the request path, for the writeback of the
//! ranges streamed writes started, and drops their pages from the cache.
//!
//! A streamed write (the writeback of a sequential writer's pages, which the
//! mount holds until the request is answered) starts the writeback of its
//! range at once. Waiting for it before answering kept as many ranges at the
//! disk as the kernel lets requests be in flight (28), and a 1 GiB flush
//! reached 1.3-1.45 GB/s where the disk takes 2.5 (docs/perf, change 17).
//! The request now hands its range here and is answered after the copy; one
//! thread waits for the ranges in the order they came and drops their pages,
//! so the pages are reused while the host still backs them (change 16).
//!
//! A random writer's short writes behind (the writeback of pages the mount
//! also holds) hand their extent over once per batch written into it, so
//! that their member pages go too once written back (change 21).
//!
//! Invariants: at most `lag` bytes wait here (a range longer than that alone);
//! a caller that would exceed it waits for room, so the members' cache holds
//! at most `lag` bytes of streamed data besides what is being copied. (For an
//! extent handed over by a batch, only the batch counts; an extent already
//! waiting is not queued twice.) Only a
//! hint to the page cache: nothing here changes a file's content or when it
//! is durable (that is `sync_data`'s job), and errors are left to that sync.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::Handle;

/// Bytes of streamed ranges the drain holds at most: 64 MiB is 25 ms of
/// writeback at 2.5 GB/s.
pub const DRAIN_LAG: u64 = 64 << 20;

/// The queue and the thread that drains it (started on first use).
pub struct Drain {
    shared: Arc<Shared>,
}

struct Shared {
    lag: u64,
    state: Mutex<State>,
    /// Signalled when bytes leave the queue.
    room: Condvar,
    /// Signalled when a range arrives or the drain closes.
    work: Condvar,
}

#[derive(Default)]
struct State {
    /// (file, offset, length, bytes counted against the lag).
    queue: VecDeque<(Handle, u64, u64, u64)>,
    /// Bytes counted of the ranges queued or being waited for.
    bytes: u64,
    started: bool,
    closed: bool,
}

impl Drain {
    pub fn new(lag: u64) -> Drain {
        Drain {
            shared: Arc::new(Shared {
                lag,
                state: Mutex::new(State::default()),
                room: Condvar::new(),
                work: Condvar::new(),
            }),
        }
    }

    /// Hands over `[off, off+len)` of `f`, whose writeback was started: the
    /// drain waits for it and drops its pages. Waits for room first.
    pub fn push(&self, f: Handle, off: u64, len: u64) {
        let st = self.shared.state.lock();
        self.enqueue(st, f, off, len, len);
    }

    /// [`Drain::push`] of a range that holds only `counted` bytes written
    /// since its last push (an extent of a random writer, handed over once
    /// per batch written into it): `counted` is what counts against the
    /// lag. A range already waiting, not yet taken, is not queued twice.
    pub fn push_counted(&self, f: Handle, off: u64, len: u64, counted: u64) {
        let st = self.shared.state.lock();
        if st
            .queue
            .iter()
            .any(|(g, o, l, _)| Arc::ptr_eq(g, &f) && (*o, *l) == (off, len))
        {
            return;
        }
        self.enqueue(st, f, off, len, counted);
    }

    /// Queues a range once `counted` more bytes fit in the lag (`st` is the
    /// state, locked by the caller).
    fn enqueue(
        &self,
        mut st: parking_lot::MutexGuard<'_, State>,
        f: Handle,
        off: u64,
        len: u64,
        counted: u64,
    ) {
        let sh = &self.shared;
        while st.bytes > 0 && st.bytes + counted > sh.lag {
            sh.room.wait(&mut st);
        }
        if !st.started {
            let worker = sh.clone();
            let spawned = std::thread::Builder::new()
                .name("vpool-drain".into())
                .spawn(move || worker.run());
            if let Err(e) = spawned {
                // No thread: the caller waits itself, as before the drain.
                drop(st);
                tracing::warn!(error = %e, "cannot start the write-behind drain");
                f.write_behind(off, len, true);
                return;
            }
            st.started = true;
        }
        st.bytes += counted;
        st.queue.push_back((f, off, len, counted));
        sh.work.notify_one();
    }

    /// Waits until every range handed over so far was waited for and dropped.
    pub fn settle(&self) {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        while st.bytes > 0 {
            sh.room.wait(&mut st);
        }
    }
}

impl Drop for Drain {
    /// The thread drains what is queued, then ends.
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.work.notify_all();
    }
}

impl Shared {
    fn run(&self) {
        let mut st = self.state.lock();
        loop {
            let Some((f, off, len, counted)) = st.queue.pop_front() else {
                if st.closed {
                    return;
                }
                self.work.wait(&mut st);
                continue;
            };
            drop(st);
            f.write_behind(off, len, true);
            drop(f);
            st = self.state.lock();
            st.bytes -= counted;
            self.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Alloc, FileIo};
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A file whose waited write-behind blocks until `open` is set, and
    /// records the ranges waited for.
    #[derive(Debug, Default)]
    struct Gate {
        open: AtomicBool,
        waited: Mutex<Vec<(u64, u64)>>,
    }

    impl FileIo for Gate {
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
            Ok(0)
        }
        fn write_at(&self, b: &[u8], _: u64) -> io::Result<usize> {
            Ok(b.len())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn allocated(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn allocate(&self, _: Alloc, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn seek(&self, _: u64, _: bool) -> io::Result<Option<u64>> {
            Ok(None)
        }
        fn allocated_ranges(&self, _: u64, _: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
            Ok(None)
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn write_behind(&self, off: u64, len: u64, wait: bool) {
            assert!(wait, "the drain only waits");
            while !self.open.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.waited.lock().push((off, len));
        }
    }

    /// Ranges are waited for in the order they came; a caller past the lag
    /// waits for room; `settle` returns once all were waited for.
    #[test]
    fn drains_in_order_within_the_lag() {
        let drain = Arc::new(Drain::new(3 << 20));
        let gate = Arc::new(Gate::default());
        let f: Handle = gate.clone();
        for i in 0..3u64 {
            drain.push(f.clone(), i << 20, 1 << 20);
        }
        // The fourth MiB is over the lag while the disk (the gate) holds.
        let pushed = Arc::new(AtomicBool::new(false));
        let t = {
            let (drain, f, pushed) = (drain.clone(), f.clone(), pushed.clone());
            std::thread::spawn(move || {
                drain.push(f, 3 << 20, 1 << 20);
                pushed.store(true, Ordering::Release);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pushed.load(Ordering::Acquire), "pushed past the lag");
        gate.open.store(true, Ordering::Release);
        t.join().unwrap();
        drain.settle();
        let waited = gate.waited.lock().clone();
        assert_eq!(
            waited,
            (0..4u64).map(|i| (i << 20, 1 << 20)).collect::<Vec<_>>()
        );
    }

    /// An extent handed over per batch counts only its batch against the
    /// lag, and one already waiting is not queued again; once the drain has
    /// taken it, the next batch queues it anew.
    #[test]
    fn extents_count_their_batch_and_wait_once() {
        let drain = Arc::new(Drain::new(8 << 20));
        let gate = Arc::new(Gate::default());
        let other = Arc::new(Gate::default());
        other.open.store(true, Ordering::Release);
        let (f, g): (Handle, Handle) = (gate.clone(), other.clone());
        // Parked on the first extent: it is taken, the next ones wait.
        drain.push_counted(f.clone(), 0, 64 << 20, 1 << 20);
        while drain.shared.state.lock().queue.len() == 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..5 {
            drain.push_counted(f.clone(), 64 << 20, 64 << 20, 1 << 20);
        }
        // The same range of another file is another range.
        drain.push_counted(g, 64 << 20, 64 << 20, 1 << 20);
        {
            let st = drain.shared.state.lock();
            assert_eq!(st.queue.len(), 2, "an extent waiting was queued twice");
            assert_eq!(st.bytes, 3 << 20, "only the batches count");
        }
        // Taken by the drain (in write-behind), it can be queued again.
        drain.push_counted(f.clone(), 0, 64 << 20, 1 << 20);
        assert_eq!(drain.shared.state.lock().queue.len(), 3);
        assert_eq!(drain.shared.state.lock().bytes, 4 << 20);
        gate.open.store(true, Ordering::Release);
        drain.settle();
        assert_eq!(
            gate.waited.lock().clone(),
            vec![(0, 64 << 20), (64 << 20, 64 << 20), (0, 64 << 20)]
        );
    }

    /// A range longer than the lag is taken alone, not refused forever.
    #[test]
    fn a_range_longer_than_the_lag_passes_alone() {
        let drain = Drain::new(1 << 20);
        let gate = Arc::new(Gate::default());
        gate.open.store(true, Ordering::Release);
        let f: Handle = gate.clone();
        drain.push(f.clone(), 0, 4 << 20);
        drain.push(f, 4 << 20, 4 << 20);
        drain.settle();
        assert_eq!(gate.waited.lock().len(), 2);
    }
}
