//! The send stream, byte by byte (docs/design.md section 22): what `vpool
//! snapshot send` writes and `receive`, `stream restore`, `stream verify`
//! and `stream list` read. It depends on nothing but this module: a stream
//! is readable without a pool.
//!
//! ```text
//! stream  := MAGIC record*            MAGIC = "VPSTREAM" (8 bytes)
//! record  := tag u8 | 0 u8[3] | len u32 | payload[len] | crc32c u32
//! ```
//! The CRC-32C of each record covers its tag, the three zero bytes, `len`
//! and the payload. The first record is `B` (begin) or `R` (resume); the
//! last is `E`, whose `stream_crc` is the CRC-32C of every byte before it
//! from the magic on, and nothing follows it. All integers little-endian.
//!
//! Order (checked by [`Checker`]): `B`, then every inode `I` in ascending
//! inode number, every entry `D` in ascending (parent, name), then for each
//! file whose data the stream carries, ascending by inode, an `F` followed
//! by its runs `W`, `Z`, `H` in ascending, non-overlapping block order, all
//! below the file's size; then `E`.
//!
//! A resumed stream (`send --resume TOKEN`) is `MAGIC R` followed by the
//! bytes of the original stream from the token's offset (a record boundary)
//! on: the receiver checks the token against what it kept and carries on.
//!
//! One file for one format (about 800 lines, a third of them tests): the
//! records, their encoder, decoder and order checker, the resume token and
//! the byte-map tests, so that the byte map is read and pinned in one place.

use crate::bytes::LeReader;

/// The first eight bytes of every stream.
pub const MAGIC: &[u8; 8] = b"VPSTREAM";
/// The version in `B` and `R` records; a reader refuses any other.
pub const VERSION: u16 = 1;
/// Bytes of a record around its payload: tag, padding, length, CRC.
pub const RECORD_OVERHEAD: usize = 12;
/// The largest payload a reader accepts (a data frame is at most 256 blocks
/// of at most 1 MiB each, compressed; zstd's worst case is barely more).
pub const MAX_PAYLOAD: u32 = 260 << 20;
/// Most blocks in one data record (a delta frame's limit).
pub const MAX_FRAME_BLOCKS: u32 = 256;
/// Inode numbers a stream may carry (those a snapshot view can number).
pub const MAX_INO: u64 = (1 << 40) - 1;
/// Longest snapshot name, entry name, symlink target, xattr name and value.
pub const MAX_NAME: usize = 255;
pub const MAX_TARGET: usize = 4096;
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 << 10;

/// Record tags.
pub mod tag {
    pub const BEGIN: u8 = b'B';
    pub const RESUME: u8 = b'R';
    pub const INODE: u8 = b'I';
    pub const DIRENT: u8 = b'D';
    pub const FILE: u8 = b'F';
    pub const DATA: u8 = b'W';
    pub const ZERO: u8 = b'Z';
    pub const HOLE: u8 = b'H';
    pub const END: u8 = b'E';
}

/// Which snapshot, on any pool: the pool it was taken on, its id there and
/// its creation time. A received snapshot keeps its origin's identity, so a
/// chain relayed through several pools still matches (cf. ZFS's GUIDs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Identity {
    pub pool: [u8; 16],
    pub id: u64,
    pub secs: i64,
    pub nanos: u32,
}

/// Bytes of an encoded [`Identity`].
pub const IDENTITY_LEN: usize = 40;

impl Identity {
    pub fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.pool);
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.secs.to_le_bytes());
        b.extend_from_slice(&self.nanos.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }

    fn decode(r: &mut LeReader) -> Result<Identity, String> {
        let pool = r.array("identity pool")?;
        let id = r.u64("identity id")?;
        let secs = r.i64("identity seconds")?;
        let nanos = r.u32("identity nanoseconds")?;
        r.u32("identity padding")?;
        Ok(Identity {
            pool,
            id,
            secs,
            nanos,
        })
    }

    pub fn is_zero(&self) -> bool {
        *self == Identity::default()
    }

    /// Lowercase hex of the encoding (names a resume's spool file).
    pub fn hex(&self) -> String {
        let mut b = Vec::new();
        self.encode(&mut b);
        hex(&b[..32])
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `B`: what the stream holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub block_size: u32,
    /// Relative to `base` (an incremental) or complete (a full).
    pub incremental: bool,
    pub snapshot: Identity,
    /// All zeros in a full stream.
    pub base: Identity,
    /// The pool that wrote the stream.
    pub sender: [u8; 16],
    pub inodes: u64,
    /// Sum of the sizes of the files.
    pub logical_bytes: u64,
    pub name: String,
}

