//! cairn's volume engine: thin, layered copy-on-write volumes with instant snapshots, clones,
//! revert, background merge of deleted snapshots and changed-block tracking.
//!
//! A [`Store`] keeps volumes and snapshots in one directory. A volume is a chain of layers:
//! frozen snapshot layers below, one writable head on top. A snapshot freezes the head and
//! starts an empty one, so it costs the same at any size. The byte format is in docs/format.md.

mod blockmap;
mod brlock;
pub mod buffer;
mod catalog;
mod journal;
mod layer;
pub mod storage;
mod store;
mod view;

/// Damage for the replay property tests of the catalog and the map journal.
#[cfg(test)]
mod damage {
    use proptest::prelude::*;

    /// Bit flips at a few positions, and where the file is then cut.
    pub fn strategy() -> impl Strategy<Value = (Vec<(prop::sample::Index, u8)>, prop::sample::Index)> {
        (prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6), any::<prop::sample::Index>())
    }

    /// `bytes` with `flips` applied, cut at `cut`: a damaged and possibly torn file.
    pub fn apply(mut bytes: Vec<u8>, (flips, cut): &(Vec<(prop::sample::Index, u8)>, prop::sample::Index)) -> Vec<u8> {
        for (at, xor) in flips {
            let at = at.index(bytes.len());
            bytes[at] ^= xor;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        bytes
    }
}

pub use blockmap::BLOCK_SIZE;
pub use store::{
    ChangeTarget, Extent, Footprint, SnapshotId, SnapshotInfo, SnapshotUsage, SnapshotView, Store, StoreOptions,
    Volume, VolumeId, VolumeInfo, MAX_VOLUME_SIZE, SECTOR_SIZE,
};
pub use view::{AllocExtent, Allocation, DepthExtent, ReadPart};

/// Everything that can go wrong in the volume engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: &'static str },
    #[error("invalid name {0:?}: names are 1-255 bytes without '@', '/', NUL or surrounding spaces")]
    InvalidName(String),
    #[error("range {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{file} is corrupt: {reason}")]
    Corrupt { file: String, reason: String },
    /// A file in a format version this build does not read: written by a newer cairn. Not
    /// damage; the store is left as it was.
    #[error("{file} was written by a newer cairn: {reason}; open the store with that version (nothing was changed)")]
    UnsupportedFormat { file: String, reason: String },
    #[error("background merge failed: {0}")]
    Merge(String),
    /// A change or flush through a volume handle kept after [`Store::close`].
    #[error("the store is closed")]
    Closed,
    #[error("catalog: {0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<view::ReadError> for Error {
    fn from(e: view::ReadError) -> Self {
        match e {
            view::ReadError::OutOfRange { offset, len, size } => Error::OutOfRange { offset, len, size },
            view::ReadError::Io(io) => Error::Io(io),
        }
    }
}
