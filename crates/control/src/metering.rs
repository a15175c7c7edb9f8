//! Metering (R10): what each resource stores, integrated over time into GiB-hours and priced.
//!
//! Every change of a resource's billed bytes closes its open meter segment and opens a new
//! one, in the transaction that makes the change, so the record is a step function with no
//! gaps and no overlaps whatever the daemon's restarts: data stored while the daemon was down
//! is billed, and nothing is sampled twice. This module is the arithmetic over those segments;
//! `db` keeps them.
//!
//! Units: a GiB is 2^30 bytes, a month 730 hours (the cloud price-sheet convention). Usage is
//! kept exactly as byte-milliseconds; money as integer micro-units (a millionth of the
//! currency), rounded once per line item.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub const GIB: u128 = 1 << 30;
pub const HOUR_MS: u128 = 3_600_000;
pub const MONTH_HOURS: u128 = 730;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PriceError(String);

/// What is metered; each has its own price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeteredKind {
    /// Billed on its provisioned size, attached or not, its VM running or stopped.
    Volume,
    /// Billed on the data its own layer holds: what changed since the snapshot before it.
    Snapshot,
    /// Billed on its size.
    Template,
    /// Billed on the bytes it added to the repository after dedup and compression.
    Backup,
}

impl MeteredKind {
    pub const ALL: [MeteredKind; 4] =
        [MeteredKind::Volume, MeteredKind::Snapshot, MeteredKind::Template, MeteredKind::Backup];

    pub fn as_str(self) -> &'static str {
        match self {
            MeteredKind::Volume => "volume",
            MeteredKind::Snapshot => "snapshot",
            MeteredKind::Template => "template",
            MeteredKind::Backup => "backup",
        }
    }

    pub fn parse(text: &str) -> Option<MeteredKind> {
        MeteredKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One step of a resource's meter: `bytes` from `start_ms` until `end_ms` (None: still open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub kind: MeteredKind,
    pub resource: String,
    pub name: String,
    pub tenant: String,
    /// The VM a backup was taken of: its first backups are free.
    pub vm: Option<String>,
    /// Backups of a VM's disks taken at one instant are one restore point.
    pub group: Option<String>,
    pub bytes: u64,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
}

/// A price per GiB-month in micro-units of the currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price(pub u64);

impl std::str::FromStr for Price {
    type Err = PriceError;

    /// A decimal with at most six places: "0.05", "0.023", "1".
    fn from_str(text: &str) -> Result<Price, PriceError> {
        let bad = || PriceError(format!("price {text:?}: give a decimal such as 0.05 (at most 6 places)"));
        let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
        if whole.is_empty() && fraction.is_empty()
            || fraction.len() > 6
            || !whole.chars().chain(fraction.chars()).all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
        let fraction: u64 = format!("{fraction:0<6}").parse().map_err(|_| bad())?;
        whole.checked_mul(1_000_000).and_then(|w| w.checked_add(fraction)).map(Price).ok_or_else(bad)
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", money(self.0))
    }
}

/// Micro-units as a decimal with six places.
pub fn money(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// The price list: per GiB-month for each kind, and how many restore points of each VM are
/// free (R10: the first 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prices {
    pub per_gib_month: BTreeMap<MeteredKind, Price>,
    pub free_backups_per_vm: u32,
}

impl Default for Prices {
    fn default() -> Prices {
        // A public cloud's list prices, in the currency's units: block storage 0.08,
        // snapshots and images 0.05, backups 0.05 per GiB-month.
        let per_gib_month = BTreeMap::from([
            (MeteredKind::Volume, Price(80_000)),
            (MeteredKind::Snapshot, Price(50_000)),
            (MeteredKind::Template, Price(50_000)),
            (MeteredKind::Backup, Price(50_000)),
        ]);
        Prices { per_gib_month, free_backups_per_vm: 3 }
    }
}

impl Prices {
    fn of(&self, kind: MeteredKind) -> u64 {
        self.per_gib_month.get(&kind).map_or(0, |p| p.0)
    }

