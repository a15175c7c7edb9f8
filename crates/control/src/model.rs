//! The resources the control plane keeps, as stored and as the API shows them.

use serde::Serialize;

/// An enum stored as text and shown as the same lowercase word.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The variant named `text`; `None` for a word this version does not know.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

text_enum!(
    /// Whether a VM runs; a stopped VM keeps its disks.
    VmState { Running = "running", Stopped = "stopped" }
);
text_enum!(
    /// A volume or template is `importing` while a job fills it.
    ResourceState { Ready = "ready", Importing = "importing" }
);
text_enum!(
    /// A VM's root disk never becomes a data disk or a standalone volume (R7).
    DiskRole { Root = "root", Data = "data" }
);
text_enum!(
    /// Who asked for a snapshot.
    Origin { Manual = "manual", Scheduled = "scheduled" }
);
text_enum!(
    /// Whether the guest was quiesced by hooks (application) or not (crash).
    Consistency { Crash = "crash", Application = "application" }
);
text_enum!(
    JobKind { Import = "import", Export = "export", Backup = "backup", Restore = "restore", Verify = "verify", Gc = "gc", Copy = "copy" }
);
text_enum!(
    JobState { Running = "running", Succeeded = "succeeded", Failed = "failed" }
);
text_enum!(
    /// What a schedule aims at: one volume, or every disk of a VM at one instant.
    TargetKind { Volume = "volume", Vm = "vm" }
);
text_enum!(
    /// What a schedule makes.
    ScheduleAction { Snapshot = "snapshot", Backup = "backup" }
);
text_enum!(
    RunState { Running = "running", Succeeded = "succeeded", Failed = "failed" }
);
text_enum!(
    /// How far a run got, so a run a restart interrupted resumes without doing anything twice:
    /// `started` made nothing yet; `taken` made its snapshots (or started its backup job, whose
    /// backups carry the run's id); `done` has nothing left to do.
    RunStage { Started = "started", Taken = "taken", Done = "done" }
);
text_enum!(
    /// What a failing pre hook does to a snapshot: no snapshot, or a crash-consistent one.
    OnHookFailure { Fail = "fail", CrashConsistent = "crash-consistent" }
);
text_enum!(
    /// Formats qemu-img reads and writes for import and export.
    ImageFormat { Raw = "raw", Qcow2 = "qcow2" }
);

/// Where a volume's or template's first content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    Blank,
    Snapshot { id: String },
    Template { id: String },
    Image { path: String },
    Backup { id: String },
}

impl Source {
    /// The two columns it is stored in.
    pub fn columns(&self) -> (&'static str, Option<&str>) {
        match self {
            Source::Blank => ("blank", None),
            Source::Snapshot { id } => ("snapshot", Some(id)),
            Source::Template { id } => ("template", Some(id)),
            Source::Image { path } => ("image", Some(path)),
            Source::Backup { id } => ("backup", Some(id)),
        }
    }

