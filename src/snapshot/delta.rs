//! The delta file of one file (inode) in one snapshot, format version 1.
//!
//! A delta maps block ranges of the file to zstd-compressed data frames,
//! "zero" runs (allocated, reading as zeros) or "hole" runs (unallocated);
//! blocks it does not mention are resolved in an older snapshot (see
//! [`super::flatten`]). All integers are little-endian.
//!
//! Header, 64 bytes at offset 0:
//!
//! | Offset | Size | Field |
//! |---:|---:|---|
//! | 0 | 8 | magic `VPOOLDLT` |
//! | 8 | 4 | u32 version = 1 |
//! | 12 | 4 | u32 header length = 64 |
//! | 16 | 8 | u64 snapshot id |
//! | 24 | 8 | u64 base snapshot id (0 = none) |
//! | 32 | 8 | u64 inode |
//! | 40 | 8 | u64 file size (bytes) |
//! | 48 | 4 | u32 block size (power of two, 512 ..= [`MAX_BLOCK_SIZE`]) |
//! | 52 | 4 | u32 flags = 0 (a reader rejects others) |
//! | 56 | 4 | u32 reserved = 0 (not checked) |
//! | 60 | 4 | u32 CRC-32C of bytes 0..60 |
//!
//! Then the data frames, back to back: each one is the zstd compression of
//! `count * block_size` bytes, the consecutive blocks of one data entry
//! (`1 <= count <=` [`MAX_FRAME_BLOCKS`]).
//!
//! Then the index, `entry_count` entries of 32 bytes, sorted by start and not
//! overlapping:
//!
//! | Offset | Size | Field |
//! |---:|---:|---|
//! | 0 | 8 | u64 first block |
//! | 8 | 4 | u32 block count (>= 1) |
//! | 12 | 1 | u8 kind: 0 data, 1 zero, 2 hole |
//! | 13 | 3 | padding = 0 |
//! | 16 | 8 | u64 data: file offset of the frame, else 0 |
//! | 24 | 4 | u32 data: compressed length (>= 1), else 0 |
//! | 28 | 4 | u32 data: CRC-32C of the compressed frame, else 0 |
//!
//! Then the footer, the last 40 bytes of the file:
//!
//! | Offset | Size | Field |
//! |---:|---:|---|
//! | 0 | 8 | magic `VPDLTEND` |
//! | 8 | 8 | u64 index offset |
//! | 16 | 8 | u64 entry count |
//! | 24 | 4 | u32 CRC-32C of the index bytes |
//! | 28 | 4 | u32 reserved = 0 (not checked) |
//! | 32 | 4 | u32 CRC-32C of footer bytes 0..32 |
//! | 36 | 4 | u32 reserved = 0 (outside the CRC, so a reader requires 0) |
//!
//! Every byte of the file is covered by a checksum (header, frame, index or
//! footer CRC) or, for the last 4 bytes, required to be 0, so any single-byte
//! damage is reported as [`DeltaError::Corrupt`], either by
//! [`DeltaFile::open`] or by reading the damaged frame.
//!
//! Write order ([`DeltaWriter`]): header, frames (appended as they come),
//! index, footer, `fdatasync`. A file without a valid footer is incomplete
//! (the writer crashed) and never opens; the caller must not reference a delta
//! before [`DeltaWriter::finish`] returned, and is responsible for fsyncing the
//! directory holding it.
//!
//! Why one file of about 1,500 lines: one job, the delta format; the
//! writer and the reader share its layout and checks, and about 540 lines
//! are tests (every byte flipped, every truncation) kept next to the format
//! they pin.

use crate::bytes::Fields;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{Handle, OpenMode, Storage};

use serde::{Deserialize, Serialize};

/// `VPOOLDLT`: first 8 bytes of a delta file.
pub const MAGIC: [u8; 8] = *b"VPOOLDLT";
/// `VPDLTEND`: first 8 bytes of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"VPDLTEND";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
pub const ENTRY_LEN: u64 = 32;
pub const FOOTER_LEN: u64 = 40;
/// Most blocks in one data frame.
pub const MAX_FRAME_BLOCKS: u32 = 256;
pub const MIN_BLOCK_SIZE: u32 = crate::pool::label::MIN_BLOCK_SIZE;
/// Largest block size, the pool's: keeps a frame at most 256 MiB
/// uncompressed, so its compressed length (at most slightly more) always fits
/// the u32 `clen`, and bounds what reading one frame allocates.
pub const MAX_BLOCK_SIZE: u32 = crate::pool::label::MAX_BLOCK_SIZE;
/// Index bytes read at a time by [`DeltaFile::open`].
const INDEX_CHUNK: usize = 64 << 10;
const _: () = assert!(INDEX_CHUNK.is_multiple_of(ENTRY_LEN as usize));

/// Errors of delta files. A caller's mistake (bad data length, block number
/// overflow, reading a non-data entry...) is an `Io` error of kind
/// [`io::ErrorKind::InvalidInput`], and nothing was written.
#[derive(thiserror::Error, Debug)]
pub enum DeltaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt delta{}: {reason}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Corrupt {
        path: PathBuf,
        /// Where in the file, when known.
        offset: Option<u64>,
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DeltaError + '_ {
    move |source| DeltaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> DeltaError {
    DeltaError::Corrupt {
        path: path.to_path_buf(),
        offset: None,
        reason: reason.into(),
    }
}

fn corrupt_at(path: &Path, offset: u64, reason: impl Into<String>) -> DeltaError {
    DeltaError::Corrupt {
        path: path.to_path_buf(),
        offset: Some(offset),
        reason: reason.into(),
    }
}

/// A caller's mistake: `Io` of kind `InvalidInput`.
fn invalid(path: &Path, reason: impl Into<String>) -> DeltaError {
    DeltaError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, reason.into()),
    }
}

fn check_block_size(block_size: u32) -> Result<(), String> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(format!(
            "block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// Blocks stored in a frame.
    Data,
    /// Allocated blocks reading as zeros.
    Zero,
    /// Unallocated blocks.
    Hole,
}

impl EntryKind {
    fn to_u8(self) -> u8 {
        match self {
            EntryKind::Data => 0,
            EntryKind::Zero => 1,
            EntryKind::Hole => 2,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(EntryKind::Data),
            1 => Some(EntryKind::Zero),
            2 => Some(EntryKind::Hole),
            _ => None,
        }
    }
}

/// One index entry: blocks `[start, start + count)`.
///
/// For `Data`, `offset`/`clen`/`crc` locate and check the frame; for the other
/// kinds they are 0. Entries of a valid delta have `count >= 1` and
/// `start + count` does not overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub start: u64,
    pub count: u32,
    pub kind: EntryKind,
    pub offset: u64,
    pub clen: u32,
    pub crc: u32,
}

