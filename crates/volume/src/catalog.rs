//! The catalog: which volumes, snapshots and layers exist and how layers stack. Pure state
//! plus the events that change it; the store appends each event to `catalog.log` (and syncs)
//! before acting on it, and rebuilds the state on open by replaying the log.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Magic at the start of `catalog.log`.
pub const MAGIC: [u8; 8] = *b"CAIRNCAT";
/// The catalog format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the file header.
pub const HEADER_LEN: usize = 16;
const FRAME_HEADER_LEN: usize = 8;
/// Largest frame payload accepted: a guard against reading a garbage length.
const MAX_FRAME: usize = 256 << 20;

/// Why an event does not apply, or the log cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    #[error("not a cairn catalog (bad magic)")]
    BadMagic,
    #[error("catalog format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("catalog record at byte {offset} does not decode: {reason}")]
    BadRecord { offset: u64, reason: String },
    #[error("catalog event does not apply: {0}")]
    Inconsistent(String),
}

/// A layer: one file of blocks stacked on its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer below, if any.
    pub parent: Option<u64>,
    /// Its data was merged into its child; only its change tracking remains.
    #[serde(default)]
    pub ghost: bool,
}

/// A volume: a writable head layer on a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub size: u64,
    pub head: u64,
    pub created_ms: u64,
}

/// A snapshot: a frozen layer and the size at that instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// The volume it was taken of (it may since have been deleted).
    pub volume: u64,
    pub layer: u64,
    pub size: u64,
    pub created_ms: u64,
    /// Deleted, but kept as a change-tracking checkpoint: its name is free, its data is
    /// merged away, and changed blocks can still be listed since it.
    #[serde(default)]
    pub checkpoint_only: bool,
}

/// The whole catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub next_id: u64,
    #[serde(with = "id_map")]
    pub layers: BTreeMap<u64, LayerRecord>,
    #[serde(with = "id_map")]
    pub volumes: BTreeMap<u64, VolumeRecord>,
    #[serde(with = "id_map")]
    pub snapshots: BTreeMap<u64, SnapshotRecord>,
}

