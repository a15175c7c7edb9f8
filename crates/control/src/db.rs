//! The metadata store: every query cairn makes, over sqlx. Only this module knows SQL. The SQL
//! is portable (numbered parameters, TEXT/INTEGER/BIGINT columns, no SQLite functions), so a
//! PostgreSQL pool can serve the same statements later.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::metering::{MeteredKind, Quota, Segment};
use crate::model::*;
use crate::Error;

/// Schema migrations, applied in order; a database records the versions it has.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql")),
    (2, include_str!("../migrations/0002_backups.sql")),
    (3, include_str!("../migrations/0003_pruning.sql")),
    (4, include_str!("../migrations/0004_copies.sql")),
    (5, include_str!("../migrations/0005_schedules.sql")),
    (6, include_str!("../migrations/0006_metering.sql")),
    (7, include_str!("../migrations/0007_repository_usage.sql")),
    (8, include_str!("../migrations/0008_backup_shares.sql")),
    (9, include_str!("../migrations/0009_backup_attribution.sql")),
];

/// The metadata database.
#[derive(Debug, Clone)]
pub struct MetaStore {
    pool: SqlitePool,
}

pub type Conn = SqliteConnection;
pub type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

impl MetaStore {
    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to date.
    pub async fn open_sqlite(path: &Path) -> Result<MetaStore, Error> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed change survives power loss, not only a killed process.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        let store = MetaStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(newer) = applied.iter().find(|v| **v > known) {
            return Err(Error::Internal(format!(
                "the metadata database has schema version {newer}, newer than this cairn knows ({known}); run a newer cairn"
            )));
        }
        for (version, sql) in MIGRATIONS {
            if !applied.contains(version) {
                sqlx::raw_sql(sql).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(version)
                    .bind(crate::now())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A write transaction. IMMEDIATE takes SQLite's write lock at the start: a deferred
    /// transaction that reads, then writes after another connection committed, fails at once
    /// (SQLITE_BUSY_SNAPSHOT in WAL mode) instead of waiting its turn.
    pub async fn begin(&self) -> Result<Tx, Error> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>, Error> {
        Ok(self.pool.acquire().await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn u64_of(row: &SqliteRow, column: &str) -> Result<u64, Error> {
    let value: i64 = row.try_get(column)?;
    u64::try_from(value).map_err(|_| corrupt(column, &value.to_string()))
}

fn corrupt(column: &str, value: &str) -> Error {
    Error::Internal(format!("metadata column {column} holds {value:?}, which this cairn does not understand"))
}

fn text_enum<T>(row: &SqliteRow, column: &str, parse: fn(&str) -> Option<T>) -> Result<T, Error> {
    let text: String = row.try_get(column)?;
    parse(&text).ok_or_else(|| corrupt(column, &text))
}

fn source_of(row: &SqliteRow) -> Result<Source, Error> {
    let kind: String = row.try_get("source_kind")?;
    Source::from_columns(&kind, row.try_get("source_ref")?).ok_or_else(|| corrupt("source_kind", &kind))
}

fn tenant_of(row: &SqliteRow) -> Result<Tenant, Error> {
    Ok(Tenant {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        admin: row.try_get::<i64, _>("admin")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

fn vm_of(row: &SqliteRow) -> Result<Vm, Error> {
    Ok(Vm {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        state: text_enum(row, "state", VmState::parse)?,
        root_volume: row.try_get("root_volume_id")?,
        data_volumes: Vec::new(),
        template: row.try_get("template_id")?,
        created_at: row.try_get("created_at")?,
    })
}

fn volume_of(row: &SqliteRow) -> Result<Volume, Error> {
    Ok(Volume {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        size: u64_of(row, "size")?,
        state: text_enum(row, "state", ResourceState::parse)?,
        vm: row.try_get("vm_id")?,
        role: text_enum(row, "role", DiskRole::parse)?,
        from_root_disk: row.try_get::<i64, _>("from_root_disk")? != 0,
        source: source_of(row)?,
        created_at: row.try_get("created_at")?,
    })
}

fn snapshot_of(row: &SqliteRow) -> Result<Snapshot, Error> {
    Ok(Snapshot {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        volume: row.try_get("volume_id")?,
        volume_name: row.try_get("volume_name")?,
        vm: row.try_get("vm_id")?,
        disk_role: text_enum(row, "disk_role", DiskRole::parse)?,
        group: row.try_get("group_id")?,
        origin: text_enum(row, "origin", Origin::parse)?,
        consistency: text_enum(row, "consistency", Consistency::parse)?,
        created_at: row.try_get("created_at")?,
        schedule: row.try_get("schedule_id")?,
        run: row.try_get("run_id")?,
        protected: row.try_get::<i64, _>("protected")? != 0,
    })
}

fn template_of(row: &SqliteRow) -> Result<Template, Error> {
    Ok(Template {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        size: u64_of(row, "size")?,
        state: text_enum(row, "state", ResourceState::parse)?,
        source: source_of(row)?,
        created_at: row.try_get("created_at")?,
    })
}

fn job_of(row: &SqliteRow) -> Result<Job, Error> {
    Ok(Job {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        kind: text_enum(row, "kind", JobKind::parse)?,
        state: text_enum(row, "state", JobState::parse)?,
        resource: row.try_get("resource_id")?,
        path: row.try_get("path")?,
        bytes_done: u64_of(row, "bytes_done")?,
        bytes_total: u64_of(row, "bytes_total")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
        result: row
            .try_get::<Option<String>, _>("result")?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| Error::Internal(format!("a job's stored result: {e}")))?,
    })
}

fn all<T>(rows: Vec<SqliteRow>, map: fn(&SqliteRow) -> Result<T, Error>) -> Result<Vec<T>, Error> {
    rows.iter().map(map).collect()
}

fn one<T>(row: Option<SqliteRow>, map: fn(&SqliteRow) -> Result<T, Error>) -> Result<Option<T>, Error> {
    row.as_ref().map(map).transpose()
}

/// SQLite stores u64 sizes as i64; sizes are at most 16 TiB, far inside.
fn int(n: u64) -> i64 {
    i64::try_from(n).expect("sizes are far below 2^63")
}

/// The row of `table` that belongs to `tenant` and has `reference` as its id or its name.
async fn find_by_reference<T>(
    c: &mut Conn,
    table: &'static str,
    tenant: &str,
    reference: &str,
    map: fn(&SqliteRow) -> Result<T, Error>,
) -> Result<Option<T>, Error> {
    let sql = format!("SELECT * FROM {table} WHERE tenant_id = $1 AND (id = $2 OR name = $2)");
    one(sqlx::query(&sql).bind(tenant).bind(reference).fetch_optional(c).await?, map)
}

/// The row of `table` that belongs to `tenant` and has id `id` (for kinds without names).
async fn find_by_id<T>(
    c: &mut Conn,
    table: &'static str,
    tenant: &str,
    id: &str,
    map: fn(&SqliteRow) -> Result<T, Error>,
) -> Result<Option<T>, Error> {
    let sql = format!("SELECT * FROM {table} WHERE tenant_id = $1 AND id = $2");
    one(sqlx::query(&sql).bind(tenant).bind(id).fetch_optional(c).await?, map)
}

/// Rows of `table`, oldest first, of `tenant` (None: every tenant's).
async fn list_of_tenant<T>(
    c: &mut Conn,
    table: &'static str,
    tenant: Option<&str>,
    map: fn(&SqliteRow) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    let sql = format!("SELECT * FROM {table} WHERE $1 IS NULL OR tenant_id = $1 ORDER BY created_at, id");
    all(sqlx::query(&sql).bind(tenant).fetch_all(c).await?, map)
}

/// Rows of a table of copies of disks (snapshots, backups), oldest first, filtered by tenant
/// (None: all), volume id and VM id.
async fn list_of_disks<T>(
    c: &mut Conn,
    table: &'static str,
    (tenant, volume, vm): (Option<&str>, Option<&str>, Option<&str>),
    map: fn(&SqliteRow) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    let sql = format!(
        "SELECT * FROM {table} WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR volume_id = $2) \
         AND ($3 IS NULL OR vm_id = $3) ORDER BY created_at, id"
    );
    all(sqlx::query(&sql).bind(tenant).bind(volume).bind(vm).fetch_all(c).await?, map)
}

// ---- tenants and tokens ----

pub async fn insert_tenant(c: &mut Conn, t: &Tenant) -> Result<(), Error> {
    sqlx::query("INSERT INTO tenants (id, name, admin, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&t.id)
        .bind(&t.name)
        .bind(t.admin as i64)
        .bind(&t.created_at)
        .execute(c)
        .await?;
    Ok(())
}

pub async fn insert_token(c: &mut Conn, hash: &str, tenant: &str) -> Result<(), Error> {
    sqlx::query("INSERT INTO tokens (hash, tenant_id, created_at) VALUES ($1, $2, $3)")
        .bind(hash)
        .bind(tenant)
        .bind(crate::now())
        .execute(c)
        .await?;
    Ok(())
}

pub async fn delete_tokens(c: &mut Conn, tenant: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM tokens WHERE tenant_id = $1").bind(tenant).execute(c).await?;
    Ok(())
}

pub async fn tenant_by_token(c: &mut Conn, hash: &str) -> Result<Option<Tenant>, Error> {
    let row = sqlx::query("SELECT t.* FROM tenants t JOIN tokens k ON k.tenant_id = t.id WHERE k.hash = $1")
        .bind(hash)
        .fetch_optional(c)
        .await?;
    one(row, tenant_of)
}

pub async fn tenant_by_id(c: &mut Conn, id: &str) -> Result<Option<Tenant>, Error> {
    one(sqlx::query("SELECT * FROM tenants WHERE id = $1").bind(id).fetch_optional(c).await?, tenant_of)
}

pub async fn tenant_by_name(c: &mut Conn, name: &str) -> Result<Option<Tenant>, Error> {
    one(sqlx::query("SELECT * FROM tenants WHERE name = $1").bind(name).fetch_optional(c).await?, tenant_of)
}

pub async fn list_tenants(c: &mut Conn) -> Result<Vec<Tenant>, Error> {
    all(sqlx::query("SELECT * FROM tenants ORDER BY created_at, id").fetch_all(c).await?, tenant_of)
}

// ---- VMs ----

pub async fn insert_vm(c: &mut Conn, vm: &Vm) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO vms (id, tenant_id, name, state, root_volume_id, template_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&vm.id)
    .bind(&vm.tenant)
    .bind(&vm.name)
    .bind(vm.state.as_str())
    .bind(&vm.root_volume)
    .bind(&vm.template)
    .bind(&vm.created_at)
    .execute(c)
    .await?;
    Ok(())
}

pub async fn set_vm_state(c: &mut Conn, id: &str, state: VmState) -> Result<(), Error> {
    sqlx::query("UPDATE vms SET state = $1 WHERE id = $2").bind(state.as_str()).bind(id).execute(c).await?;
    Ok(())
}

pub async fn set_vm_root(c: &mut Conn, id: &str, root_volume: &str) -> Result<(), Error> {
    sqlx::query("UPDATE vms SET root_volume_id = $1 WHERE id = $2").bind(root_volume).bind(id).execute(c).await?;
    Ok(())
}

pub async fn delete_vm(c: &mut Conn, id: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM vms WHERE id = $1").bind(id).execute(c).await?;
    Ok(())
}

/// A VM of `tenant` by id or name.
pub async fn find_vm(c: &mut Conn, tenant: &str, reference: &str) -> Result<Option<Vm>, Error> {
    find_by_reference(c, "vms", tenant, reference, vm_of).await
}

pub async fn list_vms(c: &mut Conn, tenant: Option<&str>) -> Result<Vec<Vm>, Error> {
    list_of_tenant(c, "vms", tenant, vm_of).await
}

// ---- volumes ----

pub async fn insert_volume(c: &mut Conn, v: &Volume) -> Result<(), Error> {
    let (source_kind, source_ref) = v.source.columns();
    sqlx::query(
        "INSERT INTO volumes (id, tenant_id, name, size, state, vm_id, role, from_root_disk, source_kind, source_ref, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&v.id)
    .bind(&v.tenant)
    .bind(&v.name)
    .bind(int(v.size))
    .bind(v.state.as_str())
    .bind(&v.vm)
    .bind(v.role.as_str())
    .bind(v.from_root_disk as i64)
    .bind(source_kind)
    .bind(source_ref)
    .bind(&v.created_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Writes a volume's changeable columns: state, attachment and size.
pub async fn update_volume(c: &mut Conn, v: &Volume) -> Result<(), Error> {
    sqlx::query("UPDATE volumes SET state = $1, vm_id = $2, size = $3 WHERE id = $4")
        .bind(v.state.as_str())
        .bind(&v.vm)
        .bind(int(v.size))
        .bind(&v.id)
        .execute(c)
        .await?;
    Ok(())
}

pub async fn delete_volume(c: &mut Conn, id: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM volumes WHERE id = $1").bind(id).execute(c).await?;
    Ok(())
}

pub async fn find_volume(c: &mut Conn, tenant: &str, reference: &str) -> Result<Option<Volume>, Error> {
    find_by_reference(c, "volumes", tenant, reference, volume_of).await
}

/// Volumes of `tenant` (every tenant's when None), optionally only those attached to `vm`.
pub async fn list_volumes(c: &mut Conn, tenant: Option<&str>, vm: Option<&str>) -> Result<Vec<Volume>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM volumes WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR vm_id = $2) \
         ORDER BY created_at, id",
    )
    .bind(tenant)
    .bind(vm)
    .fetch_all(c)
    .await?;
    all(rows, volume_of)
}

// ---- snapshots ----

pub async fn insert_snapshot(c: &mut Conn, s: &Snapshot) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO snapshots (id, tenant_id, name, volume_id, volume_name, vm_id, disk_role, group_id, origin, \
         consistency, created_at, schedule_id, run_id, protected) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&s.id)
    .bind(&s.tenant)
    .bind(&s.name)
    .bind(&s.volume)
    .bind(&s.volume_name)
    .bind(&s.vm)
    .bind(s.disk_role.as_str())
    .bind(&s.group)
    .bind(s.origin.as_str())
    .bind(s.consistency.as_str())
    .bind(&s.created_at)
    .bind(&s.schedule)
    .bind(&s.run)
    .bind(i64::from(s.protected))
    .execute(c)
    .await?;
    Ok(())
}

pub async fn delete_snapshot(c: &mut Conn, id: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM snapshots WHERE id = $1").bind(id).execute(c).await?;
    Ok(())
}

pub async fn find_snapshot(c: &mut Conn, tenant: &str, reference: &str) -> Result<Option<Snapshot>, Error> {
    find_by_reference(c, "snapshots", tenant, reference, snapshot_of).await
}

/// Snapshots, oldest first, filtered by tenant (None: all), volume id and VM id.
pub async fn list_snapshots(
    c: &mut Conn,
    tenant: Option<&str>,
    volume: Option<&str>,
    vm: Option<&str>,
) -> Result<Vec<Snapshot>, Error> {
    list_of_disks(c, "snapshots", (tenant, volume, vm), snapshot_of).await
}

// ---- templates ----

pub async fn insert_template(c: &mut Conn, t: &Template) -> Result<(), Error> {
    let (source_kind, source_ref) = t.source.columns();
    sqlx::query(
        "INSERT INTO templates (id, tenant_id, name, size, state, source_kind, source_ref, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&t.id)
    .bind(&t.tenant)
    .bind(&t.name)
    .bind(int(t.size))
    .bind(t.state.as_str())
    .bind(source_kind)
    .bind(source_ref)
    .bind(&t.created_at)
    .execute(c)
    .await?;
    Ok(())
}

pub async fn set_template_state(c: &mut Conn, id: &str, state: ResourceState) -> Result<(), Error> {
    sqlx::query("UPDATE templates SET state = $1 WHERE id = $2").bind(state.as_str()).bind(id).execute(c).await?;
    Ok(())
}

pub async fn delete_template(c: &mut Conn, id: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM templates WHERE id = $1").bind(id).execute(c).await?;
    Ok(())
}

pub async fn find_template(c: &mut Conn, tenant: &str, reference: &str) -> Result<Option<Template>, Error> {
    find_by_reference(c, "templates", tenant, reference, template_of).await
}

pub async fn list_templates(c: &mut Conn, tenant: Option<&str>) -> Result<Vec<Template>, Error> {
    list_of_tenant(c, "templates", tenant, template_of).await
}

// ---- jobs ----

pub async fn insert_job(c: &mut Conn, j: &Job) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, state, resource_id, path, bytes_done, bytes_total, error, created_at, \
         finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&j.id)
    .bind(&j.tenant)
    .bind(j.kind.as_str())
    .bind(j.state.as_str())
    .bind(&j.resource)
    .bind(&j.path)
    .bind(int(j.bytes_done))
    .bind(int(j.bytes_total))
    .bind(&j.error)
    .bind(&j.created_at)
    .bind(&j.finished_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Records how a job ended.
pub async fn finish_job(c: &mut Conn, j: &Job) -> Result<(), Error> {
    sqlx::query(
        "UPDATE jobs SET state = $1, bytes_done = $2, bytes_total = $3, error = $4, finished_at = $5, result = $6 \
         WHERE id = $7",
    )
    .bind(j.state.as_str())
    .bind(int(j.bytes_done))
    .bind(int(j.bytes_total))
    .bind(&j.error)
    .bind(&j.finished_at)
    .bind(j.result.as_ref().map(|r| r.to_string()))
    .bind(&j.id)
    .execute(c)
    .await?;
    Ok(())
}

pub async fn find_job(c: &mut Conn, tenant: &str, id: &str) -> Result<Option<Job>, Error> {
    find_by_id(c, "jobs", tenant, id, job_of).await
}

/// Jobs, newest first, of one tenant or (None) of all; optionally only those in `state`.
pub async fn list_jobs(c: &mut Conn, tenant: Option<&str>, state: Option<JobState>) -> Result<Vec<Job>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM jobs WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR state = $2) \
         ORDER BY created_at DESC, id DESC",
    )
    .bind(tenant)
    .bind(state.map(JobState::as_str))
    .fetch_all(c)
    .await?;
    all(rows, job_of)
}

// ---- backups ----

fn backup_of(row: &SqliteRow) -> Result<Backup, Error> {
    Ok(Backup {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        record: row.try_get("record_id")?,
        volume: row.try_get("volume_id")?,
        volume_name: row.try_get("volume_name")?,
        vm: row.try_get("vm_id")?,
        disk_role: text_enum(row, "disk_role", DiskRole::parse)?,
        group: row.try_get("group_id")?,
        created_at: row.try_get("created_at")?,
        size: u64_of(row, "size")?,
        bytes_read: u64_of(row, "bytes_read")?,
        bytes_added: u64_of(row, "bytes_added")?,
        checkpoint: row.try_get::<Option<i64>, _>("checkpoint")?.map(|c| c as u64),
        copies: Vec::new(),
        schedule: row.try_get("schedule_id")?,
        run: row.try_get("run_id")?,
        protected: row.try_get::<i64, _>("protected")? != 0,
        exclusive_bytes: row.try_get::<Option<i64>, _>("exclusive_bytes")?.map(|b| b as u64),
        shared_bytes: row.try_get::<Option<i64>, _>("shared_bytes")?.map(|b| b as u64),
        attributed_bytes: row.try_get::<Option<i64>, _>("attributed_bytes")?.map(|b| b as u64),
    })
}

pub async fn insert_backup(c: &mut Conn, b: &Backup) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO backups (id, tenant_id, record_id, volume_id, volume_name, vm_id, disk_role, group_id, created_at, \
         size, bytes_read, bytes_added, checkpoint, schedule_id, run_id, protected) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(&b.id)
    .bind(&b.tenant)
    .bind(&b.record)
    .bind(&b.volume)
    .bind(&b.volume_name)
    .bind(&b.vm)
    .bind(b.disk_role.as_str())
    .bind(&b.group)
    .bind(&b.created_at)
    .bind(int(b.size))
    .bind(int(b.bytes_read))
    .bind(int(b.bytes_added))
    .bind(b.checkpoint.map(int))
    .bind(&b.schedule)
    .bind(&b.run)
    .bind(i64::from(b.protected))
    .execute(c)
    .await?;
    Ok(())
}

/// Forgets the checkpoint of every backup of `volume` but `keep`.
pub async fn drop_checkpoints(c: &mut Conn, volume: &str, keep: &str) -> Result<(), Error> {
    sqlx::query("UPDATE backups SET checkpoint = NULL WHERE volume_id = $1 AND id <> $2")
        .bind(volume)
        .bind(keep)
        .execute(c)
        .await?;
    Ok(())
}

/// Deletes backup rows and, in the same transaction, queues their records to be forgotten in
/// the backup repository and in every second repository holding a copy.
pub async fn delete_backups(c: &mut Conn, backups: &[Backup], since: &str) -> Result<(), Error> {
    for b in backups {
        sqlx::query("DELETE FROM backups WHERE id = $1").bind(&b.id).execute(&mut *c).await?;
        sqlx::query(
            "INSERT INTO pending_forgets_in (repository, record_id, since) \
             SELECT repository, $1, $2 FROM backup_copies WHERE backup_id = $3 \
             UNION SELECT '', $1, $2 ON CONFLICT DO NOTHING",
        )
        .bind(&b.record)
        .bind(since)
        .bind(&b.id)
        .execute(&mut *c)
        .await?;
        sqlx::query("DELETE FROM backup_copies WHERE backup_id = $1").bind(&b.id).execute(&mut *c).await?;
    }
    Ok(())
}

/// Records queued to be forgotten, as (repository, record id); repository '' is the backup
/// repository.
pub async fn pending_forgets(c: &mut Conn) -> Result<Vec<(String, String)>, Error> {
    let rows =
        sqlx::query("SELECT repository, record_id FROM pending_forgets_in ORDER BY since, repository, record_id")
            .fetch_all(c)
            .await?;
    rows.iter().map(|r| Ok((r.try_get("repository")?, r.try_get("record_id")?))).collect()
}

pub async fn forgotten(c: &mut Conn, repository: &str, record: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM pending_forgets_in WHERE repository = $1 AND record_id = $2")
        .bind(repository)
        .bind(record)
        .execute(c)
        .await?;
    Ok(())
}

pub async fn insert_copy(c: &mut Conn, backup: &str, repository: &str, at: &str) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO backup_copies (backup_id, repository, copied_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(backup)
    .bind(repository)
    .bind(at)
    .execute(c)
    .await?;
    Ok(())
}

/// The second repositories holding a copy of each backup (or only of `backup`), by backup id.
pub async fn copies(c: &mut Conn, backup: Option<&str>) -> Result<HashMap<String, Vec<String>>, Error> {
    let rows = sqlx::query(
        "SELECT backup_id, repository FROM backup_copies WHERE $1 IS NULL OR backup_id = $1 ORDER BY repository",
    )
    .bind(backup)
    .fetch_all(c)
    .await?;
    let mut copies: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        copies.entry(row.try_get("backup_id")?).or_default().push(row.try_get("repository")?);
    }
    Ok(copies)
}

pub async fn find_backup(c: &mut Conn, tenant: &str, id: &str) -> Result<Option<Backup>, Error> {
    find_by_id(c, "backups", tenant, id, backup_of).await
}

/// Backups, oldest first, by tenant (None: all), volume id and VM id.
pub async fn list_backups(
    c: &mut Conn,
    tenant: Option<&str>,
    volume: Option<&str>,
    vm: Option<&str>,
) -> Result<Vec<Backup>, Error> {
    list_of_disks(c, "backups", (tenant, volume, vm), backup_of).await
}

/// Protects or unprotects a snapshot or backup (`table` is one of the two).
pub async fn set_protected(c: &mut Conn, table: &'static str, id: &str, protected: bool) -> Result<(), Error> {
    sqlx::query(&format!("UPDATE {table} SET protected = $1 WHERE id = $2"))
        .bind(i64::from(protected))
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

/// The snapshots a schedule made, oldest first.
pub async fn snapshots_of_schedule(c: &mut Conn, schedule: &str) -> Result<Vec<Snapshot>, Error> {
    let rows = sqlx::query("SELECT * FROM snapshots WHERE schedule_id = $1 ORDER BY created_at, id")
        .bind(schedule)
        .fetch_all(c)
        .await?;
    all(rows, snapshot_of)
}

/// The backups a schedule made, oldest first.
pub async fn backups_of_schedule(c: &mut Conn, schedule: &str) -> Result<Vec<Backup>, Error> {
    let rows = sqlx::query("SELECT * FROM backups WHERE schedule_id = $1 ORDER BY created_at, id")
        .bind(schedule)
        .fetch_all(c)
        .await?;
    all(rows, backup_of)
}

/// What a run made so far: its snapshots and its backups.
pub async fn items_of_run(c: &mut Conn, run: &str) -> Result<(Vec<Snapshot>, Vec<Backup>), Error> {
    let snapshots = sqlx::query("SELECT * FROM snapshots WHERE run_id = $1 ORDER BY created_at, id")
        .bind(run)
        .fetch_all(&mut *c)
        .await?;
    let backups =
        sqlx::query("SELECT * FROM backups WHERE run_id = $1 ORDER BY created_at, id").bind(run).fetch_all(c).await?;
    Ok((all(snapshots, snapshot_of)?, all(backups, backup_of)?))
}

// ---- schedules and runs ----

fn schedule_of(row: &SqliteRow) -> Result<Schedule, Error> {
    let frequency: String = row.try_get("frequency")?;
    let retention: String = row.try_get("retention")?;
    let hooks: Option<String> = row.try_get("hooks")?;
    Ok(Schedule {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        target_kind: text_enum(row, "target_kind", TargetKind::parse)?,
        target: row.try_get("target_id")?,
        action: text_enum(row, "action", ScheduleAction::parse)?,
        copy_to: row.try_get("copy_to")?,
        frequency: frequency.parse().map_err(|_| corrupt("frequency", &frequency))?,
        time_zone: row.try_get("time_zone")?,
        retention: serde_json::from_str(&retention).map_err(|_| corrupt("retention", &retention))?,
        hooks: hooks.map(|text| serde_json::from_str(&text).map_err(|_| corrupt("hooks", &text))).transpose()?,
        paused: row.try_get::<i64, _>("paused")? != 0,
        next_run_at: row.try_get("next_run_at")?,
        created_at: row.try_get("created_at")?,
    })
}

fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}

pub async fn insert_schedule(c: &mut Conn, s: &Schedule) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO schedules (id, tenant_id, name, target_kind, target_id, action, copy_to, frequency, time_zone, \
         retention, hooks, paused, next_run_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&s.id)
    .bind(&s.tenant)
    .bind(&s.name)
    .bind(s.target_kind.as_str())
    .bind(&s.target)
    .bind(s.action.as_str())
    .bind(&s.copy_to)
    .bind(s.frequency.to_string())
    .bind(&s.time_zone)
    .bind(json_text(&s.retention))
    .bind(s.hooks.as_ref().map(json_text))
    .bind(i64::from(s.paused))
    .bind(&s.next_run_at)
    .bind(&s.created_at)
    .execute(c)
    .await?;
    Ok(())
}

