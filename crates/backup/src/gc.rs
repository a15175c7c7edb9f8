//! Garbage collection: deletes the packs no backup needs, safely while other sessions run.
//!
//! A GC run first *collects* what an earlier run (or itself) *condemned*, then condemns anew:
//! 1. Condemn: read every backup record and its manifest, count each pack's live bytes, copy
//!    the live blobs of mostly-dead packs into new packs (repack), and write a condemned list
//!    (`gc/ID`) naming the packs with nothing live. Packs younger than the grace period are
//!    left alone whatever they hold.
//! 2. Collect: wait until every live session's marker says it saw the list (a session that
//!    saw it neither dedups against nor reads from those packs); then read the records again,
//!    since sessions that ended meanwhile may have come to reference a condemned blob, and
//!    spare every pack holding the only copy of a referenced blob; rewrite the index objects
//!    without the dead packs, delete the packs, and last the list.
//!
//! Every step is idempotent, so a run killed anywhere leaves a repository that verifies clean
//! and a list the next run finishes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;

use crate::backend::{BackendError, ObjectInfo};
use crate::crypto::{hex, random, ChunkId};
use crate::format::{CondemnedList, IndexEntry, Location, FORMAT_VERSION};
use crate::marker::{list_markers, LiveMarker};
use crate::repo::{now_secs, pack_key, Progress, Repository, Session};
use crate::Error;

/// How a GC run behaves.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Packs written more recently than this are never condemned.
    pub grace: Duration,
    /// A marker not refreshed for this long belongs to a dead session and is ignored.
    pub stale_after: Duration,
    /// Packs with more than this percentage of dead bytes are repacked.
    pub repack_unused_percent: u8,
    /// Work out and report what a run would do, changing nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            stale_after: Duration::from_secs(3600),
            repack_unused_percent: 50,
            dry_run: false,
        }
    }
}

/// What a GC run did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub backups: usize,
    /// Packs in the repository when the run began, and their bytes.
    pub packs: u64,
    pub pack_bytes: u64,
    /// Packs whose live blobs were copied into new packs, and the live bytes copied.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    /// Packs newly put on a condemned list.
    pub packs_condemned: u64,
    /// Condemned packs kept because a backup made meanwhile needs them.
    pub packs_rescued: u64,
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    pub stale_markers_removed: u64,
    /// Per `tenant` label of the backups: the bytes stored (compressed, sealed) of the distinct
    /// blobs its backups reference, each counted once however many backups share it: what the
    /// tenant takes in the repository after dedup and compression.
    pub bytes_by_tenant: BTreeMap<String, u64>,
    /// Per backup record: the stored bytes of the blobs it alone references (what forgetting
    /// it frees at the next gc), of those other backups reference too, and its part of the
    /// repository when each blob counts once.
    pub bytes_by_backup: BTreeMap<String, BackupBytes>,
    /// Sessions that began before a condemned list and still run; deletion waits for them
    /// (a later run finishes it).
    pub waiting_for: Vec<String>,
}

/// A backup's share of the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BackupBytes {
    pub exclusive: u64,
    pub shared: u64,
    /// The blobs it is the oldest backup to reference: what it added, and what older backups
    /// that are gone added and it still uses. Over all backups this adds up to what the
    /// backups keep stored, each blob once, so billing on it neither counts a blob twice nor
    /// drops one when the backup that first stored it is forgotten.
    pub attributed: u64,
}

/// A backup record as gc counts it.
struct RecordBlobs {
    id: String,
    time: u64,
    generation: u64,
    /// Its distinct blobs, as numbers into `Scan::blobs` (4 bytes a reference rather than 32,
    /// since every backup of a disk references most of its chunks).
    blobs: Vec<u32>,
}

/// What GC knows about the repository: packs, index objects, referenced blobs.
#[derive(Default)]
struct Scan {
    packs: HashMap<ChunkId, ObjectInfo>,
    index_objects: HashMap<String, Vec<IndexEntry>>,
    locations: HashMap<ChunkId, Vec<Location>>,
    records_read: HashSet<String>,
    referenced: HashSet<ChunkId>,
    /// The blobs each tenant's backups reference (by their `tenant` label).
    by_tenant: HashMap<String, HashSet<ChunkId>>,
    /// Each record read, with its distinct blobs.
    by_record: Vec<RecordBlobs>,
    blob_numbers: HashMap<ChunkId, u32>,
    blobs: Vec<ChunkId>,
}

