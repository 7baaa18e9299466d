//! Block checksums of one extent copy: the sum file `data/<ino>.<index>.<file_id>.sum`
//! beside the extent file on every member holding a copy.
//!
//! Layout (version 2, little-endian):
//! ```text
//! 0   8  magic "VPOOLSUM"
//! 8   4  version (2; 1 is read too)
//! 12  4  block size
//! 16  8  ino
//! 24  8  extent index
//! 32  8  file id
//! 40  4  number of entries (extent size / block size)
//! 44  4  reserved (0)
//! 48  8  generation of the commit that wrote it
//! 56  4  crc32c of bytes 0..56
//! 60  4  reserved (0)
//! 64  4n entries: crc32c of each block as it reads (holes read as zeros)
//! 64+4n  4p  page checksums: crc32c of each page of 1024 entries (the last
//!            page may be shorter), p = ceil(n / 1024)     [version 2 only]
//! ```
//! A flipped entry would otherwise make good data unreadable (every copy's
//! blocks fail against it): with the page checksums a damaged table is
//! detected, and the table of another copy, or the data, is used instead.
//! Version 1 files (no page checksums) are still read, and rewritten as
//! version 2 by the next commit that writes the table.
//! Every copy's sum file holds the same table (the copies hold the same data);
//! a reader verifies whichever copy it reads against the one table in memory,
//! loaded from the valid sum file of the highest generation (a member that
//! missed writes while it was failed has an older one).
//! The table is written and fdatasynced by the commit, before the intent records
//! covering the extent are cleared: between two commits the sum file may lag its
//! data, and that extent then has an intent record, so recovery after a crash
//! recomputes its table from the data (see `Volume::resync`).

use crate::bytes::Fields;
use std::io;
use std::path::Path;

use crate::bytes::read_capped;
use crate::storage::{OpenMode, Storage};

pub const SUM_MAGIC: [u8; 8] = *b"VPOOLSUM";
pub const SUM_VERSION: u32 = 2;
pub const SUM_HEADER: usize = 64;
/// Entries covered by one page checksum (version 2).
pub const SUM_PAGE_ENTRIES: usize = 1024;

/// Identity a sum file must carry to belong to an extent copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumId {
    pub ino: u64,
    pub index: u64,
    pub file_id: u64,
    pub block_size: u32,
    pub entries: u32,
}

/// The checksum of one block.
pub fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}

/// The checksum of an all-zero block of `bs` bytes.
pub fn zero_crc(bs: usize) -> u32 {
    block_crc(&vec![0u8; bs])
}