impl Entry {
    /// First block after the entry (saturating, so a damaged entry cannot
    /// overflow; exact for every entry of a valid delta).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(u64::from(self.count))
    }

    fn encode(&self) -> [u8; ENTRY_LEN as usize] {
        let mut b = [0u8; ENTRY_LEN as usize];
        b[0..8].copy_from_slice(&self.start.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12] = self.kind.to_u8();
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.clen.to_le_bytes());
        b[28..32].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes and checks one entry on its own (not its place in the file):
    /// `b` is [`ENTRY_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Entry, String> {
        let f = Fields::exact(b, ENTRY_LEN as usize, "index entry")?;
        let kind = EntryKind::from_u8(f.u8(12))
            .ok_or_else(|| format!("unknown entry kind {}", f.u8(12)))?;
        if f.bytes(13, 3) != [0, 0, 0] {
            return Err("nonzero entry padding".into());
        }
        let e = Entry {
            start: f.u64(0),
            count: f.u32(8),
            kind,
            offset: f.u64(16),
            clen: f.u32(24),
            crc: f.u32(28),
        };
        if e.count == 0 {
            return Err(format!("entry at block {} has no blocks", e.start));
        }
        if e.start.checked_add(u64::from(e.count)).is_none() {
            return Err(format!("entry at block {} overflows", e.start));
        }
        match kind {
            EntryKind::Data => {
                if e.count > MAX_FRAME_BLOCKS {
                    return Err(format!(
                        "data entry at block {} has {} blocks (max {MAX_FRAME_BLOCKS})",
                        e.start, e.count
                    ));
                }
                if e.clen == 0 {
                    return Err(format!(
                        "data entry at block {} has an empty frame",
                        e.start
                    ));
                }
            }
            EntryKind::Zero | EntryKind::Hole => {
                if e.offset != 0 || e.clen != 0 || e.crc != 0 {
                    return Err(format!(
                        "{kind:?} entry at block {} has frame fields set",
                        e.start
                    ));
                }
            }
        }
        Ok(e)
    }
}

/// The identity of a delta, stored in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    pub snap_id: u64,
    /// Snapshot this one is a delta against; 0 = none.
    pub base_id: u64,
    pub ino: u64,
    /// File size in bytes at the snapshot.
    pub file_size: u64,
    pub block_size: u32,
}

