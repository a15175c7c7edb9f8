//! cairn's control plane: tenants, VMs, volumes, snapshots, templates and jobs, kept in a
//! metadata database ([`db`]) and carried out on the volume engine. [`Control`] enforces the
//! lifecycle rules of the product (R1–R8 in DESIGN.md); the API crate only translates HTTP.

pub mod clock;
pub mod db;
mod error;
mod exports;
pub mod hooks;
mod jobs;
pub mod metering;
pub mod model;
pub mod names;
pub mod retention;
pub mod schedule;
mod service;

pub use cairn_backup::{GcOptions, RepoLocation};
pub use cairn_volume as volume;
pub use error::Error;
pub use exports::{engine_snapshot_name, ServiceExports};
pub use jobs::parse_progress;
pub use service::{
    Control, CreateSchedule, CreateVm, DeleteVmOutcome, DiskPlan, DiskStatus, ImageSource, NbdAddress,
    ProtectionStatus, PruneItem, PrunePlan, PruneRequest, QuotaView, Recovery, RestorePoint, RestoreRequest,
    RetentionPlan, RunItems, ScheduleView, SchedulerOptions, Settings, SnapshotRequest, StoreCounts, UpdateSchedule,
    Usage, VmStatus,
};

/// Now, as the RFC 3339 UTC text every record carries (millisecond precision, so records
/// made in the same second still sort in order).
pub fn now() -> String {
    clock::stamp(jiff::Timestamp::now())
}

/// `seconds` before now, in the same form as [`now`].
pub fn now_minus(seconds: i64) -> String {
    clock::stamp(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(seconds))
}
