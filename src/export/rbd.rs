//! The `rbd diff v1` export: the stream that Ceph's `rbd export-diff` writes
//! and `rbd import-diff` reads (Ceph's doc/dev/rbd-diff.rst; the layout is in
//! docs/design.md, "Exports"). All integers little-endian.
//!
//! ```text
//! "rbd diff v1\n"
//! ['f' le32 len, from-snapshot name]     incremental only
//! 't' le32 len, to-snapshot name
//! 's' le64 image size
//! ('w' le64 offset, le64 length, data | 'z' le64 offset, le64 length)*
//! 'e'
//! ```
//!
//! A full export has no `f` and writes the data as `w` records (never-written
//! holes need no record: a new image reads zeros). An incremental one names
//! its base in `f` and writes every changed range: data as `w`, ranges that
//! became zeros or holes as `z` (`import-diff` discards them). Records are
//! ascending and disjoint; a `w` carries at most [`CHUNK`] bytes, so that the
//! importer never holds more than that.

use std::io::{self, Write};
use std::time::Instant;

use super::{CHUNK, ImageMap, Piece, Progress, ReadAt, Summary, data_total};

pub const HEADER: &[u8] = b"rbd diff v1\n";

/// Longest snapshot name written (Ceph's names are far shorter in practice).
const MAX_NAME: usize = 4096;

/// Counts the bytes that go through.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn name_record(w: &mut dyn Write, tag: u8, name: &str) -> io::Result<()> {
    if name.len() > MAX_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("snapshot name longer than {MAX_NAME} bytes"),
        ));
    }
    w.write_all(&[tag])?;
    w.write_all(&(name.len() as u32).to_le_bytes())?;
    w.write_all(name.as_bytes())
}

/// Writes `map`'s image (read from `src`) as an `rbd diff v1` stream from
/// snapshot `from` (an incremental map) or from nothing (a full one) to
/// snapshot `to`. `out` should be buffered.
pub fn write(
    map: &ImageMap,
    src: &mut dyn ReadAt,
    out: &mut dyn Write,
    from: Option<&str>,
    to: &str,
    progress: Progress,
) -> io::Result<Summary> {
    map.validate()?;
    if from.is_some() != map.changed.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rbd diff: a from-snapshot goes with an incremental map",
        ));
    }
    let started = Instant::now();
    let mut w = Counting { inner: out, n: 0 };
    w.write_all(HEADER)?;
    if let Some(f) = from {
        name_record(&mut w, b'f', f)?;
    }
    name_record(&mut w, b't', to)?;
    w.write_all(b"s")?;
    w.write_all(&map.size.to_le_bytes())?;
    let pieces = map.pieces();
    let total = data_total(&pieces);
    let mut done = 0u64;
    let mut buf = Vec::new();
    for p in &pieces {
        match p.piece {
            Piece::Data => {
                let mut pos = p.start;
                while pos < p.end() {
                    let n = (p.end() - pos).min(CHUNK);
                    buf.resize(n as usize, 0);
                    src.read_at(pos, &mut buf)?;
                    w.write_all(b"w")?;
                    w.write_all(&pos.to_le_bytes())?;
                    w.write_all(&n.to_le_bytes())?;
                    w.write_all(&buf)?;
                    pos += n;
                    done += n;
                    progress(done, total);
                }
            }
            Piece::Zero | Piece::Hole => {
                w.write_all(b"z")?;
                w.write_all(&p.start.to_le_bytes())?;
                w.write_all(&p.len.to_le_bytes())?;
            }
        }
    }
    w.write_all(b"e")?;
    w.flush()?;
    Ok(Summary::finish("rbd-diff", started, w.n, done))
}

/// One data record of a decoded stream: `data` for `w`, `None` for `z`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub len: u64,
    pub data: Option<Vec<u8>>,
}

/// A decoded `rbd diff v1` stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    pub from: Option<String>,
    pub to: String,
    pub size: u64,
    pub records: Vec<Record>,
}