impl DeltaHeader {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.snap_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.ino.to_le_bytes());
        b[40..48].copy_from_slice(&self.file_size.to_le_bytes());
        b[48..52].copy_from_slice(&self.block_size.to_le_bytes());
        // 52 flags = 0, 56 reserved = 0.
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: `b` is [`HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<DeltaHeader, String> {
        let f = Fields::exact(b, HEADER_LEN as usize, "header")?;
        if f.bytes(0, 8) != MAGIC {
            return Err("bad header magic".into());
        }
        if !f.crc_ok(60) {
            return Err("header checksum mismatch".into());
        }
        let version = f.u32(8);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let header_len = f.u32(12);
        if u64::from(header_len) != HEADER_LEN {
            return Err(format!("unsupported header length {header_len}"));
        }
        let flags = f.u32(52);
        if flags != 0 {
            return Err(format!("unsupported flags {flags:#x}"));
        }
        let h = DeltaHeader {
            snap_id: f.u64(16),
            base_id: f.u64(24),
            ino: f.u64(32),
            file_size: f.u64(40),
            block_size: f.u32(48),
        };
        check_block_size(h.block_size)?;
        Ok(h)
    }
}

/// Who a delta belongs to: what its reader expects its header to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaId {
    pub snap_id: u64,
    /// 0 = none.
    pub base_id: u64,
    pub ino: u64,
    pub block_size: u32,
}

impl DeltaHeader {
    pub fn id(&self) -> DeltaId {
        DeltaId {
            snap_id: self.snap_id,
            base_id: self.base_id,
            ino: self.ino,
            block_size: self.block_size,
        }
    }

    /// Checks that the header names `want`; the error lists both.
    pub fn check_id(&self, want: &DeltaId) -> Result<(), String> {
        let got = self.id();
        if got != *want {
            return Err(format!(
                "header names snapshot {} (base {}), inode {}, block size {}; expected snapshot {} (base {}), inode {}, block size {}",
                got.snap_id,
                got.base_id,
                got.ino,
                got.block_size,
                want.snap_id,
                want.base_id,
                want.ino,
                want.block_size
            ));
        }
        Ok(())
    }
}

/// The footer's fields, checked against the length of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub index_offset: u64,
    pub entry_count: u64,
    pub index_crc: u32,
}

impl Footer {
    /// Decodes and checks the footer of a file of `file_len` bytes: `b` is
    /// its last [`FOOTER_LEN`] bytes; the index must lie between the header
    /// and the footer and end exactly where the footer starts.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Footer, String> {
        let r = Fields::exact(b, FOOTER_LEN as usize, "footer")?;
        if file_len < HEADER_LEN + FOOTER_LEN {
            return Err(format!("{file_len} bytes, shorter than header and footer"));
        }
        if r.bytes(0, 8) != FOOTER_MAGIC {
            return Err("bad footer magic (incomplete or truncated file)".into());
        }
        if !r.crc_ok(32) {
            return Err("footer checksum mismatch".into());
        }
        if r.u32(36) != 0 {
            return Err("nonzero reserved footer bytes 36..40".into());
        }
        let f = Footer {
            index_offset: r.u64(8),
            entry_count: r.u64(16),
            index_crc: r.u32(24),
        };
        let index_end = file_len - FOOTER_LEN;
        let index_len = f.entry_count.checked_mul(ENTRY_LEN);
        if f.index_offset < HEADER_LEN
            || index_len.and_then(|l| f.index_offset.checked_add(l)) != Some(index_end)
        {
            return Err(format!(
                "index of {} entries at {} does not end at the footer ({index_end})",
                f.entry_count, f.index_offset
            ));
        }
        Ok(f)
    }
}

fn encode_footer(index_offset: u64, entry_count: u64, index_crc: u32) -> [u8; FOOTER_LEN as usize] {
    let mut b = [0u8; FOOTER_LEN as usize];
    b[0..8].copy_from_slice(&FOOTER_MAGIC);
    b[8..16].copy_from_slice(&index_offset.to_le_bytes());
    b[16..24].copy_from_slice(&entry_count.to_le_bytes());
    b[24..28].copy_from_slice(&index_crc.to_le_bytes());
    // 28 reserved = 0.
    let crc = crc32c::crc32c(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    // 36 reserved = 0.
    b
}

/// Reads `e`'s compressed frame and checks its CRC.
fn read_raw_at(file: &Handle, path: &Path, e: &Entry) -> Result<Vec<u8>, DeltaError> {
    if e.kind != EntryKind::Data {
        return Err(invalid(
            path,
            format!("entry at block {} is {:?}, not data", e.start, e.kind),
        ));
    }
    let mut buf = vec![0u8; e.clen as usize];
    file.read_exact_at(&mut buf, e.offset).map_err(|err| {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(
                path,
                format!(
                    "frame of block {} ({} bytes at {}) extends past the end of the file",
                    e.start, e.clen, e.offset
                ),
            )
        } else {
            io_err(path)(err)
        }
    })?;
    let crc = crc32c::crc32c(&buf);
    if crc != e.crc {
        return Err(corrupt_at(
            path,
            e.offset,
            format!(
                "frame of block {} at offset {}: checksum {crc:#010x}, expected {:#010x}",
                e.start, e.offset, e.crc
            ),
        ));
    }
    Ok(buf)
}

/// Reads, checks and decompresses the frame of data entry `e` from `file`:
/// returns exactly `e.count * block_size` bytes. A checksum mismatch, a short
/// file, a zstd error or a wrong decompressed length is `Corrupt`; a non-data
/// entry or an invalid block size is an `InvalidInput` error.
pub fn read_frame_at(
    file: &Handle,
    path: &Path,
    e: &Entry,
    block_size: u32,
) -> Result<Vec<u8>, DeltaError> {
    check_block_size(block_size).map_err(|r| invalid(path, r))?;
    if e.kind == EntryKind::Data && !(1..=MAX_FRAME_BLOCKS).contains(&e.count) {
        return Err(corrupt(
            path,
            format!("data entry at block {} has {} blocks", e.start, e.count),
        ));
    }
    let raw = read_raw_at(file, path, e)?;
    // At most 256 blocks of at most 1 MiB: no overflow.
    let want = e.count as usize * block_size as usize;
    // The frame says how much it holds (every frame written here does): a
    // wrong size is refused before `want` bytes are allocated for it.
    match zstd::zstd_safe::get_frame_content_size(&raw) {
        Ok(Some(n)) if n == want as u64 => {}
        Ok(Some(n)) => {
            return Err(corrupt(
                path,
                format!(
                    "frame of block {} at offset {} holds {n} bytes, expected {want}",
                    e.start, e.offset
                ),
            ));
        }
        Ok(None) | Err(_) => {
            return Err(corrupt(
                path,
                format!(
                    "frame of block {} at offset {}: no zstd frame with its content size",
                    e.start, e.offset
                ),
            ));
        }
    }
    let data = zstd::bulk::decompress(&raw, want).map_err(|err| {
        corrupt(
            path,
            format!(
                "frame of block {} at offset {}: zstd: {err}",
                e.start, e.offset
            ),
        )
    })?;
    if data.len() != want {
        return Err(corrupt(
            path,
            format!(
                "frame of block {} at offset {} holds {} bytes, expected {want}",
                e.start,
                e.offset,
                data.len()
            ),
        ));
    }
    Ok(data)
}

/// Bytes of a delta written between two write-behind steps
/// ([`crate::storage::FileIo::write_behind`]).
const WRITE_BEHIND: u64 = 8 << 20;

/// Writes one delta, the same bytes to every path (copies on different
/// members).
///
/// Invariant: every file holds the header and the frames of `entries` in
/// `[HEADER_LEN, offset)`, identically. A writer dropped without
/// [`finish`](Self::finish) succeeding removes its files (as
/// [`abandon`](Self::abandon) does).
pub struct DeltaWriter {
    storage: Arc<dyn Storage>,
    paths: Vec<PathBuf>,
    files: Vec<Handle>,
    header: DeltaHeader,
    /// zstd level of [`add_data`](Self::add_data)'s frames (compressed
    /// with the thread's kept context, `snapshot/compress.rs`).
    level: i32,
    /// In insertion order; sorted by `finish`.
    entries: Vec<Entry>,
    /// Where the next frame goes: bytes written so far.
    offset: u64,
    /// Write-behind: writeback was started for `[.., started)` and waited
    /// for (pages dropped) for `[.., flushed)`; `flushed <= started <=
    /// offset`. At most two [`WRITE_BEHIND`] windows of a delta are dirty.
    started: u64,
    flushed: u64,
    /// Finished: `Drop` leaves the files alone.
    finished: bool,
}

impl DeltaWriter {
    /// Creates every file (`create_new`: an existing file is an error) and
    /// writes the header. On an error, files already created are removed.
    pub fn create(
        storage: Arc<dyn Storage>,
        paths: &[PathBuf],
        header: &DeltaHeader,
        level: i32,
    ) -> Result<DeltaWriter, DeltaError> {
        let Some(first) = paths.first() else {
            return Err(invalid(Path::new(""), "no path to write the delta to"));
        };
        check_block_size(header.block_size).map_err(|r| invalid(first, r))?;
        let mut w = DeltaWriter {
            storage,
            paths: Vec::with_capacity(paths.len()),
            files: Vec::with_capacity(paths.len()),
            header: header.clone(),
            level,
            entries: Vec::new(),
            offset: 0,
            started: 0,
            flushed: 0,
            finished: false,
        };
        for path in paths {
            // On an error, dropping `w` removes the files created so far.
            let file = w.storage.open(path, OpenMode::NEW).map_err(io_err(path))?;
            w.paths.push(path.clone());
            w.files.push(file);
        }
        w.write_all(&header.encode(), 0)?;
        w.offset = HEADER_LEN;
        Ok(w)
    }

    /// `bytes` at `offset` in every file.
    fn write_all(&self, bytes: &[u8], offset: u64) -> Result<(), DeltaError> {
        for (file, path) in self.files.iter().zip(&self.paths) {
            file.write_all_at(bytes, offset).map_err(io_err(path))?;
        }
        Ok(())
    }