/// Maps keyed by id are stored as `[[id, value], ...]`: serde cannot read integer map keys
/// back from inside an internally tagged enum (the `state` event).
mod id_map {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer, V: Serialize>(map: &BTreeMap<u64, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(d: D) -> Result<BTreeMap<u64, V>, D::Error> {
        Ok(Vec::<(u64, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// One volume's part of a (group) snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub volume: u64,
    pub snapshot: u64,
    pub name: String,
    /// The new, empty head; the old head becomes the snapshot's layer.
    pub new_head: u64,
}

/// A change to the catalog, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The full state (first record of a compacted log).
    State {
        catalog: Catalog,
    },
    /// A new volume with an empty head on `parent` (a clone) or on nothing.
    CreateVolume {
        volume: u64,
        name: String,
        size: u64,
        head: u64,
        parent: Option<u64>,
        created_ms: u64,
    },
    /// Several volumes snapshotted at one instant.
    Snapshot {
        entries: Vec<SnapshotEntry>,
        created_ms: u64,
    },
    /// The volume's head is dropped; a new empty head sits on the snapshot's layer.
    Revert {
        volume: u64,
        snapshot: u64,
        new_head: u64,
    },
    Grow {
        volume: u64,
        size: u64,
    },
    DeleteSnapshot {
        snapshot: u64,
        keep_checkpoint: bool,
    },
    DeleteVolume {
        volume: u64,
    },
    /// A checkpoint is no longer needed; its ghost layer can fold into its child.
    ForgetCheckpoint {
        snapshot: u64,
    },
    /// `layer`'s blocks were copied into its only child `into`; it becomes a ghost if a
    /// checkpoint still needs its change tracking, else it is gone.
    Merged {
        layer: u64,
        into: u64,
    },
}

/// A layer whose data can be merged into its only child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeTask {
    pub layer: u64,
    pub into: u64,
    /// Where the data goes: the nearest descendant that is not a ghost (ghosts hold no data
    /// and always have exactly one child). `None` when the layer is a ghost itself.
    pub data_into: Option<u64>,
    /// A checkpoint needs the layer's change tracking kept apart from its child's.
    pub keep_tracking: bool,
}

fn inconsistent<T>(msg: impl Into<String>) -> Result<T, CatalogError> {
    Err(CatalogError::Inconsistent(msg.into()))
}

impl Catalog {
    /// Hands out a fresh id (volumes, snapshots and layers share one sequence).
    pub fn allocate_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The size of the largest volume or snapshot, checkpoints included: no layer holds data
    /// past it.
    pub fn largest_size(&self) -> u64 {
        let volumes = self.volumes.values().map(|v| v.size);
        volumes.chain(self.snapshots.values().map(|s| s.size)).max().unwrap_or(0)
    }

    fn bump_ids(&mut self, ids: &[u64]) {
        for id in ids {
            self.next_id = self.next_id.max(*id);
        }
    }

    /// Applies an event, then drops layers nothing uses. Returns the ids of dropped layers.
    pub fn apply(&mut self, event: &Event) -> Result<Vec<u64>, CatalogError> {
        match event {
            Event::State { catalog } => *self = catalog.clone(),
            Event::CreateVolume { volume, name, size, head, parent, created_ms } => {
                if self.volumes.contains_key(volume) || self.layers.contains_key(head) {
                    return inconsistent(format!("volume {volume} or layer {head} exists"));
                }
                if let Some(p) = parent {
                    if self.layers.get(p).is_none_or(|l| l.ghost) {
                        return inconsistent(format!("parent layer {p} missing or merged away"));
                    }
                }
                self.bump_ids(&[*volume, *head]);
                self.layers.insert(*head, LayerRecord { parent: *parent, ghost: false });
                self.volumes.insert(
                    *volume,
                    VolumeRecord { name: name.clone(), size: *size, head: *head, created_ms: *created_ms },
                );
            }
            Event::Snapshot { entries, created_ms } => {
                for (i, e) in entries.iter().enumerate() {
                    let repeated = entries[..i].iter().any(|o| o.new_head == e.new_head || o.volume == e.volume);
                    if repeated || !self.volumes.contains_key(&e.volume) || self.layers.contains_key(&e.new_head) {
                        return inconsistent(format!("volume {} missing or layer {} exists", e.volume, e.new_head));
                    }
                }
                for e in entries {
                    let Some(vol) = self.volumes.get_mut(&e.volume) else {
                        return inconsistent(format!("volume {} missing", e.volume));
                    };
                    let frozen = vol.head;
                    vol.head = e.new_head;
                    let size = vol.size;
                    self.layers.insert(e.new_head, LayerRecord { parent: Some(frozen), ghost: false });
                    self.snapshots.insert(
                        e.snapshot,
                        SnapshotRecord {
                            name: e.name.clone(),
                            volume: e.volume,
                            layer: frozen,
                            size,
                            created_ms: *created_ms,
                            checkpoint_only: false,
                        },
                    );
                    self.bump_ids(&[e.snapshot, e.new_head]);
                }
            }
            Event::Revert { volume, snapshot, new_head } => {
                if self.layers.contains_key(new_head) {
                    return inconsistent(format!("layer {new_head} exists"));
                }
                let Some(snap) = self.snapshots.get(snapshot).filter(|s| !s.checkpoint_only) else {
                    return inconsistent(format!("snapshot {snapshot} missing"));
                };
                let (layer, size) = (snap.layer, snap.size);
                let Some(vol) = self.volumes.get_mut(volume) else {
                    return inconsistent(format!("volume {volume} missing"));
                };
                vol.head = *new_head;
                vol.size = size;
                self.layers.insert(*new_head, LayerRecord { parent: Some(layer), ghost: false });
                self.bump_ids(&[*new_head]);
            }
            Event::Grow { volume, size } => {
                let Some(vol) = self.volumes.get_mut(volume) else {
                    return inconsistent(format!("volume {volume} missing"));
                };
                vol.size = *size;
            }
            Event::DeleteSnapshot { snapshot, keep_checkpoint } => {
                if *keep_checkpoint {
                    let Some(snap) = self.snapshots.get_mut(snapshot) else {
                        return inconsistent(format!("snapshot {snapshot} missing"));
                    };
                    snap.checkpoint_only = true;
                } else if self.snapshots.remove(snapshot).is_none() {
                    return inconsistent(format!("snapshot {snapshot} missing"));
                }
            }
            Event::ForgetCheckpoint { snapshot } => {
                if !self.snapshots.get(snapshot).is_some_and(|s| s.checkpoint_only) {
                    return inconsistent(format!("checkpoint {snapshot} missing"));
                }
                self.snapshots.remove(snapshot);
            }
            Event::DeleteVolume { volume } => {
                if self.volumes.remove(volume).is_none() {
                    return inconsistent(format!("volume {volume} missing"));
                }
            }
            Event::Merged { layer, into } => {
                let task = self.merge_task_for(*layer);
                if task.map(|t| t.into) != Some(*into) {
                    return inconsistent(format!("layer {layer} cannot merge into {into}"));
                }
                if self.has_checkpoint(*layer) {
                    self.layers.get_mut(layer).expect("merge task layer exists").ghost = true;
                } else {
                    let parent = self.layers.remove(layer).expect("merge task layer exists").parent;
                    self.layers.get_mut(into).expect("merge task child exists").parent = parent;
                    let mut dropped = vec![*layer];
                    dropped.extend(self.collect_garbage());
                    return Ok(dropped);
                }
            }
        }
        Ok(self.collect_garbage())
    }

    fn children(&self, layer: u64) -> impl Iterator<Item = u64> + '_ {
        self.layers.iter().filter(move |(_, l)| l.parent == Some(layer)).map(|(id, _)| *id)
    }

    fn is_head(&self, layer: u64) -> bool {
        self.volumes.values().any(|v| v.head == layer)
    }

    pub(crate) fn has_live_snapshot(&self, layer: u64) -> bool {
        self.snapshots.values().any(|s| s.layer == layer && !s.checkpoint_only)
    }

    fn has_checkpoint(&self, layer: u64) -> bool {
        self.snapshots.values().any(|s| s.layer == layer && s.checkpoint_only)
    }

    /// Drops layers that no volume, snapshot or child uses, repeatedly, and the checkpoints
    /// that pointed at them.
    fn collect_garbage(&mut self) -> Vec<u64> {
        let mut dropped = Vec::new();
        loop {
            // One pass over each table, not one per layer: this runs after every event, and a
            // store with thousands of snapshots must not pay layers × snapshots each time.
            let mut used: HashSet<u64> = self.volumes.values().map(|v| v.head).collect();
            used.extend(self.snapshots.values().filter(|s| !s.checkpoint_only).map(|s| s.layer));
            used.extend(self.layers.values().filter_map(|l| l.parent));
            let unused: Vec<u64> = self.layers.keys().copied().filter(|id| !used.contains(id)).collect();
            if unused.is_empty() {
                return dropped;
            }
            for id in unused {
                self.layers.remove(&id);
                self.snapshots.retain(|_, s| s.layer != id);
                dropped.push(id);
            }
        }
    }

    /// The layers whose data `layer` holds once the merges waiting now are done, top first:
    /// `layer`, then down its parents through ghosts (which hold none) and every layer waiting
    /// to merge up into it. A read of the layer's final content sees the upper ones first.
    pub(crate) fn settling_into(&self, layer: u64) -> Vec<u64> {
        let mut stack = vec![layer];
        let mut below = self.layers.get(&layer).and_then(|l| l.parent);
        while let Some(id) = below {
            let rec = &self.layers[&id];
            if !rec.ghost {
                if self.merge_task_for(id).is_none() {
                    break;
                }
                stack.push(id);
            }
            below = rec.parent;
        }
        stack
    }

    /// Where data put into `layer` comes to rest once the merges waiting now are done: the
    /// layers it passes through, from `layer` up to the one it rests in, and that one's live
    /// snapshot (None: a volume's head, or nowhere).
    pub(crate) fn landing(&self, layer: u64) -> (Vec<u64>, Option<u64>) {
        let mut path = vec![layer];
        let mut at = layer;
        loop {
            if let Some((id, _)) = self.snapshots.iter().find(|(_, s)| s.layer == at && !s.checkpoint_only) {
                return (path, Some(*id));
            }
            if self.is_head(at) {
                return (path, None);
            }
            match self.merge_task_for(at).and_then(|t| t.data_into) {
                Some(next) => {
                    path.push(next);
                    at = next;
                }
                None => return (path, None),
            }
        }
    }

    pub(crate) fn merge_task_for(&self, layer: u64) -> Option<MergeTask> {
        let rec = self.layers.get(&layer)?;
        if self.is_head(layer) || self.has_live_snapshot(layer) {
            return None;
        }
        let mut children = self.children(layer);
        let into = children.next()?;
        if children.next().is_some() {
            return None; // Clones share it: it stays as it is.
        }
        let keep_tracking = self.has_checkpoint(layer);
        if rec.ghost && keep_tracking {
            return None; // Nothing to do until its checkpoint is forgotten.
        }
        let data_into = if rec.ghost { None } else { Some(self.first_holding_layer(into)?) };
        Some(MergeTask { layer, into, data_into, keep_tracking })
    }

    /// Where the data of a layer whose only child is `child` lands when it merges: that child,
    /// or, through ghosts (which hold no data), the first real layer above.
    pub(crate) fn first_holding_layer(&self, child: u64) -> Option<u64> {
        let mut target = child;
        while self.layers[&target].ghost {
            target = self.children(target).next()?;
        }
        Some(target)
    }

    /// Layers to merge into their child, lowest id first.
    pub fn merge_tasks(&self) -> Vec<MergeTask> {
        self.layers.keys().filter_map(|id| self.merge_task_for(*id)).collect()
    }

    /// Layers from the bottom up to `top` that hold data (ghosts left out).
    pub fn read_chain(&self, top: u64) -> Vec<u64> {
        let mut chain: Vec<u64> = self.lineage(top).into_iter().filter(|id| !self.layers[id].ghost).collect();
        chain.reverse();
        chain
    }

    /// `top` and every layer below it, top first, ghosts included.
    pub fn lineage(&self, top: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = Some(top);
        while let Some(id) = cur {
            let Some(rec) = self.layers.get(&id) else {
                break;
            };
            out.push(id);
            cur = rec.parent;
        }
        out
    }

    /// A snapshot that is not deleted (checkpoints of deleted ones are not).
    pub fn live_snapshot(&self, id: u64) -> Option<&SnapshotRecord> {
        self.snapshots.get(&id).filter(|s| !s.checkpoint_only)
    }

    /// The id of the volume named `name`.
    pub fn volume_by_name(&self, name: &str) -> Option<u64> {
        self.volumes.iter().find(|(_, v)| v.name == name).map(|(id, _)| *id)
    }

    /// The live snapshot named `name` of volume `volume`.
    pub fn snapshot_by_name(&self, volume: u64, name: &str) -> Option<u64> {
        self.snapshots
            .iter()
            .find(|(_, s)| s.volume == volume && s.name == name && !s.checkpoint_only)
            .map(|(id, _)| *id)
    }
}

/// Encodes the file header.
pub fn encode_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Appends one framed event to `out`.
pub fn encode_frame(event: &Event, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(event).expect("catalog events always serialize");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Whether the frame at the start of `bytes` is whole, of a valid length, and its checksum
/// matches.
fn is_intact_frame(bytes: &[u8]) -> bool {
    let field = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let (Some(len), Some(crc)) = (field(0), field(4)) else {
        return false;
    };
    let len = len as usize;
    len > 0
        && len <= MAX_FRAME
        && bytes.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len).is_some_and(|p| crc32c::crc32c(p) == crc)
}

/// The offset of the first intact frame in `bytes` after `from`. Events are JSON objects, so
/// a payload starts with `{`: a cheap test that spares the checksum at almost every offset.
fn next_intact_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|at| bytes.get(at + FRAME_HEADER_LEN) == Some(&b'{') && is_intact_frame(&bytes[*at..]))
}

