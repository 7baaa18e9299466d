//! Error types. Pool-level errors ([`Error`]) name the member or file involved so
//! the CLI can print them as they are; filesystem errors ([`FsError`]) map one to
//! one onto errnos in the FUSE adapter.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} does not exist")]
    DirectoryMissing(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0} is given twice")]
    DirectoryGivenTwice(PathBuf),
    #[error("{path} already belongs to pool {pool}")]
    AlreadyInPool { path: PathBuf, pool: String },
    #[error("{inner} is inside {outer}, which is (or will be) a pool member")]
    NestedMember { inner: PathBuf, outer: PathBuf },
    #[error(
        "{0} is on a FUSE filesystem (another pool's mount, or this one's): \
         a member must be on a local filesystem"
    )]
    MemberOnFuse(PathBuf),
    #[error("copies={copies} needs at least {copies} members, but only {members} were given")]
    TooManyCopies { copies: u32, members: usize },
    #[error("{0} is not a vpool member (no label found)")]
    NotAMember(PathBuf),
    #[error("label of {path} is corrupt: {reason}")]
    CorruptLabel { path: PathBuf, reason: String },
    #[error("member {path} (id {id}) of pool {pool} is missing")]
    MemberMissing {
        path: PathBuf,
        id: String,
        pool: String,
    },
    #[error("{path} belongs to another pool ({found}) than the one being opened ({expected})")]
    ForeignMember {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("pool {pool} is already mounted{at} (member {path} is locked)")]
    AlreadyMounted {
        pool: String,
        path: PathBuf,
        at: String,
    },
    #[error("members diverged: {0}")]
    MembersDiverged(String),
    #[error("metadata of member {path} is corrupt: {reason}")]
    CorruptMetadata { path: PathBuf, reason: String },
    #[error("metadata store error on {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("the metadata store of member {0} is not open (it failed to reopen after an error)")]
    StoreNotOpen(PathBuf),
    #[error("no member left to commit to: every member of the pool has failed")]
    NoMemberLeft,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn store(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Error::Store {
            path: path.into(),
            reason: e.to_string(),
        }
    }

    /// The I/O error underneath, for an [`Error::Io`].
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Damage found in what vpool stored: the file it is in and the byte offset
/// where it was found, when known, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub file: Option<PathBuf>,
    pub offset: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.file {
            write!(f, "{}: ", p.display())?;
        }
        if let Some(o) = self.offset {
            write!(f, "at byte {o}: ")?;
        }
        f.write_str(&self.what)
    }
}

/// Errors of filesystem operations: a closed set the FUSE adapter maps to errnos.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("no space left in the pool")]
    NoSpace,
    #[error("read-only")]
    ReadOnly,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("name too long")]
    NameTooLong,
    #[error("no such attribute")]
    NoAttribute,
    #[error("buffer too small")]
    Range,
    #[error("operation not supported")]
    NotSupported,
    #[error("file too large")]
    FileTooLarge,
    #[error("no data past offset")]
    NoData,
    #[error("too many links")]
    TooManyLinks,
    #[error("bad file handle")]
    BadHandle,
    #[error("corruption: {0}")]
    Corrupt(Corruption),
    #[error("busy")]
    Busy,
    /// A long operation stopped on request (`vpool jobs cancel`).
    #[error("cancelled")]
    Cancelled,
    /// A refusal explained in words (EINVAL to the kernel; the message to the CLI).
    #[error("{0}")]
    Message(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A failure of the pool underneath (a member's metadata store, label,
    /// lock or files), shown as the pool layer words it: which member or
    /// file, and what is wrong.
    #[error("{0}")]
    Pool(Box<Error>),
}

impl FsError {
    /// Damage that belongs to no one file (a record naming a member that
    /// does not exist).
    pub fn corrupt(what: impl Into<String>) -> FsError {
        FsError::Corrupt(Corruption {
            file: None,
            offset: None,
            what: what.into(),
        })
    }

    /// Damage in `file`, at byte `offset` when known.
    pub fn corrupt_in(
        file: &std::path::Path,
        offset: Option<u64>,
        what: impl Into<String>,
    ) -> FsError {
        FsError::Corrupt(Corruption {
            file: Some(file.to_path_buf()),
            offset,
            what: what.into(),
        })
    }

    /// The errno this error stands for. The one table from errors to errnos.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NoSpace => libc::ENOSPC,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotPermitted => libc::EPERM,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoAttribute => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::FileTooLarge => libc::EFBIG,
            FsError::NoData => libc::ENXIO,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::BadHandle => libc::EBADF,
            FsError::Corrupt(_) => libc::EIO,
            FsError::Busy => libc::EBUSY,
            FsError::Cancelled => libc::ECANCELED,
            FsError::Message(_) => libc::EINVAL,
            FsError::Io(e) => match e.raw_os_error() {
                Some(code) => code,
                None => libc::EIO,
            },
            // As an `Io` of the same cause: the errno of the I/O error
            // underneath, else EIO.
            FsError::Pool(e) => match e.io_source().and_then(|s| s.raw_os_error()) {
                Some(code) => code,
                None => libc::EIO,
            },
        }
    }
}

impl From<Error> for FsError {
    fn from(e: Error) -> Self {
        FsError::Pool(Box::new(e))
    }
}

pub type FsResult<T> = std::result::Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_errors_keep_their_words_and_their_errno() {
        let store = FsError::from(Error::store("/m0/meta.redb", "disk full"));
        assert_eq!(
            store.to_string(),
            "metadata store error on /m0/meta.redb: disk full"
        );
        assert_eq!(store.errno(), libc::EIO);

        let full = FsError::from(Error::io(
            "/m1/data",
            io::Error::from_raw_os_error(libc::ENOSPC),
        ));
        assert!(full.to_string().starts_with("/m1/data: "), "{full}");
        assert_eq!(full.errno(), libc::ENOSPC);

        let closed = FsError::from(Error::StoreNotOpen("/m2".into()));
        assert_eq!(
            closed.to_string(),
            "the metadata store of member /m2 is not open (it failed to reopen after an error)"
        );
        assert_eq!(closed.errno(), libc::EIO);
        assert_eq!(FsError::from(Error::NoMemberLeft).errno(), libc::EIO);
    }
}
