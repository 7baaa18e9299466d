//! Which directories may become members: the one check that `vpool create`
//! ([`admit_new_pool`]) and `vpool device add` ([`admit_member_dir`], then
//! [`refuse_nesting`]) both make before writing anything, so that both
//! refuse the same directories with the same messages.
//!
//! A directory is refused when it
//! - does not exist or is not a directory;
//! - is given twice to one `create`;
//! - carries a label of another pool, or one that does not read;
//! - is inside a directory that carries a label (a member of any pool);
//! - holds a metadata store without a label (never overwritten);
//! - is on a FUSE filesystem (a pool's own mount, or another's);
//! - is inside, or contains, another member (or another directory given to
//!   the same `create`).
//!
//! A directory carrying the label of the pool it would join is no refusal:
//! it is a member already, or one whose `device add` a crash interrupted
//! ([`Admission`]).

use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::label::{Label, has_label, read_label};
use super::layout;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// `dir` as an absolute path without symlinks, `.` or `..`, once it is known
/// to be a directory.
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

/// What [`admit_member_dir`] found in a directory it did not refuse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// No label: it may become a member.
    Fresh,
    /// The label of the pool being joined, which lists it: a member already.
    Listed,
    /// The label of the pool being joined, which does not list it (a
    /// `device add` interrupted before the other labels listed it): it is
    /// taken over under this member uuid.
    Unlisted(Uuid),
}

/// The checks of one directory `dir` (canonical) before it becomes a member
/// of a new pool (`joining` is `None`) or of the pool whose label is
/// `joining`: its label, a labelled ancestor, metadata without a label, a
/// FUSE filesystem. Nesting among the members is [`refuse_nesting`]'s.
pub(crate) fn admit_member_dir(
    s: &dyn Storage,
    dir: &Path,
    joining: Option<&Label>,
) -> Result<Admission> {
    if has_label(s, dir) {
        return match (read_label(s, dir), joining) {
            (Ok(found), Some(pool)) if found.pool == pool.pool => {
                if pool.members.iter().any(|e| e.uuid == found.member) {
                    Ok(Admission::Listed)
                } else {
                    Ok(Admission::Unlisted(found.member))
                }
            }
            (Ok(found), _) => Err(Error::AlreadyInPool {
                path: dir.to_path_buf(),
                pool: found.pool.to_string(),
            }),
            (Err(_), None) => Err(Error::AlreadyInPool {
                path: dir.to_path_buf(),
                pool: "(unreadable label)".to_string(),
            }),
            // It may be one of this pool's members: say so rather than name
            // a pool.
            (Err(_), Some(_)) => Err(Error::Invalid(format!(
                "{} holds a damaged vpool label; refusing to take it over",
                dir.display()
            ))),
        };
    }
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
    Ok(Admission::Fresh)
}

