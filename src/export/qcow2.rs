//! The qcow2 export: a qcow2 version 3 image (QEMU's docs/interop/qcow2.txt;
//! the layout is in docs/design.md, "Exports"). All integers big-endian.
//!
//! Clusters are 64 KiB, refcounts 16 bits (refcount order 4), nothing is
//! compressed or encrypted. Every structure's size is known before the first
//! byte is written (which guest clusters are exported, and which of them hold
//! data, follow from the map alone), so the file is written front to back in
//! one pass, each cluster once:
//!
//! ```text
//! cluster 0        header, header extensions, backing file name
//! L1 table         ceil(guest clusters / 8192) entries
//! refcount table   one entry per refcount block
//! refcount blocks  every cluster of the file has refcount 1
//! L2 tables        only those covering an exported cluster, ascending
//! data clusters    ascending guest order
//! ```
//!
//! A full export allocates the clusters that hold data; the rest stay
//! unallocated (they read as zeros: there is no backing file). An overlay
//! (a map with changed ranges, and a backing file) exports each cluster that
//! a changed range touches: with its whole content as of the snapshot when any
//! of it is data, else as a zero cluster (L2 entry with only bit 0 set, "reads
//! as zeros", not the backing file's content). Unchanged clusters stay
//! unallocated and read through to the backing file.
//!
//! The virtual size is rounded up to 512 bytes (QEMU counts sectors).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::time::Instant;

use super::{CHUNK, ImageMap, Progress, ReadAt, Summary};

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const CLUSTER_BITS: u32 = 16;
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
pub const REFCOUNT_ORDER: u32 = 4;
/// Length of the version 3 header written (no compression type field).
pub const HEADER_LEN: u32 = 104;
/// Header extension: the backing file's format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// L1/L2 entry flag: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 entry flag (version 3): the cluster reads as zeros.
pub const ZERO: u64 = 1;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// QEMU refuses longer backing file names.
const MAX_BACKING_NAME: usize = 1023;

/// The backing file of an overlay, as its header names it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Backing {
    /// Relative to the overlay's directory (QEMU resolves it so).
    pub name: String,
    /// "raw" or "qcow2".
    pub format: String,
}

/// Guest clusters `[start, start + count)`, all data or all zero clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClusterRun {
    start: u64,
    count: u64,
    data: bool,
}

fn clusters(map: &ImageMap) -> Vec<ClusterRun> {
    let mut out: Vec<ClusterRun> = Vec::new();
    for p in map.pieces() {
        let first = p.start / CLUSTER;
        let end = p.end().div_ceil(CLUSTER);
        for c in first..end {
            if out.last().is_some_and(|l| l.start + l.count > c) {
                continue; // this cluster was decided by the previous piece
            }
            let data = map.has_data(c * CLUSTER, ((c + 1) * CLUSTER).min(map.size));
            match out.last_mut() {
                Some(l) if l.start + l.count == c && l.data == data => l.count += 1,
                _ => out.push(ClusterRun {
                    start: c,
                    count: 1,
                    data,
                }),
            }
        }
    }
    out
}

/// Where everything goes, in clusters of the file.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    l1_entries: u64,
    l1_at: u64,
    l1_clusters: u64,
    reftable_at: u64,
    reftable_clusters: u64,
    refblocks_at: u64,
    refblocks: u64,
    /// Guest L2 indexes that get a table, ascending; table `i` at `l2_at + i`.
    l2: Vec<u64>,
    l2_at: u64,
    data_at: u64,
    data_clusters: u64,
    /// Clusters in the file.
    total: u64,
}

fn layout(size: u64, runs: &[ClusterRun]) -> Layout {
    let l1_entries = size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
    let mut l2: Vec<u64> = Vec::new();
    let mut data_clusters = 0;
    for r in runs {
        if r.data {
            data_clusters += r.count;
        }
        for t in r.start / L2_ENTRIES..=(r.start + r.count - 1) / L2_ENTRIES {
            if l2.last() != Some(&t) {
                l2.push(t);
            }
        }
    }
    let fixed = 1 + l1_clusters + l2.len() as u64 + data_clusters;
    // The refcount structures count themselves: grow until they cover all.
    let (mut refblocks, mut reftable_clusters) = (1u64, 1u64);
    loop {
        let total = fixed + refblocks + reftable_clusters;
        let rb = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let rt = (rb * 8).div_ceil(CLUSTER);
        if rb == refblocks && rt == reftable_clusters {
            break;
        }
        refblocks = rb.max(refblocks);
        reftable_clusters = rt.max(reftable_clusters);
    }
    let l1_at = 1;
    let reftable_at = l1_at + l1_clusters;
    let refblocks_at = reftable_at + reftable_clusters;
    let l2_at = refblocks_at + refblocks;
    let data_at = l2_at + l2.len() as u64;
    Layout {
        l1_entries,
        l1_at,
        l1_clusters,
        reftable_at,
        reftable_clusters,
        refblocks_at,
        refblocks,
        data_at,
        data_clusters,
        total: data_at + data_clusters,
        l2,
        l2_at,
    }
}

