//! What the server serves: the [`Export`] and [`Exports`] traits, and their implementation
//! over a cairn volume store (`VOLUME` read-write, `VOLUME@SNAPSHOT` read-only).

use std::sync::Arc;

use cairn_volume::{AllocExtent, DepthExtent, ReadPart, SnapshotId, SnapshotView, Store, Volume, VolumeId};

use crate::proto::ErrorCode;

/// Why an operation on an export failed, in the terms the protocol can tell a client.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the export is read-only")]
    ReadOnly,
    #[error("range {offset}+{len} is beyond the end of the export")]
    OutOfRange { offset: u64, len: u64 },
    #[error("no space left: {0}")]
    NoSpace(String),
    #[error("{0}")]
    Failed(String),
}

impl ExportError {
    /// The NBD error value for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ExportError::ReadOnly => ErrorCode::Perm,
            ExportError::OutOfRange { .. } => ErrorCode::Inval,
            ExportError::NoSpace(_) => ErrorCode::NoSpc,
            ExportError::Failed(_) => ErrorCode::Io,
        }
    }
}

impl From<cairn_volume::Error> for ExportError {
    fn from(e: cairn_volume::Error) -> Self {
        match e {
            cairn_volume::Error::OutOfRange { offset, len, .. } => ExportError::OutOfRange { offset, len },
            cairn_volume::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                ExportError::NoSpace(io.to_string())
            }
            other => ExportError::Failed(other.to_string()),
        }
    }
}

/// One disk as the server sees it. Calls block (they do file I/O); the server runs the slow
/// ones (flush, durable writes) off its event loop.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError>;
    /// Where the bytes [`Export::read`] would give are, so the server can send them without
    /// copying them (see [`ReadPart`]); None where the export cannot say.
    fn read_parts(&self, _offset: u64, _len: u64) -> Result<Option<Vec<ReadPart>>, ExportError> {
        Ok(None)
    }
    fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError>;
    /// Makes the range read as zeros, freeing space where it can.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Makes every completed write durable, whichever connection made it.
    fn flush(&self) -> Result<(), ExportError>;
    /// Data, zero and hole extents covering `[offset, offset+len)` in order.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocExtent>, ExportError>;
    /// Which layer holds each part of `[offset, offset+len)`: 0 none, 1 the top, 2 below it...
    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>, ExportError>;
}

/// An export's name and a line about it, for NBD_OPT_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// Why an export name could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no export named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// The set of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, LookupError>;
    fn list(&self) -> Vec<ExportListing>;
}

/// Every volume of a store (read-write) and every snapshot (read-only, `VOLUME@SNAPSHOT`).
/// Volumes and snapshots are named by name or by numeric id.
#[derive(Debug, Clone)]
pub struct VolumeExports {
    store: Arc<Store>,
}

impl VolumeExports {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    fn volume_id(&self, name: &str) -> Option<VolumeId> {
        // A name wins over an id, so a volume named "7" stays reachable.
        self.store.volume_id(name).ok().or_else(|| {
            let id = VolumeId(name.parse().ok()?);
            self.store.list_volumes().iter().any(|v| v.id == id).then_some(id)
        })
    }

    fn snapshot_id(&self, volume: VolumeId, name: &str) -> Option<SnapshotId> {
        self.store.snapshot_id(volume, name).ok().or_else(|| {
            let id = SnapshotId(name.parse().ok()?);
            self.store.list_snapshots(Some(volume)).iter().any(|s| s.id == id).then_some(id)
        })
    }
}

impl Exports for VolumeExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, LookupError> {
        let not_found = || LookupError::NotFound(name.to_string());
        let (volume, snapshot) = match name.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (name, None),
        };
        let volume = self.volume_id(volume).ok_or_else(not_found)?;
        let failed = |e: cairn_volume::Error| LookupError::Failed(e.to_string());
        Ok(match snapshot {
            None => Arc::new(self.store.volume(volume).map_err(failed)?),
            Some(s) => {
                let snapshot = self.snapshot_id(volume, s).ok_or_else(not_found)?;
                Arc::new(self.store.open_snapshot(snapshot).map_err(failed)?)
            }
        })
    }

    fn list(&self) -> Vec<ExportListing> {
        let volumes = self.store.list_volumes();
        let mut out = Vec::new();
        for v in &volumes {
            out.push(ExportListing { name: v.name.clone(), description: format!("volume, {} bytes", v.size) });
        }
        for s in self.store.list_snapshots(None) {
            if let Some(v) = volumes.iter().find(|v| v.id == s.volume) {
                out.push(ExportListing {
                    name: format!("{}@{}", v.name, s.name),
                    description: format!("snapshot (read-only), {} bytes", s.size),
                });
            }
        }
        out
    }
}

impl Export for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        Ok(Volume::read(self, buf, offset)?)
    }

    fn read_parts(&self, offset: u64, len: u64) -> Result<Option<Vec<ReadPart>>, ExportError> {
        Ok(Some(Volume::read_parts(self, offset, len)?))
    }

    fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        Ok(Volume::write(self, data, offset, fua)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        Ok(Volume::write_zeroes(self, offset, len, fua)?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        Ok(Volume::trim(self, offset, len, fua)?)
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(Volume::flush(self)?)
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocExtent>, ExportError> {
        Ok(Volume::allocation(self, offset, len)?)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>, ExportError> {
        Ok(Volume::allocation_depth(self, offset, len)?)
    }
}

impl Export for SnapshotView {
    fn size(&self) -> u64 {
        SnapshotView::size(self)
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        Ok(SnapshotView::read(self, buf, offset)?)
    }

    fn read_parts(&self, offset: u64, len: u64) -> Result<Option<Vec<ReadPart>>, ExportError> {
        Ok(Some(SnapshotView::read_parts(self, offset, len)?))
    }

    fn write(&self, _: &[u8], _: u64, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }

    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }

    fn flush(&self) -> Result<(), ExportError> {
        // A snapshot is durable from the moment it exists.
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocExtent>, ExportError> {
        Ok(SnapshotView::allocation(self, offset, len)?)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>, ExportError> {
        Ok(SnapshotView::allocation_depth(self, offset, len)?)
    }
}