    /// What `byte_ms` of `kind` costs, in micro-units, rounded to the nearest.
    pub fn cost(&self, kind: MeteredKind, byte_ms: u128) -> u64 {
        let divisor = GIB * HOUR_MS * MONTH_HOURS;
        let micros = (byte_ms * u128::from(self.of(kind)) + divisor / 2) / divisor;
        u64::try_from(micros).unwrap_or(u64::MAX)
    }

    /// What `bytes` of `kind` stored for a whole month cost, in micro-units.
    pub fn monthly(&self, kind: MeteredKind, bytes: u64) -> u64 {
        self.cost(kind, u128::from(bytes) * HOUR_MS * MONTH_HOURS)
    }
}

/// One resource's usage over a period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineItem {
    pub tenant: String,
    pub kind: MeteredKind,
    pub resource: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// What it stores at the period's end (or stored when it went).
    pub bytes: u64,
    /// Byte-milliseconds billed and free: exact, and what the cost is worked from. Not in
    /// answers: a month of a large disk passes what JSON readers take as an integer.
    #[serde(skip)]
    pub byte_ms: u128,
    #[serde(skip)]
    pub free_byte_ms: u128,
    pub gib_hours: f64,
    pub free_gib_hours: f64,
    pub cost_micros: u64,
}

/// The usage of every resource with a segment in `[from_ms, to_ms)`, one line each, ordered by
/// tenant, kind and resource.
pub fn line_items(segments: &[Segment], from_ms: i64, to_ms: i64, prices: &Prices) -> Vec<LineItem> {
    let free = free_intervals(segments, prices.free_backups_per_vm);
    let mut items: BTreeMap<(String, MeteredKind, String), LineItem> = BTreeMap::new();
    for s in segments {
        let (start, end) = (s.start_ms.max(from_ms), s.end_ms.unwrap_or(to_ms).min(to_ms));
        if start >= end {
            continue;
        }
        let span = u128::try_from(end.saturating_sub(start)).unwrap_or(0);
        let free_ms: u128 = free
            .get(&s.resource)
            .into_iter()
            .flatten()
            .map(|&(a, b)| u128::try_from(b.min(end).saturating_sub(a.max(start))).unwrap_or(0))
            .sum();
        let free_ms = free_ms.min(span);
        let key = (s.tenant.clone(), s.kind, s.resource.clone());
        let item = items.entry(key).or_insert_with(|| LineItem {
            tenant: s.tenant.clone(),
            kind: s.kind,
            resource: s.resource.clone(),
            name: s.name.clone(),
            vm: s.vm.clone(),
            bytes: s.bytes,
            byte_ms: 0,
            free_byte_ms: 0,
            gib_hours: 0.0,
            free_gib_hours: 0.0,
            cost_micros: 0,
        });
        // Segments come in time order per resource: the last one seen is the latest state.
        item.bytes = s.bytes;
        item.name = s.name.clone();
        item.vm = s.vm.clone();
        item.byte_ms += u128::from(s.bytes) * (span - free_ms);
        item.free_byte_ms += u128::from(s.bytes) * free_ms;
    }
    let mut out: Vec<LineItem> = items.into_values().collect();
    for item in &mut out {
        item.gib_hours = gib_hours(item.byte_ms);
        item.free_gib_hours = gib_hours(item.free_byte_ms);
        item.cost_micros = prices.cost(item.kind, item.byte_ms);
    }
    out
}

pub fn gib_hours(byte_ms: u128) -> f64 {
    byte_ms as f64 / (GIB * HOUR_MS) as f64
}

