//! [`Repository`]: open or create one, back a disk up into it, restore, verify.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::backend::{Backend, BackendError};
use crate::crypto::{hex, random, ChunkId, KdfParams, Keys};
use crate::format::*;
use crate::marker::Marker;
use crate::Error;

/// What a backup reads: a disk (a snapshot, in cairn).
pub trait BlockSource: Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Where a restore writes.
pub trait BlockSink: Sync {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Bytes done out of bytes to do, updated as work goes; read from any thread. Each backup or
/// restore adds its work to both, so one `Progress` can follow several disks.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// One backup to make.
#[derive(Debug)]
pub struct BackupRequest<'a> {
    pub labels: BTreeMap<String, String>,
    /// The previous backup of the same disk, and the byte ranges changed since it was taken
    /// (from changed-block tracking). Only those ranges are read; the rest is the parent's.
    pub parent: Option<(&'a BackupRecord, &'a [Range<u64>])>,
    /// Byte ranges that may hold data; the rest reads as zeros and is not read. `None`: all.
    pub allocated: Option<&'a [Range<u64>]>,
    pub progress: Option<&'a Progress>,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub chunks_written: u64,
    pub chunks_unchanged: u64,
    pub chunks_zero: u64,
}

/// What verify found; `damaged_backups` names every backup that can not be fully restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub backups: usize,
    pub blobs_checked: u64,
    pub problems: Vec<String>,
    pub damaged_backups: Vec<String>,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn pack_key(id: ChunkId) -> String {
    let hex = id.to_hex();
    format!("packs/{}/{hex}", &hex[..2])
}

/// How many worker threads a backup or restore uses: the machine's cores, within reason.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

/// A pack being filled by a backup.
#[derive(Default)]
struct OpenPack {
    bytes: Vec<u8>,
    entries: Vec<(ChunkId, BlobKind, u32, u32, u32)>,
}

/// The state of one backup session, shared by its workers.
pub(crate) struct Session<'r> {
    repo: &'r Repository,
    pack: Mutex<OpenPack>,
    /// Blobs stored in this session so far, for the session's index object.
    written: Mutex<Vec<IndexEntry>>,
    /// Ids stored or being stored by this session, so two workers never store one chunk twice.
    claimed: Mutex<HashSet<ChunkId>>,
    bytes_added: AtomicU64,
    chunks_new: AtomicU64,
}

impl<'r> Session<'r> {
    pub(crate) fn new(repo: &'r Repository) -> Self {
        Session {
            repo,
            pack: Mutex::default(),
            written: Mutex::default(),
            claimed: Mutex::default(),
            bytes_added: AtomicU64::new(0),
            chunks_new: AtomicU64::new(0),
        }
    }

    /// Stores a blob unless the repository has it; returns its id. A blob that is only in a
    /// condemned pack counts as absent: GC may delete that pack once this session ends.
    pub(crate) fn store(&self, kind: BlobKind, content: &[u8]) -> Result<ChunkId, Error> {
        let id = self.repo.keys.chunk_id(content);
        if self.repo.has_live_blob(id) {
            return Ok(id);
        }
        self.store_copy(id, kind, content)?;
        Ok(id)
    }

    /// Stores a blob whatever the index says (GC's repacking moves live blobs this way), once
    /// per session.
    pub(crate) fn store_copy(&self, id: ChunkId, kind: BlobKind, content: &[u8]) -> Result<(), Error> {
        if !self.claimed.lock().expect("claims lock").insert(id) {
            return Ok(());
        }
        let level = if kind == BlobKind::Data { 1 } else { 0 };
        let sealed = self.repo.keys.seal(pack_blob(content, level));
        self.chunks_new.fetch_add(1, Ordering::Relaxed);
        let full = {
            let mut pack = self.pack.lock().expect("pack lock");
            let offset = pack.bytes.len() as u32;
            pack.bytes.extend_from_slice(&sealed);
            pack.entries.push((id, kind, offset, sealed.len() as u32, content.len() as u32));
            (pack.bytes.len() >= PACK_TARGET).then(|| std::mem::take(&mut *pack))
        };
        if let Some(pack) = full {
            self.upload(pack)?;
        }
        Ok(())
    }