impl Scan {
    fn packs(&mut self, repo: &Repository) -> Result<(), Error> {
        self.packs.clear();
        for object in repo.backend.list("packs/")? {
            let name = object.key.rsplit('/').next().unwrap_or_default();
            match ChunkId::from_hex(name) {
                Some(id) => {
                    self.packs.insert(id, object);
                }
                None => return Err(Error::Invalid(format!("gc: {} is not a pack name", object.key))),
            }
        }
        Ok(())
    }

    /// Loads the index objects not yet loaded.
    fn index(&mut self, repo: &Repository) -> Result<(), Error> {
        for object in repo.backend.list("index/")? {
            if !self.index_objects.contains_key(&object.key) {
                let entries = repo.read_index_object(&object.key)?;
                for e in &entries {
                    self.locations.entry(e.id).or_default().push(e.location);
                }
                self.index_objects.insert(object.key, entries);
            }
        }
        Ok(())
    }

    /// Adds the blobs of backups not yet read. Any record or segment that can not be read
    /// stops the run: GC deletes nothing while it can not tell what is referenced.
    fn references(&mut self, repo: &Repository) -> Result<(), Error> {
        repo.refresh_index()?;
        for object in repo.backend.list("backups/")? {
            if self.records_read.contains(&object.key) {
                continue;
            }
            let stop = |e: Error| Error::Invalid(format!("gc stopped, nothing deleted: {}: {e}", object.key));
            let record = match repo.backup_record(object.key.trim_start_matches("backups/")) {
                Ok(record) => record,
                // Forgotten meanwhile: nothing to keep for it.
                Err(Error::BackupNotFound(_)) => continue,
                Err(e) => return Err(stop(e)),
            };
            let mut ids: Vec<ChunkId> = repo.manifest(&record).map_err(stop)?;
            for segment in &record.segments {
                ids.push(ChunkId::from_hex(segment).ok_or_else(|| stop(Error::Invalid(format!("segment {segment}"))))?);
            }
            let tenant = self.by_tenant.entry(record.labels.get("tenant").cloned().unwrap_or_default()).or_default();
            let mut numbers = Vec::with_capacity(ids.len());
            for id in ids.into_iter().filter(|id| *id != ChunkId::ZERO) {
                self.referenced.insert(id);
                tenant.insert(id);
                let next = self.blobs.len() as u32;
                let number = *self.blob_numbers.entry(id).or_insert(next);
                if number == next {
                    self.blobs.push(id);
                }
                numbers.push(number);
            }
            numbers.sort_unstable();
            numbers.dedup();
            self.by_record.push(RecordBlobs {
                id: record.id.clone(),
                time: record.time,
                generation: record.generation,
                blobs: numbers,
            });
            self.records_read.insert(object.key);
        }
        Ok(())
    }

    /// Each record's blobs split into those it alone references and the rest, in stored
    /// bytes, and the blobs attributed to it: each to the oldest record referencing it.
    fn shares(&self) -> BTreeMap<String, BackupBytes> {
        let mut records_using = vec![0u32; self.blobs.len()];
        for record in &self.by_record {
            for n in &record.blobs {
                records_using[*n as usize] += 1;
            }
        }
        let stored = |n: u32| self.preferred(&self.blobs[n as usize]).map_or(0, |l| u64::from(l.length));
        // An order fixed per record, so forgetting one backup moves only its own blobs.
        let mut oldest_first: Vec<&RecordBlobs> = self.by_record.iter().collect();
        oldest_first.sort_by_key(|r| (r.time, r.generation, &r.id));
        let mut attributed = vec![false; self.blobs.len()];
        oldest_first
            .into_iter()
            .map(|record| {
                let mut bytes = BackupBytes::default();
                for n in &record.blobs {
                    match records_using[*n as usize] {
                        1 => bytes.exclusive += stored(*n),
                        _ => bytes.shared += stored(*n),
                    }
                    if !std::mem::replace(&mut attributed[*n as usize], true) {
                        bytes.attributed += stored(*n);
                    }
                }
                (record.id.clone(), bytes)
            })
            .collect()
    }

    /// The copy of a referenced blob that counts as its live one: in the newest pack, so
    /// repacked copies keep their new packs alive and the old ones empty out.
    fn preferred(&self, id: &ChunkId) -> Option<Location> {
        let modified = |l: &Location| self.packs.get(&l.pack).map(|o| o.modified);
        self.locations
            .get(id)?
            .iter()
            .filter(|l| self.packs.contains_key(&l.pack))
            .max_by_key(|l| (modified(l), l.pack.0))
            .copied()
    }
}