/// Writes back what may change in a schedule: retention, hooks, pause and next run.
pub async fn update_schedule(c: &mut Conn, s: &Schedule) -> Result<(), Error> {
    sqlx::query("UPDATE schedules SET retention = $1, hooks = $2, paused = $3, next_run_at = $4 WHERE id = $5")
        .bind(json_text(&s.retention))
        .bind(s.hooks.as_ref().map(json_text))
        .bind(i64::from(s.paused))
        .bind(&s.next_run_at)
        .bind(&s.id)
        .execute(c)
        .await?;
    Ok(())
}

/// Deletes a schedule and its runs' history; what it made stays.
pub async fn delete_schedule(c: &mut Conn, id: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM schedule_runs WHERE schedule_id = $1").bind(id).execute(&mut *c).await?;
    sqlx::query("DELETE FROM schedules WHERE id = $1").bind(id).execute(c).await?;
    Ok(())
}

/// Deletes the schedules aimed at a volume or VM that is going.
pub async fn delete_schedules_of(c: &mut Conn, target: &str) -> Result<(), Error> {
    for schedule in list_schedules(&mut *c, None, Some(target)).await? {
        delete_schedule(&mut *c, &schedule.id).await?;
    }
    Ok(())
}

pub async fn find_schedule(c: &mut Conn, tenant: &str, reference: &str) -> Result<Option<Schedule>, Error> {
    find_by_reference(c, "schedules", tenant, reference, schedule_of).await
}

