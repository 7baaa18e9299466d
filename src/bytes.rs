//! Bounded parsing of on-disk data: whole files read under a size cap, the
//! two little-endian readers every parser uses ([`Fields`] for records of
//! fixed size, [`LeReader`] for a cursor over variable ones), and bincode
//! decoding limited to the input (see `docs/design.md`, "Parser validation and fuzzing").

use std::io;
use std::path::Path;

use bincode::Options;
use serde::de::DeserializeOwned;

use crate::storage::{OpenMode, Storage};

/// Reads the whole file at `path`, refusing one of more than `cap` bytes with
/// an `InvalidData` error (before reading it, from its length, and while
/// reading, so that a file growing meanwhile cannot get past the cap).
pub fn read_capped(s: &dyn Storage, path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let f = s.open(path, OpenMode::READ)?;
    let len = f.len()?;
    let too_big = |n: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} bytes, more than the {cap} such a file can hold"),
        )
    };
    if len > cap {
        return Err(too_big(len));
    }
    // `len <= cap`; a cap above the address space is not a concern here.
    let buf = f.read_prefix(len)?;
    // Grown since the length was read: past the cap?
    let mut probe = [0u8; 1];
    if buf.len() as u64 == len && f.read_at(&mut probe, len)? > 0 && len >= cap {
        return Err(too_big(len + 1));
    }
    Ok(buf)
}

/// A record of fixed size whose fields sit at the offsets of its byte map
/// (headers, footers, index entries, sum and intent records). The length is
/// checked once, when it is made; a field read then cannot run past it (an
/// offset beyond the record is a bug in the caller's byte map: it reads as
/// zeros and fails a debug assertion, never a panic in release).
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a> {
    b: &'a [u8],
}

impl<'a> Fields<'a> {
    /// `b` must be exactly `len` bytes: `what` names the record in the error.
    pub fn exact(b: &'a [u8], len: usize, what: &str) -> Result<Self, String> {
        if b.len() != len {
            return Err(format!("{what} of {} bytes, not {len}", b.len()));
        }
        Ok(Fields { b })
    }

    /// `b` must hold at least `len` bytes (a header followed by more).
    pub fn at_least(b: &'a [u8], len: usize, what: &str) -> Result<Self, String> {
        if b.len() < len {
            return Err(format!("{what} of {} bytes, shorter than {len}", b.len()));
        }
        Ok(Fields { b })
    }

    pub fn bytes(&self, off: usize, n: usize) -> &'a [u8] {
        let r = off.checked_add(n).and_then(|end| self.b.get(off..end));
        debug_assert!(
            r.is_some(),
            "field {off}+{n} beyond a {}-byte record",
            self.b.len()
        );
        r.unwrap_or(&[])
    }

    fn array<const N: usize>(&self, off: usize) -> [u8; N] {
        self.bytes(off, N).try_into().unwrap_or([0; N])
    }

    pub fn u8(&self, off: usize) -> u8 {
        self.array::<1>(off)[0]
    }

    pub fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.array(off))
    }

    pub fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.array(off))
    }

    pub fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.array(off))
    }

    /// CRC-32C of the bytes before `off` equals the u32 at `off` (the usual
    /// last field of a header).
    pub fn crc_ok(&self, off: usize) -> bool {
        crc32c::crc32c(self.bytes(0, off)) == self.u32(off)
    }
}

/// A cursor over little-endian fields; every read is bounds-checked and fails
/// with a message naming the field and the offset.
#[derive(Clone, Debug)]
pub struct LeReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> LeReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        LeReader { buf, pos: 0 }
    }

    /// Offset of the next read.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} at offset {} needs {n} bytes, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    pub fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn i64(&mut self, what: &str) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
}

/// Decodes bincode written by `bincode::serialize` (fixed-width little-endian
/// integers, trailing bytes allowed), reading at most `b.len()` bytes: a
/// length or count field larger than the input fails instead of allocating.
pub fn bincode_decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(b.len() as u64)
        .deserialize(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::real::RealStorage;
    use std::collections::BTreeMap;

    #[test]
    fn reader_bounds() {
        let b = [1u8, 0, 2, 0, 0, 0, 9];
        let mut r = LeReader::new(&b);
        assert_eq!(r.u16("a").unwrap(), 1);
        assert_eq!(r.u32("b").unwrap(), 2);
        let e = r.u16("c").unwrap_err();
        assert!(e.contains("c at offset 6 needs 2 bytes, 1 left"), "{e}");
        assert_eq!(r.u8("d").unwrap(), 9);
        assert_eq!(r.remaining(), 0);
        assert!(r.bytes(usize::MAX, "huge").is_err());
    }

    #[test]
    fn read_capped_refuses_big_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, [7u8; 10]).unwrap();
        assert_eq!(read_capped(&RealStorage, &p, 10).unwrap(), vec![7u8; 10]);
        let e = read_capped(&RealStorage, &p, 9).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("10 bytes, more than the 9"), "{e}");
        assert_eq!(
            read_capped(&RealStorage, &d.path().join("none"), 9)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    /// Same bytes as `bincode::serialize`/`deserialize`, which wrote every
    /// record on disk so far.
    #[test]
    fn bincode_options_match_bincode_serialize() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct T {
            a: u16,
            b: i64,
            s: String,
            v: Vec<u32>,
            m: BTreeMap<u64, Vec<u8>>,
            o: Option<u8>,
            e: Result<u8, String>,
        }
        let t = T {
            a: 0x1234,
            b: -3,
            s: "héllo".into(),
            v: vec![1, u32::MAX],
            m: BTreeMap::from([(9, vec![1, 2]), (u64::MAX, vec![])]),
            o: Some(5),
            e: Err("x".into()),
        };
        let bytes = bincode::serialize(&t).unwrap();
        assert_eq!(
            bytes,
            bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .allow_trailing_bytes()
                .serialize(&t)
                .unwrap()
        );
        // Fixed-width little-endian: the u16 then the i64.
        assert_eq!(
            &bytes[..10],
            &[0x34, 0x12, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(bincode_decode::<T>(&bytes).unwrap(), t);
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0, 0]);
        assert_eq!(bincode_decode::<T>(&longer).unwrap(), t);
        // A length field far beyond the input fails.
        let mut big = bytes.clone();
        big[10..18].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(bincode_decode::<T>(&big).is_err());
        assert!(bincode::deserialize::<T>(&big).is_err());
    }
}