/// `R`: the rest of an interrupted stream, from `offset` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub snapshot: Identity,
    /// Where the rest starts in the original stream (a record boundary).
    pub offset: u64,
    /// CRC-32C of the original stream's bytes before `offset`.
    pub prefix_crc: u32,
}

/// The kinds of inode a stream carries (`I`'s `kind` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl InodeKind {
    fn from_u8(v: u8) -> Option<InodeKind> {
        Some(match v {
            1 => InodeKind::File,
            2 => InodeKind::Dir,
            3 => InodeKind::Symlink,
            4 => InodeKind::Fifo,
            5 => InodeKind::Socket,
            6 => InodeKind::CharDev,
            7 => InodeKind::BlockDev,
            _ => return None,
        })
    }
}

/// `I`: one inode's attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    pub kind: InodeKind,
    /// Permission and set-id bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    /// (seconds, nanoseconds) since the epoch.
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Directories: the parent (the root is its own).
    pub parent: u64,
    pub target: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Bytes of `I`'s fixed part.
pub const INODE_FIXED: usize = 96;

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Begin(Begin),
    Resume(Resume),
    Inode(Inode),
    Dirent {
        parent: u64,
        name: Vec<u8>,
        child: u64,
    },
    /// The data of file `ino` follows; `size` is its size in bytes.
    File {
        ino: u64,
        size: u64,
    },
    /// `count` blocks from `start`, compressed into one zstd frame whose
    /// CRC-32C is `crc` (as a delta file stores it).
    Data {
        start: u64,
        count: u32,
        crc: u32,
        frame: Vec<u8>,
    },
    /// Allocated blocks that read as zeros.
    Zero {
        start: u64,
        count: u64,
    },
    /// Unallocated blocks.
    Hole {
        start: u64,
        count: u64,
    },
    End {
        /// Records before this one, `B` included.
        records: u64,
        /// Blocks carried by `W` records.
        data_blocks: u64,
        stream_crc: u32,
    },
}

impl Record {
    pub fn tag(&self) -> u8 {
        match self {
            Record::Begin(_) => tag::BEGIN,
            Record::Resume(_) => tag::RESUME,
            Record::Inode(_) => tag::INODE,
            Record::Dirent { .. } => tag::DIRENT,
            Record::File { .. } => tag::FILE,
            Record::Data { .. } => tag::DATA,
            Record::Zero { .. } => tag::ZERO,
            Record::Hole { .. } => tag::HOLE,
            Record::End { .. } => tag::END,
        }
    }

    /// The payload's bytes.
    pub fn payload(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Record::Begin(x) => {
                b.extend_from_slice(&VERSION.to_le_bytes());
                b.extend_from_slice(&0u16.to_le_bytes());
                b.extend_from_slice(&x.block_size.to_le_bytes());
                b.push(u8::from(x.incremental));
                b.extend_from_slice(&[0; 7]);
                x.snapshot.encode(&mut b);
                x.base.encode(&mut b);
                b.extend_from_slice(&x.sender);
                b.extend_from_slice(&x.inodes.to_le_bytes());
                b.extend_from_slice(&x.logical_bytes.to_le_bytes());
                b.extend_from_slice(&(x.name.len() as u16).to_le_bytes());
                b.extend_from_slice(x.name.as_bytes());
            }
            Record::Resume(x) => {
                b.extend_from_slice(&VERSION.to_le_bytes());
                b.extend_from_slice(&0u16.to_le_bytes());
                b.extend_from_slice(&x.prefix_crc.to_le_bytes());
                b.extend_from_slice(&x.offset.to_le_bytes());
                x.snapshot.encode(&mut b);
            }
            Record::Inode(x) => {
                b.extend_from_slice(&x.ino.to_le_bytes());
                b.push(x.kind as u8);
                b.extend_from_slice(&[0; 3]);
                for v in [x.mode, x.uid, x.gid, x.nlink, x.rdev] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&x.size.to_le_bytes());
                for (s, n) in [x.atime, x.mtime, x.ctime] {
                    b.extend_from_slice(&s.to_le_bytes());
                    b.extend_from_slice(&n.to_le_bytes());
                }
                b.extend_from_slice(&(x.target.len() as u32).to_le_bytes());
                b.extend_from_slice(&x.parent.to_le_bytes());
                b.extend_from_slice(&(x.xattrs.len() as u32).to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(&x.target);
                for (n, v) in &x.xattrs {
                    b.extend_from_slice(&(n.len() as u16).to_le_bytes());
                    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    b.extend_from_slice(n);
                    b.extend_from_slice(v);
                }
            }
            Record::Dirent {
                parent,
                name,
                child,
            } => {
                b.extend_from_slice(&parent.to_le_bytes());
                b.extend_from_slice(&child.to_le_bytes());
                b.extend_from_slice(&(name.len() as u16).to_le_bytes());
                b.extend_from_slice(name);
            }
            Record::File { ino, size } => {
                b.extend_from_slice(&ino.to_le_bytes());
                b.extend_from_slice(&size.to_le_bytes());
            }
            Record::Data {
                start,
                count,
                crc,
                frame,
            } => {
                b.extend_from_slice(&start.to_le_bytes());
                b.extend_from_slice(&count.to_le_bytes());
                b.extend_from_slice(&crc.to_le_bytes());
                b.extend_from_slice(frame);
            }
            Record::Zero { start, count } | Record::Hole { start, count } => {
                b.extend_from_slice(&start.to_le_bytes());
                b.extend_from_slice(&count.to_le_bytes());
            }
            Record::End {
                records,
                data_blocks,
                stream_crc,
            } => {
                b.extend_from_slice(&records.to_le_bytes());
                b.extend_from_slice(&data_blocks.to_le_bytes());
                b.extend_from_slice(&stream_crc.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
            }
        }
        b
    }