pub async fn schedule_by_id(c: &mut Conn, id: &str) -> Result<Option<Schedule>, Error> {
    one(sqlx::query("SELECT * FROM schedules WHERE id = $1").bind(id).fetch_optional(c).await?, schedule_of)
}

/// Schedules, oldest first, of `tenant` (None: all), aimed at `target` (None: any).
pub async fn list_schedules(c: &mut Conn, tenant: Option<&str>, target: Option<&str>) -> Result<Vec<Schedule>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM schedules WHERE ($1 IS NULL OR tenant_id = $1) AND ($2 IS NULL OR target_id = $2) \
         ORDER BY created_at, id",
    )
    .bind(tenant)
    .bind(target)
    .fetch_all(c)
    .await?;
    all(rows, schedule_of)
}

/// Unpaused schedules whose next run is at or before `until`, soonest first.
pub async fn schedules_due(c: &mut Conn, until: &str) -> Result<Vec<Schedule>, Error> {
    let rows = sqlx::query("SELECT * FROM schedules WHERE paused = 0 AND next_run_at <= $1 ORDER BY next_run_at, id")
        .bind(until)
        .fetch_all(c)
        .await?;
    all(rows, schedule_of)
}

/// The soonest next run of an unpaused schedule.
pub async fn soonest_next_run(c: &mut Conn) -> Result<Option<String>, Error> {
    let row = sqlx::query("SELECT MIN(next_run_at) AS soonest FROM schedules WHERE paused = 0").fetch_one(c).await?;
    Ok(row.try_get("soonest")?)
}

