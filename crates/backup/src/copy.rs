//! Copying a backup to another repository (the off-site copy), incrementally.
//!
//! The two repositories have different keys, so a chunk's id differs between them and can't
//! be looked up across. What makes a copy incremental is the backup's parent: a copy keeps the
//! source record's id, so if the parent was copied before, its two manifests, position by
//! position, say which destination chunk each source chunk became. Only chunks that mapping
//! does not cover (or whose destination copy is gone) are fetched, by pack with neighbours in
//! one read as a restore fetches, and stored; the destination dedups those too.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::crypto::ChunkId;
use crate::format::{encode_segment, BackupRecord, BackupStats, BlobKind, FORMAT_VERSION, SEGMENT_CHUNKS};
use crate::repo::{Progress, Repository, Session};
use crate::Error;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyStats {
    /// The destination had the backup already; nothing was done.
    pub already_there: bool,
    /// Chunks read from the source (the rest were known from the parent's copy, or zero).
    pub chunks_fetched: u64,
    /// Blobs new to the destination (chunks and manifest segments).
    pub chunks_new: u64,
    pub bytes_added: u64,
}

impl Repository {
    /// Copies backup `id` into `dest`, record last, under the same id. Copying a backup that
    /// is there already does nothing; a copy cut short leaves no record and is redone.
    pub fn copy_backup(&self, id: &str, dest: &Repository, progress: Option<&Progress>) -> Result<CopyStats, Error> {
        let started = Instant::now();
        if dest.has_backup(id)? {
            return Ok(CopyStats { already_there: true, ..CopyStats::default() });
        }
        let _reading = self.begin("copy")?;
        let _writing = dest.begin("copy")?;
        let record = self.backup_record(id)?;
        let source_ids = self.manifest(&record)?;
        let known = self.copied_parent_chunks(&record, dest);
        let mut dest_ids = vec![ChunkId::ZERO; source_ids.len()];
        let mut to_fetch: HashMap<ChunkId, Vec<usize>> = HashMap::new();
        for (i, source) in source_ids.iter().enumerate() {
            if *source == ChunkId::ZERO {
                continue;
            }
            match known.get(source) {
                Some(copied) if dest.has_live_blob(*copied) => dest_ids[i] = *copied,
                _ => to_fetch.entry(*source).or_default().push(i),
            }
        }
        if let Some(p) = progress {
            p.total.fetch_add(to_fetch.len() as u64 * record.chunk_size, Ordering::Relaxed);
        }
        let session = Session::new(dest);
        let stored: Mutex<Vec<(ChunkId, ChunkId)>> = Mutex::new(Vec::with_capacity(to_fetch.len()));
        self.read_blobs(to_fetch.keys().copied(), "chunk", |source, content| {
            let copied = session.store(BlobKind::Data, &content)?;
            stored.lock().expect("stored lock").push((source, copied));
            if let Some(p) = progress {
                p.done.fetch_add(record.chunk_size, Ordering::Relaxed);
            }
            Ok(())
        })?;
        for (source, copied) in stored.into_inner().expect("stored lock") {
            for &i in &to_fetch[&source] {
                dest_ids[i] = copied;
            }
        }
        let mut segments = Vec::with_capacity(dest_ids.len().div_ceil(SEGMENT_CHUNKS));
        for part in dest_ids.chunks(SEGMENT_CHUNKS) {
            segments.push(session.store(BlobKind::Segment, &encode_segment(part))?.to_hex());
        }
        let (chunks_new, bytes_added) = session.finish()?;
        let stats = CopyStats { already_there: false, chunks_fetched: to_fetch.len() as u64, chunks_new, bytes_added };
        dest.write_record(&BackupRecord {
            // The destination's segments are this code's encoding, whatever wrote the source's.
            version: FORMAT_VERSION,
            segments,
            stats: BackupStats {
                chunks_read: stats.chunks_fetched,
                chunks_new,
                bytes_added,
                seconds: started.elapsed().as_secs_f64(),
            },
            ..record
        })?;
        Ok(stats)
    }

    /// Source chunk id -> destination chunk id, from the parent's copy if it has one.
    fn copied_parent_chunks(&self, record: &BackupRecord, dest: &Repository) -> HashMap<ChunkId, ChunkId> {
        let Some(parent) = &record.parent else { return HashMap::new() };
        let manifests = (|| -> Result<_, Error> {
            let source = self.manifest(&self.backup_record(parent)?)?;
            let copied = dest.manifest(&dest.backup_record(parent)?)?;
            Ok((source, copied))
        })();
        // No parent copy (or an unreadable one): fetch everything; dedup still applies.
        let Ok((source, copied)) = manifests else { return HashMap::new() };
        source.into_iter().zip(copied).filter(|(s, _)| *s != ChunkId::ZERO).collect()
    }
}