    /// The whole record: header, payload, CRC.
    pub fn encode(&self) -> Vec<u8> {
        let p = self.payload();
        let mut b = Vec::with_capacity(p.len() + RECORD_OVERHEAD);
        b.push(self.tag());
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(&p);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a payload of record `tag` (its CRC already checked).
    pub fn decode(tag: u8, p: &[u8]) -> Result<Record, String> {
        let mut r = LeReader::new(p);
        let rec = match tag {
            tag::BEGIN => {
                version(&mut r)?;
                r.u16("flags")?;
                let block_size = r.u32("block size")?;
                let incremental = match r.u8("kind")? {
                    0 => false,
                    1 => true,
                    k => return Err(format!("unknown stream kind {k}")),
                };
                r.bytes(7, "padding")?;
                let snapshot = Identity::decode(&mut r)?;
                let base = Identity::decode(&mut r)?;
                let sender = r.array("sender pool")?;
                let inodes = r.u64("inode count")?;
                let logical_bytes = r.u64("logical bytes")?;
                let n = r.u16("name length")? as usize;
                let name = String::from_utf8(r.bytes(n, "name")?.to_vec())
                    .map_err(|_| "snapshot name is not UTF-8".to_string())?;
                if !block_size.is_power_of_two() || !(512..=(1 << 20)).contains(&block_size) {
                    return Err(format!(
                        "block size {block_size} is not a power of two in 512..=1 MiB"
                    ));
                }
                if incremental == base.is_zero() {
                    return Err("the base identity contradicts the stream kind".into());
                }
                if name.is_empty() || name.len() > MAX_NAME {
                    return Err(format!("snapshot name of {} bytes", name.len()));
                }
                Record::Begin(Begin {
                    block_size,
                    incremental,
                    snapshot,
                    base,
                    sender,
                    inodes,
                    logical_bytes,
                    name,
                })
            }
            tag::RESUME => {
                version(&mut r)?;
                r.u16("flags")?;
                let prefix_crc = r.u32("prefix crc")?;
                let offset = r.u64("offset")?;
                let snapshot = Identity::decode(&mut r)?;
                Record::Resume(Resume {
                    snapshot,
                    offset,
                    prefix_crc,
                })
            }
            tag::INODE => {
                let ino = r.u64("ino")?;
                let k = r.u8("kind")?;
                let kind = InodeKind::from_u8(k).ok_or(format!("inode {ino}: unknown kind {k}"))?;
                r.bytes(3, "padding")?;
                let mode = r.u32("mode")?;
                let uid = r.u32("uid")?;
                let gid = r.u32("gid")?;
                let nlink = r.u32("nlink")?;
                let rdev = r.u32("rdev")?;
                let size = r.u64("size")?;
                let mut t = || -> Result<(i64, u32), String> {
                    let s = r.i64("time seconds")?;
                    let n = r.u32("time nanoseconds")?;
                    if n >= 1_000_000_000 {
                        return Err(format!("inode {ino}: {n} nanoseconds"));
                    }
                    Ok((s, n))
                };
                let (atime, mtime, ctime) = (t()?, t()?, t()?);
                let tlen = r.u32("target length")? as usize;
                let parent = r.u64("parent")?;
                let nx = r.u32("xattr count")? as usize;
                r.u32("padding")?;
                if tlen > MAX_TARGET {
                    return Err(format!("inode {ino}: symlink target of {tlen} bytes"));
                }
                let target = r.bytes(tlen, "target")?.to_vec();
                let mut xattrs = Vec::new();
                for _ in 0..nx {
                    let nl = r.u16("xattr name length")? as usize;
                    let vl = r.u32("xattr value length")? as usize;
                    if nl == 0 || nl > MAX_XATTR_NAME || vl > MAX_XATTR_VALUE {
                        return Err(format!("inode {ino}: xattr of {nl}+{vl} bytes"));
                    }
                    let n = r.bytes(nl, "xattr name")?.to_vec();
                    let v = r.bytes(vl, "xattr value")?.to_vec();
                    xattrs.push((n, v));
                }
                Record::Inode(Inode {
                    ino,
                    kind,
                    mode,
                    uid,
                    gid,
                    nlink,
                    rdev,
                    size,
                    atime,
                    mtime,
                    ctime,
                    parent,
                    target,
                    xattrs,
                })
            }
            tag::DIRENT => {
                let parent = r.u64("parent")?;
                let child = r.u64("child")?;
                let n = r.u16("name length")? as usize;
                let name = r.bytes(n, "name")?.to_vec();
                Record::Dirent {
                    parent,
                    name,
                    child,
                }
            }
            tag::FILE => Record::File {
                ino: r.u64("ino")?,
                size: r.u64("size")?,
            },
            tag::DATA => {
                let start = r.u64("start")?;
                let count = r.u32("count")?;
                let crc = r.u32("frame crc")?;
                let frame = r.bytes(r.remaining(), "frame")?.to_vec();
                if crc32c::crc32c(&frame) != crc {
                    return Err(format!("data frame at block {start}: checksum mismatch"));
                }
                Record::Data {
                    start,
                    count,
                    crc,
                    frame,
                }
            }
            tag::ZERO => Record::Zero {
                start: r.u64("start")?,
                count: r.u64("count")?,
            },
            tag::HOLE => Record::Hole {
                start: r.u64("start")?,
                count: r.u64("count")?,
            },
            tag::END => {
                let records = r.u64("record count")?;
                let data_blocks = r.u64("data blocks")?;
                let stream_crc = r.u32("stream crc")?;
                r.u32("padding")?;
                Record::End {
                    records,
                    data_blocks,
                    stream_crc,
                }
            }
            t => return Err(format!("unknown record tag {t:#04x}")),
        };
        if r.remaining() != 0 {
            return Err(format!(
                "record {:?}: {} bytes after its fields",
                tag as char,
                r.remaining()
            ));
        }
        Ok(rec)
    }
}

fn version(r: &mut LeReader) -> Result<(), String> {
    let v = r.u16("version")?;
    if v != VERSION {
        return Err(format!(
            "stream version {v}; this vpool reads version {VERSION}"
        ));
    }
    Ok(())
}

/// A resume token: what a receive kept of an interrupted stream, for `send
/// --resume`. Text: `vpr1-` then the hex of identity (40 bytes), offset
/// (u64), prefix CRC (u32) and a CRC-32C of those 52 bytes (u32).
pub fn token_encode(r: &Resume) -> String {
    let mut b = Vec::new();
    r.snapshot.encode(&mut b);
    b.extend_from_slice(&r.offset.to_le_bytes());
    b.extend_from_slice(&r.prefix_crc.to_le_bytes());
    let c = crc32c::crc32c(&b);
    b.extend_from_slice(&c.to_le_bytes());
    format!("vpr1-{}", hex(&b))
}

pub fn token_decode(s: &str) -> Result<Resume, String> {
    let bad = || format!("{s:?} is not a resume token (one looks like vpr1-0123abcd...)");
    let b = s
        .trim()
        .strip_prefix("vpr1-")
        .and_then(unhex)
        .ok_or_else(bad)?;
    if b.len() != IDENTITY_LEN + 16 {
        return Err(bad());
    }
    let mut r = LeReader::new(&b);
    let snapshot = Identity::decode(&mut r)?;
    let offset = r.u64("offset")?;
    let prefix_crc = r.u32("prefix crc")?;
    let c = r.u32("token crc")?;
    if crc32c::crc32c(&b[..IDENTITY_LEN + 12]) != c {
        return Err(format!(
            "resume token {s:?} is damaged (its checksum does not match)"
        ));
    }
    Ok(Resume {
        snapshot,
        offset,
        prefix_crc,
    })
}

/// Writes records to `w`, keeping the running CRC and the counts for `E`.
pub struct Encoder<W: std::io::Write> {
    w: W,
    crc: u32,
    records: u64,
    data_blocks: u64,
    /// Bytes written so far, the magic included.
    pub written: u64,
}

impl<W: std::io::Write> Encoder<W> {
    pub fn new(mut w: W) -> std::io::Result<Self> {
        w.write_all(MAGIC)?;
        Ok(Encoder {
            w,
            crc: crc32c::crc32c(MAGIC),
            records: 0,
            data_blocks: 0,
            written: MAGIC.len() as u64,
        })
    }

