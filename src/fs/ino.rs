//! Which view an inode number or a file handle belongs to: the live tree, or
//! the `.snapshots` control directory and the snapshots' trees below it. The
//! numbers alone say it, so the route (`route.rs`) decides without a lookup.
//!
//! Inode numbers (cf. the reserved high range of ZFS's `.zfs`):
//!
//! | Range | Meaning |
//! |---|---|
//! | bit 63 clear | a live inode; numbered from 1 (`ROOT_INO`), and below `2^40` for a snapshot to be able to number it |
//! | `2^63` ([`SNAPDIR_INO`]) | `.snapshots` itself |
//! | `2^63 \| s << 40 \| i` | inode `i` of snapshot `s` (`1 <= s < 2^23`; the snapshot's root is `i = ROOT_INO`) |
//!
//! Snapshot ids are never reused, so the kernel never sees one number name
//! two things. `.snapshots` is the name [`SNAPDIR_NAME`] in the live root:
//! found by lookup there, listed only with `snapdir=visible`, and never a
//! live entry (the live tree refuses to create it: [`is_reserved`]).
//!
//! File handles: the live view numbers its handles from 1 up; the snapshot
//! view sets bit 63 on its own ([`SNAP_FH`]). So a handle, too, names its view.

use crate::pool::meta::ROOT_INO;

/// The bit that marks the snapshot view, in inode numbers and file handles.
pub const SNAP_BIT: u64 = 1 << 63;
/// The inode of `.snapshots`.
pub const SNAPDIR_INO: u64 = SNAP_BIT;
/// Its name in the live root.
pub const SNAPDIR_NAME: &[u8] = b".snapshots";
/// Bits of a live inode number inside a snapshot inode number.
pub const INO_BITS: u32 = 40;
/// The largest snapshot id `.snapshots` can number.
pub const MAX_SNAP_ID: u64 = (1 << 23) - 1;
/// The first bit of snapshot-view file handles (they count up from here).
pub const SNAP_FH: u64 = SNAP_BIT;

/// A view of the filesystem: where an operation on an inode or handle goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The live tree (`live.rs`, `namespace.rs`, `data.rs`).
    Live,
    /// `.snapshots` and the snapshots' trees (`snapview.rs`), read-only.
    Snapshots,
}

/// The view inode `ino` belongs to.
pub fn view_of(ino: u64) -> View {
    if ino & SNAP_BIT == 0 {
        View::Live
    } else {
        View::Snapshots
    }
}

/// The view file handle `fh` belongs to.
pub fn view_of_handle(fh: u64) -> View {
    if fh & SNAP_FH == 0 {
        View::Live
    } else {
        View::Snapshots
    }
}

/// An inode of the snapshot view, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapIno {
    /// `.snapshots` itself.
    Dir,
    /// Inode `ino` of snapshot `snap` (`snap` 0 names no snapshot: such a
    /// number is never handed out, and finds nothing).
    Node { snap: u64, ino: u64 },
}

/// Decodes a number of the snapshot view (`view_of(ino) == View::Snapshots`).
pub fn decode(ino: u64) -> SnapIno {
    if ino == SNAPDIR_INO {
        return SnapIno::Dir;
    }
    SnapIno::Node {
        snap: (ino & !SNAP_BIT) >> INO_BITS,
        ino: ino & ((1 << INO_BITS) - 1),
    }
}

/// The number of inode `ino` of snapshot `snap`.
pub fn snap_ino(snap: u64, ino: u64) -> u64 {
    SNAP_BIT | (snap << INO_BITS) | ino
}

/// Whether `name` in live directory `parent` is taken by the route (it is
/// `.snapshots` in the root): no live entry may be made under it.
pub fn is_reserved(parent: u64, name: &[u8]) -> bool {
    parent == ROOT_INO && name == SNAPDIR_NAME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_numbers() {
        assert_eq!(view_of(ROOT_INO), View::Live);
        assert_eq!(view_of((1 << INO_BITS) + 5), View::Live);
        assert_eq!(view_of(SNAPDIR_INO), View::Snapshots);
        assert_eq!(decode(SNAPDIR_INO), SnapIno::Dir);
        let n = snap_ino(MAX_SNAP_ID, (1 << INO_BITS) - 1);
        assert_eq!(view_of(n), View::Snapshots);
        assert_eq!(
            decode(n),
            SnapIno::Node {
                snap: MAX_SNAP_ID,
                ino: (1 << INO_BITS) - 1
            }
        );
        assert_eq!(
            decode(snap_ino(3, ROOT_INO)),
            SnapIno::Node {
                snap: 3,
                ino: ROOT_INO
            }
        );
        assert_eq!(view_of_handle(1), View::Live);
        assert_eq!(view_of_handle(SNAP_FH | 1), View::Snapshots);
        assert!(is_reserved(ROOT_INO, b".snapshots"));
        assert!(!is_reserved(ROOT_INO + 1, b".snapshots"));
        assert!(!is_reserved(ROOT_INO, b"snapshots"));
    }
}
