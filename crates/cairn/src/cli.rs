//! The command-line client: one command per REST call (see docs/api.md and docs/cli.md), with
//! tables for people and the API's own JSON for scripts.

mod client;
mod output;
mod progress;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};

use client::{encode, Client};
use output::{item_rows, object_rows, render_block, render_table, Field};

/// Kept apart in every command's help, where they mix with the command's own options otherwise.
const GLOBAL_OPTIONS: &str = "Global options";

#[derive(Debug, clap::Args)]
pub struct Global {
    /// Base URL of the cairn API [default: the one in $CAIRN_DATA_DIR/api.url or
    /// ./cairn-data/api.url, else http://127.0.0.1:8474]
    #[arg(long, global = true, env = "CAIRN_URL", value_name = "URL", help_heading = GLOBAL_OPTIONS)]
    url: Option<String>,
    /// API token [default: $CAIRN_DATA_DIR/admin.token or ./cairn-data/admin.token]
    #[arg(long, global = true, env = "CAIRN_TOKEN", hide_env_values = true, value_name = "TOKEN", help_heading = GLOBAL_OPTIONS)]
    token: Option<String>,
    /// Print the API's JSON answer instead of tables
    #[arg(long, global = true, help_heading = GLOBAL_OPTIONS)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Virtual machines: a root disk and any attached data disks
    #[command(subcommand)]
    Vm(VmCommand),
    /// Disks: create, attach, grow, revert, import and export
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Point-in-time snapshots of disks
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Golden images that new VMs start from
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Backups in the backup repository, off the disks' own storage
    #[command(subcommand)]
    Backup(BackupCommand),
    /// The backup repository (administrators only)
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Automated snapshots and backups on a timetable, each with its retention
    #[command(subcommand)]
    Schedule(Box<ScheduleCommand>),
    /// How well each disk and VM is protected: its newest restore point, that point's age and
    /// the RPO its schedules promise
    Status {
        /// Only this volume
        #[arg(long)]
        volume: Option<String>,
        /// Only this VM's disks
        #[arg(long, conflicts_with = "volume")]
        vm: Option<String>,
    },
    /// Storage used and what it costs, per resource, over a period (GiB-hours, billed
    /// continuously; a VM's first restore points are free)
    Usage {
        /// Only this tenant (administrators; others see their own)
        #[arg(long)]
        tenant: Option<String>,
        /// Start: an RFC 3339 instant or a date, midnight UTC [default: the 1st of this month]
        #[arg(long)]
        from: Option<String>,
        /// End: an RFC 3339 instant or a date [default: now]
        #[arg(long)]
        to: Option<String>,
        /// Comma-separated values, a line per resource and a total line
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
    /// Long operations (import, export) and their progress
    #[command(subcommand)]
    Job(JobCommand),
    /// Tenants and their tokens (administrators only)
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Show the tenant the token belongs to
    Whoami,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (running) with a blank root disk, a template's clone or an imported image
    Create {
        name: String,
        /// Size of a blank root disk (10G, 512M…), or of a template's clone to make it larger
        #[arg(long, required_unless_present_any = ["template", "image"], conflicts_with = "image")]
        size: Option<String>,
        /// Template (id or name) to clone the root disk from
        #[arg(long, conflicts_with = "image")]
        template: Option<String>,
        /// Image file on the daemon's machine to import as the root disk
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
        /// Format of the image [default: detected]
        // Conflicting too, because clap lets `requires` pass when the required flag conflicts
        // with one that is present.
        #[arg(long, requires = "image", conflicts_with_all = ["size", "template"])]
        format: Option<DiskFormat>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// List VMs
    List,
    /// Show a VM
    Show { vm: String },
    /// Start a VM
    Start { vm: String },
    /// Stop a VM (it keeps its disks)
    Stop { vm: String },
    /// Delete a VM and its root disk; data disks are detached and kept, snapshots stay
    Delete { vm: String },
    /// Snapshot all disks of a VM at one instant
    Snapshot {
        vm: String,
        #[command(flatten)]
        options: SnapshotOptions,
    },
    /// List the snapshots of a VM's disks (also of a deleted VM, by its id)
    Snapshots { vm: String },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a blank data volume
    Create {
        name: String,
        /// Size (10G, 512M…)
        #[arg(long)]
        size: String,
        /// VM to attach it to
        #[arg(long)]
        vm: Option<String>,
    },
    /// List volumes
    List,
    /// Show a volume, with its NBD URIs
    Show { volume: String },
    /// Attach a data volume to a VM
    Attach { volume: String, vm: String },
    /// Detach a data volume from its VM
    Detach { volume: String },
    /// Grow a volume to a new size
    Grow { volume: String, size: String },
    /// Roll a volume back to one of its snapshots (its VM must be stopped)
    Revert { volume: String, snapshot: String },
    /// Delete a detached volume (its snapshots stay)
    Delete { volume: String },
    /// Import a raw or qcow2 file on the daemon's machine as a new data volume
    Import {
        path: PathBuf,
        #[arg(long)]
        name: String,
        /// Format of the file [default: detected]
        #[arg(long)]
        format: Option<DiskFormat>,
        /// VM to attach it to
        #[arg(long)]
        vm: Option<String>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// Export a volume to a new file on the daemon's machine
    Export {
        volume: String,
        #[command(flatten)]
        to: ExportTo,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot one volume
    Create {
        volume: String,
        #[command(flatten)]
        options: SnapshotOptions,
    },
    /// List snapshots, oldest first
    List {
        /// Only the snapshots of this volume
        #[arg(long)]
        volume: Option<String>,
        /// Only the snapshots of this VM's disks
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show a snapshot, with its NBD URIs
    Show { snapshot: String },
    /// Delete a snapshot
    Delete {
        snapshot: String,
        /// Only show what deleting it would free and do to the monthly bill
        #[arg(long)]
        dry_run: bool,
    },
    /// Protect a snapshot: neither retention nor delete touches it until it is unprotected
    Protect { snapshot: String },
    /// Lift a snapshot's protection
    Unprotect { snapshot: String },
    /// Make a new volume from a snapshot, usable at once
    Restore {
        snapshot: String,
        /// Name of the new volume [default: SNAPSHOTNAME-restore]
        #[arg(long)]
        name: Option<String>,
        /// VM to attach the new volume to (a root-disk snapshot only goes back to its own VM)
        #[arg(long)]
        vm: Option<String>,
        /// Attach as the VM's root disk (VM stopped; the old root is snapshotted, then deleted)
        /// or as a data disk [default: data]
        #[arg(long = "as", value_name = "ROLE")]
        role: Option<DiskRole>,
    },
    /// Export a snapshot to a new file on the daemon's machine
    Export {
        snapshot: String,
        #[command(flatten)]
        to: ExportTo,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a volume, or every disk of a VM at one instant (incremental after the first)
    Create {
        /// The volume to back up
        #[arg(required_unless_present = "vm", conflicts_with = "vm")]
        volume: Option<String>,
        /// Back up all of this VM's disks instead
        #[arg(long)]
        vm: Option<String>,
        /// Keep a snapshot of the same instant on the disks' own storage too
        #[arg(long)]
        keep_snapshot: bool,
        /// Name of the kept snapshot (implies --keep-snapshot) [default: its id]
        #[arg(long, value_name = "NAME")]
        snapshot_name: Option<String>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// List backups, oldest first
    List {
        /// Only the backups of this volume
        #[arg(long)]
        volume: Option<String>,
        /// Only the backups of this VM's disks
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show a backup
    Show { backup: String },
    /// Restore a backup into a new volume, or over the volume it was taken of (--over)
    Restore {
        backup: String,
        /// Name of the new volume [default: VOLUMENAME-restore]
        #[arg(long, conflicts_with = "over")]
        name: Option<String>,
        /// VM to attach the new volume to (a root disk's backup only goes back to its own VM)
        #[arg(long, conflicts_with = "over")]
        vm: Option<String>,
        /// Write over this existing volume, only where it differs (its VM must be stopped)
        #[arg(long, value_name = "VOLUME")]
        over: Option<String>,
        /// Restore from the backup's copy in this second repository
        #[arg(long, value_name = "REPOSITORY")]
        from: Option<String>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// Export a backup to a new raw or qcow2 file on the daemon's machine
    Export {
        backup: String,
        #[command(flatten)]
        to: ExportTo,
    },
    /// Copy backups to a second repository (the off-site copy), sending only what changed:
    /// one backup, or all without a copy there (of a volume, or of a VM's disks)
    Copy {
        backup: Option<String>,
        /// The second repository, by the name the daemon's --copy-repo gives it
        #[arg(long, value_name = "REPOSITORY")]
        to: String,
        #[arg(long, conflicts_with_all = ["backup", "vm"])]
        volume: Option<String>,
        #[arg(long, conflicts_with = "backup")]
        vm: Option<String>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// Delete a backup (its data goes at the next `cairn repo gc`)
    Delete { backup: String },
    /// Protect a backup: neither retention nor delete touches it until it is unprotected
    Protect { backup: String },
    /// Lift a backup's protection
    Unprotect { backup: String },
    /// Delete backups by retention rules, each disk judged apart; --dry-run prints the plan only
    Prune {
        /// Only the backups of this volume
        #[arg(long)]
        volume: Option<String>,
        /// Only the backups of this VM's disks
        #[arg(long, conflicts_with = "volume")]
        vm: Option<String>,
        #[command(flatten)]
        rules: RetentionOptions,
        /// IANA time zone that days, weeks, months and years are counted in [default: UTC]
        #[arg(long, value_name = "ZONE")]
        time_zone: Option<String>,
        /// Print what would be deleted; delete nothing
        #[arg(long)]
        dry_run: bool,
    },
}

/// Retention rules: what to keep of a series of snapshots or backups.
#[derive(Debug, clap::Args)]
pub struct RetentionOptions {
    /// Keep the newest N
    #[arg(long, alias = "keep", value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest of each of the last N days that have one
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest of each of the last N ISO weeks that have one
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep the newest of each of the last N months that have one
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// Keep the newest of each of the last N years that have one
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep everything younger than N days
    #[arg(long, value_name = "N")]
    keep_within_days: Option<u32>,
}

impl RetentionOptions {
    fn body(&self) -> Value {
        without_nulls(json!({
            "keep_last": self.keep_last, "keep_daily": self.keep_daily, "keep_weekly": self.keep_weekly,
            "keep_monthly": self.keep_monthly, "keep_yearly": self.keep_yearly,
            "keep_within_days": self.keep_within_days,
        }))
    }

    fn is_empty(&self) -> bool {
        self.body().as_object().is_none_or(|rules| rules.is_empty())
    }
}

/// Pre and post hooks around a snapshot (R9): a command on the daemon's machine
/// (administrators only) or a webhook that receives a POST.
#[derive(Debug, clap::Args)]
pub struct HookOptions {
    /// Command run before the snapshot, e.g. "/usr/local/bin/freeze db1" (split at spaces, no
    /// shell; a script for anything more)
    #[arg(long, value_name = "COMMAND", conflicts_with = "pre_hook_url")]
    pre_hook: Option<String>,
    /// URL that receives a POST before the snapshot
    #[arg(long, value_name = "URL")]
    pre_hook_url: Option<String>,
    /// Command run after the snapshot (also when the pre hook or the snapshot failed)
    #[arg(long, value_name = "COMMAND", conflicts_with = "post_hook_url")]
    post_hook: Option<String>,
    /// URL that receives a POST after the snapshot
    #[arg(long, value_name = "URL")]
    post_hook_url: Option<String>,
    /// Seconds each hook may take [default: 60]
    #[arg(long, value_name = "SECONDS")]
    hook_timeout: Option<u32>,
    /// What a failing pre hook does: fail (no snapshot) or take a crash-consistent snapshot
    /// anyway [default: fail]
    #[arg(long, value_name = "WHAT")]
    on_pre_hook_failure: Option<OnHookFailure>,
}

impl HookOptions {
    fn hook(&self, command: &Option<String>, url: &Option<String>) -> Value {
        let command = command.as_ref().map(|c| c.split_whitespace().collect::<Vec<_>>());
        match (command, url) {
            (None, None) => Value::Null,
            (command, url) => json!({"command": command, "url": url, "timeout_seconds": self.hook_timeout}),
        }
    }

    /// The hooks member of a request; null without hooks. A timeout or failure rule without
    /// a hook would be dropped unseen, so it is refused.
    fn body(&self) -> Result<Value> {
        let pre = self.hook(&self.pre_hook, &self.pre_hook_url);
        let post = self.hook(&self.post_hook, &self.post_hook_url);
        if pre.is_null() && post.is_null() {
            if self.hook_timeout.is_some() || self.on_pre_hook_failure.is_some() {
                anyhow::bail!(
                    "--hook-timeout and --on-pre-hook-failure go with a hook: give --pre-hook, --pre-hook-url, \
                     --post-hook or --post-hook-url too"
                );
            }
            return Ok(Value::Null);
        }
        Ok(without_nulls(json!({"pre": pre, "post": post, "on_pre_failure": self.on_pre_hook_failure})))
    }
}

#[derive(Clone, Copy, Debug, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnHookFailure {
    Fail,
    CrashConsistent,
}

/// When a schedule fires; one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct FrequencyOptions {
    /// Every day at HH:MM
    #[arg(long, value_name = "HH:MM")]
    daily: Option<String>,
    /// Every week on a day at HH:MM, e.g. "sun 03:00"
    #[arg(long, value_name = "DAY HH:MM")]
    weekly: Option<String>,
    /// Every month on a day at HH:MM, e.g. "1 03:00"; days past a month's end run on its last day
    #[arg(long, value_name = "DAY HH:MM")]
    monthly: Option<String>,
    /// A cron expression (minute hour day-of-month month day-of-week), e.g. "*/15 * * * *"
    #[arg(long, value_name = "EXPR")]
    cron: Option<String>,
}

impl FrequencyOptions {
    /// As the API writes frequencies: "daily 03:00", "cron */15 * * * *".
    fn text(&self) -> String {
        let (kind, when) = match (&self.daily, &self.weekly, &self.monthly, &self.cron) {
            (Some(when), ..) => ("daily", when),
            (_, Some(when), ..) => ("weekly", when),
            (_, _, Some(when), _) => ("monthly", when),
            (_, _, _, Some(when)) => ("cron", when),
            // clap's group requires one.
            (None, None, None, None) => return String::new(),
        };
        format!("{kind} {when}")
    }
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Make snapshots (or backups) of a volume or of all a VM's disks on a timetable, keeping
    /// what its retention says
    Create {
        name: String,
        /// The volume it snapshots
        #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
        volume: Option<String>,
        /// The VM whose disks it snapshots at one instant
        #[arg(long)]
        vm: Option<String>,
        #[command(flatten)]
        frequency: FrequencyOptions,
        /// IANA time zone of the times, e.g. Europe/Berlin [default: UTC]
        #[arg(long, value_name = "ZONE")]
        time_zone: Option<String>,
        /// Make backups in the backup repository instead of snapshots
        #[arg(long)]
        backup: bool,
        /// Copy each backup to this second repository (its --copy-repo name)
        #[arg(long, value_name = "REPOSITORY", requires = "backup")]
        copy_to: Option<String>,
        #[command(flatten)]
        rules: RetentionOptions,
        #[command(flatten)]
        hooks: HookOptions,
        /// Make it paused
        #[arg(long)]
        paused: bool,
    },
    /// List schedules
    List {
        /// Only those aimed at this volume
        #[arg(long)]
        volume: Option<String>,
        /// Only those aimed at this VM
        #[arg(long, conflicts_with = "volume")]
        vm: Option<String>,
    },
    /// Show a schedule and its latest runs
    Show { schedule: String },
    /// Change a schedule's retention (applied at once, pruning what it lets go) or hooks
    Update {
        schedule: String,
        #[command(flatten)]
        rules: RetentionOptions,
        #[command(flatten)]
        hooks: HookOptions,
        /// Remove the schedule's hooks
        #[arg(long, conflicts_with_all = ["pre_hook", "pre_hook_url", "post_hook", "post_hook_url"])]
        no_hooks: bool,
        /// Print what the new retention would delete; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Pause a schedule: it makes nothing until resumed
    Pause { schedule: String },
    /// Resume a paused schedule at its next time (missed times are not made up)
    Resume { schedule: String },
    /// Delete a schedule; what it made stays until deleted
    Delete { schedule: String },
    /// Run a schedule now, whatever its times
    RunNow {
        schedule: String,
        /// Return at once instead of waiting for the run to end
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Re-read and re-hash the repository's chunks; names every backup that could not be restored
    Verify {
        /// Check only about this percentage of the packs [default: all]
        #[arg(long, value_name = "PERCENT")]
        sample: Option<f64>,
        /// A second repository (by its --copy-repo name) instead of the backup repository
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// Delete the data no backup references; safe while backups run
    Gc {
        /// Leave packs younger than this alone (e.g. 30m, 1h, 2d) [default: 1h]
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        grace: Option<u64>,
        /// Rewrite packs with more than this percentage of unreferenced data [default: 50]
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
        repack_unused: Option<u8>,
        /// Report what would be deleted; delete nothing
        #[arg(long)]
        dry_run: bool,
        /// A second repository (by its --copy-repo name) instead of the backup repository
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        #[command(flatten)]
        wait: NoWait,
    },
}

/// `90`, `90s`, `30m`, `1h` or `2d`, in seconds.
fn parse_age(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: give a number of seconds, or a number with s, m, h or d")),
    };
    let number: u64 = number.parse().map_err(|_| format!("{text:?}: no number before the unit"))?;
    number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Make a template from a root-disk snapshot
    Create {
        name: String,
        #[arg(long)]
        snapshot: String,
    },
    /// Import a raw or qcow2 file on the daemon's machine as a template
    Import {
        path: PathBuf,
        #[arg(long)]
        name: String,
        /// Format of the file [default: detected]
        #[arg(long)]
        format: Option<DiskFormat>,
        #[command(flatten)]
        wait: NoWait,
    },
    /// List templates
    List,
    /// Show a template, with its NBD URIs
    Show { template: String },
    /// Delete a template (VMs made from it keep working)
    Delete { template: String },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List jobs, newest first
    List,
    /// Show a job
    Show { job: String },
    /// Wait for a job to finish (fails if the job fails)
    Wait { job: String },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its token (shown only this once)
    Create { name: String },
    /// List tenants
    List,
    /// Show a tenant's quota and what it holds; with limits, set them (administrators)
    Quota {
        tenant: String,
        /// Most bytes stored: volumes' sizes, snapshots, templates and backups (10G, 1T…)
        #[arg(long, value_name = "SIZE")]
        max_bytes: Option<String>,
        #[arg(long, value_name = "N")]
        max_volumes: Option<u64>,
        #[arg(long, value_name = "N")]
        max_snapshots: Option<u64>,
        #[arg(long, value_name = "N")]
        max_backups: Option<u64>,
        /// Lift every limit
        #[arg(long, conflicts_with_all = ["max_bytes", "max_volumes", "max_snapshots", "max_backups"])]
        clear: bool,
    },
}

/// Where and how an export writes, shared by volume and snapshot exports.
#[derive(Debug, clap::Args)]
pub struct ExportTo {
    /// The new file, on the daemon's machine (a relative path is taken from here)
    path: PathBuf,
    /// Format of the file [default: raw]
    #[arg(long)]
    format: Option<DiskFormat>,
    #[command(flatten)]
    wait: NoWait,
}

#[derive(Debug, clap::Args)]
pub struct NoWait {
    /// Return at once with the running job instead of waiting for it
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotOptions {
    /// Name of the snapshot [default: its id]
    #[arg(long)]
    name: Option<String>,
    /// What you vouch for: crash, or application when you quiesced the guest yourself
    /// [default: application with a pre hook that succeeds, else crash]
    #[arg(long)]
    consistency: Option<Consistency>,
    #[command(flatten)]
    hooks: HookOptions,
}

impl SnapshotOptions {
    fn body(&self) -> Result<Value> {
        Ok(json!({"name": self.name, "consistency": self.consistency, "hooks": self.hooks.body()?}))
    }
}

#[derive(Clone, Copy, Debug, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, Debug, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Crash,
    Application,
}

#[derive(Clone, Copy, Debug, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    Root,
    Data,
}

/// The kinds of resource the API serves, with where they live and how people see them.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Vm,
    Volume,
    Snapshot,
    Template,
    Backup,
    Job,
    Tenant,
    Schedule,
    Run,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Kind::Vm => "/v1/vms",
            Kind::Volume => "/v1/volumes",
            Kind::Snapshot => "/v1/snapshots",
            Kind::Template => "/v1/templates",
            Kind::Backup => "/v1/backups",
            Kind::Job => "/v1/jobs",
            Kind::Tenant => "/v1/tenants",
            Kind::Schedule => "/v1/schedules",
            // Runs are listed under their schedule only.
            Kind::Run => "/v1/schedules",
        }
    }

    /// The path of one resource, or of an action on it (`suffix` like `/start`).
    fn item(self, id_or_name: &str, suffix: &str) -> String {
        format!("{}/{}{suffix}", self.collection(), encode(id_or_name))
    }

    /// The member that holds this kind in answers that carry several things (`{"job", "vm"}`).
    fn member(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::Template => "template",
            Kind::Backup => "backup",
            Kind::Job => "job",
            Kind::Tenant => "tenant",
            Kind::Schedule => "schedule",
            Kind::Run => "run",
        }
    }

    fn fields(self) -> &'static [Field] {
        match self {
            Kind::Vm => output::VM_FIELDS,
            Kind::Volume => output::VOLUME_FIELDS,
            Kind::Snapshot => output::SNAPSHOT_FIELDS,
            Kind::Template => output::TEMPLATE_FIELDS,
            Kind::Backup => output::BACKUP_FIELDS,
            Kind::Job => output::JOB_FIELDS,
            Kind::Tenant => output::TENANT_FIELDS,
            Kind::Schedule => output::SCHEDULE_FIELDS,
            Kind::Run => output::RUN_FIELDS,
        }
    }
}

pub fn run(global: &Global, command: Command) -> Result<()> {
    let data_dir = client::data_dir();
    let url = client::resolve_url(global.url.as_deref(), &data_dir);
    let token = client::resolve_token(global.token.as_deref(), &data_dir)?;
    let session = Session { client: Client::new(&url, token), json: global.json };
    match command {
        Command::Vm(command) => session.vm(command),
        Command::Volume(command) => session.volume(command),
        Command::Snapshot(command) => session.snapshot(command),
        Command::Template(command) => session.template(command),
        Command::Backup(command) => session.backup(command),
        Command::Repo(RepoCommand::Verify { sample, repository, wait }) => {
            let body = without_nulls(json!({"sample_percent": sample, "repository": repository}));
            let accepted = session.client.post("/v1/repository/verify", &body)?;
            session.report_job(accepted, wait)
        }
        Command::Repo(RepoCommand::Gc { grace, repack_unused, dry_run, repository, wait }) => {
            let body = json!({"grace_seconds": grace, "repack_unused_percent": repack_unused, "dry_run": dry_run,
                "repository": repository});
            let accepted = session.client.post("/v1/repository/gc", &without_nulls(body))?;
            session.report_job(accepted, wait)
        }
        Command::Schedule(command) => session.schedule(*command),
        Command::Status { volume, vm } => {
            let status =
                session.client.get(&format!("/v1/status{}", filter_query(&[("volume", volume), ("vm", vm)])))?;
            session.emit(&status, || Ok(output::render_status(&status)))
        }
        Command::Usage { tenant, from, to, csv } => {
            let query = filter_query(&[("tenant", tenant), ("from", from), ("to", to)]);
            let usage = session.client.get(&format!("/v1/usage{query}"))?;
            if csv {
                print!("{}", output::usage_csv(&usage));
                return Ok(());
            }
            session.emit(&usage, || Ok(output::render_usage(&usage)))
        }
        Command::Job(command) => session.job(command),
        Command::Tenant(command) => session.tenant(command),
        Command::Whoami => session.print_item(Kind::Tenant, &session.client.get("/v1/whoami")?),
    }
}

/// `?key=value&...` for the filters that are set, or nothing.
fn filter_query(filters: &[(&str, Option<String>)]) -> String {
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(key, value)| value.as_deref().map(|value| format!("{key}={}", encode(value))))
        .collect();
    if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    }
}

#[derive(Debug)]
struct Session {
    client: Client,
    json: bool,
}

impl Session {
    fn vm(&self, command: VmCommand) -> Result<()> {
        let api = &self.client;
        match command {
            VmCommand::Create { name, image: Some(image), format, wait, .. } => {
                let image = json!({"path": daemon_path(&image)?, "format": format});
                let accepted =
                    api.create(Kind::Vm.collection(), &without_nulls(json!({"name": name, "image": image})))?;
                self.follow_job(accepted, Some(Kind::Vm), wait)
            }
            VmCommand::Create { name, size, template, image: None, .. } => {
                let body = json!({"name": name, "size": size, "template": template});
                self.print_item(Kind::Vm, &api.create(Kind::Vm.collection(), &without_nulls(body))?)
            }
            VmCommand::List => self.print_list(Kind::Vm, &api.get(Kind::Vm.collection())?),
            VmCommand::Show { vm } => self.print_item(Kind::Vm, &api.get(&Kind::Vm.item(&vm, ""))?),
            VmCommand::Start { vm } => self.print_item(Kind::Vm, &api.post(&Kind::Vm.item(&vm, "/start"), &json!({}))?),
            VmCommand::Stop { vm } => self.print_item(Kind::Vm, &api.post(&Kind::Vm.item(&vm, "/stop"), &json!({}))?),
            VmCommand::Delete { vm } => self.print_deleted(&api.delete(&Kind::Vm.item(&vm, ""))?),
            VmCommand::Snapshot { vm, options } => {
                let snapshots = api.create(&Kind::Vm.item(&vm, "/snapshots"), &without_nulls(options.body()?))?;
                self.print_list(Kind::Snapshot, &snapshots)
            }
            VmCommand::Snapshots { vm } => {
                self.print_list(Kind::Snapshot, &api.get(&Kind::Vm.item(&vm, "/snapshots"))?)
            }
        }
    }

    fn volume(&self, command: VolumeCommand) -> Result<()> {
        let api = &self.client;
        let print = |answer: Value| self.print_item(Kind::Volume, &answer);
        match command {
            VolumeCommand::Create { name, size, vm } => {
                let body = json!({"name": name, "size": size, "vm": vm});
                print(api.create(Kind::Volume.collection(), &without_nulls(body))?)
            }
            VolumeCommand::List => self.print_list(Kind::Volume, &api.get(Kind::Volume.collection())?),
            VolumeCommand::Show { volume } => print(api.get(&Kind::Volume.item(&volume, ""))?),
            VolumeCommand::Attach { volume, vm } => {
                print(api.post(&Kind::Volume.item(&volume, "/attach"), &json!({"vm": vm}))?)
            }
            VolumeCommand::Detach { volume } => print(api.post(&Kind::Volume.item(&volume, "/detach"), &json!({}))?),
            VolumeCommand::Grow { volume, size } => {
                print(api.post(&Kind::Volume.item(&volume, "/grow"), &json!({"size": size}))?)
            }
            VolumeCommand::Revert { volume, snapshot } => {
                print(api.post(&Kind::Volume.item(&volume, "/revert"), &json!({"snapshot": snapshot}))?)
            }
            VolumeCommand::Delete { volume } => self.print_deleted(&api.delete(&Kind::Volume.item(&volume, ""))?),
            VolumeCommand::Import { path, name, format, vm, wait } => {
                let body = json!({"name": name, "path": daemon_path(&path)?, "format": format, "vm": vm});
                let accepted = api.create("/v1/volumes/import", &without_nulls(body))?;
                self.follow_job(accepted, Some(Kind::Volume), wait)
            }
            VolumeCommand::Export { volume, to } => self.export(&Kind::Volume.item(&volume, "/export"), to),
        }
    }

    fn snapshot(&self, command: SnapshotCommand) -> Result<()> {
        let api = &self.client;
        match command {
            SnapshotCommand::Create { volume, options } => {
                let snapshot =
                    api.create(&Kind::Volume.item(&volume, "/snapshots"), &without_nulls(options.body()?))?;
                self.print_item(Kind::Snapshot, &snapshot)
            }
            SnapshotCommand::List { volume, vm } => {
                let query = filter_query(&[("volume", volume), ("vm", vm)]);
                self.print_list(Kind::Snapshot, &api.get(&format!("{}{query}", Kind::Snapshot.collection()))?)
            }
            SnapshotCommand::Show { snapshot } => {
                self.print_item(Kind::Snapshot, &api.get(&Kind::Snapshot.item(&snapshot, ""))?)
            }
            SnapshotCommand::Delete { snapshot, dry_run: false } => {
                self.print_deleted(&api.delete(&Kind::Snapshot.item(&snapshot, ""))?)
            }
            SnapshotCommand::Delete { snapshot, dry_run: true } => {
                let preview = api.delete(&Kind::Snapshot.item(&snapshot, "?dry_run=true"))?;
                self.emit(&preview, || Ok(output::render_cost(&preview)))
            }
            SnapshotCommand::Protect { snapshot } => {
                self.print_item(Kind::Snapshot, &api.post(&Kind::Snapshot.item(&snapshot, "/protect"), &json!({}))?)
            }
            SnapshotCommand::Unprotect { snapshot } => {
                self.print_item(Kind::Snapshot, &api.post(&Kind::Snapshot.item(&snapshot, "/unprotect"), &json!({}))?)
            }
            SnapshotCommand::Restore { snapshot, name, vm, role } => {
                let body = json!({"name": name, "vm": vm, "as": role});
                let volume = api.create(&Kind::Snapshot.item(&snapshot, "/restore"), &without_nulls(body))?;
                self.print_item(Kind::Volume, &volume)
            }
            SnapshotCommand::Export { snapshot, to } => self.export(&Kind::Snapshot.item(&snapshot, "/export"), to),
        }
    }

    fn template(&self, command: TemplateCommand) -> Result<()> {
        let api = &self.client;
        match command {
            TemplateCommand::Create { name, snapshot } => {
                let template = api.create(Kind::Template.collection(), &json!({"name": name, "snapshot": snapshot}))?;
                self.print_item(Kind::Template, &template)
            }
            TemplateCommand::Import { path, name, format, wait } => {
                let body = json!({"name": name, "path": daemon_path(&path)?, "format": format});
                let accepted = api.create("/v1/templates/import", &without_nulls(body))?;
                self.follow_job(accepted, Some(Kind::Template), wait)
            }
            TemplateCommand::List => self.print_list(Kind::Template, &api.get(Kind::Template.collection())?),
            TemplateCommand::Show { template } => {
                self.print_item(Kind::Template, &api.get(&Kind::Template.item(&template, ""))?)
            }
            TemplateCommand::Delete { template } => {
                self.print_deleted(&api.delete(&Kind::Template.item(&template, ""))?)
            }
        }
    }

    fn backup(&self, command: BackupCommand) -> Result<()> {
        let api = &self.client;
        match command {
            BackupCommand::Create { volume, vm, keep_snapshot, snapshot_name, wait } => {
                let body = without_nulls(json!({"keep_snapshot": keep_snapshot, "snapshot_name": snapshot_name}));
                let path = match (volume, vm) {
                    (Some(volume), _) => Kind::Volume.item(&volume, "/backups"),
                    (None, Some(vm)) => Kind::Vm.item(&vm, "/backups"),
                    (None, None) => anyhow::bail!("give a volume or --vm"),
                };
                self.follow_job(api.create(&path, &body)?, None, wait)
            }
            BackupCommand::List { volume, vm } => {
                let query = filter_query(&[("volume", volume), ("vm", vm)]);
                self.print_list(Kind::Backup, &api.get(&format!("{}{query}", Kind::Backup.collection()))?)
            }
            BackupCommand::Show { backup } => self.print_item(Kind::Backup, &api.get(&Kind::Backup.item(&backup, ""))?),
            BackupCommand::Restore { backup, over: Some(volume), from, wait, .. } => {
                let body = without_nulls(json!({"backup": backup, "from": from}));
                let accepted = api.create(&Kind::Volume.item(&volume, "/restore"), &body)?;
                self.follow_job(accepted, None, wait)
            }
            BackupCommand::Export { backup, to } => self.export(&Kind::Backup.item(&backup, "/export"), to),
            BackupCommand::Copy { backup, to, volume, vm, wait } => {
                let body = without_nulls(json!({"to": to, "backup": backup, "volume": volume, "vm": vm}));
                let accepted = api.create(&format!("{}/copy", Kind::Backup.collection()), &body)?;
                self.report_job(accepted, wait)
            }
            BackupCommand::Delete { backup } => self.print_deleted(&api.delete(&Kind::Backup.item(&backup, ""))?),
            BackupCommand::Protect { backup } => {
                self.print_item(Kind::Backup, &api.post(&Kind::Backup.item(&backup, "/protect"), &json!({}))?)
            }
            BackupCommand::Unprotect { backup } => {
                self.print_item(Kind::Backup, &api.post(&Kind::Backup.item(&backup, "/unprotect"), &json!({}))?)
            }
            BackupCommand::Prune { volume, vm, rules, time_zone, dry_run } => {
                let mut body = rules.body();
                body["volume"] = json!(volume);
                body["vm"] = json!(vm);
                body["time_zone"] = json!(time_zone);
                body["dry_run"] = json!(dry_run);
                let plan = api.post(&format!("{}/prune", Kind::Backup.collection()), &without_nulls(body))?;
                self.emit(&plan, || Ok(output::render_prune_plan(&plan)))
            }
            BackupCommand::Restore { backup, name, vm, from, wait, .. } => {
                let body = without_nulls(json!({"name": name, "vm": vm, "from": from}));
                let accepted = api.create(&Kind::Backup.item(&backup, "/restore"), &body)?;
                self.follow_job(accepted, Some(Kind::Volume), wait)
            }
        }
    }

    fn schedule(&self, command: ScheduleCommand) -> Result<()> {
        let api = &self.client;
        let print = |answer: Value| self.print_item(Kind::Schedule, &answer);
        match command {
            ScheduleCommand::Create {
                name,
                volume,
                vm,
                frequency,
                time_zone,
                backup,
                copy_to,
                rules,
                hooks,
                paused,
            } => {
                let body = json!({
                    "name": name, "volume": volume, "vm": vm, "frequency": frequency.text(),
                    "time_zone": time_zone, "action": if backup { "backup" } else { "snapshot" },
                    "copy_to": copy_to, "retention": rules.body(), "hooks": hooks.body()?, "paused": paused,
                });
                print(api.create(Kind::Schedule.collection(), &without_nulls(body))?)
            }
            ScheduleCommand::List { volume, vm } => {
                let query = filter_query(&[("volume", volume), ("vm", vm)]);
                self.print_list(Kind::Schedule, &api.get(&format!("{}{query}", Kind::Schedule.collection()))?)
            }
            ScheduleCommand::Show { schedule } => {
                let shown = api.get(&Kind::Schedule.item(&schedule, ""))?;
                let runs = api.get(&Kind::Schedule.item(&schedule, "/runs"))?;
                let both = json!({"schedule": shown, "runs": runs});
                self.emit(&both, || {
                    let block = render_block(&item_rows(Kind::Schedule.fields(), &shown));
                    Ok(format!(
                        "{block}

{}",
                        render_table(Kind::Run.fields(), &runs)
                    ))
                })
            }
            ScheduleCommand::Update { schedule, rules, hooks, no_hooks, dry_run } => {
                let hooks = if no_hooks { json!({}) } else { hooks.body()? };
                let retention = if rules.is_empty() { Value::Null } else { rules.body() };
                if retention.is_null() && hooks.is_null() {
                    anyhow::bail!("nothing to change: give retention rules (--keep-last…) or hooks");
                }
                let body = json!({"retention": retention, "hooks": hooks, "dry_run": dry_run});
                let answer = api.patch(&Kind::Schedule.item(&schedule, ""), &without_nulls(body))?;
                self.emit(&answer, || {
                    let block = render_block(&item_rows(Kind::Schedule.fields(), &answer["schedule"]));
                    Ok(match &answer["retention_plan"] {
                        Value::Null => block,
                        plan => format!("{block}\n\n{}", output::render_retention_plan(plan)),
                    })
                })
            }
            ScheduleCommand::Pause { schedule } => {
                print(api.post(&Kind::Schedule.item(&schedule, "/pause"), &json!({}))?)
            }
            ScheduleCommand::Resume { schedule } => {
                print(api.post(&Kind::Schedule.item(&schedule, "/resume"), &json!({}))?)
            }
            ScheduleCommand::Delete { schedule } => {
                self.print_deleted(&api.delete(&Kind::Schedule.item(&schedule, ""))?)
            }
            ScheduleCommand::RunNow { schedule, no_wait } => {
                let started = api.post(&Kind::Schedule.item(&schedule, "/run"), &json!({}))?;
                let run = if no_wait { started } else { progress::wait_for_run(api, &schedule, started)? };
                self.print_item(Kind::Run, &run)?;
                if run["state"] == "failed" {
                    anyhow::bail!("run {} failed: {}", output::text(&run["id"]), output::text(&run["error"]));
                }
                Ok(())
            }
        }
    }

    fn job(&self, command: JobCommand) -> Result<()> {
        let api = &self.client;
        match command {
            JobCommand::List => self.print_list(Kind::Job, &api.get(Kind::Job.collection())?),
            JobCommand::Show { job } => self.print_item(Kind::Job, &api.get(&Kind::Job.item(&job, ""))?),
            JobCommand::Wait { job } => {
                let job = api.get(&Kind::Job.item(&job, ""))?;
                self.print_item(Kind::Job, &progress::wait_for_job(api, job)?)
            }
        }
    }

    fn tenant(&self, command: TenantCommand) -> Result<()> {
        let api = &self.client;
        match command {
            TenantCommand::Create { name } => {
                let created = api.create(Kind::Tenant.collection(), &json!({"name": name}))?;
                self.emit(&created, || {
                    let mut rows = item_rows(Kind::Tenant.fields(), &created["tenant"]);
                    rows.push(("token".to_owned(), output::text(&created["token"])));
                    eprintln!("The token is shown only this once: keep it.");
                    Ok(render_block(&rows))
                })
            }
            TenantCommand::List => self.print_list(Kind::Tenant, &api.get(Kind::Tenant.collection())?),
            TenantCommand::Quota { tenant, max_bytes, max_volumes, max_snapshots, max_backups, clear } => {
                let path = format!("/v1/tenants/{}/quota", encode(&tenant));
                let limits = json!({
                    "max_bytes": max_bytes.as_deref().map(|text| cairn_control::names::parse_size(text)
                        .ok_or_else(|| anyhow::anyhow!("--max-bytes {text:?}: give a size such as 500G or 2T"))).transpose()?,
                    "max_volumes": max_volumes, "max_snapshots": max_snapshots, "max_backups": max_backups,
                });
                let limits = without_nulls(limits);
                let answer = match (clear, limits.as_object().is_some_and(|l| !l.is_empty())) {
                    (true, _) => api.put(&path, &json!({}))?,
                    (false, true) => api.put(&path, &limits)?,
                    (false, false) => api.get(&path)?,
                };
                self.emit(&answer, || Ok(output::render_quota(&answer)))
            }
        }
    }

    /// Starts an export job (of a volume or a snapshot) and follows it.
    fn export(&self, path: &str, to: ExportTo) -> Result<()> {
        let body = json!({"path": daemon_path(&to.path)?, "format": to.format});
        self.follow_job(self.client.create(path, &without_nulls(body))?, None, to.wait)
    }

    /// Handles a `202 Accepted` answer: waits for its job unless told not to, then prints the
    /// job and the resource it makes (`made`, a member of the answer) as they are at the end.
    /// With `--json` that is the final job, or the answer itself when not waiting.
    fn follow_job(&self, accepted: Value, made: Option<Kind>, wait: NoWait) -> Result<()> {
        if wait.no_wait {
            return self.emit(&accepted, || {
                Ok(job_report(&accepted["job"], made.map(|kind| (kind, &accepted[kind.member()]))))
            });
        }
        let job = progress::wait_for_job(&self.client, accepted["job"].clone())?;
        self.emit(&job, || {
            let resource = match made {
                Some(kind) => {
                    let id = accepted[kind.member()]["id"].as_str().context("the API's answer names no resource")?;
                    Some((kind, self.client.get(&kind.item(id, ""))?))
                }
                None => None,
            };
            Ok(job_report(&job, resource.as_ref().map(|(kind, resource)| (*kind, resource))))
        })
    }

    /// Waits for a repository job (verify, gc) and prints its report; a failed job's report
    /// is printed before its error.
    fn report_job(&self, accepted: Value, wait: NoWait) -> Result<()> {
        if wait.no_wait {
            return self.emit(&accepted, || Ok(job_report(&accepted["job"], None)));
        }
        let job = progress::wait_for_job_end(&self.client, accepted["job"].clone())?;
        let report = &job["result"];
        if !report.is_null() {
            self.emit(report, || Ok(render_block(&object_rows(report))))?;
        }
        progress::check_succeeded(&job)
    }

    fn print_item(&self, kind: Kind, item: &Value) -> Result<()> {
        self.emit(item, || Ok(render_block(&item_rows(kind.fields(), item))))
    }

    fn print_list(&self, kind: Kind, items: &Value) -> Result<()> {
        self.emit(items, || Ok(render_table(kind.fields(), items)))
    }

    /// What a delete removed (and, for a VM, which disks it detached).
    fn print_deleted(&self, answer: &Value) -> Result<()> {
        self.emit(answer, || Ok(render_block(&object_rows(answer))))
    }

    /// Prints the API's answer as JSON with `--json`, else what `for_people` makes of it. The
    /// people's version may need more calls, so it is only made when it is shown.
    fn emit(&self, answer: &Value, for_people: impl FnOnce() -> Result<String>) -> Result<()> {
        let text = if self.json { serde_json::to_string_pretty(answer)? } else { for_people()? };
        match writeln!(io::stdout().lock(), "{text}") {
            // A reader that stopped early (`| head`) has what it wanted.
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            written => written.context("writing to stdout"),
        }
    }
}

/// A job's block, followed by the block of the resource it makes.
fn job_report(job: &Value, made: Option<(Kind, &Value)>) -> String {
    let mut report = render_block(&item_rows(Kind::Job.fields(), job));
    if let Some((kind, resource)) = made {
        report += &format!("\n\n{}", render_block(&item_rows(kind.fields(), resource)));
    }
    report
}

/// Import and export paths are read on the daemon's machine, which wants them absolute; a
/// relative one is taken from here, which is right when the daemon runs on this machine.
fn daemon_path(path: &Path) -> Result<String> {
    let absolute = std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))?;
    absolute.to_str().map(str::to_owned).with_context(|| format!("{} is not UTF-8", absolute.display()))
}

