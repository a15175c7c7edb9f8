//! Metering and quotas (R10) on the control plane: the meter follows the metadata, and usage
//! and quotas are read from it. The arithmetic is in [`crate::metering`].

use std::collections::{HashMap, HashSet};

use jiff::Timestamp;
use serde::Serialize;

use super::Control;
use crate::db;
use crate::metering::{self, CostPreview, Holding, LineItem, MeteredKind, Prices, Quota, Segment, Totals};
use crate::model::*;
use crate::Error;
use cairn_volume::SnapshotId;

/// Usage over a period: a line per resource and the totals.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub from: String,
    pub to: String,
    /// Per GiB-month, in the currency's units.
    pub prices: HashMap<MeteredKind, String>,
    pub free_backups_per_vm: u32,
    pub items: Vec<LineItem>,
    pub totals: Totals,
    /// Per tenant, what its backups take in the backup repository after dedup and compression,
    /// as the latest gc counted it (none before the first gc).
    pub repository: Vec<RepositoryUsage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepositoryUsage {
    pub tenant: String,
    pub bytes: u64,
    pub measured_at: String,
}

impl Control {
    pub fn prices(&self) -> &Prices {
        &self.settings.prices
    }

    /// Brings the meter in line with what exists now: a resource that appeared opens a
    /// segment, one that went closes its own, one whose billed bytes changed does both. Every
    /// change calls this when it is done, so the meter is at most one change behind; reading
    /// usage or judging a quota calls it first, so they never see a stale meter.
    pub async fn sync_meters(&self) -> Result<(), Error> {
        let _meter = self.meter_lock.lock().await;
        let at = self.clock_now().as_millisecond();
        let mut c = self.meta.conn().await?;
        let open: HashMap<String, Segment> =
            db::open_segments(&mut c, None).await?.into_iter().map(|s| (s.resource.clone(), s)).collect();
        let mut wanted = Vec::new();
        let segment = |kind, resource: &str, name: &str, tenant: &str, bytes| Segment {
            kind,
            resource: resource.to_string(),
            name: name.to_string(),
            tenant: tenant.to_string(),
            vm: None,
            group: None,
            bytes,
            start_ms: at,
            end_ms: None,
        };
        // A volume's line names the VM it is attached to: a stopped VM's disks bill too.
        for v in db::list_volumes(&mut c, None, None).await? {
            wanted
                .push(Segment { vm: v.vm.clone(), ..segment(MeteredKind::Volume, &v.id, &v.name, &v.tenant, v.size) });
        }
        for t in db::list_templates(&mut c, None).await? {
            wanted.push(segment(MeteredKind::Template, &t.id, &t.name, &t.tenant, t.size));
        }
        for b in db::list_backups(&mut c, None, None, None).await? {
            let name = format!("{}@{}", b.volume_name, b.created_at);
            wanted.push(Segment {
                vm: b.vm.clone(),
                group: b.group.clone(),
                ..segment(MeteredKind::Backup, &b.id, &name, &b.tenant, b.billed_bytes())
            });
        }
        // A snapshot's layer is frozen: measured when it first shows up, and again only when
        // a deleted snapshot's data moves up into it.
        let remeasure = std::mem::take(&mut *self.meter_remeasure.lock().expect("meter lock"));
        let snapshots = db::list_snapshots(&mut c, None, None, None).await?;
        let (metered, measure): (Vec<Snapshot>, Vec<Snapshot>) =
            snapshots.into_iter().partition(|s| open.contains_key(&s.id) && !remeasure.contains(&s.id));
        for s in metered {
            let bytes = open[&s.id].bytes;
            wanted.push(segment(MeteredKind::Snapshot, &s.id, &s.name, &s.tenant, bytes));
        }
        for view in self.snapshot_views(measure)? {
            let s = &view.snapshot;
            wanted.push(segment(MeteredKind::Snapshot, &s.id, &s.name, &s.tenant, view.stored_bytes));
        }
        drop(c);
        let changes: Vec<&Segment> = wanted
            .iter()
            .filter(|w| open.get(&w.resource).is_none_or(|o| (o.bytes, &o.vm) != (w.bytes, &w.vm)))
            .collect();
        let wanted_ids: std::collections::HashSet<&str> = wanted.iter().map(|w| w.resource.as_str()).collect();
        let gone: Vec<&str> = open.keys().map(String::as_str).filter(|id| !wanted_ids.contains(id)).collect();
        if changes.is_empty() && gone.is_empty() {
            return Ok(());
        }
        let mut tx = self.meta.begin().await?;
        for id in gone {
            db::close_segment(&mut tx, id, at).await?;
        }
        for s in changes {
            db::close_segment(&mut tx, &s.resource, at).await?;
            db::open_segment(&mut tx, s).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Usage from `from` to `to`: the caller's own, or (the administrator) every tenant's or
    /// the one named.
    /// `from` and `to` are RFC 3339 instants or dates (midnight UTC); by default the current
    /// month so far.
    pub async fn usage(
        &self,
        caller: &Tenant,
        tenant: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Usage, Error> {
        let now = self.clock_now();
        let to = to.map(|t| instant("to", t)).transpose()?.unwrap_or(now);
        let from = match from {
            Some(text) => instant("from", text)?,
            None => {
                let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
                today
                    .first_of_month()
                    .to_zoned(jiff::tz::TimeZone::UTC)
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .timestamp()
            }
        };
        if from > to {
            return Err(Error::invalid("from", "`from` must not be after `to`"));
        }
        self.sync_meters().await?;
        let mut c = self.meta.conn().await?;
        let scope = match (caller.admin, tenant) {
            (true, None) => None,
            (true, Some(name)) => Some(self.tenant_named(&mut c, name).await?.id),
            (false, None) => Some(caller.id.clone()),
            (false, Some(name)) if name == caller.name || name == caller.id => Some(caller.id.clone()),
            (false, Some(_)) => {
                return Err(Error::Forbidden("only the administrator sees other tenants' usage".into()))
            }
        };
        let segments =
            db::segments_between(&mut c, scope.as_deref(), from.as_millisecond(), to.as_millisecond()).await?;
        let mut items = metering::line_items(&segments, from.as_millisecond(), to.as_millisecond(), self.prices());
        let names: HashMap<String, String> =
            db::list_tenants(&mut c).await?.into_iter().map(|t| (t.id, t.name)).collect();
        for item in &mut items {
            if let Some(name) = names.get(&item.tenant) {
                item.tenant = name.clone();
            }
        }
        let totals = metering::totals(&items);
        let repository = db::repository_usage(&mut c, scope.as_deref())
            .await?
            .into_iter()
            .map(|(tenant, bytes, measured_at)| RepositoryUsage {
                tenant: names.get(&tenant).cloned().unwrap_or(tenant),
                bytes,
                measured_at,
            })
            .collect();
        Ok(Usage {
            from: crate::clock::stamp(from),
            to: crate::clock::stamp(to),
            prices: self.prices().per_gib_month.iter().map(|(k, p)| (*k, p.to_string())).collect(),
            free_backups_per_vm: self.prices().free_backups_per_vm,
            items,
            totals,
            repository,
        })
    }

    /// What deleting `doomed` (resource ids) would free and do to the tenant's monthly bill;
    /// read in the caller's transaction, with the meter as the last change left it.
    pub(super) async fn cost_preview(
        &self,
        c: &mut db::Conn,
        tenant: &str,
        doomed: &[&str],
        frees_bytes: u64,
    ) -> Result<CostPreview, Error> {
        let open = db::open_segments(c, Some(tenant)).await?;
        let before = metering::monthly_cost(&open, self.prices(), &HashSet::new());
        let after = metering::monthly_cost(&open, self.prices(), &doomed.iter().copied().collect());
        Ok(CostPreview {
            frees_bytes,
            monthly_cost_before: metering::money(before),
            monthly_cost_after: metering::money(after),
        })
    }

    /// What deleting a snapshot would free and cost, without deleting it.
    pub async fn preview_snapshot_delete(&self, t: &Tenant, reference: &str) -> Result<CostPreview, Error> {
        let mut c = self.meta.conn().await?;
        let snapshot = self.snapshot(&mut c, t, reference).await?;
        let frees = self.freed_by_deleting_snapshots(&[snapshot.id.as_str()])?;
        self.cost_preview(&mut c, &t.id, &[snapshot.id.as_str()], frees).await
    }

    /// What deleting these snapshots together frees in the volume store, once merged: not the
    /// sum of their exclusive bytes, since a block the next one overwrote is freed only when
    /// both go.
    pub(super) fn freed_by_deleting_snapshots(&self, ids: &[&str]) -> Result<u64, Error> {
        let known = self.engine_snapshot_ids();
        let engine: Vec<SnapshotId> = ids
            .iter()
            .map(|id| known.get(*id).copied().ok_or_else(|| super::missing_from_engine(id)))
            .collect::<Result<_, _>>()?;
        Ok(self.engine.freed_by_deleting(&engine, &[])?)
    }

    async fn tenant_named(&self, c: &mut db::Conn, reference: &str) -> Result<Tenant, Error> {
        match db::tenant_by_name(c, reference).await? {
            Some(t) => Ok(t),
            None => db::tenant_by_id(c, reference).await?.ok_or_else(|| Error::not_found("tenant", reference)),
        }
    }

    /// Sets (or with None lifts) a tenant's quota; the administrator's task.
    pub async fn set_quota(&self, caller: &Tenant, tenant: &str, quota: Option<Quota>) -> Result<QuotaView, Error> {
        Self::require_admin(caller)?;
        let mut c = self.meta.conn().await?;
        let target = self.tenant_named(&mut c, tenant).await?;
        db::set_tenant_quota(&mut c, &target.id, quota.as_ref()).await?;
        drop(c);
        self.quota_of(caller, tenant).await
    }

    /// A tenant's quota and what it holds now.
    pub async fn quota_of(&self, caller: &Tenant, tenant: &str) -> Result<QuotaView, Error> {
        let mut c = self.meta.conn().await?;
        let target = self.tenant_named(&mut c, tenant).await?;
        if !caller.admin && target.id != caller.id {
            return Err(Error::not_found("tenant", tenant));
        }
        drop(c);
        self.sync_meters().await?;
        let mut c = self.meta.conn().await?;
        let quota = db::tenant_quota(&mut c, &target.id).await?.unwrap_or_default();
        let holding = Holding::of(&db::open_segments(&mut c, Some(&target.id)).await?);
        Ok(QuotaView { tenant: target.name, quota, holding })
    }

    /// Refuses, before any work, a request that would take the tenant over its quota. Called
    /// in the request's own transaction, under the lock that orders changes, so two requests
    /// can not both squeeze under a limit; the meter is as the last change left it.
    pub(super) async fn check_quota(&self, c: &mut db::Conn, tenant: &Tenant, adding: Holding) -> Result<(), Error> {
        let Some(quota) = db::tenant_quota(c, &tenant.id).await? else { return Ok(()) };
        let holding = Holding::of(&db::open_segments(c, Some(&tenant.id)).await?);
        quota.admits(&holding, &adding).map_err(|why| Error::QuotaExceeded(format!("tenant {}: {why}", tenant.name)))
    }
}

/// An instant as RFC 3339 ("2026-11-01T00:00:00Z") or a date ("2026-11-01", midnight UTC).
fn instant(field: &'static str, text: &str) -> Result<Timestamp, Error> {
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(at);
    }
    let date: jiff::civil::Date = text
        .parse()
        .map_err(|_| Error::invalid(field, format!("{text:?} is not an RFC 3339 instant or a YYYY-MM-DD date")))?;
    date.to_zoned(jiff::tz::TimeZone::UTC).map(|z| z.timestamp()).map_err(|e| Error::invalid(field, e.to_string()))
}

/// A tenant's quota next to what it holds.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaView {
    pub tenant: String,
    pub quota: Quota,
    pub holding: Holding,
}