    /// Writes a pack and makes its blobs known.
    fn upload(&self, pack: OpenPack) -> Result<(), Error> {
        if pack.entries.is_empty() {
            return Ok(());
        }
        let pack_id = ChunkId(*blake3::hash(&pack.bytes).as_bytes());
        let entries: Vec<IndexEntry> = pack
            .entries
            .iter()
            .map(|&(id, kind, offset, length, raw_length)| IndexEntry {
                id,
                location: Location { kind, pack: pack_id, offset, length, raw_length },
            })
            .collect();
        let blob_bytes = pack.bytes.len() as u64;
        let trailer = self.repo.keys.seal(encode_index(&entries));
        self.repo.backend.put(&pack_key(pack_id), Bytes::from(finish_pack(pack.bytes, &trailer)))?;
        self.bytes_added.fetch_add(blob_bytes, Ordering::Relaxed);
        let mut index = self.repo.index.write().expect("index lock");
        for e in &entries {
            index.insert(e.id, e.location);
        }
        drop(index);
        self.written.lock().expect("written lock").extend(entries);
        Ok(())
    }

    /// Uploads the last pack and the session's index object. Until the index object exists,
    /// the session's packs are unreferenced (a crash leaves them to garbage collection).
    pub(crate) fn finish(self) -> Result<(u64, u64), Error> {
        let last = std::mem::take(&mut *self.pack.lock().expect("pack lock"));
        self.upload(last)?;
        let mut written = self.written.lock().expect("written lock");
        if !written.is_empty() {
            self.repo.write_index_object(&written)?;
        }
        // Indexed now: what the session stored stays known when it is dropped.
        written.clear();
        drop(written);
        Ok((self.chunks_new.load(Ordering::Relaxed), self.bytes_added.load(Ordering::Relaxed)))
    }
}

impl Drop for Session<'_> {
    /// A session that did not finish (an error, a failed index write) leaves packs no index
    /// object names: garbage for GC. Its blobs leave the in-memory index, so a later session
    /// in this process stores them again rather than pointing a record at those packs.
    fn drop(&mut self) {
        let written = std::mem::take(self.written.get_mut().unwrap_or_else(|e| e.into_inner()));
        if written.is_empty() {
            return;
        }
        let mut index = self.repo.index.write().unwrap_or_else(|e| e.into_inner());
        for e in written {
            if index.get(&e.id) == Some(&e.location) {
                index.remove(&e.id);
            }
        }
    }
}

/// Whether the index holds `id` in a pack that is not condemned: the one rule for what a
/// session may reuse.
fn is_live(index: &HashMap<ChunkId, Location>, condemned: &HashSet<ChunkId>, id: ChunkId) -> bool {
    index.get(&id).is_some_and(|l| !condemned.contains(&l.pack))
}

/// Chunk indexes overlapping any of `ranges`, in order, without repeats.
fn chunks_of(ranges: &[Range<u64>], size: u64) -> Vec<usize> {
    let mut chunks: Vec<usize> = Vec::new();
    for r in ranges {
        let end = r.end.min(size);
        if r.start >= end {
            continue;
        }
        let first = (r.start / CHUNK_SIZE) as usize;
        let last = end.div_ceil(CHUNK_SIZE) as usize;
        chunks.extend(first..last);
    }
    chunks.sort_unstable();
    chunks.dedup();
    chunks
}

/// The most one coalesced read of neighbouring blobs asks for: large enough to make requests
/// few, small enough that a worker's buffer stays modest.
const MAX_READ: u64 = 8 << 20;

/// Splits blobs sorted by (pack, offset) into runs that one ranged read each fetches: blobs
/// that follow one another in one pack, a run ending once it reaches `max_bytes`.
fn read_runs(blobs: &[(ChunkId, Location)], max_bytes: u64) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=blobs.len() {
        let split = i == blobs.len() || {
            let (prev, next) = (&blobs[i - 1].1, &blobs[i].1);
            let run_bytes = (prev.offset + prev.length - blobs[start].1.offset) as u64;
            next.pack != prev.pack || next.offset != prev.offset + prev.length || run_bytes >= max_bytes
        };
        if split {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

/// Runs `work(i)` for every i in 0..count on the worker threads; the first error stops all.
pub(crate) fn parallel<F>(count: usize, work: F) -> Result<(), Error>
where
    F: Fn(usize) -> Result<(), Error> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers().min(count.max(1)) {
            scope.spawn(|| loop {
                if failed.lock().expect("error lock").is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                if let Err(e) = work(i) {
                    failed.lock().expect("error lock").get_or_insert(e);
                    return;
                }
            });
        }
    });
    match failed.into_inner().expect("error lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) keys: Keys,
    config: RepoConfig,
    /// Where each blob is. With several copies (after a repack, or two sessions storing one
    /// chunk at once), one outside the condemned packs.
    pub(crate) index: RwLock<HashMap<ChunkId, Location>>,
    /// The index objects loaded into `index`, so a refresh loads only new ones.
    index_objects: Mutex<HashSet<String>>,
    /// Packs on a condemned list when the index was last refreshed.
    pub(crate) condemned: RwLock<HashSet<ChunkId>>,
}