    pub fn put(&mut self, r: &Record) -> std::io::Result<()> {
        if let Record::Data { count, .. } = r {
            self.data_blocks += u64::from(*count);
        }
        let b = r.encode();
        self.w.write_all(&b)?;
        self.crc = crc32c::crc32c_append(self.crc, &b);
        self.records += 1;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Writes `E` and returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let end = Record::End {
            records: self.records,
            data_blocks: self.data_blocks,
            stream_crc: self.crc,
        };
        self.w.write_all(&end.encode())?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Reads records from `r`, checking each CRC and, at `E`, the stream's.
/// After `E` it expects the end of the input.
pub struct Decoder<R: std::io::Read> {
    r: R,
    crc: u32,
    records: u64,
    data_blocks: u64,
    /// Bytes consumed so far (the offset of the next record).
    pub offset: u64,
    done: bool,
}

impl<R: std::io::Read> Decoder<R> {
    /// Checks the magic.
    pub fn new(mut r: R) -> Result<Self, String> {
        let mut m = [0u8; 8];
        read_full(&mut r, &mut m, "stream magic")?;
        if &m != MAGIC {
            return Err("not a vpool stream (no VPSTREAM magic at its start)".into());
        }
        Ok(Decoder {
            r,
            crc: crc32c::crc32c(MAGIC),
            records: 0,
            data_blocks: 0,
            offset: 8,
            done: false,
        })
    }

    /// Continues a stream whose first `offset` bytes had CRC `crc` (a resume).
    pub fn resume_at(&mut self, offset: u64, crc: u32, records: u64, data_blocks: u64) {
        self.offset = offset;
        self.crc = crc;
        self.records = records;
        self.data_blocks = data_blocks;
    }

    /// The running CRC of every byte consumed.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    pub fn counts(&self) -> (u64, u64) {
        (self.records, self.data_blocks)
    }

    /// The next record with its encoded bytes, `None` after `E` at the end
    /// of the input.
    pub fn next_raw(&mut self) -> Result<Option<(Record, Vec<u8>)>, String> {
        if self.done {
            let mut x = [0u8; 1];
            return match self.r.read(&mut x) {
                Ok(0) => Ok(None),
                Ok(_) => Err(format!(
                    "bytes after the end record at offset {}",
                    self.offset
                )),
                Err(e) => Err(format!("reading the stream: {e}")),
            };
        }
        let at = self.offset;
        let mut h = [0u8; 8];
        read_full(&mut self.r, &mut h, "record header")
            .map_err(|e| format!("{e} at offset {at} (the stream is truncated)"))?;
        let t = h[0];
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if h[1..4] != [0, 0, 0] {
            return Err(format!("record at offset {at}: bad header"));
        }
        if len > MAX_PAYLOAD {
            return Err(format!("record at offset {at}: payload of {len} bytes"));
        }
        // Grown as the bytes arrive, never from the length field alone: a
        // cut or crafted stream cannot make this allocate what it does not hold.
        let mut b = Vec::with_capacity(8 + (len as usize).min(1 << 20) + 4);
        b.extend_from_slice(&h);
        let want = 8 + len as usize + 4;
        use std::io::Read as _;
        (&mut self.r)
            .take((len as u64) + 4)
            .read_to_end(&mut b)
            .map_err(|e| format!("reading the record at offset {at}: {e}"))?;
        if b.len() != want {
            return Err(format!(
                "end of input inside the record at offset {at} (the stream is truncated)"
            ));
        }
        let body = 8 + len as usize;
        let want = u32::from_le_bytes([b[body], b[body + 1], b[body + 2], b[body + 3]]);
        if crc32c::crc32c(&b[..body]) != want {
            return Err(format!(
                "record at offset {at}: checksum mismatch (the stream is corrupted)"
            ));
        }
        let rec =
            Record::decode(t, &b[8..body]).map_err(|e| format!("record at offset {at}: {e}"))?;
        if let Record::End {
            records,
            data_blocks,
            stream_crc,
        } = &rec
        {
            if *stream_crc != self.crc
                || *records != self.records
                || *data_blocks != self.data_blocks
            {
                return Err(format!(
                    "end record at offset {at}: the stream's checksum or counts do not match (the stream is corrupted)"
                ));
            }
            self.done = true;
        }
        if let Record::Data { count, .. } = &rec {
            self.data_blocks += u64::from(*count);
        }
        self.crc = crc32c::crc32c_append(self.crc, &b);
        self.records += 1;
        self.offset += b.len() as u64;
        Ok(Some((rec, b)))
    }

    pub fn next_record(&mut self) -> Result<Option<Record>, String> {
        Ok(self.next_raw()?.map(|(r, _)| r))
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

fn read_full(r: &mut impl std::io::Read, buf: &mut [u8], what: &str) -> Result<(), String> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Err(format!("end of input inside the {what}")),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the {what}: {e}")),
        }
    }
    Ok(())
}

/// Decompresses data frames with one zstd context and one buffer, reused:
/// a context made per frame cost more than decompressing a 64 KiB frame.
pub struct Frames {
    dctx: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
}

impl Frames {
    pub fn new() -> Result<Self, String> {
        Ok(Frames {
            dctx: zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?,
            buf: Vec::new(),
        })
    }