impl Repository {
    /// Deletes what no backup references (see the module's documentation). Only one GC runs
    /// at a time; a second one finds the first's marker and refuses.
    pub fn gc(&self, options: &GcOptions, progress: Option<&Progress>) -> Result<GcReport, Error> {
        let marker = if options.dry_run { None } else { Some(self.begin("gc")?) };
        let own = marker.as_ref().map_or("", |m| m.key());
        let (live, _) = list_markers(&*self.backend, options.stale_after, own)?;
        if let Some(other) = live.iter().find(|m| m.body.kind == "gc") {
            return Err(Error::Busy(format!(
                "another gc is running (marker {}, host {:?}, pid {})",
                other.key, other.body.host, other.body.pid
            )));
        }
        let mut report = GcReport { dry_run: options.dry_run, ..GcReport::default() };
        let mut scan = Scan::default();
        scan.packs(self)?;
        scan.index(self)?;
        scan.references(self)?;
        report.backups = scan.records_read.len();
        report.packs = scan.packs.len() as u64;
        report.pack_bytes = scan.packs.values().map(|o| o.size).sum();
        report.bytes_by_backup = scan.shares();
        report.bytes_by_tenant = scan
            .by_tenant
            .iter()
            .map(|(tenant, ids)| {
                let stored = ids.iter().filter_map(|id| scan.preferred(id)).map(|l| u64::from(l.length)).sum();
                (tenant.clone(), stored)
            })
            .collect();

        let mut pending = 0;
        for object in self.backend.list("gc/")? {
            let list = CondemnedList::decode(&self.keys.open(&self.backend.get(&object.key)?)?)?;
            if !self.collect(&object.key, list.pack_ids()?, &mut scan, options, own, &mut report)? {
                pending += 1;
            }
        }
        if pending == 0 {
            match self.condemn(&mut scan, options, progress, &mut report)? {
                // A dry run did not repack, so collecting would spare the packs it meant to
                // repack: count what a real run would delete instead.
                Some((_, packs)) if options.dry_run => {
                    report.packs_deleted += packs.len() as u64;
                    report.bytes_deleted += packs.iter().filter_map(|p| scan.packs.get(p)).map(|o| o.size).sum::<u64>();
                }
                Some((key, packs)) => {
                    self.collect(&key, packs, &mut scan, options, own, &mut report)?;
                }
                None => {}
            }
        }
        Ok(report)
    }

    /// Picks the dead packs, repacking mostly-dead ones first, and writes their condemned
    /// list; `None` when nothing is dead.
    fn condemn(
        &self,
        scan: &mut Scan,
        options: &GcOptions,
        progress: Option<&Progress>,
        report: &mut GcReport,
    ) -> Result<Option<(String, Vec<ChunkId>)>, Error> {
        let mut live: HashMap<ChunkId, Vec<(ChunkId, Location)>> = HashMap::new();
        for id in &scan.referenced {
            if let Some(location) = scan.preferred(id) {
                live.entry(location.pack).or_default().push((*id, location));
            }
        }
        // Blob bytes per pack, each stored blob once (index objects may repeat entries).
        let mut blob_bytes: HashMap<ChunkId, u64> = HashMap::new();
        let stored: HashSet<(ChunkId, u32, u32)> = scan
            .index_objects
            .values()
            .flatten()
            .map(|e| (e.location.pack, e.location.offset, e.location.length))
            .collect();
        for (pack, _, length) in stored {
            *blob_bytes.entry(pack).or_default() += length as u64;
        }
        let now = SystemTime::now();
        let mut dead = Vec::new();
        let mut repack = Vec::new();
        for (pack, object) in &scan.packs {
            if now.duration_since(object.modified).unwrap_or_default() < options.grace {
                continue;
            }
            let live_bytes: u64 = live.get(pack).map_or(0, |blobs| blobs.iter().map(|(_, l)| l.length as u64).sum());
            if live_bytes == 0 {
                dead.push(*pack);
                continue;
            }
            let stored = blob_bytes.get(pack).copied().unwrap_or_default();
            if stored.saturating_sub(live_bytes) * 100 > options.repack_unused_percent as u64 * stored {
                repack.push(*pack);
            }
        }
        report.packs_repacked = repack.len() as u64;
        report.bytes_repacked = repack.iter().flat_map(|p| &live[p]).map(|(_, l)| l.length as u64).sum::<u64>();
        if !options.dry_run && !repack.is_empty() {
            if let Some(p) = progress {
                p.total.fetch_add(report.bytes_repacked, Ordering::Relaxed);
            }
            let session = Session::new(self);
            for pack in &repack {
                let bytes = self.backend.get(&pack_key(*pack))?;
                for (id, location) in &live[pack] {
                    let start = location.offset as usize;
                    let sealed = bytes
                        .get(start..start + location.length as usize)
                        .ok_or(Error::Corrupt { id: *id, why: "the pack is shorter than its index says".into() })?;
                    let content = self.blob_content(*id, location, sealed)?;
                    session.store_copy(*id, location.kind, &content)?;
                    if let Some(p) = progress {
                        p.done.fetch_add(location.length as u64, Ordering::Relaxed);
                    }
                }
            }
            session.finish()?;
        }
        dead.extend(repack);
        report.packs_condemned = dead.len() as u64;
        if dead.is_empty() {
            return Ok(None);
        }
        let key = format!("gc/{}", hex(&random::<16>()));
        if !options.dry_run {
            let list = CondemnedList {
                version: FORMAT_VERSION,
                time: now_secs(),
                packs: dead.iter().map(|p| p.to_hex()).collect(),
            };
            let plain = serde_json::to_vec(&list).expect("a list serialises");
            self.backend.put(&key, Bytes::from(self.keys.seal(plain)))?;
        }
        Ok(Some((key, dead)))
    }