fn run_of(row: &SqliteRow) -> Result<Run, Error> {
    Ok(Run {
        id: row.try_get("id")?,
        schedule: row.try_get("schedule_id")?,
        tenant: row.try_get("tenant_id")?,
        due_at: row.try_get("due_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        state: text_enum(row, "state", RunState::parse)?,
        stage: text_enum(row, "stage", RunStage::parse)?,
        late: row.try_get::<i64, _>("late")? != 0,
        manual: row.try_get::<i64, _>("manual")? != 0,
        consistency: row
            .try_get::<Option<String>, _>("consistency")?
            .map(|text| Consistency::parse(&text).ok_or_else(|| corrupt("consistency", &text)))
            .transpose()?,
        job: row.try_get("job_id")?,
        bytes: u64_of(row, "bytes")?,
        pruned: u64_of(row, "pruned")?,
        error: row.try_get("error")?,
        warning: row.try_get("warning")?,
    })
}

/// Records a new run; false (and nothing written) when the schedule already has a run for
/// that firing.
pub async fn insert_run(c: &mut Conn, r: &Run) -> Result<bool, Error> {
    let done = sqlx::query(
        "INSERT INTO schedule_runs (id, schedule_id, tenant_id, due_at, started_at, finished_at, state, stage, late, \
         manual, consistency, job_id, bytes, pruned, error, warning) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
         ON CONFLICT (schedule_id, due_at) DO NOTHING",
    )
    .bind(&r.id)
    .bind(&r.schedule)
    .bind(&r.tenant)
    .bind(&r.due_at)
    .bind(&r.started_at)
    .bind(&r.finished_at)
    .bind(r.state.as_str())
    .bind(r.stage.as_str())
    .bind(i64::from(r.late))
    .bind(i64::from(r.manual))
    .bind(r.consistency.map(Consistency::as_str))
    .bind(&r.job)
    .bind(int(r.bytes))
    .bind(int(r.pruned))
    .bind(&r.error)
    .bind(&r.warning)
    .execute(c)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn update_run(c: &mut Conn, r: &Run) -> Result<(), Error> {
    sqlx::query(
        "UPDATE schedule_runs SET finished_at = $1, state = $2, stage = $3, late = $4, consistency = $5, job_id = $6, \
         bytes = $7, pruned = $8, error = $9, warning = $10 WHERE id = $11",
    )
    .bind(&r.finished_at)
    .bind(r.state.as_str())
    .bind(r.stage.as_str())
    .bind(i64::from(r.late))
    .bind(r.consistency.map(Consistency::as_str))
    .bind(&r.job)
    .bind(int(r.bytes))
    .bind(int(r.pruned))
    .bind(&r.error)
    .bind(&r.warning)
    .bind(&r.id)
    .execute(c)
    .await?;
    Ok(())
}

/// Runs of a schedule (None: of every schedule) in `state` (None: any), oldest first; at
/// most `limit`, the newest ones.
pub async fn list_runs(
    c: &mut Conn,
    schedule: Option<&str>,
    state: Option<RunState>,
    limit: i64,
) -> Result<Vec<Run>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM (SELECT * FROM schedule_runs WHERE ($1 IS NULL OR schedule_id = $1) \
         AND ($2 IS NULL OR state = $2) ORDER BY due_at DESC, id DESC LIMIT $3) AS newest ORDER BY due_at, id",
    )
    .bind(schedule)
    .bind(state.map(RunState::as_str))
    .bind(limit)
    .fetch_all(c)
    .await?;
    all(rows, run_of)
}

