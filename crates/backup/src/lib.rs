//! cairn's backup repository: disks cut into 64 KiB chunks, named by (keyed) BLAKE3,
//! compressed with zstd, optionally sealed with XChaCha20-Poly1305, packed into large objects
//! on any [`Backend`]. Backups are incremental by changed-block tracking and dedup across every
//! disk in the repository. The byte format is in docs/backup-format.md.

pub mod backend;
mod copy;
pub mod crypto;
pub mod format;
mod gc;
mod location;
mod marker;
mod repo;
pub mod s3;

pub use backend::{
    Backend, BackendError, DirBackend, Fault, FaultyBackend, ObjectInfo, ObjectStoreBackend, RetryingBackend,
};
pub use copy::CopyStats;
pub use crypto::{ChunkId, CryptoError, KdfParams};
pub use format::{BackupRecord, BackupStats, FormatError, CHUNK_SIZE};
pub use gc::{BackupBytes, GcOptions, GcReport};
pub use location::RepoLocation;
pub use repo::{BackupRequest, BlockSink, BlockSource, Progress, Repository, RestoreStats, VerifyReport};
pub use s3::S3Location;

/// Everything that can go wrong with a repository.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("no repository here (no config object)")]
    NoRepository,
    #[error("a repository exists here already")]
    AlreadyExists,
    #[error("the repository is encrypted: a passphrase is needed")]
    NeedPassphrase,
    #[error("backup {0} not found")]
    BackupNotFound(String),
    #[error("{what} {id:?} is missing from the repository")]
    Missing { what: &'static str, id: ChunkId },
    #[error("blob {id:?} is corrupt: {why}")]
    Corrupt { id: ChunkId, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("disk I/O: {0}")]
    Io(#[from] std::io::Error),
}
