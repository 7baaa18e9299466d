//! The POSIX view of a pool: [`core`] implements the filesystem on our own types
//! (tested without a kernel); [`fuse`] is the thin `fuser` adapter over it.

pub mod core;
pub mod fuse;
pub mod jobs;
pub mod kernel_refresh;
pub mod members;
pub mod scrub;
pub mod snapview;

pub use core::{Attr, SetAttr, TimeSet, Vfs, VfsOptions};

/// The progress sink of a long operation: called with (done, total) units;
/// returning `false` asks the operation to stop (it ends with
/// [`crate::error::FsError::Cancelled`], or a report saying so, leaving
/// everything done so far consistent and committed).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;