    fn first_path(&self) -> &Path {
        // `create` guarantees at least one path.
        &self.paths[0]
    }

    /// Appends a frame to every file and records its data entry.
    fn append_frame(
        &mut self,
        start: u64,
        count: u32,
        compressed: &[u8],
        crc: u32,
    ) -> Result<Entry, DeltaError> {
        let clen = u32::try_from(compressed.len())
            .map_err(|_| invalid(self.first_path(), "compressed frame exceeds 4 GiB"))?;
        // A failed write leaves `offset` as it was: the next frame, or the
        // index, overwrites what it left, and `finish` cuts the files at
        // their final length.
        self.write_all(compressed, self.offset)?;
        let e = Entry {
            start,
            count,
            kind: EntryKind::Data,
            offset: self.offset,
            clen,
            crc,
        };
        self.offset += u64::from(clen);
        self.entries.push(e);
        self.write_behind();
        Ok(e)
    }

    /// Once a window past `started` is written: starts its writeback, and
    /// waits for the window before it. A delta is written once and read
    /// rarely, so its pages need not stay in the cache either.
    fn write_behind(&mut self) {
        if self.offset - self.started < WRITE_BEHIND {
            return;
        }
        for f in &self.files {
            f.write_behind(self.started, self.offset - self.started, false);
            if self.started > self.flushed {
                f.write_behind(self.flushed, self.started - self.flushed, true);
            }
        }
        self.flushed = self.started;
        self.started = self.offset;
    }

    fn check_run(&self, start: u64, count: u64) -> Result<(), DeltaError> {
        if start.checked_add(count).is_none() {
            return Err(invalid(
                self.first_path(),
                format!("{count} blocks at block {start} overflow"),
            ));
        }
        Ok(())
    }

    /// Compresses `data`, the blocks `start..`, into one frame and appends it.
    /// `data.len()` must be a nonzero multiple of the block size, at most
    /// [`MAX_FRAME_BLOCKS`] blocks.
    pub fn add_data(&mut self, start: u64, data: &[u8]) -> Result<Entry, DeltaError> {
        let bs = self.header.block_size as usize;
        if data.is_empty()
            || !data.len().is_multiple_of(bs)
            || data.len() / bs > MAX_FRAME_BLOCKS as usize
        {
            return Err(invalid(
                self.first_path(),
                format!(
                    "data of {} bytes is not 1..={MAX_FRAME_BLOCKS} blocks of {bs}",
                    data.len()
                ),
            ));
        }
        let count = (data.len() / bs) as u32;
        self.check_run(start, u64::from(count))?;
        let compressed =
            super::compress::compress(data, self.level).map_err(io_err(&self.paths[0]))?;
        let crc = crc32c::crc32c(&compressed);
        self.append_frame(start, count, &compressed, crc)
    }

    /// Appends a frame copied verbatim from another delta (as returned by
    /// [`DeltaFile::read_raw`]) for the blocks `start..start + count`, after
    /// checking `crc` against it. The source must have the same block size.
    pub fn add_raw(
        &mut self,
        start: u64,
        count: u32,
        compressed: &[u8],
        crc: u32,
    ) -> Result<Entry, DeltaError> {
        if !(1..=MAX_FRAME_BLOCKS).contains(&count) || compressed.is_empty() {
            return Err(invalid(
                self.first_path(),
                format!(
                    "raw frame of {count} blocks, {} bytes: not 1..={MAX_FRAME_BLOCKS} blocks or empty",
                    compressed.len()
                ),
            ));
        }
        self.check_run(start, u64::from(count))?;
        let actual = crc32c::crc32c(compressed);
        if actual != crc {
            return Err(corrupt(
                self.first_path(),
                format!(
                    "raw frame for block {start}: checksum {actual:#010x}, expected {crc:#010x}"
                ),
            ));
        }
        self.append_frame(start, count, compressed, crc)
    }

    /// Records `count` blocks from `start` as `kind` (zero or hole), in new
    /// entries of at most `u32::MAX` blocks each.
    fn add_run(
        &mut self,
        kind: EntryKind,
        mut start: u64,
        mut count: u64,
    ) -> Result<(), DeltaError> {
        self.check_run(start, count)?;
        while count > 0 {
            let take = count.min(u64::from(u32::MAX));
            self.entries.push(Entry {
                start,
                count: take as u32,
                kind,
                offset: 0,
                clen: 0,
                crc: 0,
            });
            start += take;
            count -= take;
        }
        Ok(())
    }

    /// Blocks `start..start + count` are allocated and read as zeros.
    pub fn add_zero(&mut self, start: u64, count: u64) -> Result<(), DeltaError> {
        self.add_run(EntryKind::Zero, start, count)
    }

    /// Blocks `start..start + count` are unallocated.
    pub fn add_hole(&mut self, start: u64, count: u64) -> Result<(), DeltaError> {
        self.add_run(EntryKind::Hole, start, count)
    }

    /// Entries so far, in insertion order. Every `add_*` call only appends
    /// (adjacent runs are never merged into an earlier entry), so the entries
    /// past the length taken before a call are exactly what it added.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Bytes written to each file so far (header and frames).
    pub fn stored_bytes(&self) -> u64 {
        self.offset
    }

    /// Reads back a frame already appended (from the first file), to serve
    /// reads while the delta is being written.
    pub fn read_frame(&self, e: &Entry) -> Result<Vec<u8>, DeltaError> {
        if e.offset < HEADER_LEN || e.offset.saturating_add(u64::from(e.clen)) > self.offset {
            return Err(invalid(
                self.first_path(),
                format!(
                    "frame of block {} at offset {} was not written",
                    e.start, e.offset
                ),
            ));
        }
        read_frame_at(&self.files[0], &self.paths[0], e, self.header.block_size)
    }

