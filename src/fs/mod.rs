//! The POSIX view of a pool: [`core`] implements the filesystem on our own types
//! (tested without a kernel); [`fuse`] is the thin `fuser` adapter over it.

pub mod core;
pub mod fuse;
pub mod kernel_refresh;
pub mod members;
pub mod scrub;
pub mod snapview;

pub use core::{Attr, SetAttr, TimeSet, Vfs, VfsOptions};