/// How many runs ended in each state, for metrics.
pub async fn count_runs(c: &mut Conn) -> Result<Vec<(String, u64)>, Error> {
    let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM schedule_runs GROUP BY state ORDER BY state")
        .fetch_all(c)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("state")?, u64_of(r, "n")?))).collect()
}

// ---- idempotency keys ----

/// A stored answer to a creating call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub fingerprint: String,
    pub status: u16,
    pub body: String,
}

pub async fn find_answer(
    c: &mut Conn,
    tenant: &str,
    key: &str,
    not_before: &str,
) -> Result<Option<StoredAnswer>, Error> {
    let row = sqlx::query(
        "SELECT fingerprint, status, body FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND created_at >= $3",
    )
    .bind(tenant)
    .bind(key)
    .bind(not_before)
    .fetch_optional(c)
    .await?;
    row.map(|r| {
        Ok(StoredAnswer {
            fingerprint: r.try_get("fingerprint")?,
            status: u16::try_from(r.try_get::<i64, _>("status")?).map_err(|_| corrupt("status", "?"))?,
            body: r.try_get("body")?,
        })
    })
    .transpose()
}

/// Stores an answer, replacing an expired one under the same key.
pub async fn store_answer(c: &mut Conn, tenant: &str, key: &str, answer: &StoredAnswer) -> Result<(), Error> {
    sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2")
        .bind(tenant)
        .bind(key)
        .execute(&mut *c)
        .await?;
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, status, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant)
    .bind(key)
    .bind(&answer.fingerprint)
    .bind(i64::from(answer.status))
    .bind(&answer.body)
    .bind(crate::now())
    .execute(c)
    .await?;
    Ok(())
}