impl Diff {
    /// Applies the records to `image` as `import-diff` does: resize to the
    /// stream's size, then write and zero.
    pub fn apply(&self, image: &mut Vec<u8>) {
        image.resize(self.size as usize, 0);
        for r in &self.records {
            let (s, e) = (r.offset as usize, (r.offset + r.len) as usize);
            match &r.data {
                Some(d) => image[s..e].copy_from_slice(d),
                None => image[s..e].fill(0),
            }
        }
    }
}

/// Decodes a stream strictly (stricter than `import-diff`, which skips what
/// it does not know): the exact header; `f`, `t` and `s` at most once each
/// and before any data, `t` and `s` present; data records non-empty,
/// ascending, disjoint and inside the image; `e` last, nothing after it.
pub fn decode(b: &[u8]) -> Result<Diff, String> {
    let rest = b
        .strip_prefix(HEADER)
        .ok_or("not an rbd diff v1 stream (header)")?;
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= rest.len())
            .ok_or_else(|| format!("truncated at byte {}", HEADER.len() + *pos))?;
        let s = &rest[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u64_at = |pos: &mut usize| -> Result<u64, String> {
        let s = take(pos, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    };
    let name_at = |pos: &mut usize| -> Result<String, String> {
        let s = take(pos, 4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(s);
        let n = u32::from_le_bytes(a) as usize;
        if n > MAX_NAME {
            return Err(format!("snapshot name of {n} bytes"));
        }
        String::from_utf8(take(pos, n)?.to_vec()).map_err(|_| "snapshot name not UTF-8".into())
    };
    let (mut from, mut to, mut size) = (None, None, None);
    let mut records: Vec<Record> = Vec::new();
    loop {
        let tag = take(&mut pos, 1)?[0];
        let in_data = !records.is_empty();
        match tag {
            b'f' | b't' | b's' if in_data => {
                return Err(format!("metadata record '{}' after data", tag as char));
            }
            b'f' if from.is_none() => from = Some(name_at(&mut pos)?),
            b't' if to.is_none() => to = Some(name_at(&mut pos)?),
            b's' if size.is_none() => size = Some(u64_at(&mut pos)?),
            b'f' | b't' | b's' => return Err(format!("record '{}' twice", tag as char)),
            b'w' | b'z' => {
                let size = size.ok_or("data record before the size record")?;
                let offset = u64_at(&mut pos)?;
                let len = u64_at(&mut pos)?;
                let end = offset.checked_add(len).ok_or("record past 2^64")?;
                if len == 0 || end > size {
                    return Err(format!(
                        "record {offset}+{len} empty or past the size {size}"
                    ));
                }
                if let Some(l) = records.last()
                    && offset < l.offset + l.len
                {
                    return Err(format!("record at {offset} overlaps or is out of order"));
                }
                let data = if tag == b'w' {
                    let n = usize::try_from(len).map_err(|_| "record too long")?;
                    Some(take(&mut pos, n)?.to_vec())
                } else {
                    None
                };
                records.push(Record { offset, len, data });
            }
            b'e' => {
                if pos != rest.len() {
                    return Err(format!("{} byte(s) after the end record", rest.len() - pos));
                }
                break;
            }
            t => return Err(format!("unknown record tag {t:#04x}")),
        }
    }
    Ok(Diff {
        from,
        to: to.ok_or("no to-snapshot record")?,
        size: size.ok_or("no size record")?,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{map, pattern};
    use super::*;

    fn export(m: &ImageMap, img: &[u8], from: Option<&str>, to: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut src: &[u8] = img;
        let s = write(m, &mut src, &mut out, from, to, &mut |_, _| ()).expect("export");
        assert_eq!(s.bytes_written, out.len() as u64);
        out
    }

    #[test]
    fn full_stream_layout_is_pinned() {
        let mut img = vec![0u8; 64];
        img[8..16].copy_from_slice(b"ABCDEFGH");
        let m = map(64, &[(8, 8, Piece::Data), (32, 8, Piece::Zero)], None);
        let out = export(&m, &img, None, "s1");
        let mut want = b"rbd diff v1\n".to_vec();
        want.extend_from_slice(&[b't', 2, 0, 0, 0, b's', b'1']);
        want.extend_from_slice(&[b's', 64, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[b'w', 8, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"ABCDEFGH");
        want.push(b'e');
        assert_eq!(out, want);
    }

    #[test]
    fn incremental_round_trips_through_the_strict_decoder() {
        let size = 3 * CHUNK as usize + 4096;
        let old = pattern(7, size);
        let mut new = old.clone();
        // Changed: a data range longer than a chunk, a range that became a
        // hole, one that became allocated zeros.
        let d = pattern(8, CHUNK as usize + 8192);
        new[4096..4096 + d.len()].copy_from_slice(&d);
        new[2 * CHUNK as usize..2 * CHUNK as usize + 8192].fill(0);
        new[3 * CHUNK as usize..].fill(0);
        let dl = d.len() as u64;
        let c2 = 2 * CHUNK;
        let c3 = 3 * CHUNK;
        let m = map(
            size as u64,
            &[
                (0, 4096, Piece::Data),
                (4096, dl, Piece::Data),
                (4096 + dl, c2 - 4096 - dl, Piece::Data),
                (c2, 8192, Piece::Hole),
                (c2 + 8192, c3 - c2 - 8192, Piece::Data),
                (c3, 4096, Piece::Zero),
            ],
            Some(&[(4096, 4096 + dl), (c2, c2 + 8192), (c3, c3 + 4096)]),
        );
        let out = export(&m, &new, Some("s1"), "s2");
        let diff = decode(&out).expect("strict decode");
        assert_eq!(diff.from.as_deref(), Some("s1"));
        assert_eq!(diff.to, "s2");
        assert_eq!(diff.size, size as u64);
        assert!(diff.records.iter().all(|r| r.len <= CHUNK));
        assert_eq!(diff.records.iter().filter(|r| r.data.is_none()).count(), 2);
        let mut img = old.clone();
        diff.apply(&mut img);
        assert_eq!(img, new);
        // A full export applied to nothing gives the image too.
        let full = ImageMap {
            changed: None,
            ..m.clone()
        };
        let diff = decode(&export(&full, &new, None, "s2")).expect("decode");
        assert!(diff.from.is_none() && diff.records.iter().all(|r| r.data.is_some()));
        let mut img = Vec::new();
        diff.apply(&mut img);
        assert_eq!(img, new);
    }

    #[test]
    fn decoder_refuses_every_truncation_and_malformed_streams() {
        let img = pattern(3, 8192);
        let m = map(8192, &[(0, 4096, Piece::Data)], Some(&[(0, 8192)]));
        let out = export(&m, &img, Some("a"), "b");
        assert!(decode(&out).is_ok());
        for n in 0..out.len() {
            assert!(decode(&out[..n]).is_err(), "truncated at {n}");
        }
        let mut extra = out.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
        // Unknown tag, metadata after data, out-of-order records.
        let mut bad = out.clone();
        bad[HEADER.len()] = b'x';
        assert!(decode(&bad).is_err());
        let mut s = HEADER.to_vec();
        s.extend_from_slice(&[b't', 0, 0, 0, 0, b's']);
        s.extend_from_slice(&100u64.to_le_bytes());
        let rec = |s: &mut Vec<u8>, o: u64, l: u64| {
            s.push(b'z');
            s.extend_from_slice(&o.to_le_bytes());
            s.extend_from_slice(&l.to_le_bytes());
        };
        let mut unordered = s.clone();
        rec(&mut unordered, 50, 10);
        rec(&mut unordered, 10, 10);
        unordered.push(b'e');
        assert!(decode(&unordered).is_err());
        let mut past = s.clone();
        rec(&mut past, 95, 10);
        past.push(b'e');
        assert!(decode(&past).is_err());
        let mut late = s.clone();
        rec(&mut late, 0, 10);
        late.extend_from_slice(&[b'f', 0, 0, 0, 0]);
        late.push(b'e');
        assert!(decode(&late).is_err());
        let mut ok = s;
        rec(&mut ok, 0, 10);
        ok.push(b'e');
        assert!(decode(&ok).is_ok());
    }

    #[test]
    fn from_and_map_must_agree() {
        let m = map(4096, &[], None);
        let mut out = Vec::new();
        let mut src: &[u8] = &[0u8; 4096];
        assert!(write(&m, &mut src, &mut out, Some("a"), "b", &mut |_, _| ()).is_err());
    }
}
