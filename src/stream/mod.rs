//! Send streams without a pool: their format ([`format`]), and what `vpool
//! stream verify|list|restore` do with them ([`restore`]). Nothing here
//! knows a pool: a stream restores on any Linux machine.

pub mod format;
pub mod restore;

use std::io::Read;

use format::{Begin, Checker, Decoder, Identity, Record};

/// What `vpool stream list` and `verify` say of one stream.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamSummary {
    pub name: String,
    pub kind: String,
    /// `pool-uuid/id@seconds`.
    pub snapshot: String,
    pub base: Option<String>,
    pub block_size: u32,
    pub inodes: u64,
    pub files_with_data: u64,
    pub logical_bytes: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub hole_blocks: u64,
    pub bytes: u64,
    pub created: i64,
}

/// Text form of an identity.
pub fn ident_text(i: &Identity) -> String {
    format!("{}/{}@{}", uuid::Uuid::from_bytes(i.pool), i.id, i.secs)
}

/// Reads and checks a whole stream (every record's CRC, order and bounds,
/// the whole stream's CRC, every frame decompressed to its size).
pub fn verify(r: impl Read) -> Result<StreamSummary, String> {
    let mut dec = Decoder::new(std::io::BufReader::with_capacity(1 << 20, r))?;
    let mut check = Checker::default();
    let mut s = StreamSummary::default();
    let mut begin: Option<Begin> = None;
    let mut frames = format::Frames::new()?;
    while let Some(rec) = dec.next_record()? {
        check.check(&rec)?;
        match &rec {
            Record::Begin(b) => {
                s.name = b.name.clone();
                s.kind = if b.incremental { "incremental" } else { "full" }.into();
                s.snapshot = ident_text(&b.snapshot);
                s.base = b.incremental.then(|| ident_text(&b.base));
                s.block_size = b.block_size;
                s.inodes = b.inodes;
                s.logical_bytes = b.logical_bytes;
                s.created = b.snapshot.secs;
                begin = Some(b.clone());
            }
            Record::File { .. } => s.files_with_data += 1,
            Record::Data {
                count,
                frame,
                start,
                ..
            } => {
                let bs = begin.as_ref().map_or(0, |b| b.block_size as usize);
                let want = *count as usize * bs;
                frames
                    .decompress(frame, want)
                    .map_err(|e| format!("data at block {start}: {e}"))?;
                s.data_blocks += u64::from(*count);
            }
            Record::Zero { count, .. } => s.zero_blocks += count,
            Record::Hole { count, .. } => s.hole_blocks += count,
            _ => {}
        }
    }
    if !check.complete() {
        return Err("the stream has no end record".into());
    }
    s.bytes = dec.offset;
    Ok(s)
}