pub fn encode(id: SumId, generation: u64, vals: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(file_len(id) as usize);
    out.extend_from_slice(&SUM_MAGIC);
    out.extend_from_slice(&SUM_VERSION.to_le_bytes());
    out.extend_from_slice(&id.block_size.to_le_bytes());
    out.extend_from_slice(&id.ino.to_le_bytes());
    out.extend_from_slice(&id.index.to_le_bytes());
    out.extend_from_slice(&id.file_id.to_le_bytes());
    out.extend_from_slice(&(vals.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in vals {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let pages: Vec<u32> = out[SUM_HEADER..]
        .chunks(SUM_PAGE_ENTRIES * 4)
        .map(crc32c::crc32c)
        .collect();
    for c in pages {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

/// Page checksums of a table of `entries` entries.
fn pages(entries: u32) -> u64 {
    u64::from(entries).div_ceil(SUM_PAGE_ENTRIES as u64)
}

/// Decodes a sum file into its generation and entries; the error says what is
/// wrong with it.
pub fn decode(bytes: &[u8], id: SumId) -> Result<(u64, Vec<u32>), String> {
    if bytes.len() < SUM_HEADER {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    let h = Fields::at_least(bytes, SUM_HEADER, "sum file")?;
    if h.bytes(0, 8) != SUM_MAGIC {
        return Err("bad magic".into());
    }
    if !h.crc_ok(56) {
        return Err("header checksum mismatch".into());
    }
    let version = h.u32(8);
    if version != SUM_VERSION && version != 1 {
        return Err(format!("unsupported version {version}"));
    }
    let got = SumId {
        block_size: h.u32(12),
        ino: h.u64(16),
        index: h.u64(24),
        file_id: h.u64(32),
        entries: h.u32(40),
    };
    if got != id {
        return Err(format!("belongs to {got:?}, not {id:?}"));
    }
    let n = id.entries as usize;
    let want = if version == 1 {
        file_len_v1(id)
    } else {
        file_len(id)
    };
    if bytes.len() as u64 != want {
        return Err(format!(
            "{} bytes for {n} entries (want {want})",
            bytes.len()
        ));
    }
    let table = &bytes[SUM_HEADER..SUM_HEADER + 4 * n];
    if version != 1 {
        let sums = Fields::at_least(&bytes[SUM_HEADER + 4 * n..], 0, "page checksums")?;
        for (k, page) in table.chunks(SUM_PAGE_ENTRIES * 4).enumerate() {
            if crc32c::crc32c(page) != sums.u32(4 * k) {
                return Err(format!(
                    "entries {}..{} damaged (page checksum mismatch)",
                    k * SUM_PAGE_ENTRIES,
                    ((k + 1) * SUM_PAGE_ENTRIES).min(n)
                ));
            }
        }
    }
    let t = Fields::exact(table, 4 * n, "sum table")?;
    let entries = (0..n).map(|i| t.u32(4 * i)).collect();
    Ok((h.u64(48), entries))
}

/// Length of the sum file of `id`: the header, 4 bytes an entry and 4 bytes
/// a page of entries.
pub fn file_len(id: SumId) -> u64 {
    file_len_v1(id) + 4 * pages(id.entries)
}

/// Length of a version-1 sum file (no page checksums).
fn file_len_v1(id: SumId) -> u64 {
    SUM_HEADER as u64 + 4 * u64::from(id.entries)
}

/// Reads a sum file: `Ok(None)` when it does not exist, an `InvalidData` error
/// when it is damaged. Reads no more than [`file_len`] of `id` (a longer file
/// is damaged).
pub fn read(s: &dyn Storage, path: &Path, id: SumId) -> io::Result<Option<(u64, Vec<u32>)>> {
    let bytes = match read_capped(s, path, file_len(id)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    decode(&bytes, id)
        .map(Some)
        .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
}

/// Writes a whole sum file in place and fdatasyncs it. The caller syncs the
/// directory entry of a file this creates, even if the write then fails.
pub fn write(
    s: &dyn Storage,
    path: &Path,
    id: SumId,
    generation: u64,
    vals: &[u32],
) -> io::Result<()> {
    let f = s.open(path, OpenMode::CREATE)?;
    let bytes = encode(id, generation, vals);
    f.write_all_at(&bytes, 0)?;
    if f.len()? > bytes.len() as u64 {
        f.set_len(bytes.len() as u64)?;
    }
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::real::RealStorage as R;

    fn id() -> SumId {
        SumId {
            ino: 7,
            index: 3,
            file_id: 99,
            block_size: 4096,
            entries: 4,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let vals = vec![1, 2, 3, zero_crc(4096)];
        let b = encode(id(), 42, &vals);
        // Pinned layout (docs/design.md section 17.1): header, entries, one
        // page checksum for up to 1024 entries.
        assert_eq!(b.len(), SUM_HEADER + 16 + 4);
        assert_eq!(&b[0..8], b"VPOOLSUM");
        let f = Fields::at_least(&b, b.len(), "sum file").unwrap();
        let le32 = |_: &[u8], o: usize| f.u32(o);
        let le64 = |_: &[u8], o: usize| f.u64(o);
        assert_eq!(le32(&b, 8), 2);
        assert_eq!(le32(&b, 40), 4);
        assert_eq!(le64(&b, 48), 42);
        assert_eq!(le32(&b, SUM_HEADER + 8), 3);
        assert_eq!(
            le32(&b, SUM_HEADER + 16),
            crc32c::crc32c(&b[SUM_HEADER..SUM_HEADER + 16])
        );
        assert_eq!(decode(&b, id()).unwrap(), (42, vals.clone()));
        // A flipped entry is found, whichever page it is in.
        for at in [SUM_HEADER, SUM_HEADER + 7, SUM_HEADER + 15] {
            let mut bad = b.clone();
            bad[at] ^= 0x10;
            assert!(
                decode(&bad, id()).unwrap_err().contains("page checksum"),
                "{at}"
            );
        }
        let big = SumId {
            entries: 2500,
            ..id()
        };
        let many: Vec<u32> = (0..2500).collect();
        let b2 = encode(big, 1, &many);
        assert_eq!(b2.len() as u64, file_len(big));
        assert_eq!(b2.len(), SUM_HEADER + 4 * 2500 + 4 * 3);
        let mut bad = b2.clone();
        bad[SUM_HEADER + 4 * 2400] ^= 1;
        assert!(
            decode(&bad, big)
                .unwrap_err()
                .contains("entries 2048..2500")
        );
        // Version 1 (no page checksums) is still read.
        let mut v1 = b[..SUM_HEADER + 16].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1[..56]);
        v1[56..60].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&v1, id()).unwrap(), (42, vals));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(decode(&bad, id()).unwrap_err().contains("checksum"));
        let other = SumId { ino: 8, ..id() };
        assert!(decode(&b, other).unwrap_err().contains("belongs"));
        assert!(decode(&b[..b.len() - 1], id()).is_err());
    }

    /// A sum file is read only up to the length its extent needs: a huge one
    /// is damaged, and not read into memory.
    #[test]
    fn oversized_file_is_damaged_without_reading_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.sum");
        write(&R, &p, id(), 1, &[1, 2, 3, 4]).unwrap();
        assert_eq!(read(&R, &p, id()).unwrap(), Some((1, vec![1, 2, 3, 4])));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        let e = read(&R, &p, id()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string().contains("1073741824 bytes, more than the 84"),
            "{e}"
        );
    }
}