pub async fn forget_answers_before(c: &mut Conn, not_before: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1").bind(not_before).execute(c).await?;
    Ok(())
}

// ---- meter segments ----

fn segment_of(row: &SqliteRow) -> Result<Segment, Error> {
    let kind: String = row.try_get("kind")?;
    Ok(Segment {
        kind: MeteredKind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
        resource: row.try_get("resource_id")?,
        name: row.try_get("name")?,
        tenant: row.try_get("tenant_id")?,
        vm: row.try_get("vm_id")?,
        group: row.try_get("group_id")?,
        bytes: u64_of(row, "bytes")?,
        start_ms: row.try_get("start_ms")?,
        end_ms: row.try_get("end_ms")?,
    })
}

/// The open segments (what is metered now), of one tenant or all.
pub async fn open_segments(c: &mut Conn, tenant: Option<&str>) -> Result<Vec<Segment>, Error> {
    let rows = sqlx::query("SELECT * FROM meter_segments WHERE end_ms IS NULL AND ($1 IS NULL OR tenant_id = $1)")
        .bind(tenant)
        .fetch_all(c)
        .await?;
    all(rows, segment_of)
}

/// The segments that overlap `[from_ms, to_ms)`, of one tenant or all, in time order per resource.
pub async fn segments_between(
    c: &mut Conn,
    tenant: Option<&str>,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Segment>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM meter_segments WHERE start_ms < $1 AND (end_ms IS NULL OR end_ms > $2) \
         AND ($3 IS NULL OR tenant_id = $3) ORDER BY resource_id, start_ms",
    )
    .bind(to_ms)
    .bind(from_ms)
    .bind(tenant)
    .fetch_all(c)
    .await?;
    all(rows, segment_of)
}