    /// The `want` bytes `frame` holds: its header must declare exactly that
    /// many (checked before anything is allocated for them).
    pub fn decompress(&mut self, frame: &[u8], want: usize) -> Result<&[u8], String> {
        match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) if n == want as u64 => {}
            _ => return Err(format!("the frame does not declare {want} bytes")),
        }
        self.buf.clear();
        self.buf.reserve(want);
        let n = self
            .dctx
            .decompress_to_buffer(frame, &mut self.buf)
            .map_err(|e| format!("zstd: {e}"))?;
        if n != want {
            return Err(format!("the frame holds {n} bytes, not {want}"));
        }
        Ok(&self.buf)
    }
}

/// Checks the order and the bounds of a stream's records, as it is read:
/// every consumer runs one, so that a crafted stream cannot make a receive
/// or a restore write outside a file or build a tree that does not hold.
#[derive(Default)]
pub struct Checker {
    pub begin: Option<Begin>,
    phase: u8,
    last_ino: Option<u64>,
    last_dirent: Option<(u64, Vec<u8>)>,
    /// Inodes declared: kind and size.
    pub inodes: std::collections::BTreeMap<u64, (InodeKind, u64)>,
    file: Option<(u64, u64)>,
    next_block: u64,
    last_file: Option<u64>,
    inode_count: u64,
}