impl Repository {
    /// Creates a repository on an empty backend; encrypted when a passphrase is given.
    pub fn init(backend: Arc<dyn Backend>, passphrase: Option<&str>, kdf: KdfParams) -> Result<Repository, Error> {
        match backend.get("config") {
            Ok(_) => return Err(Error::AlreadyExists),
            Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let (keys, encryption) = match passphrase {
            Some(passphrase) => {
                let (keys, wrapped_key) = Keys::generate(passphrase, &kdf)?;
                (keys, Some(Encryption { algorithm: "xchacha20poly1305".into(), kdf, wrapped_key }))
            }
            None => (Keys::plain(), None),
        };
        let config = RepoConfig {
            format: "cairn-backup".into(),
            version: FORMAT_VERSION,
            id: hex(&random::<16>()),
            chunk_size: CHUNK_SIZE,
            segment_chunks: SEGMENT_CHUNKS,
            encryption,
        };
        let text = serde_json::to_vec_pretty(&config).expect("a config serialises");
        backend.put("config", Bytes::from(text))?;
        Ok(Repository::new(backend, keys, config))
    }

    fn new(backend: Arc<dyn Backend>, keys: Keys, config: RepoConfig) -> Repository {
        Repository {
            backend,
            keys,
            config,
            index: RwLock::default(),
            index_objects: Mutex::default(),
            condemned: RwLock::default(),
        }
    }

    /// Opens a repository and loads its index.
    pub fn open(backend: Arc<dyn Backend>, passphrase: Option<&str>) -> Result<Repository, Error> {
        let config = match backend.get("config") {
            Ok(bytes) => RepoConfig::decode(&bytes)?,
            Err(BackendError::NotFound(_)) => return Err(Error::NoRepository),
            Err(e) => return Err(e.into()),
        };
        let keys = match (&config.encryption, passphrase) {
            (Some(enc), Some(passphrase)) => Keys::unwrap(passphrase, &enc.kdf, &enc.wrapped_key)?,
            (Some(_), None) => return Err(Error::NeedPassphrase),
            (None, _) => Keys::plain(),
        };
        let repo = Repository::new(backend, keys, config);
        repo.refresh_index()?;
        Ok(repo)
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn encrypted(&self) -> bool {
        self.keys.encrypted()
    }

    /// Whether the repository holds `id` in a pack that is not condemned.
    pub(crate) fn has_live_blob(&self, id: ChunkId) -> bool {
        let index = self.index.read().expect("index lock");
        is_live(&index, &self.condemned.read().expect("condemned lock"), id)
    }

    /// Positions in `ids` of non-zero blobs the repository lacks or holds only in condemned packs.
    fn missing_blobs(&self, ids: &[ChunkId]) -> Vec<usize> {
        let index = self.index.read().expect("index lock");
        let condemned = self.condemned.read().expect("condemned lock");
        (0..ids.len()).filter(|&i| ids[i] != ChunkId::ZERO && !is_live(&index, &condemned, ids[i])).collect()
    }

    /// Writes an index object for `entries` and counts it as loaded.
    pub(crate) fn write_index_object(&self, entries: &[IndexEntry]) -> Result<(), Error> {
        let key = format!("index/{}", hex(&random::<16>()));
        self.backend.put(&key, Bytes::from(self.keys.seal(encode_index(entries))))?;
        self.index_objects.lock().expect("index objects lock").insert(key);
        Ok(())
    }

    /// Reads one index object.
    pub(crate) fn read_index_object(&self, key: &str) -> Result<Vec<IndexEntry>, Error> {
        Ok(decode_index(&self.keys.open(&self.backend.get(key)?)?)?)
    }

    /// Brings the index up to date with the backend: loads index objects written since the
    /// last refresh, or everything again when some were removed (GC rewrote them) or the
    /// condemned packs changed.
    pub(crate) fn refresh_index(&self) -> Result<(), Error> {
        // GC may delete an index object between our listing and our reading it, having
        // written its replacement first: list again then.
        let mut attempts = 0;
        loop {
            match self.try_refresh_index() {
                Err(Error::Backend(BackendError::NotFound(_))) if attempts < 5 => attempts += 1,
                other => return other,
            }
        }
    }

    fn try_refresh_index(&self) -> Result<(), Error> {
        let listed: HashSet<String> = self.backend.list("index/")?.into_iter().map(|o| o.key).collect();
        let mut loaded_keys = self.index_objects.lock().expect("index objects lock");
        let full = !loaded_keys.is_subset(&listed);
        let to_load: Vec<&String> = listed.iter().filter(|k| full || !loaded_keys.contains(*k)).collect();
        let loaded: Mutex<Vec<IndexEntry>> = Mutex::default();
        parallel(to_load.len(), |i| {
            let entries = self.read_index_object(to_load[i])?;
            loaded.lock().expect("loaded lock").extend(entries);
            Ok(())
        })?;
        let condemned = self.condemned.read().expect("condemned lock");
        let mut index = self.index.write().expect("index lock");
        if full {
            index.clear();
        }
        for e in loaded.into_inner().expect("loaded lock") {
            match index.entry(e.id) {
                Entry::Vacant(slot) => {
                    slot.insert(e.location);
                }
                Entry::Occupied(mut slot) => {
                    if condemned.contains(&slot.get().pack) && !condemned.contains(&e.location.pack) {
                        slot.insert(e.location);
                    }
                }
            }
        }
        *loaded_keys = listed;
        Ok(())
    }

    /// Starts a session of `kind`: writes its marker, takes note of the condemned packs (so
    /// the session neither dedups against nor reads from them), then refreshes the index.
    /// The marker must exist before the condemned lists are read, for GC's protocol.
    pub(crate) fn begin(&self, kind: &str) -> Result<Marker, Error> {
        let marker = Marker::create(self.backend.clone(), kind)?;
        let mut seen = Vec::new();
        let mut condemned = HashSet::new();
        for object in self.backend.list("gc/")? {
            let list = match self.backend.get(&object.key) {
                Ok(sealed) => CondemnedList::decode(&self.keys.open(&sealed)?)?,
                // GC finished with it between the listing and now.
                Err(BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            condemned.extend(list.pack_ids()?);
            seen.push(object.key);
        }
        marker.set_seen(seen)?;
        let changed = *self.condemned.read().expect("condemned lock") != condemned;
        if changed {
            *self.condemned.write().expect("condemned lock") = condemned;
            // Preferences between copies depend on the condemned set: load everything again.
            self.index_objects.lock().expect("index objects lock").clear();
        }
        self.refresh_index()?;
        Ok(marker)
    }

    /// Every backup, oldest first.
    pub fn list_backups(&self) -> Result<Vec<BackupRecord>, Error> {
        let objects = self.backend.list("backups/")?;
        let mut records = Vec::with_capacity(objects.len());
        for o in objects {
            match self.read_record(&o.key) {
                Ok(record) => records.push(record),
                // Forgotten between the listing and now.
                Err(Error::Backend(BackendError::NotFound(_))) => {}
                Err(e) => return Err(e),
            }
        }
        records.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(records)
    }

    fn read_record(&self, key: &str) -> Result<BackupRecord, Error> {
        Ok(BackupRecord::decode(&self.keys.open(&self.backend.get(key)?)?)?)
    }

    pub fn backup_record(&self, id: &str) -> Result<BackupRecord, Error> {
        match self.read_record(&format!("backups/{id}")) {
            Err(Error::Backend(BackendError::NotFound(_))) => Err(Error::BackupNotFound(id.to_string())),
            other => other,
        }
    }

    /// Writes a backup record: the last step of a backup, after everything it names.
    pub(crate) fn write_record(&self, record: &BackupRecord) -> Result<(), Error> {
        let sealed = self.keys.seal(serde_json::to_vec(record).expect("a record serialises"));
        self.backend.put(&format!("backups/{}", record.id), Bytes::from(sealed))?;
        Ok(())
    }

    pub fn has_backup(&self, id: &str) -> Result<bool, Error> {
        match self.backup_record(id) {
            Ok(_) => Ok(true),
            Err(Error::BackupNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Forgets a backup: deletes its record. Its chunks stay until GC finds them unreferenced.
    pub fn forget(&self, id: &str) -> Result<(), Error> {
        self.backup_record(id)?;
        self.backend.delete(&format!("backups/{id}"))?;
        Ok(())
    }

    /// A blob's content, checked against its id.
    pub(crate) fn read_blob(&self, id: ChunkId, kind: &'static str) -> Result<Vec<u8>, Error> {
        let location = *self.index.read().expect("index lock").get(&id).ok_or(Error::Missing { what: kind, id })?;
        let start = location.offset as u64;
        let sealed = self.backend.get_range(&pack_key(location.pack), start..start + location.length as u64)?;
        self.blob_content(id, &location, &sealed)
    }

    /// Reads many blobs on the worker threads and hands each one's checked content to `each`.
    /// They are fetched by pack, in pack order, neighbours coalesced into one ranged read:
    /// far fewer requests than one per blob, which object stores charge and wait for.
    pub(crate) fn read_blobs<F>(
        &self,
        ids: impl IntoIterator<Item = ChunkId>,
        what: &'static str,
        each: F,
    ) -> Result<(), Error>
    where
        F: Fn(ChunkId, Vec<u8>) -> Result<(), Error> + Sync,
    {
        let index = self.index.read().expect("index lock");
        let mut blobs: Vec<(ChunkId, Location)> = ids
            .into_iter()
            .map(|id| index.get(&id).map(|l| (id, *l)).ok_or(Error::Missing { what, id }))
            .collect::<Result<_, _>>()?;
        drop(index);
        blobs.sort_by_key(|(_, l)| (l.pack, l.offset));
        let runs = read_runs(&blobs, MAX_READ);
        parallel(runs.len(), |r| {
            let run = &blobs[runs[r].clone()];
            let first = run[0].1;
            let last = run[run.len() - 1].1;
            let bytes = self
                .backend
                .get_range(&pack_key(first.pack), first.offset as u64..(last.offset + last.length) as u64)?;
            for (id, location) in run {
                let at = (location.offset - first.offset) as usize;
                let sealed = bytes
                    .get(at..at + location.length as usize)
                    .ok_or_else(|| Error::Corrupt { id: *id, why: "the pack is shorter than its index says".into() })?;
                each(*id, self.blob_content(*id, location, sealed)?)?;
            }
            Ok(())
        })
    }

    pub(crate) fn blob_content(&self, id: ChunkId, location: &Location, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let corrupt = |why: String| Error::Corrupt { id, why };
        let plain = self.keys.open(sealed).map_err(|e| corrupt(e.to_string()))?;
        let content = unpack_blob(&plain, location.raw_length as usize).map_err(|e| corrupt(e.to_string()))?;
        if self.keys.chunk_id(&content) != id {
            return Err(corrupt("its content does not hash to its id".into()));
        }
        Ok(content)
    }

    /// A backup's chunk ids, in disk order.
    pub(crate) fn manifest(&self, record: &BackupRecord) -> Result<Vec<ChunkId>, Error> {
        let mut ids = Vec::with_capacity(record.size.div_ceil(CHUNK_SIZE) as usize);
        for segment in &record.segments {
            let id = ChunkId::from_hex(segment).ok_or_else(|| Error::Invalid(format!("segment id {segment:?}")))?;
            ids.extend(decode_segment(&self.read_blob(id, "segment")?)?);
        }
        if ids.len() as u64 != record.size.div_ceil(CHUNK_SIZE) {
            return Err(Error::Invalid(format!(
                "backup {} lists {} chunks for {} bytes",
                record.id,
                ids.len(),
                record.size
            )));
        }
        Ok(ids)
    }

    /// Backs up `source`: reads the chunks that may have changed (all allocated chunks without a
    /// parent), stores the new ones, and writes the manifest and the backup record last.
    pub fn backup(&self, source: &dyn BlockSource, request: BackupRequest<'_>) -> Result<BackupRecord, Error> {
        let started = Instant::now();
        let _marker = self.begin("backup")?;
        let size = source.size();
        let chunk_count = size.div_ceil(CHUNK_SIZE) as usize;
        let (mut ids, to_read) = match request.parent {
            Some((parent, changed)) => {
                let mut ids = self.manifest(parent)?;
                ids.resize(chunk_count, ChunkId::ZERO);
                // Chunks past the parent's end are new space: read them if allocated.
                let mut ranges = changed.to_vec();
                if size > parent.size {
                    ranges.push(parent.size..size);
                }
                let mut to_read = chunks_of(&ranges, size);
                // The parent's chunks are reused unread only where the repository still holds
                // them outside condemned packs (the parent may have been pruned meanwhile).
                to_read.extend(self.missing_blobs(&ids));
                to_read.sort_unstable();
                to_read.dedup();
                (ids, to_read)
            }
            None => {
                let whole_disk = Range { start: 0, end: size };
                let ranges = request.allocated.unwrap_or(std::slice::from_ref(&whole_disk));
                (vec![ChunkId::ZERO; chunk_count], chunks_of(ranges, size))
            }
        };
        if let Some(allocated) = request.allocated {
            // What is not allocated reads as zeros: no need to read it to know.
            let allocated: HashSet<usize> = chunks_of(allocated, size).into_iter().collect();
            for (i, id) in ids.iter_mut().enumerate() {
                if !allocated.contains(&i) {
                    *id = ChunkId::ZERO;
                }
            }
        }
        let to_read: Vec<usize> = match request.allocated {
            Some(allocated) => {
                let allocated: HashSet<usize> = chunks_of(allocated, size).into_iter().collect();
                to_read.into_iter().filter(|i| allocated.contains(i)).collect()
            }
            None => to_read,
        };
        let progress = request.progress;
        if let Some(p) = progress {
            p.total.fetch_add(to_read.len() as u64 * CHUNK_SIZE, Ordering::Relaxed);
        }
        let session = Session::new(self);
        let found: Mutex<Vec<(usize, ChunkId)>> = Mutex::new(Vec::with_capacity(to_read.len()));
        // Workers take runs of chunks so each read is large and sequential.
        const RUN: usize = 16;
        parallel(to_read.len().div_ceil(RUN), |run| {
            let mut buf = vec![0u8; CHUNK_SIZE as usize];
            let mut local = Vec::with_capacity(RUN);
            for &chunk in &to_read[run * RUN..((run + 1) * RUN).min(to_read.len())] {
                let offset = chunk as u64 * CHUNK_SIZE;
                let len = CHUNK_SIZE.min(size - offset) as usize;
                source.read_at(&mut buf[..len], offset)?;
                let data = &buf[..len];
                let id =
                    if data.iter().all(|b| *b == 0) { ChunkId::ZERO } else { session.store(BlobKind::Data, data)? };
                local.push((chunk, id));
                if let Some(p) = progress {
                    p.done.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            found.lock().expect("found lock").extend(local);
            Ok(())
        })?;
        for (chunk, id) in found.into_inner().expect("found lock") {
            ids[chunk] = id;
        }
        let mut segments = Vec::with_capacity(ids.len().div_ceil(SEGMENT_CHUNKS));
        for part in ids.chunks(SEGMENT_CHUNKS) {
            segments.push(session.store(BlobKind::Segment, &encode_segment(part))?.to_hex());
        }
        let (chunks_new, bytes_added) = session.finish()?;
        let record = BackupRecord {
            version: FORMAT_VERSION,
            id: hex(&random::<12>()),
            time: now_secs(),
            labels: request.labels,
            size,
            chunk_size: CHUNK_SIZE,
            segments,
            parent: request.parent.map(|(p, _)| p.id.clone()),
            generation: request.parent.map_or(0, |(p, _)| p.generation + 1),
            stats: BackupStats {
                chunks_read: to_read.len() as u64,
                chunks_new,
                bytes_added,
                seconds: started.elapsed().as_secs_f64(),
            },
        };
        self.write_record(&record)?;
        Ok(record)
    }

    /// Restores a backup into `sink`. With `existing` (the sink's current content), only chunks
    /// that differ are written (a delta restore over a volume); without, the sink is taken to
    /// read as zeros (a fresh volume), so zero chunks are skipped.
    pub fn restore(
        &self,
        backup_id: &str,
        sink: &dyn BlockSink,
        existing: Option<&dyn BlockSource>,
        progress: Option<&Progress>,
    ) -> Result<RestoreStats, Error> {
        let _marker = self.begin("restore")?;
        let record = self.backup_record(backup_id)?;
        let ids = self.manifest(&record)?;
        let size = record.size;
        if let Some(existing) = existing {
            if existing.size() < size {
                return Err(Error::Invalid(format!(
                    "the target ({} bytes) is smaller than the backup ({size})",
                    existing.size()
                )));
            }
        }
        if let Some(p) = progress {
            p.total.fetch_add(size, Ordering::Relaxed);
        }
        let stats = Mutex::new(RestoreStats::default());
        let extent = |chunk: usize| {
            let offset = chunk as u64 * CHUNK_SIZE;
            (offset, CHUNK_SIZE.min(size - offset) as usize)
        };
        // Which chunks to write: all non-zero ones to a fresh target; to an existing one, those
        // whose current content differs (hashing it is cheaper than writing it).
        let wanted: Vec<usize> = match existing {
            None => {
                let zero = ids.iter().filter(|id| **id == ChunkId::ZERO).count() as u64;
                stats.lock().expect("stats lock").chunks_zero = zero;
                (0..ids.len()).filter(|&i| ids[i] != ChunkId::ZERO).collect()
            }
            Some(existing) => {
                let differing: Mutex<Vec<usize>> = Mutex::default();
                parallel(ids.len().div_ceil(16), |run| {
                    let mut buf = vec![0u8; CHUNK_SIZE as usize];
                    let end = ((run + 1) * 16).min(ids.len());
                    for (chunk, &wanted_id) in ids.iter().enumerate().take(end).skip(run * 16) {
                        let (offset, len) = extent(chunk);
                        existing.read_at(&mut buf[..len], offset)?;
                        let data = &buf[..len];
                        let current =
                            if data.iter().all(|b| *b == 0) { ChunkId::ZERO } else { self.keys.chunk_id(data) };
                        if current == wanted_id {
                            stats.lock().expect("stats lock").chunks_unchanged += 1;
                            if let Some(p) = progress {
                                p.done.fetch_add(len as u64, Ordering::Relaxed);
                            }
                        } else if wanted_id == ChunkId::ZERO {
                            sink.write_zeroes(offset, len as u64)?;
                            stats.lock().expect("stats lock").chunks_zero += 1;
                        } else {
                            differing.lock().expect("differing lock").push(chunk);
                        }
                    }
                    Ok(())
                })?;
                let mut differing = differing.into_inner().expect("differing lock");
                differing.sort_unstable();
                differing
            }
        };
        let mut positions: HashMap<ChunkId, Vec<usize>> = HashMap::new();
        for &chunk in &wanted {
            positions.entry(ids[chunk]).or_default().push(chunk);
        }
        self.read_blobs(positions.keys().copied(), "chunk", |id, content| {
            for &chunk in &positions[&id] {
                let (offset, len) = extent(chunk);
                sink.write_at(&content[..len], offset)?;
                if let Some(p) = progress {
                    p.done.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            stats.lock().expect("stats lock").chunks_written += positions[&id].len() as u64;
            Ok(())
        })?;
        Ok(stats.into_inner().expect("stats lock"))
    }

    /// Checks that every backup can be restored: its record, segments and chunks are indexed,
    /// and the packs holding them (all, or about `sample_percent` of them) read back, decrypt,
    /// decompress and hash to their ids. Every problem is reported with the backups it hits.
    pub fn verify(&self, sample_percent: Option<f64>, progress: Option<&Progress>) -> Result<VerifyReport, Error> {
        let _marker = self.begin("verify")?;
        let mut report = VerifyReport::default();
        let mut uses: HashMap<ChunkId, Vec<String>> = HashMap::new();
        let mut damaged: HashSet<String> = HashSet::new();
        let backups = self.backend.list("backups/")?;
        report.backups = backups.len();
        for object in &backups {
            let id = object.key.trim_start_matches("backups/").to_string();
            let record = match self.read_record(&object.key) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(format!("backup {id}: {e}"));
                    damaged.insert(id);
                    continue;
                }
            };
            match self.manifest(&record) {
                Ok(ids) => {
                    for chunk in ids.into_iter().filter(|c| *c != ChunkId::ZERO) {
                        uses.entry(chunk).or_default().push(id.clone());
                    }
                }
                Err(e) => {
                    report.problems.push(format!("backup {id}: {e}"));
                    damaged.insert(id.clone());
                }
            }
            for segment in record.segments.iter().filter_map(|s| ChunkId::from_hex(s)) {
                uses.entry(segment).or_default().push(id.clone());
            }
        }
        let index = self.index.read().expect("index lock").clone();
        let mut by_pack: BTreeMap<ChunkId, Vec<(ChunkId, Location)>> = BTreeMap::new();
        for (chunk, backups_using) in &uses {
            match index.get(chunk) {
                Some(location) => by_pack.entry(location.pack).or_default().push((*chunk, *location)),
                None => {
                    report.problems.push(format!("chunk {chunk:?} is missing"));
                    damaged.extend(backups_using.iter().cloned());
                }
            }
        }
        // A sample picks whole packs, spread by their ids, which are random.
        let keep = |pack: &ChunkId| sample_percent.is_none_or(|pct| (pack.0[0] as f64) < pct / 100.0 * 256.0);
        let packs: Vec<(ChunkId, Vec<(ChunkId, Location)>)> = by_pack.into_iter().filter(|(p, _)| keep(p)).collect();
        let problems: Mutex<Vec<(String, Vec<ChunkId>)>> = Mutex::default();
        let checked = AtomicU64::new(0);
        if let Some(p) = progress {
            let bytes: u64 = packs.iter().flat_map(|(_, blobs)| blobs).map(|(_, l)| l.length as u64).sum();
            p.total.fetch_add(bytes, Ordering::Relaxed);
        }
        parallel(packs.len(), |i| {
            let (pack, blobs) = &packs[i];
            if let Some(p) = progress {
                p.done.fetch_add(blobs.iter().map(|(_, l)| l.length as u64).sum(), Ordering::Relaxed);
            }
            match self.backend.get(&pack_key(*pack)) {
                Ok(bytes) => {
                    for (id, location) in blobs {
                        checked.fetch_add(1, Ordering::Relaxed);
                        let end = (location.offset + location.length) as usize;
                        let result = match bytes.get(location.offset as usize..end) {
                            Some(sealed) => self.blob_content(*id, location, sealed).map(|_| ()),
                            None => {
                                Err(Error::Corrupt { id: *id, why: "the pack is shorter than its index says".into() })
                            }
                        };
                        if let Err(e) = result {
                            problems.lock().expect("problems lock").push((e.to_string(), vec![*id]));
                        }
                    }
                }
                Err(e) => {
                    let ids = blobs.iter().map(|(id, _)| *id).collect();
                    problems.lock().expect("problems lock").push((format!("pack {pack:?}: {e}"), ids));
                }
            }
            Ok(())
        })?;
        for (problem, ids) in problems.into_inner().expect("problems lock") {
            report.problems.push(problem);
            for id in ids {
                damaged.extend(uses.get(&id).into_iter().flatten().cloned());
            }
        }
        report.blobs_checked = checked.into_inner();
        let mut damaged: Vec<String> = damaged.into_iter().collect();
        damaged.sort();
        report.damaged_backups = damaged;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(pack: u8, offset: u32, length: u32) -> (ChunkId, Location) {
        let location = Location { kind: BlobKind::Data, pack: ChunkId([pack; 32]), offset, length, raw_length: length };
        (ChunkId([offset as u8; 32]), location)
    }

    #[test]
    fn reads_cover_neighbours_in_one_pack_up_to_the_limit() {
        assert!(read_runs(&[], 100).is_empty());
        // A gap, then another pack, then a run cut once it reaches the limit.
        let blobs =
            [blob(1, 0, 10), blob(1, 10, 10), blob(1, 30, 10), blob(2, 40, 10), blob(2, 50, 60), blob(2, 110, 5)];
        assert_eq!(read_runs(&blobs, 50), [0..2, 2..3, 3..5, 5..6]);
        assert_eq!(read_runs(&blobs, 1000), [0..2, 2..3, 3..6]);
    }
}