/// The result of replaying a catalog log.
#[derive(Debug)]
pub struct Replayed {
    pub catalog: Catalog,
    /// Bytes that are valid; a torn tail after them is cut off.
    pub valid_len: u64,
    pub frames: u64,
    /// Layers that the replayed events dropped: their files may be deleted.
    pub dropped: std::collections::BTreeSet<u64>,
}

/// Replays a whole `catalog.log`. An empty file is an empty catalog.
pub fn replay(bytes: &[u8]) -> Result<Replayed, CatalogError> {
    if bytes.len() < HEADER_LEN {
        return Ok(Replayed { catalog: Catalog::default(), valid_len: 0, frames: 0, dropped: Default::default() });
    }
    if bytes[0..8] != MAGIC {
        return Err(CatalogError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(CatalogError::UnsupportedVersion(version));
    }
    let mut catalog = Catalog::default();
    let mut pos = HEADER_LEN;
    let mut frames = 0;
    let mut dropped = std::collections::BTreeSet::new();
    while bytes.len() - pos >= FRAME_HEADER_LEN {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let start = pos + FRAME_HEADER_LEN;
        let bad = |reason: String| CatalogError::BadRecord { offset: pos as u64, reason };
        if !is_intact_frame(&bytes[pos..]) {
            // Appends are sequential and a failed one stops every later one, so only the last
            // frame can be torn; a bad frame with more bytes after it is damage, and reading
            // past it would lose events. A header the disk never got (zeros) is a torn tail
            // too, unless an intact frame follows: then its length field was damaged.
            if len > 0 && len <= MAX_FRAME && start + len < bytes.len() {
                return Err(bad("checksum mismatch before the end of the log".into()));
            }
            if let Some(next) = next_intact_frame(bytes, pos + 1) {
                return Err(bad(format!("damaged frame header; an intact frame follows at byte {next}")));
            }
            break; // A torn tail: the event was never acknowledged.
        }
        let event: Event = serde_json::from_slice(&bytes[start..start + len]).map_err(|e| bad(e.to_string()))?;
        dropped.extend(catalog.apply(&event).map_err(|e| bad(e.to_string()))?);
        pos = start + len;
        frames += 1;
    }
    Ok(Replayed { catalog, valid_len: pos as u64, frames, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(cat: &mut Catalog, name: &str) -> (u64, u64) {
        let (volume, head) = (cat.allocate_id(), cat.allocate_id());
        let ev = Event::CreateVolume { volume, name: name.into(), size: 1 << 20, head, parent: None, created_ms: 0 };
        cat.apply(&ev).unwrap();
        (volume, head)
    }

    fn snapshot(cat: &mut Catalog, volume: u64, name: &str) -> (u64, u64) {
        let (snapshot, new_head) = (cat.allocate_id(), cat.allocate_id());
        let entries = vec![SnapshotEntry { volume, snapshot, name: name.into(), new_head }];
        cat.apply(&Event::Snapshot { entries, created_ms: 0 }).unwrap();
        (snapshot, new_head)
    }

    #[test]
    fn delete_snapshot_makes_its_layer_mergeable_unless_cloned() {
        let mut cat = Catalog::default();
        let (vol, first_head) = create(&mut cat, "a");
        let (s1, head) = snapshot(&mut cat, vol, "s1");
        assert!(cat.merge_tasks().is_empty());
        let (clone, clone_head) = (cat.allocate_id(), cat.allocate_id());
        cat.apply(&Event::CreateVolume {
            volume: clone,
            name: "c".into(),
            size: 1 << 20,
            head: clone_head,
            parent: Some(first_head),
            created_ms: 0,
        })
        .unwrap();
        cat.apply(&Event::DeleteSnapshot { snapshot: s1, keep_checkpoint: false }).unwrap();
        assert!(cat.merge_tasks().is_empty(), "two children share the layer");
        cat.apply(&Event::DeleteVolume { volume: clone }).unwrap();
        let tasks = cat.merge_tasks();
        assert_eq!(
            tasks,
            vec![MergeTask { layer: first_head, into: head, data_into: Some(head), keep_tracking: false }]
        );
        cat.apply(&Event::Merged { layer: first_head, into: head }).unwrap();
        assert_eq!(cat.read_chain(head), vec![head]);
        assert_eq!(cat.layers.len(), 1);
    }

    #[test]
    fn checkpoint_keeps_a_ghost_until_the_volume_goes() {
        let mut cat = Catalog::default();
        let (vol, first_head) = create(&mut cat, "a");
        let (s1, head) = snapshot(&mut cat, vol, "s1");
        cat.apply(&Event::DeleteSnapshot { snapshot: s1, keep_checkpoint: true }).unwrap();
        assert_eq!(cat.snapshot_by_name(vol, "s1"), None, "the name is free");
        cat.apply(&Event::Merged { layer: first_head, into: head }).unwrap();
        assert!(cat.layers[&first_head].ghost);
        assert_eq!(cat.read_chain(head), vec![head]);
        assert_eq!(cat.lineage(head), vec![head, first_head]);
        assert!(cat.merge_tasks().is_empty());
        cat.apply(&Event::ForgetCheckpoint { snapshot: s1 }).unwrap();
        assert_eq!(
            cat.merge_tasks(),
            vec![MergeTask { layer: first_head, into: head, data_into: None, keep_tracking: false }]
        );
        cat.apply(&Event::DeleteSnapshot { snapshot: s1, keep_checkpoint: true }).unwrap_err();
        let (s2, _) = snapshot(&mut cat, vol, "s2");
        cat.apply(&Event::DeleteSnapshot { snapshot: s2, keep_checkpoint: true }).unwrap();
        let dropped = cat.apply(&Event::DeleteVolume { volume: vol }).unwrap();
        assert_eq!(dropped.len(), 3);
        assert!(cat.layers.is_empty() && cat.snapshots.is_empty());
    }

    #[test]
    fn revert_drops_the_old_head_and_keeps_the_snapshot() {
        let mut cat = Catalog::default();
        let (vol, first_head) = create(&mut cat, "a");
        let (s1, _) = snapshot(&mut cat, vol, "s1");
        let (_, _) = snapshot(&mut cat, vol, "s2");
        let new_head = cat.allocate_id();
        let dropped = cat.apply(&Event::Revert { volume: vol, snapshot: s1, new_head }).unwrap();
        assert_eq!(dropped.len(), 1, "the old head goes");
        assert_eq!(cat.read_chain(new_head), vec![first_head, new_head]);
        assert_eq!(cat.layers.len(), 3, "s2's layer stays for its snapshot");
    }

    /// docs/format.md, whose examples pin the bytes the encoder writes.
    const FORMAT_DOC: &str = include_str!("../../../docs/format.md");

    /// The lines of the fenced blocks that open with `fence` in the doc's section `section`
    /// (from its heading to the next one of the same level).
    fn doc_blocks(section: &str, fence: &str) -> Vec<&'static str> {
        let start = FORMAT_DOC.find(section).expect("the section is in format.md");
        let rest = &FORMAT_DOC[start + section.len()..];
        let body = &rest[..rest.find("\n### ").unwrap_or(rest.len())];
        let mut lines = Vec::new();
        let mut inside = false;
        for line in body.lines() {
            match line {
                l if l == fence => inside = true,
                "```" => inside = false,
                l if inside => lines.push(l),
                _ => {}
            }
        }
        lines
    }

    #[test]
    fn encodes_the_documented_example() {
        // §5.2: the header and one grow event, as `hexdump -C` shows them.
        let hexdump = doc_blocks("### 5.2 Frames", "```");
        let documented: Vec<u8> = hexdump
            .iter()
            .flat_map(|line| line[10..58].split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()))
            .collect();
        let mut encoded = encode_header().to_vec();
        encode_frame(&Event::Grow { volume: 1, size: 20 << 30 }, &mut encoded);
        assert_eq!(encoded, documented);
    }

    #[test]
    fn encodes_every_documented_event_as_written_there() {
        // §5.3 gives each event as JSON, fields in the order writers emit them.
        let examples = doc_blocks("### 5.3 Events", "```json");
        let named: std::collections::BTreeSet<&str> =
            examples.iter().filter_map(|json| json.split('"').nth(3)).collect();
        let every_event = ["create_volume", "snapshot", "revert", "grow", "delete_snapshot", "delete_volume"];
        let every_event = every_event.into_iter().chain(["forget_checkpoint", "merged", "state"]);
        assert_eq!(named, every_event.collect(), "an example of every event");
        for json in examples {
            let event: Event = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let mut frame = Vec::new();
            encode_frame(&event, &mut frame);
            assert_eq!(std::str::from_utf8(&frame[8..]).unwrap(), json);
        }
    }

    #[test]
    fn log_round_trip_with_torn_tail() {
        let mut cat = Catalog::default();
        let mut log = encode_header().to_vec();
        let (volume, head) = (cat.allocate_id(), cat.allocate_id());
        let ev = Event::CreateVolume { volume, name: "a".into(), size: 4096, head, parent: None, created_ms: 1 };
        cat.apply(&ev).unwrap();
        encode_frame(&ev, &mut log);
        let good = log.len();
        encode_frame(&Event::Grow { volume, size: 8192 }, &mut log);
        log.truncate(log.len() - 1);
        let r = replay(&log).unwrap();
        assert_eq!(r.catalog, cat);
        assert_eq!(r.valid_len, good as u64);
        log[8] = 2;
        assert_eq!(replay(&log).unwrap_err(), CatalogError::UnsupportedVersion(2));
    }

    #[test]
    fn damage_before_the_end_is_an_error_not_a_tail() {
        let mut cat = Catalog::default();
        let (volume, _) = create(&mut cat, "a");
        let mut log = encode_header().to_vec();
        encode_frame(&Event::State { catalog: cat.clone() }, &mut log);
        let damaged = log.len() + 9;
        encode_frame(&Event::Grow { volume, size: 8192 }, &mut log);
        encode_frame(&Event::Grow { volume, size: 16384 }, &mut log);
        assert_eq!(replay(&log).unwrap().catalog.volumes[&volume].size, 16384);
        log[damaged] ^= 1;
        assert!(matches!(replay(&log).unwrap_err(), CatalogError::BadRecord { .. }));
        // A header of zeros (a torn write) is a tail, not an empty event.
        let mut torn = encode_header().to_vec();
        torn.extend_from_slice(&[0u8; 40]);
        assert_eq!(replay(&torn).unwrap().valid_len, HEADER_LEN as u64);
    }

    #[test]
    fn a_damaged_frame_header_followed_by_an_intact_frame_is_damage_not_a_tail() {
        let mut cat = Catalog::default();
        let (volume, _) = create(&mut cat, "a");
        let mut log = encode_header().to_vec();
        encode_frame(&Event::State { catalog: cat.clone() }, &mut log);
        encode_frame(&Event::Grow { volume, size: 8192 }, &mut log);
        // Each of these once read as a torn tail: the catalog lost every later event, and the
        // orphan cleanup then deleted the files of every layer those events created.
        let zeroed = |at: usize, len: usize| {
            let mut damaged = log.clone();
            damaged[at..at + len].fill(0);
            damaged
        };
        let huge = {
            let mut damaged = log.clone();
            damaged[HEADER_LEN + 3] = 0xff;
            damaged
        };
        for (damaged, what) in [
            (zeroed(HEADER_LEN, 4), "length zeroed"),
            (zeroed(HEADER_LEN, 8), "header zeroed"),
            (huge, "length too large"),
        ] {
            let err = replay(&damaged).unwrap_err();
            assert!(
                matches!(&err, CatalogError::BadRecord { offset, reason } if *offset == HEADER_LEN as u64 && reason.contains("intact frame follows")),
                "{what}: {err}"
            );
        }
        // A torn last frame is still a tail.
        let mut torn = log.clone();
        torn.truncate(log.len() - 2);
        let r = replay(&torn).unwrap();
        assert_eq!(r.frames, 1);
        assert_eq!(r.catalog, cat);
    }

    mod damaged_logs {
        use super::*;
        use proptest::prelude::*;

        /// A log of a volume's creation and `grows` events on it, and the end of each whole
        /// frame with the catalog up to it.
        fn grown_log(grows: &[u64]) -> (Vec<u8>, Vec<(usize, Catalog)>) {
            let mut cat = Catalog::default();
            let mut log = encode_header().to_vec();
            let mut states = vec![(log.len(), cat.clone())];
            let (volume, head) = (cat.allocate_id(), cat.allocate_id());
            let create =
                Event::CreateVolume { volume, name: "a".into(), size: 4096, head, parent: None, created_ms: 1 };
            let mut size = 4096;
            let events = std::iter::once(create).chain(grows.iter().map(|by| {
                size += by * 512;
                Event::Grow { volume, size }
            }));
            for event in events {
                cat.apply(&event).unwrap();
                encode_frame(&event, &mut log);
                states.push((log.len(), cat.clone()));
            }
            (log, states)
        }

        proptest! {
            /// A log cut anywhere (a torn append) replays as exactly the frames wholly before
            /// the cut.
            #[test]
            fn a_cut_log_replays_as_its_whole_frames(grows in prop::collection::vec(1u64..1000, 0..12), cut in any::<prop::sample::Index>()) {
                let (log, states) = grown_log(&grows);
                let cut = HEADER_LEN + cut.index(log.len() - HEADER_LEN + 1);
                let r = replay(&log[..cut]).unwrap();
                let (end, expected) = states.iter().rev().find(|(end, _)| *end <= cut).unwrap();
                prop_assert_eq!(r.valid_len, *end as u64);
                prop_assert_eq!(&r.catalog, expected);
            }

            /// Damaged bytes anywhere never panic: replay answers with a catalog (of at most the
            /// file's length) or an error.
            #[test]
            fn damaged_logs_replay_or_fail_without_panicking(
                grows in prop::collection::vec(1u64..1000, 0..12),
                damage in crate::damage::strategy(),
            ) {
                let log = crate::damage::apply(grown_log(&grows).0, &damage);
                if let Ok(r) = replay(&log) {
                    prop_assert!(r.valid_len <= log.len() as u64);
                }
            }
        }
    }

    #[test]
    fn ghost_children_are_skipped_when_merging_data() {
        // Deleting S2 with a checkpoint makes its layer a ghost; deleting S1 afterwards must put
        // S1's data into the head, not into the ghost (which holds no data).
        let mut cat = Catalog::default();
        let (vol, l1) = create(&mut cat, "a");
        let (s1, l2) = snapshot(&mut cat, vol, "s1");
        let (s2, head) = snapshot(&mut cat, vol, "s2");
        cat.apply(&Event::DeleteSnapshot { snapshot: s2, keep_checkpoint: true }).unwrap();
        cat.apply(&Event::Merged { layer: l2, into: head }).unwrap();
        cat.apply(&Event::DeleteSnapshot { snapshot: s1, keep_checkpoint: false }).unwrap();
        assert_eq!(
            cat.merge_tasks(),
            vec![MergeTask { layer: l1, into: l2, data_into: Some(head), keep_tracking: false }]
        );
        let dropped = cat.apply(&Event::Merged { layer: l1, into: l2 }).unwrap();
        assert_eq!(dropped, vec![l1]);
        assert_eq!(cat.lineage(head), vec![head, l2]);
    }
}