fn header(size: u64, lay: &Layout, backing: Option<&Backing>) -> io::Result<Vec<u8>> {
    let mut h = Vec::with_capacity(CLUSTER as usize);
    let mut ext = Vec::new();
    if let Some(b) = backing {
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&(b.format.len() as u32).to_be_bytes());
        ext.extend_from_slice(b.format.as_bytes());
        ext.resize(ext.len().next_multiple_of(8), 0);
    }
    ext.extend_from_slice(&[0u8; 8]); // end of extensions
    let name_at = HEADER_LEN as u64 + ext.len() as u64;
    let (bf_off, bf_len) = match backing {
        Some(b) => (name_at, b.name.len() as u32),
        None => (0, 0),
    };
    h.extend_from_slice(&MAGIC.to_be_bytes());
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&bf_off.to_be_bytes());
    h.extend_from_slice(&bf_len.to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt method
    h.extend_from_slice(&(lay.l1_entries as u32).to_be_bytes());
    h.extend_from_slice(&(lay.l1_at * CLUSTER).to_be_bytes());
    h.extend_from_slice(&(lay.reftable_at * CLUSTER).to_be_bytes());
    h.extend_from_slice(&(lay.reftable_clusters as u32).to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h.extend_from_slice(&HEADER_LEN.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN as usize);
    h.extend_from_slice(&ext);
    if let Some(b) = backing {
        h.extend_from_slice(b.name.as_bytes());
    }
    if h.len() > CLUSTER as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "qcow2 header does not fit its cluster",
        ));
    }
    h.resize(CLUSTER as usize, 0);
    Ok(h)
}

fn table(entries: impl IntoIterator<Item = u64>, clusters: u64) -> Vec<u8> {
    let mut t: Vec<u8> = entries.into_iter().flat_map(u64::to_be_bytes).collect();
    t.resize((clusters * CLUSTER) as usize, 0);
    t
}

