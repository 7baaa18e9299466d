//! The raw export: the image byte for byte, sparse. Only data is written
//! (positional writes into a new file); holes and allocated zeros stay holes,
//! and the file is then set to the image's size. Needs a seekable file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::{CHUNK, ImageMap, Piece, Progress, ReadAt, Summary, data_total};

/// Writes `map`'s image, read from `src`, into `out` (expected empty). A full
/// export only: an incremental one has no meaning as a raw image.
pub fn write(
    map: &ImageMap,
    src: &mut dyn ReadAt,
    out: &File,
    progress: Progress,
) -> io::Result<Summary> {
    map.validate()?;
    if map.changed.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a raw export is always full (--from needs qcow2 or rbd-diff)",
        ));
    }
    let started = Instant::now();
    let pieces = map.pieces();
    let total = data_total(&pieces);
    let mut done = 0u64;
    let mut buf = Vec::new();
    for p in pieces.iter().filter(|p| p.piece == Piece::Data) {
        let mut pos = p.start;
        while pos < p.end() {
            let n = (p.end() - pos).min(CHUNK);
            buf.resize(n as usize, 0);
            src.read_at(pos, &mut buf)?;
            out.write_all_at(&buf, pos)?;
            pos += n;
            done += n;
            progress(done, total);
        }
    }
    out.set_len(map.size)?;
    out.sync_all()?;
    Ok(Summary::finish("raw", started, map.size, done))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{map, pattern};
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_data_only_and_keeps_holes() {
        let size = 8 << 20;
        let mut img = vec![0u8; size];
        let d = pattern(1, 1 << 20);
        img[2 << 20..3 << 20].copy_from_slice(&d);
        let m = map(
            size as u64,
            &[
                (2 << 20, 1 << 20, Piece::Data),
                (5 << 20, 1 << 20, Piece::Zero),
            ],
            None,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.raw");
        let f = File::create(&p).expect("create");
        let mut src: &[u8] = &img;
        let mut calls = 0;
        let s = write(&m, &mut src, &f, &mut |_, _| calls += 1).expect("export");
        assert_eq!(s.data_bytes, 1 << 20);
        assert_eq!(s.bytes_written, size as u64);
        assert!(calls > 0);
        assert_eq!(std::fs::read(&p).expect("read"), img);
        // Sparse: about the data's worth of blocks (filesystems may round up).
        let allocated = f.metadata().expect("stat").blocks() * 512;
        assert!(allocated < 3 << 20, "allocated {allocated}");
    }

    #[test]
    fn refuses_incremental() {
        let m = map(4096, &[], Some(&[(0, 4096)]));
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::create(dir.path().join("x")).expect("create");
        let mut src: &[u8] = &[0u8; 4096];
        assert!(write(&m, &mut src, &f, &mut |_, _| ()).is_err());
    }
}
