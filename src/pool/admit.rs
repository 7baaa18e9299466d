//! Which directories may become members: the checks `vpool create` and
//! `vpool device add` make before writing anything.

use std::io;
use std::path::{Path, PathBuf};

use super::label::has_label;
use super::layout;
use crate::error::{Error, Result};
use crate::storage::Storage;

pub(crate) fn canonical_dir(s: &dyn Storage, dir: &Path) -> Result<PathBuf> {
    let md = s.stat(dir).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::DirectoryMissing(dir.to_path_buf())
        } else {
            Error::io(dir, e)
        }
    })?;
    if !md.is_dir {
        return Err(Error::NotADirectory(dir.to_path_buf()));
    }
    s.canonicalize(dir).map_err(|e| Error::io(dir, e))
}

/// The checks every directory passes before it becomes a member (by `create`
/// or `device add`), beyond carrying no other pool's label: not inside another
/// member, no unlabelled metadata to overwrite, not on a FUSE filesystem.
pub(crate) fn admit_member_dir(s: &dyn Storage, dir: &Path) -> Result<()> {
    if let Some(owner) = dir.ancestors().skip(1).find(|a| has_label(s, a)) {
        return Err(Error::NestedMember {
            inner: dir.to_path_buf(),
            outer: owner.to_path_buf(),
        });
    }
    if s.exists(&dir.join(layout::META_FILE)) {
        return Err(Error::Invalid(format!(
            "{} holds vpool metadata without a label; refusing to overwrite it",
            dir.display()
        )));
    }
    if s.on_fuse(dir).map_err(|e| Error::io(dir, e))? {
        return Err(Error::MemberOnFuse(dir.to_path_buf()));
    }
    Ok(())
}