/// Refuses `dir` when it is inside, or contains, one of `members` (canonical
/// paths; `dir` itself among them is skipped).
pub(crate) fn refuse_nesting(dir: &Path, members: &[PathBuf]) -> Result<()> {
    let others = || members.iter().filter(|m| m.as_path() != dir);
    if let Some(outer) = others().find(|m| dir.starts_with(m)) {
        return Err(Error::NestedMember {
            inner: dir.to_path_buf(),
            outer: outer.clone(),
        });
    }
    if let Some(inner) = others().find(|m| m.starts_with(dir)) {
        return Err(Error::NestedMember {
            inner: inner.clone(),
            outer: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// The directories of a new pool (`vpool create`), canonical, once every
/// one passed the checks: each on its own, then against each other.
pub(crate) fn admit_new_pool(s: &dyn Storage, dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut canon: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let c = canonical_dir(s, d)?;
        if canon.contains(&c) {
            return Err(Error::DirectoryGivenTwice(d.clone()));
        }
        admit_member_dir(s, &c, None)?;
        canon.push(c);
    }
    for c in &canon {
        refuse_nesting(c, &canon)?;
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::fs;

    use super::*;
    use crate::pool::meta::MetaImage;
    use crate::pool::{CreateOptions, Pool};
    use crate::storage::real::RealStorage as R;
    use crate::storage::{Handle, LockGuard, OpenMode, Space, Stat};

    /// Real storage, but every directory under `fuse` is on a FUSE filesystem.
    #[derive(Debug)]
    struct FuseUnder(PathBuf);

    impl Storage for FuseUnder {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Handle> {
            R.open(path, mode)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            R.remove_file(path)
        }
        fn remove_dir(&self, path: &Path) -> io::Result<()> {
            R.remove_dir(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            R.rename(from, to)
        }
        fn create_dir(&self, path: &Path) -> io::Result<()> {
            R.create_dir(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            R.sync_dir(dir)
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
            R.list(dir)
        }
        fn stat(&self, path: &Path) -> io::Result<Stat> {
            R.stat(path)
        }
        fn space(&self, path: &Path) -> io::Result<Space> {
            R.space(path)
        }
        fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
            R.canonicalize(path)
        }
        fn make_private(&self, dir: &Path) -> io::Result<()> {
            R.make_private(dir)
        }
        fn on_fuse(&self, dir: &Path) -> io::Result<bool> {
            Ok(dir.starts_with(&self.0))
        }
        fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
            R.try_lock(path)
        }
    }

    /// A scratch directory with fresh directories `names` in it (canonical).
    fn dirs(names: &[&str]) -> (tempfile::TempDir, Vec<PathBuf>) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let v = names
            .iter()
            .map(|n| {
                let d = root.join(n);
                fs::create_dir_all(&d).unwrap();
                d
            })
            .collect();
        (t, v)
    }

    /// A one-member pool over `dir`; its label.
    fn pool_at(dir: &Path) -> Label {
        Pool::create_in(&R, &[dir.to_path_buf()], CreateOptions::default()).unwrap()
    }

    /// Runs the check as `create` and as `device add` to a pool whose label
    /// is `joining`.
    fn both(s: &dyn Storage, dir: &Path, joining: &Label) -> [Result<Admission>; 2] {
        [
            admit_member_dir(s, dir, None),
            admit_member_dir(s, dir, Some(joining)),
        ]
    }

    #[test]
    fn a_fresh_directory_is_admitted() {
        let (_t, d) = dirs(&["pool", "new"]);
        let l = pool_at(&d[0]);
        for r in both(&R, &d[1], &l) {
            assert_eq!(r.unwrap(), Admission::Fresh);
        }
        assert_eq!(admit_new_pool(&R, &d[1..]).unwrap(), vec![d[1].clone()]);
    }

    #[test]
    fn missing_or_not_a_directory_is_refused() {
        let (_t, d) = dirs(&["a"]);
        let missing = d[0].join("missing");
        let r = admit_new_pool(&R, std::slice::from_ref(&missing));
        assert!(matches!(r, Err(Error::DirectoryMissing(p)) if p == missing));
        let file = d[0].join("file");
        fs::write(&file, b"x").unwrap();
        let r = admit_new_pool(&R, std::slice::from_ref(&file));
        assert!(matches!(r, Err(Error::NotADirectory(p)) if p == file));
        assert!(matches!(
            canonical_dir(&R, &missing),
            Err(Error::DirectoryMissing(_))
        ));
    }

    #[test]
    fn a_directory_given_twice_is_refused() {
        let (_t, d) = dirs(&["a"]);
        let again = d[0].join(".");
        let r = admit_new_pool(&R, &[d[0].clone(), again.clone()]);
        assert!(matches!(r, Err(Error::DirectoryGivenTwice(p)) if p == again));
    }

    #[test]
    fn another_pools_label_is_refused() {
        let (_t, d) = dirs(&["pool", "other"]);
        let l = pool_at(&d[0]);
        let other = pool_at(&d[1]);
        for r in both(&R, &d[1], &l) {
            match r {
                Err(Error::AlreadyInPool { path, pool }) => {
                    assert_eq!(path, d[1]);
                    assert_eq!(pool, other.pool.to_string());
                }
                r => panic!("{r:?}"),
            }
        }
        let msg = admit_new_pool(&R, &d[1..]).unwrap_err().to_string();
        assert!(msg.contains("already belongs to pool"), "{msg}");
    }

    #[test]
    fn an_unreadable_label_is_refused() {
        let (_t, d) = dirs(&["pool", "damaged"]);
        let l = pool_at(&d[0]);
        fs::write(d[1].join(layout::LABEL_FILES[0]), b"garbage").unwrap();
        let [create, add] = both(&R, &d[1], &l);
        assert!(
            matches!(&create, Err(Error::AlreadyInPool { pool, .. }) if pool == "(unreadable label)"),
            "{create:?}"
        );
        let msg = add.unwrap_err().to_string();
        assert!(
            msg.contains("holds a damaged vpool label; refusing to take it over"),
            "{msg}"
        );
    }

    #[test]
    fn this_pools_label_is_a_member_or_an_interrupted_add() {
        let (_t, d) = dirs(&["pool"]);
        let mut l = pool_at(&d[0]);
        assert_eq!(
            admit_member_dir(&R, &d[0], Some(&l)).unwrap(),
            Admission::Listed
        );
        let own = l.member;
        l.members.retain(|e| e.uuid != own);
        assert_eq!(
            admit_member_dir(&R, &d[0], Some(&l)).unwrap(),
            Admission::Unlisted(own)
        );
    }

    #[test]
    fn a_directory_inside_a_labelled_one_is_refused() {
        let (_t, d) = dirs(&["pool", "other"]);
        let l = pool_at(&d[0]);
        for inside in [d[0].join("sub"), d[0].join(layout::DATA_DIR).join("sub")] {
            fs::create_dir_all(&inside).unwrap();
            for r in both(&R, &inside, &l) {
                match r {
                    Err(Error::NestedMember { inner, outer }) => {
                        assert_eq!((inner, &outer), (inside.clone(), &d[0]))
                    }
                    r => panic!("{inside:?}: {r:?}"),
                }
            }
            let r = admit_new_pool(&R, &[inside.clone(), d[1].clone()]);
            assert!(matches!(r, Err(Error::NestedMember { .. })), "{r:?}");
        }
    }

    #[test]
    fn metadata_without_a_label_is_refused() {
        let (_t, d) = dirs(&["pool", "half"]);
        let l = pool_at(&d[0]);
        fs::write(d[1].join(layout::META_FILE), b"not a label's").unwrap();
        for r in both(&R, &d[1], &l) {
            let msg = r.unwrap_err().to_string();
            assert!(
                msg.contains("holds vpool metadata without a label; refusing to overwrite it"),
                "{msg}"
            );
        }
        assert_eq!(
            fs::read(d[1].join(layout::META_FILE)).unwrap(),
            b"not a label's"
        );
    }

    #[test]
    fn a_fuse_filesystem_is_refused() {
        let (_t, d) = dirs(&["pool", "mnt/img"]);
        let l = pool_at(&d[0]);
        let s = FuseUnder(d[1].parent().unwrap().to_path_buf());
        for r in both(&s, &d[1], &l) {
            assert!(
                matches!(&r, Err(Error::MemberOnFuse(p)) if *p == d[1]),
                "{r:?}"
            );
        }
        let msg = admit_new_pool(&s, &d[1..]).unwrap_err().to_string();
        assert!(msg.contains("is on a FUSE filesystem"), "{msg}");
    }

    #[test]
    fn nested_members_are_refused_either_way_round() {
        let (_t, d) = dirs(&["a", "a/b", "c"]);
        let (outer, inner) = (&d[0], &d[1]);
        let nested = |r: Result<()>| match r {
            Err(Error::NestedMember { inner: i, outer: o }) => (i, o),
            r => panic!("{r:?}"),
        };
        let want = (inner.clone(), outer.clone());
        assert_eq!(
            nested(refuse_nesting(inner, std::slice::from_ref(outer))),
            want
        );
        assert_eq!(
            nested(refuse_nesting(outer, std::slice::from_ref(inner))),
            want
        );
        refuse_nesting(&d[2], &d[..2]).unwrap();
        refuse_nesting(outer, std::slice::from_ref(outer)).unwrap();
        for given in [
            vec![outer.clone(), inner.clone()],
            vec![inner.clone(), outer.clone()],
        ] {
            let r = admit_new_pool(&R, &given);
            assert!(
                matches!(&r, Err(Error::NestedMember { inner: i, outer: o }) if (i, o) == (inner, outer)),
                "{given:?}: {r:?}"
            );
        }
    }

    /// `create` and `device add` go through the checks above, and a refused
    /// directory is left as it was.
    #[test]
    fn create_and_add_refuse_through_the_one_check() {
        let (_t, d) = dirs(&["pool", "half"]);
        fs::write(d[1].join(layout::META_FILE), b"x").unwrap();
        let r = Pool::create_in(&R, &[d[0].clone(), d[1].clone()], CreateOptions::default());
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        assert_eq!(fs::read_dir(&d[0]).unwrap().count(), 0);

        pool_at(&d[0]);
        let mut pool = Pool::open_in(crate::storage::real(), &d[0]).unwrap();
        let image: MetaImage = pool.load_metadata(true).unwrap();
        let r = pool.add_member(&d[1], &image);
        assert!(
            matches!(&r, Err(Error::Invalid(m)) if m.contains("without a label")),
            "{:?}",
            r.err()
        );
        let inside = d[0].join("sub");
        fs::create_dir(&inside).unwrap();
        let r = pool.add_member(&inside, &image);
        assert!(
            matches!(&r, Err(Error::NestedMember { .. })),
            "{:?}",
            r.err()
        );
        assert_eq!(pool.members().len(), 1);
    }
}
