//! zstd compression of delta and stream frames.
//!
//! - **A context kept per thread.** `zstd::bulk::compress` creates (and
//!   zeroes) a new context for every frame, which cost 14 % of the time of
//!   a 64 KiB frame at level 1 (docs/perf change 13). The frames are byte
//!   for byte the same: a context keeps only its parameters between frames,
//!   and each frame starts a new session. Memory: a context holds about
//!   300 KB after 64 KiB frames at level 1, kept by each thread that
//!   compresses (the capture, the FUSE workers that append their own
//!   copy-before-write, a send, a merge's
//!   [`DeltaWriter::add_data`](super::delta::DeltaWriter::add_data)).
//! - **Incompressible frames skip the compressor** (docs/perf change 14).
//!   On data that does not shrink (an encrypted guest, compressed media,
//!   random test data) zstd spends most of a frame's time building Huffman
//!   tables before it stores the blocks raw. A sample of the frame is
//!   compressed first: 16 pieces of 256 bytes, one in each sixteenth of
//!   the frame at a staggered offset (so that pieces do not all fall at the
//!   starts of 4 KiB file blocks, where a small file's data sits before its
//!   zero tail). If the sample does not shrink by 3 %, the frame is written
//!   as zstd *raw blocks* (`raw_frame`): a valid zstd frame, the bytes
//!   zstd itself writes for data it cannot compress, read by every decoder.
//!   The on-disk formats do not change. ZFS draws such a line at 12.5 %:
//!   saving a few percent is not worth a compressor's time on every write
//!   and a decoder's on every read (fio's "random" buffers compress by
//!   0.7 % at 63 µs per 64 KiB frame, 2.5 times the time of a frame that
//!   zstd stores raw). The price is paid on frames that zstd would shrink
//!   by a few percent: 0.5 % more bytes for the snapshot of an ext4 image of
//!   `/usr`, under 0.05 % for binaries and text alone (docs/perf change 14).

use std::cell::RefCell;
use std::io;

