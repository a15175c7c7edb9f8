//! What the backup crate's test binaries share: the backend conformance suite and a disk in
//! memory with backup and restore shorthands. Each binary uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::RwLock;

use bytes::Bytes;
use cairn_backup::{Backend, BackendError, BackupRecord, BackupRequest, BlockSink, BlockSource, Repository};

/// What the repository relies on from every backend.
pub fn conforms(backend: &dyn Backend) {
    backend.put("packs/ab/one", Bytes::from_static(b"hello world")).unwrap();
    backend.put("index/two", Bytes::from_static(b"xyz")).unwrap();
    backend.put("config", Bytes::from_static(b"{}")).unwrap();
    assert_eq!(&backend.get("packs/ab/one").unwrap()[..], b"hello world");
    assert_eq!(&backend.get_range("packs/ab/one", 6..11).unwrap()[..], b"world");
    // A put replaces an object whole.
    backend.put("index/two", Bytes::from_static(b"abc")).unwrap();
    assert_eq!(&backend.get("index/two").unwrap()[..], b"abc");
    let keys = |prefix: &str| -> Vec<String> {
        let mut keys: Vec<String> = backend.list(prefix).unwrap().into_iter().map(|o| o.key).collect();
        keys.sort();
        keys
    };
    assert_eq!(keys("packs/"), ["packs/ab/one"]);
    assert_eq!(keys(""), ["config", "index/two", "packs/ab/one"]);
    assert_eq!(backend.list("index/").unwrap()[0].size, 3);
    assert!(keys("backups/").is_empty(), "listing a prefix nothing was put under is empty");
    assert!(matches!(backend.get("missing"), Err(BackendError::NotFound(_))));
    backend.delete("index/two").unwrap();
    backend.delete("index/two").unwrap();
    assert!(matches!(backend.get("index/two"), Err(BackendError::NotFound(_))));
}

/// A disk in memory, usable as a backup source and a restore target.
pub struct Disk(RwLock<Vec<u8>>);

impl Disk {
    pub fn new(size: usize) -> Disk {
        Disk(RwLock::new(vec![0; size]))
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.read().unwrap().clone()
    }

    pub fn write(&self, offset: usize, data: &[u8]) {
        self.0.write().unwrap()[offset..offset + data.len()].copy_from_slice(data);
    }
}

impl BlockSource for Disk {
    fn size(&self) -> u64 {
        self.0.read().unwrap().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let disk = self.0.read().unwrap();
        buf.copy_from_slice(&disk[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl BlockSink for Disk {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.write(offset as usize, data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

pub fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("volume".to_string(), "vol-test".to_string())])
}

pub fn full(repo: &Repository, disk: &Disk) -> BackupRecord {
    repo.backup(disk, BackupRequest { labels: labels(), parent: None, allocated: None, progress: None }).unwrap()
}

pub fn incremental(repo: &Repository, disk: &Disk, parent: &BackupRecord, changed: &[Range<u64>]) -> BackupRecord {
    let request = BackupRequest { labels: labels(), parent: Some((parent, changed)), allocated: None, progress: None };
    repo.backup(disk, request).unwrap()
}

pub fn restored(repo: &Repository, backup: &BackupRecord) -> Vec<u8> {
    let target = Disk::new(backup.size as usize);
    repo.restore(&backup.id, &target, None, None).unwrap();
    target.bytes()
}