/// Per backup, the intervals in which it is free: while its restore point is one of the
/// oldest `free_per_vm` of its VM that exist. A free restore point stays free until it goes;
/// when one goes, the next oldest becomes free.
fn free_intervals(segments: &[Segment], free_per_vm: u32) -> BTreeMap<String, Vec<(i64, i64)>> {
    // Per VM, per restore point: its life, from its first disk's start to its last disk's
    // end, and its disks' backups.
    type Life<'a> = (i64, i64, Vec<&'a str>);
    let mut points: BTreeMap<&str, BTreeMap<&str, Life>> = BTreeMap::new();
    for s in segments.iter().filter(|s| s.kind == MeteredKind::Backup) {
        let Some(vm) = s.vm.as_deref() else { continue };
        let point = s.group.as_deref().unwrap_or(&s.resource);
        let entry = points.entry(vm).or_default().entry(point).or_insert((s.start_ms, i64::MIN, Vec::new()));
        entry.0 = entry.0.min(s.start_ms);
        entry.1 = entry.1.max(s.end_ms.unwrap_or(i64::MAX));
        if !entry.2.contains(&s.resource.as_str()) {
            entry.2.push(&s.resource);
        }
    }
    let mut free: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for of_vm in points.values() {
        let mut times: Vec<i64> = of_vm.values().flat_map(|(a, b, _)| [*a, *b]).collect();
        times.sort_unstable();
        times.dedup();
        for window in times.windows(2) {
            let (a, b) = (window[0], window[1]);
            let mut alive: Vec<(i64, &str, &Vec<&str>)> = of_vm
                .iter()
                .filter(|(_, (start, end, _))| *start <= a && *end >= b)
                .map(|(point, (start, _, backups))| (*start, *point, backups))
                .collect();
            alive.sort_unstable();
            for (_, _, backups) in alive.into_iter().take(free_per_vm as usize) {
                for backup in backups.iter() {
                    let intervals = free.entry(backup.to_string()).or_default();
                    match intervals.last_mut() {
                        Some(last) if last.1 == a => last.1 = b,
                        _ => intervals.push((a, b)),
                    }
                }
            }
        }
    }
    free
}

/// How a refusal by quota begins, so a failed scheduled run can be told apart in the status.
pub const OVER_QUOTA: &str = "over quota";

/// What stored resources cost for a month at their present sizes: each open segment held
/// for the month, free restore points as the rule has them. `without` leaves resources out,
/// so a deletion's effect on the bill is this with and without them.
pub fn monthly_cost(open: &[Segment], prices: &Prices, without: &std::collections::HashSet<&str>) -> u64 {
    let month_ms = (MONTH_HOURS * HOUR_MS) as i64;
    // The month after the newest start: every open segment covers all of it, and the free
    // rule still sees which restore points are oldest.
    let from = open.iter().map(|s| s.start_ms).max().unwrap_or(0);
    let held: Vec<Segment> = open
        .iter()
        .filter(|s| !without.contains(s.resource.as_str()))
        .map(|s| Segment { end_ms: None, ..s.clone() })
        .collect();
    line_items(&held, from, from + month_ms, prices).iter().map(|i| i.cost_micros).sum()
}

/// What a deletion would free and do to the monthly bill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CostPreview {
    /// Bytes it frees on disk (snapshots: their exclusive bytes) or in the repository
    /// (backups: the bytes they added).
    pub frees_bytes: u64,
    /// The tenant's storage for a month at present sizes, before and after, in currency units.
    pub monthly_cost_before: String,
    pub monthly_cost_after: String,
}

/// A tenant's limits (R10: a stopped VM's disks count too); None: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Billed bytes of every volume, snapshot, template and backup together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_volumes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backups: Option<u64>,
}

/// What a tenant holds, or what a request would add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Holding {
    pub bytes: u64,
    pub volumes: u64,
    pub snapshots: u64,
    pub backups: u64,
}

impl Holding {
    /// What the open segments say a tenant holds now.
    pub fn of(open: &[Segment]) -> Holding {
        let mut h = Holding::default();
        for s in open {
            h.bytes += s.bytes;
            match s.kind {
                MeteredKind::Volume => h.volumes += 1,
                MeteredKind::Snapshot => h.snapshots += 1,
                MeteredKind::Backup => h.backups += 1,
                MeteredKind::Template => {}
            }
        }
        h
    }
}