    pub fn from_columns(kind: &str, reference: Option<String>) -> Option<Source> {
        Some(match (kind, reference) {
            ("blank", _) => Source::Blank,
            ("snapshot", Some(id)) => Source::Snapshot { id },
            ("template", Some(id)) => Source::Template { id },
            ("image", Some(path)) => Source::Image { path },
            ("backup", Some(id)) => Source::Backup { id },
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub admin: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vm {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    pub state: VmState,
    pub root_volume: String,
    /// Filled from the volumes table when shown.
    pub data_volumes: Vec<String>,
    pub template: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    pub size: u64,
    pub state: ResourceState,
    pub vm: Option<String>,
    pub role: DiskRole,
    /// A root disk, or a data disk restored from a root-disk snapshot: it stays with its VM
    /// and its snapshots count as root-disk snapshots (R7).
    pub from_root_disk: bool,
    pub source: Source,
    pub created_at: String,
}

impl Volume {
    /// A new, ready volume with a fresh id; a root volume is marked as a root disk (R7).
    pub fn new(tenant: &str, name: String, size: u64, vm: Option<String>, role: DiskRole, source: Source) -> Volume {
        Volume {
            id: crate::names::new_id(crate::names::Kind::Volume),
            tenant: tenant.to_string(),
            name,
            size,
            state: ResourceState::Ready,
            vm,
            role,
            from_root_disk: role == DiskRole::Root,
            source,
            created_at: crate::now(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    pub volume: String,
    pub volume_name: String,
    pub vm: Option<String>,
    pub disk_role: DiskRole,
    pub group: Option<String>,
    pub origin: Origin,
    pub consistency: Consistency,
    pub created_at: String,
    /// The schedule that made it (None: made by hand), whose retention may delete it.
    pub schedule: Option<String>,
    #[serde(skip)]
    pub run: Option<String>,
    /// Protected: no retention rule and no delete touches it until it is unprotected.
    pub protected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Template {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    pub size: u64,
    pub state: ResourceState,
    pub source: Source,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub kind: JobKind,
    pub state: JobState,
    pub resource: String,
    pub path: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// What the job reports when it ends (verify and gc jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

/// A backup of one disk, kept in the backup repository, off the disk's own storage (R12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backup {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    /// The backup's record in the repository.
    pub record: String,
    pub volume: String,
    pub volume_name: String,
    pub vm: Option<String>,
    pub disk_role: DiskRole,
    /// Backups of a VM's disks taken at one instant share a group.
    pub group: Option<String>,
    /// When the disk was captured (R13: backups are dated).
    pub created_at: String,
    pub size: u64,
    /// Disk bytes read for it: all allocated data for a first backup, the changes since the
    /// previous backup of the disk after that.
    pub bytes_read: u64,
    /// Bytes it added to the repository after dedup and compression.
    pub bytes_added: u64,
    #[serde(skip)]
    pub checkpoint: Option<u64>,
    /// The second repositories holding a copy (the off-site copies).
    pub copies: Vec<String>,
    /// The schedule that made it (None: made by hand), whose retention may delete it.
    pub schedule: Option<String>,
    #[serde(skip)]
    pub run: Option<String>,
    /// Protected: no retention rule and no delete touches it until it is unprotected.
    pub protected: bool,
    /// Its share of the repository as the latest gc counted it (None before one has): the
    /// stored bytes of the blobs it alone references, what forgetting it frees, and of those
    /// other backups share.
    pub exclusive_bytes: Option<u64>,
    pub shared_bytes: Option<u64>,
    /// The stored bytes of the blobs it is the oldest backup to reference, as the latest gc
    /// counted them (None before one has): what it is billed on once counted.
    pub attributed_bytes: Option<u64>,
}

impl Backup {
    /// What the meter bills it on: its part of the repository once a gc has counted it, so a
    /// blob that outlives the backup that first stored it moves to a newer one; until then
    /// what it added.
    pub fn billed_bytes(&self) -> u64 {
        self.attributed_bytes.unwrap_or(self.bytes_added)
    }

    /// What forgetting it frees at the next gc, as far as is known: the blobs it alone
    /// references once a gc has counted them, what it added before. Blobs shared only with
    /// other backups deleted with it are freed too, so for a set this is a floor.
    pub fn frees_bytes(&self) -> u64 {
        self.exclusive_bytes.unwrap_or(self.bytes_added)
    }
}

/// Hooks around a snapshot (R9): the pre hook quiesces the guest, the post hook resumes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<crate::hooks::Hook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<crate::hooks::Hook>,
    /// What a failing pre hook does [default: fail, no snapshot].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_pre_failure: Option<OnHookFailure>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.pre.is_none() && self.post.is_none()
    }
}

/// Automated snapshots or backups of a volume or VM (R2), with their retention (R3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    pub target_kind: TargetKind,
    pub target: String,
    pub action: ScheduleAction,
    /// A second repository each backup is copied to once made.
    pub copy_to: Option<String>,
    pub frequency: crate::schedule::Frequency,
    pub time_zone: String,
    pub retention: crate::retention::RetentionRules,
    pub hooks: Option<Hooks>,
    pub paused: bool,
    /// The next time it is due (its nominal time; it starts up to its jitter later).
    pub next_run_at: String,
    pub created_at: String,
}

/// One run of a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    pub id: String,
    pub schedule: String,
    #[serde(skip)]
    pub tenant: String,
    /// The firing it stands for; a run after downtime stands for the latest one missed.
    pub due_at: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub state: RunState,
    #[serde(skip)]
    pub stage: RunStage,
    /// Started well after it was due (the daemon was down, or it resumed after a restart).
    pub late: bool,
    /// Asked for with run-now.
    pub manual: bool,
    pub consistency: Option<Consistency>,
    /// The backup job of a backup run.
    pub job: Option<String>,
    /// Bytes the run added: a snapshot's exclusive bytes when taken, or a backup's bytes added
    /// to the repository.
    pub bytes: u64,
    /// Snapshots or backups its retention deleted.
    pub pruned: u64,
    pub error: Option<String>,
    /// What went wrong without failing it (a pre hook that failed, when the schedule takes a
    /// crash-consistent snapshot anyway).
    pub warning: Option<String>,
}

/// How to reach an export over NBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nbd {
    pub export: String,
    pub uri: Option<String>,
    pub unix_uri: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    #[serde(flatten)]
    pub volume: Volume,
    /// Left out only when the volume went while it was being looked at.
    #[serde(flatten)]
    pub usage: Option<StorageUsage>,
    pub nbd: Nbd,
}

/// What a volume or template takes in the volume store, next to its logical `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StorageUsage {
    /// The data a read of it finds, in whatever layer holds it.
    pub data_bytes: u64,
    /// What its own top layer holds: a volume's writes since its last snapshot (what a
    /// snapshot taken now would store); a template's data not read from the snapshot it was
    /// made from.
    pub stored_bytes: u64,
    /// What deleting it frees: a volume's own writes, and data of deleted snapshots that only it
    /// still reads; for a template, its data no clone of it and no snapshot still uses.
    pub exclusive_bytes: u64,
    /// The rest of its data: what stays after a delete because snapshots or clones use it.
    pub shared_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    pub logical_bytes: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    /// What it stores, and is billed on: its own data, with what snapshots deleted before it
    /// moved up into it.
    pub stored_bytes: u64,
    pub nbd: Nbd,
    /// What went wrong around taking it without stopping it (a hook).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemplateView {
    #[serde(flatten)]
    pub template: Template,
    /// Left out while it is being imported, or when it went while it was being looked at.
    #[serde(flatten)]
    pub usage: Option<StorageUsage>,
    pub nbd: Nbd,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub rate_bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
}