impl Checker {
    /// Checks `r` against what came before it.
    pub fn check(&mut self, r: &Record) -> Result<(), String> {
        match r {
            Record::Begin(b) => {
                if self.phase != 0 {
                    return Err("a second begin record".into());
                }
                self.begin = Some(b.clone());
                self.phase = 1;
            }
            Record::Resume(_) => return Err("a resume record inside a stream".into()),
            Record::Inode(i) => {
                if self.phase != 1 {
                    return Err(format!("inode {} out of place", i.ino));
                }
                if i.ino == 0 || i.ino > MAX_INO {
                    return Err(format!("inode number {} out of range", i.ino));
                }
                if self.last_ino.is_some_and(|l| l >= i.ino) {
                    return Err(format!("inode {} out of order", i.ino));
                }
                if i.kind != InodeKind::Symlink && !i.target.is_empty() {
                    return Err(format!("inode {}: a target on a non-symlink", i.ino));
                }
                if self.last_ino.is_none() && (i.ino != 1 || i.kind != InodeKind::Dir) {
                    return Err("the first inode is not the root directory (inode 1)".into());
                }
                self.last_ino = Some(i.ino);
                self.inode_count += 1;
                self.inodes.insert(i.ino, (i.kind, i.size));
            }
            Record::Dirent {
                parent,
                name,
                child,
            } => {
                if self.phase == 1 {
                    self.phase = 2;
                    self.check_inode_count()?;
                }
                if self.phase != 2 {
                    return Err("a directory entry out of place".into());
                }
                if name.is_empty()
                    || name.len() > MAX_NAME
                    || name.contains(&b'/')
                    || name.contains(&0)
                    || name == b"."
                    || name == b".."
                {
                    return Err(format!(
                        "entry name {:?} is not a file name",
                        String::from_utf8_lossy(name)
                    ));
                }
                if self.inodes.get(parent).map(|k| k.0) != Some(InodeKind::Dir) {
                    return Err(format!(
                        "entry {:?}: parent {parent} is not a directory",
                        String::from_utf8_lossy(name)
                    ));
                }
                if *child == 1 || !self.inodes.contains_key(child) {
                    return Err(format!(
                        "entry {:?}: unknown inode {child}",
                        String::from_utf8_lossy(name)
                    ));
                }
                let key = (*parent, name.clone());
                if self.last_dirent.as_ref().is_some_and(|l| *l >= key) {
                    return Err("directory entries out of order".into());
                }
                self.last_dirent = Some(key);
            }
            Record::File { ino, size } => {
                if self.phase == 1 {
                    self.check_inode_count()?;
                }
                if self.phase == 0 || self.phase > 3 {
                    return Err("a file record out of place".into());
                }
                self.phase = 3;
                if self.last_file.is_some_and(|l| l >= *ino) {
                    return Err(format!("file {ino} out of order"));
                }
                match self.inodes.get(ino) {
                    Some((InodeKind::File, s)) if s == size => {}
                    _ => {
                        return Err(format!(
                            "file record for {ino}, which is no file of that size"
                        ));
                    }
                }
                self.last_file = Some(*ino);
                self.file = Some((*ino, *size));
                self.next_block = 0;
            }
            Record::Data { start, count, .. } => {
                // A delta frame's bound: what a reader may decompress at once.
                if !(1..=MAX_FRAME_BLOCKS).contains(count) {
                    return Err(format!(
                        "data at block {start}: {count} blocks in one frame"
                    ));
                }
                self.run(*start, u64::from(*count))?
            }
            Record::Zero { start, count } | Record::Hole { start, count } => {
                self.run(*start, *count)?
            }
            Record::End { .. } => {
                if self.phase == 0 {
                    return Err("an end record with no begin".into());
                }
                if self.phase == 1 {
                    self.check_inode_count()?;
                }
                self.phase = 4;
            }
        }
        Ok(())
    }