    /// Deletes the packs of condemned list `key` if no live session may still use them;
    /// returns whether the list is done with.
    fn collect(
        &self,
        key: &str,
        packs: Vec<ChunkId>,
        scan: &mut Scan,
        options: &GcOptions,
        own: &str,
        report: &mut GcReport,
    ) -> Result<bool, Error> {
        let (live, stale) = list_markers(&*self.backend, options.stale_after, own)?;
        let waiting: Vec<&LiveMarker> = live.iter().filter(|m| !m.body.seen.iter().any(|s| s == key)).collect();
        if !waiting.is_empty() {
            report.waiting_for.extend(waiting.iter().map(|m| {
                format!(
                    "{} ({} on {:?}, pid {}, since {})",
                    m.key, m.body.kind, m.body.host, m.body.pid, m.body.started
                )
            }));
            return Ok(false);
        }
        if !options.dry_run {
            for marker in &stale {
                self.backend.delete(marker)?;
            }
            report.stale_markers_removed += stale.len() as u64;
        }
        // Every session that began before the list has ended, so its record (if any) is
        // there to read now.
        scan.index(self)?;
        scan.references(self)?;
        let mut dead: HashSet<ChunkId> = packs.into_iter().collect();
        for id in &scan.referenced {
            if let Some(locations) = scan.locations.get(id) {
                if locations.iter().all(|l| dead.contains(&l.pack)) {
                    for l in locations {
                        if dead.remove(&l.pack) {
                            report.packs_rescued += 1;
                        }
                    }
                }
            }
        }
        let dead_bytes: u64 = dead.iter().filter_map(|p| scan.packs.get(p)).map(|o| o.size).sum();
        report.packs_deleted += dead.iter().filter(|p| scan.packs.contains_key(p)).count() as u64;
        report.bytes_deleted += dead_bytes;
        if options.dry_run {
            return Ok(true);
        }
        // The index first, so nothing points into a pack once it is gone.
        let stale_objects: Vec<String> = scan
            .index_objects
            .iter()
            .filter(|(_, entries)| entries.iter().any(|e| dead.contains(&e.location.pack)))
            .map(|(k, _)| k.clone())
            .collect();
        for object in stale_objects {
            let entries = scan.index_objects.remove(&object).unwrap_or_default();
            let kept: Vec<IndexEntry> = entries.into_iter().filter(|e| !dead.contains(&e.location.pack)).collect();
            if !kept.is_empty() {
                self.write_index_object(&kept)?;
            }
            self.backend.delete(&object)?;
        }
        for pack in &dead {
            self.backend.delete(&pack_key(*pack))?;
            scan.packs.remove(pack);
        }
        match self.backend.delete(key) {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // Reload from scratch: the index objects this run replaced are gone.
        scan.index_objects.clear();
        scan.locations.clear();
        scan.index(self)?;
        self.refresh_index()?;
        Ok(true)
    }
}