impl Quota {
    /// Refuses a request that would take the tenant over a limit, saying which. Only what the
    /// request adds is judged: a tenant already over (its quota lowered) may still delete.
    pub fn admits(&self, now: &Holding, adding: &Holding) -> Result<(), String> {
        let limits = [
            ("bytes", self.max_bytes, now.bytes, adding.bytes),
            ("volumes", self.max_volumes, now.volumes, adding.volumes),
            ("snapshots", self.max_snapshots, now.snapshots, adding.snapshots),
            ("backups", self.max_backups, now.backups, adding.backups),
        ];
        for (what, limit, held, more) in limits {
            if let Some(limit) = limit {
                if more > 0 && held.saturating_add(more) > limit {
                    return Err(format!(
                        "{OVER_QUOTA}: this needs {more} more {what} on top of the {held} held, and the quota is {limit}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Totals per kind and overall, for a set of line items.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub gib_hours: f64,
    pub free_gib_hours: f64,
    pub cost_micros: u64,
    pub by_kind: BTreeMap<MeteredKind, KindTotal>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KindTotal {
    pub resources: u64,
    pub bytes: u64,
    pub gib_hours: f64,
    pub free_gib_hours: f64,
    pub cost_micros: u64,
}

pub fn totals(items: &[LineItem]) -> Totals {
    let mut totals = Totals::default();
    let (mut billed, mut free) = (0u128, 0u128);
    let mut per_kind: BTreeMap<MeteredKind, (u128, u128)> = BTreeMap::new();
    for item in items {
        billed += item.byte_ms;
        free += item.free_byte_ms;
        let sums = per_kind.entry(item.kind).or_default();
        sums.0 += item.byte_ms;
        sums.1 += item.free_byte_ms;
        let kind = totals.by_kind.entry(item.kind).or_default();
        kind.resources += 1;
        kind.bytes += item.bytes;
        kind.cost_micros += item.cost_micros;
        totals.cost_micros += item.cost_micros;
    }
    for (kind, (b, f)) in per_kind {
        let total = totals.by_kind.entry(kind).or_default();
        total.gib_hours = gib_hours(b);
        total.free_gib_hours = gib_hours(f);
    }
    totals.gib_hours = gib_hours(billed);
    totals.free_gib_hours = gib_hours(free);
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn segment(kind: MeteredKind, resource: &str, bytes: u64, start_ms: i64, end_ms: Option<i64>) -> Segment {
        Segment {
            kind,
            resource: resource.into(),
            name: resource.into(),
            tenant: "t".into(),
            vm: None,
            group: None,
            bytes,
            start_ms,
            end_ms,
        }
    }

    fn backup(resource: &str, vm: &str, group: &str, start_h: i64, end_h: Option<i64>) -> Segment {
        Segment {
            vm: Some(vm.into()),
            group: Some(group.into()),
            ..segment(MeteredKind::Backup, resource, GIB as u64, start_h * H, end_h.map(|e| e * H))
        }
    }

    #[test]
    fn prices_parse_as_exact_decimals() {
        assert_eq!("0.05".parse(), Ok(Price(50_000)));
        assert_eq!("1".parse(), Ok(Price(1_000_000)));
        assert_eq!(".5".parse(), Ok(Price(500_000)));
        assert_eq!("0.000001".parse(), Ok(Price(1)));
        for bad in ["", ".", "-1", "0.0000001", "1e3", "abc", "1.2.3"] {
            assert!(bad.parse::<Price>().is_err(), "{bad:?}");
        }
        assert_eq!(Price(50_000).to_string(), "0.050000");
    }

    #[test]
    fn a_month_of_a_gib_costs_the_monthly_price() {
        let prices = Prices::default();
        assert_eq!(prices.monthly(MeteredKind::Volume, GIB as u64), 80_000);
        assert_eq!(prices.monthly(MeteredKind::Backup, 10 * GIB as u64), 500_000);
    }

    #[test]
    fn usage_is_clipped_to_the_period_and_counted_exactly() {
        // 1 GiB volume from 00:30 to 02:15 grown to 2 GiB at 01:00; period 01:00 to 03:00.
        let segments = [
            segment(MeteredKind::Volume, "vol", GIB as u64, H / 2, Some(H)),
            segment(MeteredKind::Volume, "vol", 2 * GIB as u64, H, Some(2 * H + H / 4)),
            segment(MeteredKind::Snapshot, "snap", GIB as u64 / 4, 0, None),
        ];
        let items = line_items(&segments, H, 3 * H, &Prices::default());
        assert_eq!(items.len(), 2);
        let volume = items.iter().find(|i| i.resource == "vol").unwrap();
        assert_eq!(volume.byte_ms, 2 * GIB * (H as u128 + H as u128 / 4));
        assert_eq!(volume.gib_hours, 2.5);
        assert_eq!(volume.bytes, 2 * GIB as u64);
        let snapshot = items.iter().find(|i| i.resource == "snap").unwrap();
        assert_eq!(snapshot.gib_hours, 0.5, "a quarter GiB for the two hours");
        let totals = totals(&items);
        assert_eq!(totals.gib_hours, 3.0);
        assert_eq!(totals.by_kind[&MeteredKind::Volume].resources, 1);
    }

    #[test]
    fn the_first_three_restore_points_of_a_vm_are_free_until_they_go() {
        // Restore points p1..p5 of vm1 made at hours 0..4, two disks each; p1 goes at hour 6.
        let mut segments = Vec::new();
        for (n, start) in (1..=5).zip(0..) {
            let end = (n == 1).then_some(6);
            segments.push(backup(&format!("b{n}-root"), "vm1", &format!("p{n}"), start, end));
            segments.push(backup(&format!("b{n}-data"), "vm1", &format!("p{n}"), start, end));
        }
        // Another VM's backup is not counted against vm1's free ones.
        segments.push(backup("other", "vm2", "q1", 0, None));
        let items = line_items(&segments, 0, 10 * H, &Prices::default());
        let hours = |name: &str| {
            let item = items.iter().find(|i| i.resource == name).unwrap();
            (item.gib_hours, item.free_gib_hours)
        };
        assert_eq!(hours("b1-root"), (0.0, 6.0));
        assert_eq!(hours("b2-data"), (0.0, 9.0));
        assert_eq!(hours("b3-root"), (0.0, 8.0));
        // p4 was billed from hour 3 until p1 went at 6, then free.
        assert_eq!(hours("b4-root"), (3.0, 4.0));
        assert_eq!(hours("b5-data"), (6.0, 0.0));
        assert_eq!(hours("other"), (0.0, 10.0));
        let cost: u64 = items.iter().map(|i| i.cost_micros).sum();
        assert_eq!(cost, totals(&items).cost_micros);
    }

    #[test]
    fn a_quota_refuses_only_what_would_go_over_it() {
        let quota = Quota { max_bytes: Some(10), max_volumes: Some(2), ..Default::default() };
        let held = Holding { bytes: 8, volumes: 2, snapshots: 50, backups: 0 };
        assert!(quota.admits(&held, &Holding { bytes: 2, ..Default::default() }).is_ok());
        let refused = quota.admits(&held, &Holding { bytes: 3, ..Default::default() }).unwrap_err();
        assert!(refused.contains("3 more bytes") && refused.contains("quota is 10"), "{refused}");
        assert!(quota.admits(&held, &Holding { volumes: 1, ..Default::default() }).is_err());
        assert!(quota.admits(&held, &Holding { snapshots: 1, ..Default::default() }).is_ok(), "no snapshot limit");
        let over = Holding { bytes: 20, ..held };
        assert!(quota.admits(&over, &Holding::default()).is_ok(), "adding nothing is always admitted");
    }

    #[test]
    fn a_deletion_preview_takes_the_free_rule_into_account() {
        let prices = Prices { free_backups_per_vm: 1, ..Prices::default() };
        // Named so that their ids sort the other way from their age.
        let open = [backup("old", "vm1", "p9", 0, None), backup("new", "vm1", "p1", 1, None)];
        let none = std::collections::HashSet::new();
        // One of the two is free: a month of 1 GiB at 0.05.
        assert_eq!(monthly_cost(&open, &prices, &none), 50_000);
        // Deleting the free one makes the other free: the bill drops to nothing.
        assert_eq!(monthly_cost(&open, &prices, &["old"].into()), 0);
    }

    #[test]
    fn backups_of_volumes_without_a_vm_are_never_free() {
        let segments = [segment(MeteredKind::Backup, "b", GIB as u64, 0, None)];
        let items = line_items(&segments, 0, H, &Prices::default());
        assert_eq!((items[0].gib_hours, items[0].free_gib_hours), (1.0, 0.0));
    }
}