    fn check_inode_count(&self) -> Result<(), String> {
        match &self.begin {
            Some(b) if b.inodes == self.inode_count => Ok(()),
            Some(b) => Err(format!(
                "{} inodes, the begin record says {}",
                self.inode_count, b.inodes
            )),
            None => Err("no begin record".into()),
        }
    }

    fn run(&mut self, start: u64, count: u64) -> Result<(), String> {
        let (Some((ino, size)), Some(b)) = (self.file, &self.begin) else {
            return Err("data outside a file".into());
        };
        let bs = u64::from(b.block_size);
        let end = start.checked_add(count).ok_or("run overflows")?;
        if count == 0 || start < self.next_block || end > size.div_ceil(bs) {
            return Err(format!(
                "file {ino}: run of blocks {start}..{end} out of order or past its size"
            ));
        }
        self.next_block = end;
        Ok(())
    }

    /// Whether the whole stream was seen (its end record checked).
    pub fn complete(&self) -> bool {
        self.phase == 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(id: u64) -> Identity {
        Identity {
            pool: [7; 16],
            id,
            secs: 1_700_000_000,
            nanos: 5,
        }
    }

    fn sample() -> Vec<Record> {
        let frame = zstd::bulk::compress(&[1u8; 8192], 3).unwrap();
        vec![
            Record::Begin(Begin {
                block_size: 4096,
                incremental: false,
                snapshot: ident(3),
                base: Identity::default(),
                sender: [7; 16],
                inodes: 2,
                logical_bytes: 10_000,
                name: "s1".into(),
            }),
            Record::Inode(Inode {
                ino: 1,
                kind: InodeKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                rdev: 0,
                size: 0,
                atime: (1, 2),
                mtime: (3, 4),
                ctime: (5, 6),
                parent: 1,
                target: vec![],
                xattrs: vec![],
            }),
            Record::Inode(Inode {
                ino: 5,
                kind: InodeKind::File,
                mode: 0o640,
                uid: 1000,
                gid: 1000,
                nlink: 1,
                rdev: 0,
                size: 10_000,
                atime: (1, 2),
                mtime: (3, 4),
                ctime: (5, 6),
                parent: 0,
                target: vec![],
                xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
            }),
            Record::Dirent {
                parent: 1,
                name: b"disk.img".to_vec(),
                child: 5,
            },
            Record::File {
                ino: 5,
                size: 10_000,
            },
            Record::Data {
                start: 0,
                count: 2,
                crc: crc32c::crc32c(&frame),
                frame,
            },
            Record::Hole { start: 2, count: 1 },
        ]
    }

    fn encode(recs: &[Record]) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new()).unwrap();
        for r in recs {
            e.put(r).unwrap();
        }
        e.finish().unwrap()
    }

    fn decode_all(b: &[u8]) -> Result<Vec<Record>, String> {
        let mut d = Decoder::new(b)?;
        let mut c = Checker::default();
        let mut out = Vec::new();
        while let Some(r) = d.next_record()? {
            c.check(&r)?;
            out.push(r);
        }
        if !c.complete() {
            return Err("incomplete".into());
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let recs = sample();
        let b = encode(&recs);
        let got = decode_all(&b).unwrap();
        assert_eq!(&got[..recs.len()], &recs[..]);
        assert!(matches!(
            got.last(),
            Some(Record::End {
                records: 7,
                data_blocks: 2,
                ..
            })
        ));
    }

    /// Byte map of design.md section 22: the offsets a reader relies on.
    #[test]
    fn byte_map() {
        let recs = sample();
        let b = encode(&recs);
        assert_eq!(&b[..8], b"VPSTREAM");
        // B record: tag, zero padding, length, then the payload.
        assert_eq!(b[8], b'B');
        assert_eq!(&b[9..12], &[0, 0, 0]);
        let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        assert_eq!(len, 130 + 2);
        let p = &b[16..16 + len];
        assert_eq!(u16::from_le_bytes([p[0], p[1]]), VERSION);
        assert_eq!(u32::from_le_bytes(p[4..8].try_into().unwrap()), 4096);
        assert_eq!(p[8], 0);
        assert_eq!(&p[16..32], &[7; 16]);
        assert_eq!(u64::from_le_bytes(p[32..40].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(p[112..120].try_into().unwrap()), 2);
        assert_eq!(u16::from_le_bytes([p[128], p[129]]), 2);
        assert_eq!(&p[130..132], b"s1");
        let crc = u32::from_le_bytes(b[16 + len..20 + len].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&b[8..16 + len]));
        // I: the fixed part, then the target and the xattrs.
        let Record::Inode(i) = &recs[2] else {
            unreachable!()
        };
        let ip = Record::Inode(i.clone()).payload();
        assert_eq!(ip.len(), INODE_FIXED + 2 + 4 + 6 + 1);
        assert_eq!(u64::from_le_bytes(ip[0..8].try_into().unwrap()), 5);
        assert_eq!(ip[8], InodeKind::File as u8);
        assert_eq!(u32::from_le_bytes(ip[12..16].try_into().unwrap()), 0o640);
        assert_eq!(u64::from_le_bytes(ip[32..40].try_into().unwrap()), 10_000);
        assert_eq!(i64::from_le_bytes(ip[52..60].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(ip[88..92].try_into().unwrap()), 1);
        // E: 24 bytes of payload, the whole stream's CRC at payload offset 16.
        let e = &b[b.len() - 36..];
        assert_eq!(e[0], b'E');
        assert_eq!(u32::from_le_bytes(e[4..8].try_into().unwrap()), 24);
        let sc = u32::from_le_bytes(e[8 + 16..8 + 20].try_into().unwrap());
        assert_eq!(sc, crc32c::crc32c(&b[..b.len() - 36]));
    }

    #[test]
    fn corruption_and_truncation_are_errors() {
        let b = encode(&sample());
        for cut in [0, 5, 8, 20, b.len() / 2, b.len() - 1] {
            let e = decode_all(&b[..cut]).unwrap_err();
            assert!(
                e.contains("truncated") || e.contains("magic") || e.contains("end of input"),
                "{cut}: {e}"
            );
        }
        for at in (0..b.len()).step_by(7) {
            let mut c = b.clone();
            c[at] ^= 0x40;
            assert!(decode_all(&c).is_err(), "flip at {at} went unnoticed");
        }
        let mut more = b.clone();
        more.push(0);
        assert!(decode_all(&more).unwrap_err().contains("after the end"));
    }

    #[test]
    fn checker_refuses_crafted_streams() {
        let base = sample();
        let bad = |f: &dyn Fn(&mut Vec<Record>)| {
            let mut r = base.clone();
            f(&mut r);
            decode_all(&encode(&r)).unwrap_err()
        };
        // A run past the file's size.
        assert!(bad(&|r| r.push(Record::Zero { start: 3, count: 1 })).contains("past its size"));
        // Overlapping runs.
        assert!(bad(&|r| r.push(Record::Zero { start: 1, count: 1 })).contains("out of order"));
        // An entry naming a missing inode, a name with a slash.
        assert!(
            bad(&|r| r[3] = Record::Dirent {
                parent: 1,
                name: b"x".to_vec(),
                child: 9
            })
            .contains("unknown inode")
        );
        assert!(
            bad(&|r| r[3] = Record::Dirent {
                parent: 1,
                name: b"a/b".to_vec(),
                child: 5
            })
            .contains("not a file name")
        );
        // An inode number a snapshot cannot hold.
        assert!(
            bad(&|r| {
                if let Record::Inode(i) = &mut r[2] {
                    i.ino = 1 << 41;
                }
            })
            .contains("out of range")
        );
        // Data for a file of another size.
        assert!(bad(&|r| r[4] = Record::File { ino: 5, size: 1 }).contains("no file of that size"));
    }

    #[test]
    fn tokens() {
        let r = Resume {
            snapshot: ident(9),
            offset: 12345,
            prefix_crc: 0xdead_beef,
        };
        let t = token_encode(&r);
        assert!(t.starts_with("vpr1-"));
        assert_eq!(token_decode(&t).unwrap(), r);
        let mut bad = t.clone().into_bytes();
        let n = bad.len() - 3;
        bad[n] = if bad[n] == b'0' { b'1' } else { b'0' };
        assert!(
            token_decode(std::str::from_utf8(&bad).unwrap())
                .unwrap_err()
                .contains("damaged")
        );
        assert!(token_decode("hello").is_err());
    }
}