/// Writes `map`'s image (read from `src`) into `out` (expected empty) as a
/// qcow2: a full image without `backing`, an overlay of the changed clusters
/// over `backing` with it (the map must then have changed ranges).
pub fn write(
    map: &ImageMap,
    src: &mut dyn ReadAt,
    out: &File,
    backing: Option<&Backing>,
    progress: Progress,
) -> io::Result<Summary> {
    map.validate()?;
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    if backing.is_some() != map.changed.is_some() {
        return Err(invalid(
            "qcow2: an overlay needs both a base and a backing file",
        ));
    }
    if let Some(b) = backing {
        if b.name.is_empty() || b.name.len() > MAX_BACKING_NAME {
            return Err(invalid("qcow2: backing file name empty or over 1023 bytes"));
        }
        if b.format != "raw" && b.format != "qcow2" {
            return Err(invalid("qcow2: backing format must be raw or qcow2"));
        }
    }
    let started = Instant::now();
    let vsize = map.size.next_multiple_of(512);
    let runs = clusters(map);
    let lay = layout(vsize, &runs);
    let mut w = BufWriter::with_capacity(CHUNK as usize, out);
    w.write_all(&header(vsize, &lay, backing)?)?;
    // L1: each entry points at its L2 table, if it has one.
    let mut l1 = vec![0u64; lay.l1_entries as usize];
    for (i, t) in lay.l2.iter().enumerate() {
        l1[*t as usize] = ((lay.l2_at + i as u64) * CLUSTER) | COPIED;
    }
    w.write_all(&table(l1, lay.l1_clusters))?;
    w.write_all(&table(
        (0..lay.refblocks).map(|i| (lay.refblocks_at + i) * CLUSTER),
        lay.reftable_clusters,
    ))?;
    for b in 0..lay.refblocks {
        let mut block = vec![0u8; CLUSTER as usize];
        for (k, e) in block.chunks_exact_mut(2).enumerate() {
            if b * REFCOUNTS_PER_BLOCK + (k as u64) < lay.total {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
        }
        w.write_all(&block)?;
    }
    // L2 tables, walking the runs once; data clusters numbered in order.
    let mut next_data = 0u64;
    let mut ri = 0usize;
    for &t in &lay.l2 {
        let mut l2 = vec![0u64; L2_ENTRIES as usize];
        let (lo, hi) = (t * L2_ENTRIES, (t + 1) * L2_ENTRIES);
        while ri < runs.len() && runs[ri].start + runs[ri].count <= lo {
            ri += 1;
        }
        let mut j = ri;
        while j < runs.len() && runs[j].start < hi {
            let r = runs[j];
            let (s, e) = (r.start.max(lo), (r.start + r.count).min(hi));
            for c in s..e {
                l2[(c - lo) as usize] = if r.data {
                    let host = (lay.data_at + next_data) * CLUSTER;
                    next_data += 1;
                    host | COPIED
                } else {
                    ZERO
                };
            }
            j += 1;
        }
        w.write_all(&table(l2, 1))?;
    }
    debug_assert_eq!(next_data, lay.data_clusters);
    // Data clusters, in the same order.
    let total = lay.data_clusters * CLUSTER;
    let mut done = 0u64;
    let mut read = 0u64;
    let mut buf = Vec::new();
    for r in runs.iter().filter(|r| r.data) {
        let (mut pos, end) = (r.start * CLUSTER, (r.start + r.count) * CLUSTER);
        while pos < end {
            let n = (end - pos).min(CHUNK);
            buf.clear();
            buf.resize(n as usize, 0);
            // The last cluster may pass the image's end: zeros there.
            let avail = map.size.saturating_sub(pos).min(n) as usize;
            src.read_at(pos, &mut buf[..avail])?;
            w.write_all(&buf)?;
            pos += n;
            done += n;
            read += avail as u64;
            progress(done, total);
        }
    }
    w.flush()?;
    drop(w);
    out.sync_all()?;
    Ok(Summary::finish(
        if backing.is_some() {
            "qcow2 overlay"
        } else {
            "qcow2"
        },
        started,
        lay.total * CLUSTER,
        read,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::Piece;
    use super::super::testing::{map, pattern};
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// Reads the guest image back from a qcow2 written here (no backing:
    /// unallocated reads zeros; with one, it is given as `base`).
    fn read_back(file: &[u8], base: Option<&[u8]>) -> Vec<u8> {
        let be64 = |o: usize| u64::from_be_bytes(file[o..o + 8].try_into().expect("8 bytes"));
        let be32 = |o: usize| u32::from_be_bytes(file[o..o + 4].try_into().expect("4 bytes"));
        assert_eq!(be32(0), MAGIC);
        assert_eq!(be32(4), 3);
        assert_eq!(be32(20), CLUSTER_BITS);
        assert_eq!(be32(96), REFCOUNT_ORDER);
        let size = be64(24) as usize;
        let l1_entries = be32(36) as usize;
        let l1 = be64(40) as usize;
        let mut img = vec![0u8; size];
        if let Some(b) = base {
            let n = b.len().min(size);
            img[..n].copy_from_slice(&b[..n]);
        }
        for i in 0..l1_entries {
            let l2 = (be64(l1 + 8 * i) & !COPIED) as usize;
            if l2 == 0 {
                continue;
            }
            for k in 0..L2_ENTRIES as usize {
                let e = be64(l2 + 8 * k);
                let g = (i * L2_ENTRIES as usize + k) * CLUSTER as usize;
                if g >= size || e == 0 {
                    continue;
                }
                let n = (size - g).min(CLUSTER as usize);
                if e & ZERO != 0 {
                    img[g..g + n].fill(0);
                } else {
                    let h = (e & !COPIED) as usize;
                    img[g..g + n].copy_from_slice(&file[h..h + n]);
                }
            }
        }
        img
    }

    fn export(m: &ImageMap, img: &[u8], backing: Option<&Backing>, path: &Path) -> Vec<u8> {
        let f = File::create(path).expect("create");
        let mut src: &[u8] = img;
        let s = write(m, &mut src, &f, backing, &mut |_, _| ()).expect("export");
        let bytes = std::fs::read(path).expect("read");
        assert_eq!(s.bytes_written, bytes.len() as u64);
        bytes
    }

    fn qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok()
    }

    fn qemu_check(path: &Path) {
        let o = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(path)
            .output()
            .expect("qemu-img check");
        assert!(
            o.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    #[test]
    fn header_offsets_are_pinned() {
        let lay = layout(1 << 30, &[]);
        let b = Backing {
            name: "base.raw".into(),
            format: "raw".into(),
        };
        let h = header(1 << 30, &lay, Some(&b)).expect("header");
        assert_eq!(&h[0..8], &[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
        // Backing name after the format extension (8 + "raw" padded to 8) and the end marker.
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().expect("8")),
            104 + 16 + 8
        );
        assert_eq!(&h[104..108], &EXT_BACKING_FORMAT.to_be_bytes());
        assert_eq!(&h[128..136], b"base.raw");
        assert_eq!(u32::from_be_bytes(h[16..20].try_into().expect("4")), 8);
        assert_eq!(
            u64::from_be_bytes(h[24..32].try_into().expect("8")),
            1 << 30
        );
        assert_eq!(u32::from_be_bytes(h[36..40].try_into().expect("4")), 2); // 1 GiB / 512 MiB
        assert_eq!(u32::from_be_bytes(h[100..104].try_into().expect("4")), 104);
    }

    #[test]
    fn layout_counts_its_own_refcounts() {
        // 3 GiB of data: more clusters than one refcount block covers.
        let runs = [ClusterRun {
            start: 0,
            count: 3 << 14,
            data: true,
        }];
        let lay = layout(3 << 30, &runs);
        assert_eq!(lay.l2.len(), 6);
        assert_eq!(lay.refblocks, lay.total.div_ceil(REFCOUNTS_PER_BLOCK));
        assert!(lay.refblocks >= 2);
    }

    #[test]
    fn full_image_reads_back_and_passes_qemu_check() {
        let size = (512u64 << 20) + 3 * 4096; // over two L2 tables
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("full.qcow2");
        let mut img = vec![0u8; size as usize];
        let parts = [
            (4096u64, 4096u64, Piece::Data),
            (3 * CLUSTER + 100, 200, Piece::Data),
            (300 << 20, 2 * CLUSTER + 5, Piece::Data),
            (size - 8192, 8192, Piece::Data),
        ];
        for (i, (s, l, _)) in parts.iter().enumerate() {
            let (s, l) = (*s as usize, *l as usize);
            img[s..s + l].copy_from_slice(&pattern(i as u64, l));
        }
        let m = map(size, &parts, None);
        let file = export(&m, &img, None, &p);
        assert_eq!(read_back(&file, None), img);
        // Only the clusters with data are allocated.
        let lay = layout(size, &clusters(&m));
        assert_eq!(lay.data_clusters, 1 + 1 + 3 + 1);
        if qemu_img() {
            qemu_check(&p);
        }
    }

    #[test]
    fn overlay_writes_changed_clusters_and_zero_flags() {
        let size = 16 * CLUSTER;
        let old = pattern(1, size as usize);
        let mut new = old.clone();
        // Cluster 2: one block rewritten (the whole cluster is exported);
        // clusters 5-6: punched; cluster 9: half punched, half kept.
        new[2 * CLUSTER as usize..2 * CLUSTER as usize + 4096].copy_from_slice(&pattern(9, 4096));
        new[5 * CLUSTER as usize..7 * CLUSTER as usize].fill(0);
        new[9 * CLUSTER as usize..9 * CLUSTER as usize + 32768].fill(0);
        let c = CLUSTER;
        let m = map(
            size,
            &[
                (0, 5 * c, Piece::Data),
                (7 * c, 2 * c, Piece::Data),
                (9 * c + 32768, 7 * c - 32768, Piece::Data),
            ],
            Some(&[
                (2 * c, 2 * c + 4096),
                (5 * c, 7 * c),
                (9 * c, 9 * c + 32768),
            ]),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("base.raw"), &old).expect("base");
        let b = Backing {
            name: "base.raw".into(),
            format: "raw".into(),
        };
        let p = dir.path().join("over.qcow2");
        let file = export(&m, &new, Some(&b), &p);
        assert_eq!(read_back(&file, Some(&old)), new);
        let runs = clusters(&m);
        assert_eq!(
            runs,
            vec![
                ClusterRun {
                    start: 2,
                    count: 1,
                    data: true
                },
                ClusterRun {
                    start: 5,
                    count: 2,
                    data: false
                },
                ClusterRun {
                    start: 9,
                    count: 1,
                    data: true
                },
            ]
        );
        if qemu_img() {
            qemu_check(&p);
            let raw = dir.path().join("new.raw");
            std::fs::write(&raw, &new).expect("new");
            let o = Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "raw"])
                .arg(&p)
                .arg(&raw)
                .output()
                .expect("qemu-img compare");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        }
    }

    #[test]
    fn refuses_mismatched_backing() {
        let m = map(CLUSTER, &[], None);
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::create(dir.path().join("x")).expect("create");
        let mut src: &[u8] = &[0u8; CLUSTER as usize];
        let b = Backing {
            name: "b".into(),
            format: "raw".into(),
        };
        assert!(write(&m, &mut src, &f, Some(&b), &mut |_, _| ()).is_err());
        let m = map(CLUSTER, &[], Some(&[(0, 10)]));
        let bad = Backing {
            name: "b".into(),
            format: "vmdk".into(),
        };
        assert!(write(&m, &mut src, &f, Some(&bad), &mut |_, _| ()).is_err());
    }
}
