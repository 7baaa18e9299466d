//! zstd compression of delta and stream frames with a context kept per
//! thread: `zstd::bulk::compress` creates (and zeroes) a new context for
//! every frame, which cost 14 % of the time of a 64 KiB frame at level 1
//! (docs/perf change 13). The frames are byte for byte the same: a context
//! keeps only its parameters between frames, and each frame starts a new
//! session. Memory: a context holds about 300 KB after 64 KiB frames at
//! level 1, kept by each thread that compresses (the capture, the FUSE
//! workers that append their own copy-before-write, a send, a merge's
//! [`DeltaWriter::add_data`](super::delta::DeltaWriter::add_data), which
//! before kept a context per delta written).

use std::cell::RefCell;
use std::io;

thread_local! {
    /// The thread's context and the level it was made for.
    static CONTEXT: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

/// One zstd frame of `raw` at `level`, with its content size in the header
/// (as `zstd::bulk::compress` writes it).
pub fn compress(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((l, z)) = c.as_mut()
            && *l == level
        {
            return z.compress(raw);
        }
        let mut z = zstd::bulk::Compressor::new(level)?;
        let frame = z.compress(raw);
        *c = Some((level, z));
        frame
    })
}

#[cfg(test)]
mod tests {
    use super::compress;

    /// Frames from the kept context are those of a fresh one, whatever
    /// came before them on the thread and at whichever level.
    #[test]
    fn a_kept_context_writes_the_frames_of_a_fresh_one() {
        let mut x = 7u64;
        let mut data = |n: usize, text: bool| -> Vec<u8> {
            (0..n)
                .map(|i| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if text {
                        b"vpool "[i % 6]
                    } else {
                        (x >> 56) as u8
                    }
                })
                .collect()
        };
        let inputs = [
            data(65536, true),
            data(65536, false),
            data(4096, true),
            Vec::new(),
            data(1 << 20, false),
            data(12288, true),
        ];
        for level in [1, 3, 1, -5, 19, 1] {
            for raw in &inputs {
                let kept = compress(raw, level).unwrap();
                assert_eq!(
                    kept,
                    zstd::bulk::compress(raw, level).unwrap(),
                    "level {level}"
                );
                assert_eq!(zstd::bulk::decompress(&kept, raw.len()).unwrap(), *raw);
            }
        }
    }
}