/// Ends a resource's open segment at `at_ms`. One opened at that same instant is removed
/// instead: it never held anything.
pub async fn close_segment(c: &mut Conn, resource: &str, at_ms: i64) -> Result<(), Error> {
    sqlx::query("DELETE FROM meter_segments WHERE resource_id = $1 AND end_ms IS NULL AND start_ms >= $2")
        .bind(resource)
        .bind(at_ms)
        .execute(&mut *c)
        .await?;
    sqlx::query("UPDATE meter_segments SET end_ms = $1 WHERE resource_id = $2 AND end_ms IS NULL")
        .bind(at_ms)
        .bind(resource)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Opens a segment (its start and bytes; `end_ms` is ignored).
pub async fn open_segment(c: &mut Conn, s: &Segment) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO meter_segments (resource_id, start_ms, end_ms, tenant_id, kind, name, vm_id, group_id, bytes) \
         VALUES ($1, $2, NULL, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (resource_id, start_ms) DO UPDATE SET bytes = excluded.bytes, end_ms = NULL",
    )
    .bind(&s.resource)
    .bind(s.start_ms)
    .bind(&s.tenant)
    .bind(s.kind.as_str())
    .bind(&s.name)
    .bind(&s.vm)
    .bind(&s.group)
    .bind(int(s.bytes))
    .execute(c)
    .await?;
    Ok(())
}