    /// Sorts the entries, writes index and footer to every file, cuts every
    /// file at its final length and fdatasyncs it. Returns the sorted entries
    /// and the file length. Overlapping entries are `Corrupt`; on any error
    /// the files are removed.
    pub fn finish(mut self) -> Result<(Vec<Entry>, u64), DeltaError> {
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort_by_key(|e| e.start);
        for w in entries.windows(2) {
            if w[0].end() > w[1].start {
                return Err(corrupt(
                    self.first_path(),
                    format!(
                        "entries overlap: blocks {}..{} ({:?}) and {}..{} ({:?})",
                        w[0].start,
                        w[0].end(),
                        w[0].kind,
                        w[1].start,
                        w[1].end(),
                        w[1].kind
                    ),
                ));
            }
        }
        let index_offset = self.offset;
        let mut tail = Vec::with_capacity(entries.len() * ENTRY_LEN as usize + FOOTER_LEN as usize);
        for e in &entries {
            tail.extend_from_slice(&e.encode());
        }
        let index_crc = crc32c::crc32c(&tail);
        tail.extend_from_slice(&encode_footer(
            index_offset,
            entries.len() as u64,
            index_crc,
        ));
        self.write_all(&tail, index_offset)?;
        let len = index_offset + tail.len() as u64;
        for (file, path) in self.files.iter().zip(&self.paths) {
            file.set_len(len).map_err(io_err(path))?;
            file.sync_data().map_err(io_err(path))?;
        }
        self.finished = true;
        Ok((entries, len))
    }

    /// Gives up: removes the files.
    pub fn abandon(self) {
        // `Drop` removes them.
    }
}

impl std::fmt::Debug for DeltaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaWriter")
            .field("paths", &self.paths)
            .field("header", &self.header)
            .field("entries", &self.entries.len())
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Drop for DeltaWriter {
    fn drop(&mut self) {
        if !self.finished {
            for path in &self.paths {
                // Best effort: an incomplete delta never opens anyway.
                let _ = self.storage.remove_file(path);
            }
        }
    }
}

/// An open, validated delta file.
#[derive(Debug)]
pub struct DeltaFile {
    pub header: DeltaHeader,
    /// Sorted by start, not overlapping, frames inside the frame area.
    pub entries: Vec<Entry>,
    /// File length in bytes.
    pub len: u64,
    path: PathBuf,
    file: Handle,
}

impl DeltaFile {
    /// Opens and validates a delta: header (magic, checksum, version, length,
    /// flags, block size), footer (magic, checksum), index (bounds: it ends
    /// exactly where the footer starts; checksum), every entry (kind, padding,
    /// count, frame fields), entries sorted and not overlapping, data frames
    /// inside `[HEADER_LEN, index_offset)`. Frames themselves are checked when
    /// read ([`verify`](Self::verify) reads them all).
    pub fn open(s: &dyn Storage, path: impl AsRef<Path>) -> Result<DeltaFile, DeltaError> {
        let path = path.as_ref();
        let file = s.open(path, OpenMode::READ).map_err(io_err(path))?;
        let len = file.len().map_err(io_err(path))?;
        if len < HEADER_LEN + FOOTER_LEN {
            return Err(corrupt(
                path,
                format!("{len} bytes, shorter than header and footer"),
            ));
        }
        let mut hb = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut hb, 0).map_err(io_err(path))?;
        let header = DeltaHeader::decode(&hb).map_err(|r| corrupt_at(path, 0, r))?;

