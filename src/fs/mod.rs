//! The POSIX view of a pool. [`fuse`] is the thin `fuser` adapter (a span,
//! a call, a reply); everything else implements the filesystem on our own
//! types and is tested without a kernel.
//!
//! - [`core`]: [`Vfs`], the state shared by everything below, and the types
//!   of its interface; `mount` opens it (and recovers after a crash).
//! - `route`: the filesystem operations of `Vfs`, each sent by the range of
//!   its inode or handle (`ino`) to one of two views:
//!   - the live tree: `node` (inode table), `namespace` (names, attributes),
//!     `handles` (open files and directories), `data` (the data path);
//!   - the snapshot view, [`snapview`]: `.snapshots`, read-only.
//! - `commit`: makes changes durable; `status`: counts for `statfs` and
//!   `vpool status`.
//! - Commands of the admin socket: `snapcmd` (snapshots), [`snapexport`]
//!   (the map of a snapshot's file for `snapshot export`), [`members`]
//!   (devices, copies), [`scrub`], [`jobs`] (long jobs, cancel), and
//!   [`kernel_refresh`] (the kernel's view of restored files).
//!
//! - [`priority`]: the CPU priority of the FUSE workers by the kind of
//!   request they serve.
//!
//! The storage core never imports `fuser` or `clap`: only [`fuse`] does.
//!
//! # Lock order
//!
//! A thread holding a lock takes only locks further down this list (the
//! locks below the filesystem continue it in docs/design.md, section 2):
//!
//! 1. `SnapshotStore::admin`: one snapshot or member command at a time.
//! 2. `Vfs::commit_lock`: one commit at a time; `fsync` holds it for its
//!    whole run, and scrub and member commands (`commit_guard`) while they
//!    read or rewrite metadata copies or labels.
//! 3. `Vfs::gate`: for reading around every change to file data or size
//!    (write, fallocate, truncate, copy pieces, restore and clone pieces);
//!    for writing by a commit's `take_changes` and by a snapshot's freeze.
//! 4. A directory handle's listing mutex (readdir at offset 0 lists again).
//! 5. `Vfs::ns`: the live namespace and inode table.
//! 6. `Node::meta`: one inode's attributes (one at a time).
//! 7. Below the filesystem, in the order of docs/design.md: the snapshot
//!    store's locks (its capture's per-file `state`, then `out`; a capture
//!    saves blocks from under `Node::meta` when a truncate cuts them), then a
//!    volume's stripe locks and extent map, copy descriptors, member space.
//!
//! `Vfs::handles` and the snapshot view's handle table are held only to
//! insert, find or remove a handle, never while another lock is taken. No
//! lock is held across a call that may take one above it: a writer that
//! meets ENOSPC drops the gate before it commits (`data.rs`), `setattr`
//! drops `Node::meta` before it takes `ns` for the extents it cut, and a
//! release drops `Node::meta` before it takes `ns` to free the node.

mod commit;
pub mod core;
mod data;
pub mod fuse;
mod handles;
mod ino;
pub mod jobs;
pub mod kernel_refresh;
pub mod members;
mod mount;
mod namespace;
mod node;
pub mod priority;
mod route;
pub mod scrub;
mod snapcmd;
pub mod snapexport;
pub mod snapview;
mod status;
#[cfg(test)]
mod testing;
pub mod transfer;

pub use core::{Attr, SetAttr, TimeSet, Vfs, VfsOptions};

pub use crate::util::Progress;