pub async fn tenant_quota(c: &mut Conn, tenant: &str) -> Result<Option<Quota>, Error> {
    let text: Option<String> =
        sqlx::query_scalar("SELECT quota FROM tenants WHERE id = $1").bind(tenant).fetch_optional(c).await?.flatten();
    text.map(|t| serde_json::from_str(&t).map_err(|_| corrupt("quota", &t))).transpose()
}

pub async fn set_tenant_quota(c: &mut Conn, tenant: &str, quota: Option<&Quota>) -> Result<(), Error> {
    let text = quota.map(|q| serde_json::to_string(q).expect("a quota serialises"));
    sqlx::query("UPDATE tenants SET quota = $1 WHERE id = $2").bind(text).bind(tenant).execute(c).await?;
    Ok(())
}

/// Replaces what each tenant takes in the backup repository with a gc's count.
pub async fn set_repository_usage(c: &mut Conn, by_tenant: &[(String, u64)], measured_at: &str) -> Result<(), Error> {
    sqlx::query("DELETE FROM repository_usage").execute(&mut *c).await?;
    for (tenant, bytes) in by_tenant {
        sqlx::query("INSERT INTO repository_usage (tenant_id, bytes, measured_at) VALUES ($1, $2, $3)")
            .bind(tenant)
            .bind(int(*bytes))
            .bind(measured_at)
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// Each tenant's bytes in the backup repository and when they were counted, of one tenant or all.
pub async fn repository_usage(c: &mut Conn, tenant: Option<&str>) -> Result<Vec<(String, u64, String)>, Error> {
    let rows = sqlx::query("SELECT * FROM repository_usage WHERE $1 IS NULL OR tenant_id = $1 ORDER BY tenant_id")
        .bind(tenant)
        .fetch_all(c)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("tenant_id")?, u64_of(r, "bytes")?, r.try_get("measured_at")?))).collect()
}

/// One backup's share of the repository as a gc counted it.
#[derive(Debug)]
pub struct BackupShare {
    pub record: String,
    pub exclusive: u64,
    pub shared: u64,
    /// None from a gc that did not count it: the backup is then billed on its added bytes.
    pub attributed: Option<u64>,
}

pub async fn set_backup_shares(c: &mut Conn, shares: &[BackupShare]) -> Result<(), Error> {
    for share in shares {
        sqlx::query(
            "UPDATE backups SET exclusive_bytes = $1, shared_bytes = $2, attributed_bytes = $3 WHERE record_id = $4",
        )
        .bind(int(share.exclusive))
        .bind(int(share.shared))
        .bind(share.attributed.map(int))
        .bind(&share.record)
        .execute(&mut *c)
        .await?;
    }
    Ok(())
}