/// Frames shorter than this are always compressed: the sample would be
/// most of the frame.
const SAMPLE_MIN: usize = 16 << 10;
/// The sample: `SAMPLE_PIECES` pieces of `SAMPLE_PIECE` bytes.
const SAMPLE_PIECES: usize = 16;
const SAMPLE_PIECE: usize = 256;
/// The frame is compressed when the sample's zstd frame is shorter than
/// this fraction (in 1/1000) of the sample.
const SAMPLE_KEEP_PER_MILLE: usize = 970;
/// Frames longer than this are always compressed. Up to it, zstd at any
/// level writes a single-segment frame (its window shrinks to the content),
/// so a raw frame here is the one zstd would write and needs no more
/// decoder memory than the content; 16 blocks of up to 32 KiB fit.
const RAW_MAX: usize = 512 << 10;
/// Largest raw block zstd allows (RFC 8878, Block_Maximum_Size).
const BLOCK_MAX: usize = 128 << 10;
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// The thread's context and the level it was made for, and the context
/// for samples (level 1).
struct Contexts {
    frame: Option<(i32, zstd::bulk::Compressor<'static>)>,
    sample: Option<zstd::bulk::Compressor<'static>>,
    buf: Vec<u8>,
}

thread_local! {
    static CONTEXT: RefCell<Contexts> = const {
        RefCell::new(Contexts { frame: None, sample: None, buf: Vec::new() })
    };
}

/// One zstd frame of `raw` at `level`, with its content size in the header
/// (as `zstd::bulk::compress` writes it); raw blocks when a sample of `raw`
/// does not compress.
pub fn compress(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    CONTEXT.with(|c| {
        let c = &mut *c.borrow_mut();
        if (SAMPLE_MIN..=RAW_MAX).contains(&raw.len()) && !sample_shrinks(c, raw)? {
            return Ok(raw_frame(raw));
        }
        if let Some((l, z)) = c.frame.as_mut()
            && *l == level
        {
            return z.compress(raw);
        }
        let mut z = zstd::bulk::Compressor::new(level)?;
        let frame = z.compress(raw);
        c.frame = Some((level, z));
        frame
    })
}

/// Whether the sample of `raw` (at least `SAMPLE_MIN` bytes) compresses to
/// under `SAMPLE_KEEP_PER_MILLE`.
fn sample_shrinks(c: &mut Contexts, raw: &[u8]) -> io::Result<bool> {
    let stride = raw.len() / SAMPLE_PIECES;
    c.buf.clear();
    for i in 0..SAMPLE_PIECES {
        // Staggered: 1237 is prime to 4096, so the pieces sit at different
        // offsets inside 4 KiB blocks.
        let s = i * stride + (i * 1237) % (stride - SAMPLE_PIECE);
        c.buf.extend_from_slice(&raw[s..s + SAMPLE_PIECE]);
    }
    let z = match &mut c.sample {
        Some(z) => z,
        None => c.sample.insert(zstd::bulk::Compressor::new(1)?),
    };
    let n = z.compress(&c.buf)?.len();
    Ok(n * 1000 < c.buf.len() * SAMPLE_KEEP_PER_MILLE)
}

/// The zstd frame of `raw` in raw blocks (RFC 8878 section 3.1.1): magic,
/// a single-segment header with the content size, then blocks of at most
/// 128 KiB, each a 3-byte header (last flag, type 0 = raw, size) and the
/// bytes. No checksum, as `zstd::bulk::compress` writes none.
fn raw_frame(raw: &[u8]) -> Vec<u8> {
    let n = raw.len() as u64;
    let mut out = Vec::with_capacity(raw.len() + 14 + 3 * raw.len().div_ceil(BLOCK_MAX));
    out.extend_from_slice(&ZSTD_MAGIC.to_le_bytes());
    // Frame_Header_Descriptor: Single_Segment_flag (0x20) and the
    // Frame_Content_Size field's size in its top two bits: 1 byte, 2 bytes
    // (stored minus 256), 4 bytes or 8 bytes.
    if n < 256 {
        out.push(0x20);
        out.push(n as u8);
    } else if n < 256 + (1 << 16) {
        out.push(0x60);
        out.extend_from_slice(&((n - 256) as u16).to_le_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(0xA0);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.push(0xE0);
        out.extend_from_slice(&n.to_le_bytes());
    }
    if raw.is_empty() {
        // One empty raw block, marked last.
        out.extend_from_slice(&[1, 0, 0]);
    }
    let mut blocks = raw.chunks(BLOCK_MAX).peekable();
    while let Some(b) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        let header = last | ((b.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{CONTEXT, compress, raw_frame, sample_shrinks};

    /// Whether `compress` gives `raw` to zstd (rather than the raw path).
    fn goes_to_zstd(raw: &[u8]) -> bool {
        CONTEXT.with(|c| sample_shrinks(&mut c.borrow_mut(), raw).unwrap())
    }

    struct Lcg(u64);
    impl Lcg {
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n)
                .map(|_| {
                    self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (self.0 >> 56) as u8
                })
                .collect()
        }
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"vpool "[i % 6]).collect()
    }

    /// Frames from the kept context are those of a fresh one, whatever
    /// came before them on the thread and at whichever level; random data
    /// takes the raw path, which writes zstd's own bytes.
    #[test]
    fn a_kept_context_writes_the_frames_of_a_fresh_one() {
        let mut r = Lcg(7);
        let inputs = [
            text(65536),
            r.bytes(65536),
            text(4096),
            Vec::new(),
            r.bytes(1 << 20),
            r.bytes(super::RAW_MAX),
            text(12288),
            r.bytes(12288),
        ];
        for level in [1, 3, 1, -5, 19, 1] {
            for raw in &inputs {
                let kept = compress(raw, level).unwrap();
                assert_eq!(
                    kept,
                    zstd::bulk::compress(raw, level).unwrap(),
                    "level {level}, {} bytes",
                    raw.len()
                );
                assert_eq!(zstd::bulk::decompress(&kept, raw.len()).unwrap(), *raw);
            }
        }
    }

    /// The raw frame is what zstd writes for data it cannot compress, at
    /// each size of the content-size field and across the 128 KiB block
    /// limit, and every decoder reads it back.
    #[test]
    fn a_raw_frame_is_zstds_own_for_incompressible_data() {
        let mut r = Lcg(11);
        for n in [
            0,
            1,
            100,
            255,
            256,
            4096,
            65535,
            65536,
            65791,
            65792,
            131072,
            131073,
            200000,
            super::RAW_MAX,
        ] {
            let raw = r.bytes(n);
            let frame = raw_frame(&raw);
            for level in [1, 3, 19, -5] {
                let z = zstd::bulk::compress(&raw, level).unwrap();
                assert_eq!(frame, z, "{n} bytes, level {level}");
            }
            assert_eq!(zstd::bulk::decompress(&frame, n).unwrap(), raw, "{n} bytes");
            let mut streamed = Vec::new();
            zstd::stream::copy_decode(&frame[..], &mut streamed).unwrap();
            assert_eq!(streamed, raw, "{n} bytes, streaming decoder");
        }
        // The empty frame, byte by byte: magic, single segment with a 1-byte
        // content size of 0, one empty raw block marked last.
        let h = raw_frame(&[]);
        assert_eq!(h, [0x28, 0xB5, 0x2F, 0xFD, 0x20, 0, 1, 0, 0]);
    }

    /// One compressible 4 KiB block anywhere in a 64 KiB frame of random
    /// data, or a tail of zeros after 3 KiB of random data in every block,
    /// is enough for the frame to be compressed; random data is not.
    #[test]
    fn any_compressible_block_sends_the_frame_to_zstd() {
        let mut r = Lcg(5);
        for k in 0..16 {
            for filler in [vec![0u8; 4096], text(4096)] {
                let mut raw = r.bytes(65536);
                raw[k * 4096..(k + 1) * 4096].copy_from_slice(&filler);
                assert!(goes_to_zstd(&raw), "block {k}");
                let frame = compress(&raw, 1).unwrap();
                assert!(frame.len() < 65536 - 3000, "block {k}: {}", frame.len());
                assert_eq!(zstd::bulk::decompress(&frame, 65536).unwrap(), raw);
            }
        }
        let mut raw = r.bytes(65536);
        for b in raw.chunks_mut(4096) {
            b[3072..].fill(0);
        }
        assert!(goes_to_zstd(&raw));
        let frame = compress(&raw, 1).unwrap();
        assert!(frame.len() < 65536 - 12000, "{}", frame.len());
        // Random data takes the raw path, at every frame length it covers.
        for n in [16 << 10, 65536, 100_000, super::RAW_MAX] {
            let random = r.bytes(n);
            assert!(!goes_to_zstd(&random), "{n} bytes");
            assert_eq!(compress(&random, 1).unwrap(), raw_frame(&random));
        }
        // So does data zstd shrinks by about 1 %: fio's buffers, where one
        // byte in eight has only three random bits (the top ones).
        let mut fio = r.bytes(65536);
        for b in fio.iter_mut().step_by(8) {
            *b &= 0xe0;
        }
        let z = zstd::bulk::compress(&fio, 1).unwrap().len();
        assert!(z < 65536 * 995 / 1000 && z > 65536 * 98 / 100, "{z}");
        assert!(!goes_to_zstd(&fio));
    }
}