/// Leaves out the optional members the user did not give, so the daemon applies its defaults.
fn without_nulls(mut body: Value) -> Value {
    if let Value::Object(members) = &mut body {
        members.retain(|_, value| !value.is_null());
        members.values_mut().for_each(|value| *value = without_nulls(value.take()));
    }
    body
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The client's commands as main.rs mounts them.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: Command,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cairn").chain(args.iter().copied()))
    }

    #[test]
    fn command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["vm", "list", "--json", "--url", "http://h:1", "--token", "t"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.url.as_deref(), Some("http://h:1"));
        assert_eq!(cli.global.token.as_deref(), Some("t"));
    }

    #[test]
    fn vm_create_takes_exactly_one_source() {
        assert!(parse(&["vm", "create", "web1"]).is_err(), "a source is needed");
        assert!(parse(&["vm", "create", "web1", "--size", "1G"]).is_ok());
        assert!(parse(&["vm", "create", "web1", "--template", "golden", "--size", "20G"]).is_ok());
        assert!(parse(&["vm", "create", "web1", "--image", "/a.raw", "--format", "raw"]).is_ok());
        assert!(parse(&["vm", "create", "web1", "--image", "/a.raw", "--size", "1G"]).is_err());
        assert!(parse(&["vm", "create", "web1", "--image", "/a.raw", "--template", "golden"]).is_err());
        assert!(parse(&["vm", "create", "web1", "--size", "1G", "--format", "raw"]).is_err());
    }

    #[test]
    fn restore_role_is_spelled_as() {
        let cli = parse(&["snapshot", "restore", "s1", "--vm", "web1", "--as", "root"]).unwrap();
        let Command::Snapshot(SnapshotCommand::Restore { role, .. }) = cli.command else { panic!("not a restore") };
        assert_eq!(json!(role), json!("root"));
    }

    #[test]
    fn nulls_are_left_out_at_every_depth() {
        let body = json!({"name": "web1", "size": null, "image": {"path": "/a", "format": null}});
        assert_eq!(without_nulls(body), json!({"name": "web1", "image": {"path": "/a"}}));
    }

    #[test]
    fn relative_paths_become_absolute() {
        let here = std::env::current_dir().unwrap();
        assert_eq!(daemon_path(Path::new("disk.raw")).unwrap(), here.join("disk.raw").to_str().unwrap());
        assert_eq!(daemon_path(Path::new("/img/disk.raw")).unwrap(), "/img/disk.raw");
    }

    #[test]
    fn paths_are_percent_encoded_segments() {
        assert_eq!(Kind::Vm.item("web1", "/start"), "/v1/vms/web1/start");
        assert_eq!(Kind::Snapshot.item("a b", ""), "/v1/snapshots/a%20b");
    }
}