        let mut fb = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut fb, len - FOOTER_LEN)
            .map_err(io_err(path))?;
        let footer = Footer::decode(&fb, len).map_err(|r| corrupt_at(path, len - FOOTER_LEN, r))?;
        let index_offset = footer.index_offset;
        // The index is read a chunk at a time, every entry checked as it
        // comes: memory grows with the entries actually read, not with the
        // count the footer claims.
        let mut entries: Vec<Entry> = Vec::new();
        let mut crc = 0u32;
        let index_end = len - FOOTER_LEN;
        let mut buf = vec![0u8; (index_end - index_offset).min(INDEX_CHUNK as u64) as usize];
        let mut at = index_offset;
        while at < index_end {
            // Bounded by the chunk size: fits usize.
            let n = (index_end - at).min(INDEX_CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at).map_err(io_err(path))?;
            crc = crc32c::crc32c_append(crc, chunk);
            for (k, b) in chunk.chunks_exact(ENTRY_LEN as usize).enumerate() {
                let entry_at = at + (k as u64) * ENTRY_LEN;
                let e = Entry::decode(b).map_err(|r| corrupt_at(path, entry_at, r))?;
                if e.kind == EntryKind::Data
                    && (e.offset < HEADER_LEN
                        || e.offset.saturating_add(u64::from(e.clen)) > index_offset)
                {
                    return Err(corrupt(
                        path,
                        format!(
                            "frame of block {} ({} bytes at {}) outside the frame area {HEADER_LEN}..{index_offset}",
                            e.start, e.clen, e.offset
                        ),
                    ));
                }
                if let Some(prev) = entries.last()
                    && Entry::end(prev) > e.start
                {
                    return Err(corrupt(
                        path,
                        format!(
                            "index not sorted or overlapping at block {} (previous entry ends at {})",
                            e.start,
                            Entry::end(prev)
                        ),
                    ));
                }
                entries.push(e);
            }
            at += n as u64;
        }
        if crc != footer.index_crc {
            return Err(corrupt_at(path, index_offset, "index checksum mismatch"));
        }
        Ok(DeltaFile {
            header,
            entries,
            len,
            path: path.to_path_buf(),
            file,
        })
    }

    /// Opens a delta as [`open`](Self::open) does and checks that its header
    /// names `want` (snapshot, base, inode, block size): a delta of another
    /// snapshot, file or block size is `Corrupt`.
    pub fn open_checked(
        s: &dyn Storage,
        path: impl AsRef<Path>,
        want: &DeltaId,
    ) -> Result<DeltaFile, DeltaError> {
        let path = path.as_ref();
        let f = Self::open(s, path)?;
        f.header.check_id(want).map_err(|r| corrupt(path, r))?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry covering `block`, if any.
    pub fn lookup(&self, block: u64) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.start <= block);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (block < e.end()).then_some(e)
    }

    /// The decompressed blocks of data entry `e` (see [`read_frame_at`]).
    pub fn read_frame(&self, e: &Entry) -> Result<Vec<u8>, DeltaError> {
        read_frame_at(&self.file, &self.path, e, self.header.block_size)
    }

    /// The compressed frame of data entry `e`, checksum-checked, for
    /// [`DeltaWriter::add_raw`].
    pub fn read_raw(&self, e: &Entry) -> Result<Vec<u8>, DeltaError> {
        read_raw_at(&self.file, &self.path, e)
    }

    /// Reads and checks every data frame.
    pub fn verify(&self) -> Result<(), DeltaError> {
        for e in self.entries.iter().filter(|e| e.kind == EntryKind::Data) {
            self.read_frame(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::real::RealStorage as R;
    use std::os::unix::fs::FileExt;

    const BS: u32 = 512;

    fn header() -> DeltaHeader {
        DeltaHeader {
            snap_id: 7,
            base_id: 3,
            ino: 42,
            file_size: 20 * BS as u64 - 100,
            block_size: BS,
        }
    }

    /// `n` blocks of a pattern depending on `seed`, partly compressible.
    fn blocks(n: usize, seed: u8) -> Vec<u8> {
        (0..n * BS as usize)
            .map(|i| {
                if i % 7 == 0 {
                    seed.wrapping_add((i / 13) as u8)
                } else {
                    seed
                }
            })
            .collect()
    }

    fn is_corrupt<T: std::fmt::Debug>(r: &Result<T, DeltaError>) -> bool {
        matches!(r, Err(DeltaError::Corrupt { .. }))
    }

    fn is_invalid<T: std::fmt::Debug>(r: &Result<T, DeltaError>) -> bool {
        matches!(r, Err(DeltaError::Io { source, .. }) if source.kind() == io::ErrorKind::InvalidInput)
    }

    /// A small finished delta with data, zero and hole entries; returns the
    /// entries and the data of each data entry (by start).
    fn small_delta(path: &Path) -> (Vec<Entry>, Vec<(u64, Vec<u8>)>) {
        let mut w =
            DeltaWriter::create(crate::storage::real(), &[path.to_path_buf()], &header(), 3)
                .unwrap();
        let a = blocks(2, 1);
        let b = blocks(1, 9);
        w.add_data(10, &b).unwrap();
        w.add_zero(2, 3).unwrap();
        w.add_data(0, &a).unwrap();
        w.add_hole(5, 2).unwrap();
        let (entries, _) = w.finish().unwrap();
        (entries, vec![(0, a), (10, b)])
    }

    #[test]
    fn roundtrip_two_copies() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().join("a.delta"), dir.path().join("b.delta")];
        let mut w = DeltaWriter::create(crate::storage::real(), &paths, &header(), 3).unwrap();
        assert_eq!(w.stored_bytes(), HEADER_LEN);
        let d1 = blocks(3, 5);
        let d2 = blocks(MAX_FRAME_BLOCKS as usize, 11);
        let d3: Vec<u8> = (0..BS as usize).map(|i| (i * 31 % 251) as u8).collect();
        let e1 = w.add_data(8, &d1).unwrap();
        let e2 = w.add_data(1000, &d2).unwrap();
        w.add_zero(11, 4).unwrap();
        let before = w.entries().len();
        w.add_zero(15, 1).unwrap(); // adjacent: appended, not merged
        assert_eq!(w.entries()[before..].len(), 1);
        assert_eq!(w.entries()[before].start, 15);
        w.add_hole(0, 8).unwrap();
        let e3 = w.add_data(16, &d3).unwrap();
        assert_eq!(w.entries().len(), 6);
        assert_eq!(w.entries()[2].count, 4);
        // Readable while being written.
        assert_eq!(w.read_frame(&e1).unwrap(), d1);
        assert_eq!(w.read_frame(&e2).unwrap(), d2);
        let stored = w.stored_bytes();
        assert_eq!(stored, HEADER_LEN + u64::from(e1.clen + e2.clen + e3.clen));
        let (entries, len) = w.finish().unwrap();
        assert_eq!(len, stored + 6 * ENTRY_LEN + FOOTER_LEN);
        let starts: Vec<u64> = entries.iter().map(|e| e.start).collect();
        assert_eq!(starts, vec![0, 8, 11, 15, 16, 1000]);

        let a = std::fs::read(&paths[0]).unwrap();
        let b = std::fs::read(&paths[1]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() as u64, len);

        for p in &paths {
            let f = DeltaFile::open(&R, p).unwrap();
            assert_eq!(f.header, header());
            assert_eq!(f.entries, entries);
            assert_eq!(f.len, len);
            f.verify().unwrap();
            assert_eq!(f.read_frame(&e1).unwrap(), d1);
            assert_eq!(f.read_frame(&e2).unwrap(), d2);
            assert_eq!(f.read_frame(&e3).unwrap(), d3);
            assert_eq!(f.lookup(0).unwrap().kind, EntryKind::Hole);
            assert_eq!(f.lookup(7).unwrap().kind, EntryKind::Hole);
            assert_eq!(f.lookup(10).unwrap(), &e1);
            assert_eq!(f.lookup(15).unwrap().kind, EntryKind::Zero);
            assert_eq!(f.lookup(16).unwrap(), &e3);
            assert_eq!(f.lookup(17), None);
            assert_eq!(f.lookup(999), None);
            assert_eq!(f.lookup(1255).unwrap(), &e2);
            assert_eq!(f.lookup(1256), None);
            let zero = f.lookup(12).unwrap();
            assert!(is_invalid(&f.read_frame(zero)));
        }
    }

    #[test]
    fn empty_delta() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            1,
        )
        .unwrap();
        let (entries, len) = w.finish().unwrap();
        assert!(entries.is_empty());
        assert_eq!(len, HEADER_LEN + FOOTER_LEN);
        let f = DeltaFile::open(&R, &p).unwrap();
        assert!(f.entries.is_empty());
        assert_eq!(f.lookup(0), None);
    }

    /// Every single-byte change is caught: `open` fails, or the frame holding
    /// the byte fails to read; nothing returns wrong data or panics.
    #[test]
    fn every_byte_flip_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("orig");
        let (entries, data) = small_delta(&p);
        let orig = std::fs::read(&p).unwrap();
        let q = dir.path().join("flipped");
        for off in 0..orig.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bytes = orig.clone();
                bytes[off] ^= mask;
                std::fs::write(&q, &bytes).unwrap();
                let f = match DeltaFile::open(&R, &q) {
                    Ok(f) => f,
                    Err(e) => {
                        assert!(
                            matches!(e, DeltaError::Corrupt { .. }),
                            "offset {off}: {e:?}"
                        );
                        continue;
                    }
                };
                // Open succeeded: index and header intact, so the flip is in a frame.
                assert_eq!(f.entries, entries, "offset {off}");
                let mut failed = 0;
                for (start, want) in &data {
                    let e = f.lookup(*start).unwrap();
                    let in_frame = (e.offset..e.offset + u64::from(e.clen)).contains(&(off as u64));
                    match f.read_frame(e) {
                        Ok(got) => {
                            assert!(!in_frame, "offset {off}: damaged frame read back");
                            assert_eq!(&got, want, "offset {off}");
                        }
                        Err(err) => {
                            assert!(in_frame, "offset {off}: intact frame failed: {err}");
                            assert!(matches!(err, DeltaError::Corrupt { .. }), "{err:?}");
                            failed += 1;
                        }
                    }
                }
                assert_eq!(failed, 1, "offset {off}: flip not detected");
                assert!(is_corrupt(&f.verify()));
            }
        }
    }

    #[test]
    fn truncated_or_extended_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("orig");
        small_delta(&p);
        let orig = std::fs::read(&p).unwrap();
        let q = dir.path().join("cut");
        for n in 0..orig.len() {
            std::fs::write(&q, &orig[..n]).unwrap();
            assert!(is_corrupt(&DeltaFile::open(&R, &q)), "length {n}");
        }
        let mut longer = orig.clone();
        longer.push(0);
        std::fs::write(&q, &longer).unwrap();
        assert!(is_corrupt(&DeltaFile::open(&R, &q)));
    }

    #[test]
    fn overlap_fails_at_finish_and_removes_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().join("a"), dir.path().join("b")];
        let mut w = DeltaWriter::create(crate::storage::real(), &paths, &header(), 3).unwrap();
        w.add_data(4, &blocks(2, 1)).unwrap();
        w.add_zero(5, 3).unwrap(); // overlaps block 5
        let r = w.finish();
        assert!(is_corrupt(&r), "{r:?}");
        assert!(!paths[0].exists() && !paths[1].exists());
    }

    #[test]
    fn abandon_and_drop_remove_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            3,
        )
        .unwrap();
        w.add_data(0, &blocks(1, 1)).unwrap();
        assert!(p.exists());
        w.abandon();
        assert!(!p.exists());
        let w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            3,
        )
        .unwrap();
        drop(w);
        assert!(!p.exists());
    }

    #[test]
    fn create_refuses_existing_file_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&b, b"keep").unwrap();
        let r = DeltaWriter::create(
            crate::storage::real(),
            &[a.clone(), b.clone()],
            &header(),
            3,
        );
        assert!(
            matches!(r, Err(DeltaError::Io { ref source, .. }) if source.kind() == io::ErrorKind::AlreadyExists)
        );
        assert!(!a.exists(), "partly created delta left behind");
        assert_eq!(std::fs::read(&b).unwrap(), b"keep");
        assert!(is_invalid(&DeltaWriter::create(
            crate::storage::real(),
            &[],
            &header(),
            3
        )));
        let mut bad = header();
        bad.block_size = 1000;
        assert!(is_invalid(&DeltaWriter::create(
            crate::storage::real(),
            &[a],
            &bad,
            3
        )));
    }

    #[test]
    fn invalid_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            3,
        )
        .unwrap();
        let inval = |r: Result<Entry, DeltaError>| is_invalid(&r);
        assert!(inval(w.add_data(0, &[])));
        assert!(inval(w.add_data(0, &[0u8; BS as usize + 1])));
        assert!(inval(
            w.add_data(0, &blocks(MAX_FRAME_BLOCKS as usize + 1, 0))
        ));
        assert!(inval(w.add_data(u64::MAX, &blocks(1, 0))));
        assert!(inval(w.add_raw(0, 0, b"x", crc32c::crc32c(b"x"))));
        assert!(inval(w.add_raw(0, 1, b"", 0)));
        assert!(is_invalid(&w.add_zero(u64::MAX - 1, 2)));
        assert_eq!(w.stored_bytes(), HEADER_LEN);
        assert!(w.entries().is_empty());
        let e = w.add_data(0, &blocks(1, 0)).unwrap();
        let mut later = e;
        later.offset = w.stored_bytes();
        assert!(is_invalid(&w.read_frame(&later)));
    }

    #[test]
    fn long_runs_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            3,
        )
        .unwrap();
        let big = u64::from(u32::MAX) + 10;
        w.add_zero(0, big).unwrap();
        w.add_zero(big, 5).unwrap();
        w.add_hole(big + 5, 0).unwrap(); // nothing
        w.add_hole(big + 5, 1).unwrap();
        let kinds: Vec<(u64, u32, EntryKind)> = w
            .entries()
            .iter()
            .map(|e| (e.start, e.count, e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, u32::MAX, EntryKind::Zero),
                (u64::from(u32::MAX), 10, EntryKind::Zero),
                (big, 5, EntryKind::Zero),
                (big + 5, 1, EntryKind::Hole),
            ]
        );
        w.finish().unwrap();
        let f = DeltaFile::open(&R, &p).unwrap();
        assert_eq!(f.lookup(big + 4).unwrap().kind, EntryKind::Zero);
        assert_eq!(f.lookup(big + 5).unwrap().kind, EntryKind::Hole);
    }

    #[test]
    fn add_raw_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let (_, data) = small_delta(&src);
        let s = DeltaFile::open(&R, &src).unwrap();
        let dst = dir.path().join("dst");
        let mut w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&dst),
            &header(),
            3,
        )
        .unwrap();
        let mut copied = Vec::new();
        for (start, want) in &data {
            let e = s.lookup(*start).unwrap();
            let raw = s.read_raw(e).unwrap();
            assert!(is_corrupt(&w.add_raw(
                100 + start,
                e.count,
                &raw,
                e.crc ^ 1
            )));
            let ne = w.add_raw(100 + start, e.count, &raw, e.crc).unwrap();
            assert_eq!(w.read_frame(&ne).unwrap(), *want);
            copied.push((ne, want));
        }
        w.finish().unwrap();
        let d = DeltaFile::open(&R, &dst).unwrap();
        d.verify().unwrap();
        for (ne, want) in copied {
            assert_eq!(d.lookup(ne.start).unwrap(), &ne);
            assert_eq!(&d.read_frame(&ne).unwrap(), want);
        }
    }

    /// Frames whose checksum matches but whose content is wrong (garbage, or
    /// a valid zstd frame of the wrong size) are `Corrupt`, not a panic.
    #[test]
    fn bad_frame_content_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            3,
        )
        .unwrap();
        let garbage = b"definitely not zstd";
        let g = w.add_raw(0, 1, garbage, crc32c::crc32c(garbage)).unwrap();
        let short = zstd::bulk::compress(&blocks(1, 3), 3).unwrap();
        let s = w.add_raw(1, 2, &short, crc32c::crc32c(&short)).unwrap();
        let long = zstd::bulk::compress(&blocks(3, 3), 3).unwrap();
        let l = w.add_raw(3, 2, &long, crc32c::crc32c(&long)).unwrap();
        assert!(is_corrupt(&w.read_frame(&g)));
        w.finish().unwrap();
        let f = DeltaFile::open(&R, &p).unwrap();
        for e in [g, s, l] {
            assert!(is_corrupt(&f.read_frame(&e)), "{e:?}");
        }
        assert!(is_corrupt(&f.verify()));
        // An entry pointing past the end of the file.
        let mut past = s;
        past.offset = f.len;
        assert!(is_corrupt(&f.read_frame(&past)));
        // A frame whose bytes no longer match its checksum names the file
        // and the frame's offset, through to the filesystem's error.
        let mut bad = s;
        bad.crc ^= 1;
        let e = f.read_frame(&bad).unwrap_err();
        assert!(
            matches!(&e, DeltaError::Corrupt { offset: Some(o), .. } if *o == s.offset),
            "{e:?}"
        );
        match crate::snapshot::store::delta_err(e) {
            crate::error::FsError::Corrupt(c) => {
                assert_eq!(c.file.as_deref(), Some(p.as_path()));
                assert_eq!(c.offset, Some(s.offset));
                let text = c.to_string();
                assert!(text.contains(&format!("at byte {}", s.offset)), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A footer claiming a huge index over a sparse file: `open` reads the
    /// index a chunk at a time and stops at the first bad entry (it allocated
    /// the whole claimed index first, 1 TiB here).
    #[test]
    fn huge_claimed_index_is_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        let len = 1u64 << 40;
        f.write_all_at(&header().encode(), 0).unwrap();
        f.set_len(len).unwrap();
        let index_offset = HEADER_LEN + 24;
        let count = (len - FOOTER_LEN - index_offset) / ENTRY_LEN;
        f.write_all_at(&encode_footer(index_offset, count, 0), len - FOOTER_LEN)
            .unwrap();
        let r = DeltaFile::open(&R, &p);
        assert!(
            matches!(&r, Err(DeltaError::Corrupt { reason, .. }) if reason.contains("has no blocks")),
            "{r:?}"
        );
    }

    /// A delta opened for a snapshot must be that snapshot's delta of that
    /// file, against that base, at that block size (the header said so, and
    /// nothing checked it).
    #[test]
    fn open_checked_refuses_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        small_delta(&p);
        let want = header().id();
        assert_eq!(
            DeltaFile::open_checked(&R, &p, &want).unwrap().header,
            header()
        );
        for (other, field) in [
            (DeltaId { snap_id: 8, ..want }, "snapshot 7"),
            (DeltaId { base_id: 0, ..want }, "base 3"),
            (DeltaId { ino: 43, ..want }, "inode 42"),
            (
                DeltaId {
                    block_size: 4096,
                    ..want
                },
                "block size 512",
            ),
        ] {
            let r = DeltaFile::open_checked(&R, &p, &other);
            match r {
                Err(DeltaError::Corrupt { reason, .. }) => {
                    assert!(reason.contains(field), "{reason}");
                    assert!(reason.contains("expected"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// A frame must declare the size it decompresses to, and that size must
    /// be the entry's: otherwise nothing is allocated for it.
    #[test]
    fn frame_without_the_right_content_size_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let mut w = DeltaWriter::create(
            crate::storage::real(),
            std::slice::from_ref(&p),
            &header(),
            3,
        )
        .unwrap();
        let data = blocks(2, 4);
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let nosize = enc.finish().unwrap();
        assert_eq!(zstd::stream::decode_all(&nosize[..]).unwrap(), data);
        let e = w.add_raw(0, 2, &nosize, crc32c::crc32c(&nosize)).unwrap();
        let r = w.read_frame(&e);
        assert!(
            matches!(&r, Err(DeltaError::Corrupt { reason, .. }) if reason.contains("content size")),
            "{r:?}"
        );
        let big = zstd::bulk::compress(&blocks(MAX_FRAME_BLOCKS as usize, 4), 3).unwrap();
        let e = w.add_raw(10, 1, &big, crc32c::crc32c(&big)).unwrap();
        let r = w.read_frame(&e);
        assert!(
            matches!(&r, Err(DeltaError::Corrupt { reason, .. }) if reason.contains("holds 131072 bytes, expected 512")),
            "{r:?}"
        );
    }

    #[test]
    fn header_and_footer_fields_are_where_documented() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let (entries, _) = small_delta(&p);
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[0..8], b"VPOOLDLT");
        fn fields(s: &[u8]) -> Fields<'_> {
            Fields::at_least(s, 0, "").unwrap()
        }
        let u32_at = |s: &[u8], o: usize| fields(s).u32(o);
        let u64_at = |s: &[u8], o: usize| fields(s).u64(o);
        assert_eq!(u32_at(&b, 8), 1);
        assert_eq!(u32_at(&b, 12), 64);
        assert_eq!(u64_at(&b, 16), 7);
        assert_eq!(u64_at(&b, 24), 3);
        assert_eq!(u64_at(&b, 32), 42);
        assert_eq!(u64_at(&b, 40), header().file_size);
        assert_eq!(u32_at(&b, 48), BS);
        assert_eq!(u32_at(&b, 52), 0);
        assert_eq!(u32_at(&b, 60), crc32c::crc32c(&b[0..60]));
        let f = &b[b.len() - 40..];
        assert_eq!(&f[0..8], b"VPDLTEND");
        let index_offset = u64_at(f, 8) as usize;
        assert_eq!(u64_at(f, 16), entries.len() as u64);
        let index = &b[index_offset..b.len() - 40];
        assert_eq!(index.len(), entries.len() * 32);
        assert_eq!(u32_at(f, 24), crc32c::crc32c(index));
        assert_eq!(u32_at(f, 32), crc32c::crc32c(&f[0..32]));
        // Second entry: zero run 2..5.
        let e = &index[32..64];
        assert_eq!(u64_at(e, 0), 2);
        assert_eq!(u32_at(e, 8), 3);
        assert_eq!(e[12], 1);
        // First entry: data, frame right after the header or after the other frame.
        let d = &index[0..32];
        assert_eq!(d[12], 0);
        let off = u64_at(d, 16) as usize;
        let clen = u32_at(d, 24) as usize;
        assert_eq!(u32_at(d, 28), crc32c::crc32c(&b[off..off + clen]));
    }
}
