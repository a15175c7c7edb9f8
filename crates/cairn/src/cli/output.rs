//! What people see: aligned tables, `key: value` blocks and human-readable sizes, made from the
//! API's JSON. Pure functions, so the layout is tested without a server.

use serde_json::Value;

/// One attribute of a resource as people see it. The label is the API's key wherever the value
/// is one member of the object, so a reader can map the table to `--json` output.
#[derive(Debug)]
pub struct Field {
    pub label: &'static str,
    /// Shown as a column of `list` tables too (blocks show every field).
    pub listed: bool,
    pub render: fn(&Value) -> String,
}

pub const VM_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "name", listed: true, render: |v| text(&v["name"]) },
    Field { label: "state", listed: true, render: |v| text(&v["state"]) },
    Field { label: "root_volume", listed: true, render: |v| text(&v["root_volume"]) },
    Field { label: "data_volumes", listed: true, render: |v| text(&v["data_volumes"]) },
    Field { label: "template", listed: true, render: |v| text(&v["template"]) },
    Field { label: "created_at", listed: true, render: |v| text(&v["created_at"]) },
];

pub const VOLUME_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "name", listed: true, render: |v| text(&v["name"]) },
    Field { label: "size", listed: true, render: |v| size(&v["size"]) },
    Field { label: "state", listed: true, render: |v| text(&v["state"]) },
    Field { label: "vm", listed: true, render: |v| text(&v["vm"]) },
    Field { label: "role", listed: true, render: |v| text(&v["role"]) },
    Field { label: "source", listed: true, render: |v| source(&v["source"]) },
    Field { label: "created_at", listed: false, render: |v| text(&v["created_at"]) },
    Field { label: "data_bytes", listed: false, render: |v| size(&v["data_bytes"]) },
    Field { label: "stored_bytes", listed: false, render: |v| size(&v["stored_bytes"]) },
    Field { label: "exclusive_bytes", listed: false, render: |v| size(&v["exclusive_bytes"]) },
    Field { label: "shared_bytes", listed: false, render: |v| size(&v["shared_bytes"]) },
    Field { label: "uri", listed: true, render: |v| text(&v["nbd"]["uri"]) },
    Field { label: "unix_uri", listed: false, render: |v| text(&v["nbd"]["unix_uri"]) },
];

pub const SNAPSHOT_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "name", listed: true, render: |v| text(&v["name"]) },
    Field { label: "volume", listed: false, render: |v| text(&v["volume"]) },
    Field { label: "volume_name", listed: true, render: |v| text(&v["volume_name"]) },
    Field { label: "vm", listed: false, render: |v| text(&v["vm"]) },
    Field { label: "disk_role", listed: true, render: |v| text(&v["disk_role"]) },
    Field { label: "group", listed: false, render: |v| text(&v["group"]) },
    Field { label: "origin", listed: true, render: |v| text(&v["origin"]) },
    Field { label: "consistency", listed: true, render: |v| text(&v["consistency"]) },
    Field { label: "created_at", listed: true, render: |v| text(&v["created_at"]) },
    Field { label: "logical_bytes", listed: true, render: |v| size(&v["logical_bytes"]) },
    Field { label: "exclusive_bytes", listed: true, render: |v| size(&v["exclusive_bytes"]) },
    Field { label: "shared_bytes", listed: false, render: |v| size(&v["shared_bytes"]) },
    Field { label: "uri", listed: false, render: |v| text(&v["nbd"]["uri"]) },
    Field { label: "unix_uri", listed: false, render: |v| text(&v["nbd"]["unix_uri"]) },
];

pub const TEMPLATE_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "name", listed: true, render: |v| text(&v["name"]) },
    Field { label: "size", listed: true, render: |v| size(&v["size"]) },
    Field { label: "state", listed: true, render: |v| text(&v["state"]) },
    Field { label: "source", listed: true, render: |v| source(&v["source"]) },
    Field { label: "created_at", listed: true, render: |v| text(&v["created_at"]) },
    Field { label: "data_bytes", listed: false, render: |v| size(&v["data_bytes"]) },
    Field { label: "stored_bytes", listed: false, render: |v| size(&v["stored_bytes"]) },
    Field { label: "exclusive_bytes", listed: false, render: |v| size(&v["exclusive_bytes"]) },
    Field { label: "shared_bytes", listed: false, render: |v| size(&v["shared_bytes"]) },
    Field { label: "uri", listed: false, render: |v| text(&v["nbd"]["uri"]) },
    Field { label: "unix_uri", listed: false, render: |v| text(&v["nbd"]["unix_uri"]) },
];

pub const BACKUP_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "volume", listed: false, render: |v| text(&v["volume"]) },
    Field { label: "volume_name", listed: true, render: |v| text(&v["volume_name"]) },
    Field { label: "vm", listed: true, render: |v| text(&v["vm"]) },
    Field { label: "disk_role", listed: true, render: |v| text(&v["disk_role"]) },
    Field { label: "group", listed: false, render: |v| text(&v["group"]) },
    Field { label: "created_at", listed: true, render: |v| text(&v["created_at"]) },
    Field { label: "size", listed: true, render: |v| size(&v["size"]) },
    Field { label: "bytes_read", listed: false, render: |v| size(&v["bytes_read"]) },
    Field { label: "bytes_added", listed: true, render: |v| size(&v["bytes_added"]) },
    Field { label: "record", listed: false, render: |v| text(&v["record"]) },
    Field { label: "copies", listed: true, render: |v| list(&v["copies"]) },
    Field { label: "exclusive_bytes", listed: false, render: |v| size(&v["exclusive_bytes"]) },
    Field { label: "shared_bytes", listed: false, render: |v| size(&v["shared_bytes"]) },
    Field { label: "attributed_bytes", listed: false, render: |v| size(&v["attributed_bytes"]) },
];

/// A list of strings, comma-separated; `-` when empty.
fn list(value: &Value) -> String {
    let items: Vec<String> = value.as_array().into_iter().flatten().map(text).collect();
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

pub const JOB_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "kind", listed: true, render: |v| text(&v["kind"]) },
    Field { label: "state", listed: true, render: |v| text(&v["state"]) },
    Field { label: "resource", listed: true, render: |v| text(&v["resource"]) },
    Field { label: "path", listed: false, render: |v| text(&v["path"]) },
    Field {
        label: "progress",
        listed: true,
        render: |v| amount_done(number(&v["bytes_done"]), number(&v["bytes_total"])),
    },
    Field { label: "rate", listed: false, render: |v| rate(number(&v["rate_bytes_per_sec"])).unwrap_or_else(none) },
    Field { label: "eta", listed: false, render: |v| v["eta_seconds"].as_u64().map_or_else(none, duration) },
    Field { label: "error", listed: false, render: |v| text(&v["error"]) },
    Field { label: "created_at", listed: true, render: |v| text(&v["created_at"]) },
    Field { label: "finished_at", listed: false, render: |v| text(&v["finished_at"]) },
];

pub const TENANT_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "name", listed: true, render: |v| text(&v["name"]) },
    Field { label: "admin", listed: true, render: |v| text(&v["admin"]) },
    Field { label: "created_at", listed: true, render: |v| text(&v["created_at"]) },
];

/// Shown for an absent value, so that table columns never collapse.
const NONE: &str = "-";

fn none() -> String {
    NONE.to_owned()
}

/// A JSON value as plain text: strings without quotes, lists joined by commas, null as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => none(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => none(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn number(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn size(value: &Value) -> String {
    value.as_u64().map_or_else(none, human_size)
}

/// Where a volume or template came from: `blank`, `snapshot snap-…`, `image /path`.
fn source(value: &Value) -> String {
    let origin = value["id"].as_str().or(value["path"].as_str());
    match (value["kind"].as_str(), origin) {
        (Some(kind), Some(origin)) => format!("{kind} {origin}"),
        (Some(kind), None) => kind.to_owned(),
        (None, _) => none(),
    }
}

/// Bytes in binary units with one decimal (`10.0 GiB`); exact below 1 KiB.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    // Move up while the value would print as 1024.0 or more.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A transfer rate, `None` while the daemon has measured none (zero).
pub fn rate(bytes_per_sec: u64) -> Option<String> {
    (bytes_per_sec > 0).then(|| format!("{}/s", human_size(bytes_per_sec)))
}

/// A duration for people: `9s`, `2m05s`, `1h02m`.
pub fn duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// Whole percent done, `None` while the total is unknown (zero).
pub fn percent(done: u64, total: u64) -> Option<u64> {
    (total > 0).then(|| (u128::from(done.min(total)) * 100 / u128::from(total)) as u64)
}

/// `45%  1.2 GiB / 4.0 GiB`, or only the bytes done while the total is unknown.
pub fn amount_done(done: u64, total: u64) -> String {
    match percent(done, total) {
        Some(percent) => format!("{percent}%  {} / {}", human_size(done), human_size(total)),
        None => human_size(done),
    }
}

/// The `show` rows of one resource.
pub fn item_rows(fields: &[Field], item: &Value) -> Vec<(String, String)> {
    fields.iter().map(|field| (field.label.to_owned(), (field.render)(item))).collect()
}

/// The rows of an object the API answers without a fixed shape (what a delete removed).
pub fn object_rows(object: &Value) -> Vec<(String, String)> {
    object.as_object().into_iter().flatten().map(|(key, value)| (key.clone(), text(value))).collect()
}

/// `key: value` lines with the values aligned.
pub fn render_block(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(key, _)| key.chars().count() + 1).max().unwrap_or(0);
    let lines: Vec<String> = rows.iter().map(|(key, value)| format!("{:width$}  {value}", format!("{key}:"))).collect();
    lines.join("\n")
}

/// A table of the listed fields, one row per item, columns two spaces apart, no trailing blanks.
pub fn render_table(fields: &[Field], items: &Value) -> String {
    let columns: Vec<&Field> = fields.iter().filter(|field| field.listed).collect();
    let header = columns.iter().map(|field| field.label.to_uppercase()).collect();
    let items = items.as_array().map(Vec::as_slice).unwrap_or_default();
    let rows: Vec<Vec<String>> = std::iter::once(header)
        .chain(items.iter().map(|item| columns.iter().map(|field| (field.render)(item)).collect()))
        .collect();
    render_rows(&rows)
}

/// Rows of cells as aligned columns two spaces apart, no trailing blanks.
fn render_rows(rows: &[Vec<String>]) -> String {
    let width_count = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> =
        (0..width_count).map(|column| rows.iter().map(|row| row[column].chars().count()).max().unwrap_or(0)).collect();
    let lines: Vec<String> = rows
        .iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, &width)| format!("{cell:width$}")).collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect();
    lines.join("\n")
}

pub const SCHEDULE_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "name", listed: true, render: |v| text(&v["name"]) },
    Field { label: "target", listed: false, render: |v| format!("{} {}", text(&v["target_kind"]), text(&v["target"])) },
    Field { label: "target_name", listed: true, render: |v| text(&v["target_name"]) },
    Field { label: "action", listed: true, render: |v| text(&v["action"]) },
    Field { label: "frequency", listed: true, render: |v| text(&v["frequency"]) },
    Field { label: "time_zone", listed: true, render: |v| text(&v["time_zone"]) },
    Field { label: "retention", listed: true, render: |v| rules(&v["retention"]) },
    Field { label: "copy_to", listed: false, render: |v| text(&v["copy_to"]) },
    Field { label: "hooks", listed: false, render: |v| hooks(&v["hooks"]) },
    Field { label: "paused", listed: true, render: |v| text(&v["paused"]) },
    Field { label: "next_run_at", listed: true, render: |v| text(&v["next_run_at"]) },
    Field { label: "last_run", listed: true, render: |v| text(&v["last_run"]["state"]) },
    Field { label: "interval_seconds", listed: false, render: |v| text(&v["interval_seconds"]) },
    Field { label: "created_at", listed: false, render: |v| text(&v["created_at"]) },
];

pub const RUN_FIELDS: &[Field] = &[
    Field { label: "id", listed: true, render: |v| text(&v["id"]) },
    Field { label: "schedule", listed: false, render: |v| text(&v["schedule"]) },
    Field { label: "due_at", listed: true, render: |v| text(&v["due_at"]) },
    Field { label: "started_at", listed: false, render: |v| text(&v["started_at"]) },
    Field { label: "finished_at", listed: true, render: |v| text(&v["finished_at"]) },
    Field { label: "state", listed: true, render: |v| text(&v["state"]) },
    Field { label: "late", listed: true, render: |v| text(&v["late"]) },
    Field { label: "manual", listed: false, render: |v| text(&v["manual"]) },
    Field { label: "consistency", listed: true, render: |v| text(&v["consistency"]) },
    Field { label: "job", listed: false, render: |v| text(&v["job"]) },
    Field { label: "bytes", listed: true, render: |v| size(&v["bytes"]) },
    Field { label: "pruned", listed: true, render: |v| text(&v["pruned"]) },
    Field { label: "error", listed: true, render: |v| text(&v["error"]) },
    Field { label: "warning", listed: false, render: |v| text(&v["warning"]) },
];

/// Retention rules as `last=7 daily=14`.
fn rules(value: &Value) -> String {
    let Some(rules) = value.as_object() else { return none() };
    let words: Vec<String> = rules
        .iter()
        .filter(|(_, n)| !n.is_null())
        .map(|(key, n)| format!("{}={n}", key.trim_start_matches("keep_")))
        .collect();
    if words.is_empty() {
        none()
    } else {
        words.join(" ")
    }
}

/// Hooks as `pre: /bin/freeze, post: https://…`.
fn hooks(value: &Value) -> String {
    let mut parts = Vec::new();
    for phase in ["pre", "post"] {
        let hook = &value[phase];
        if !hook.is_null() {
            let what =
                if hook["url"].is_null() { text(&hook["command"]).replace(", ", " ") } else { text(&hook["url"]) };
            parts.push(format!("{phase}: {what}"));
        }
    }
    if parts.is_empty() {
        none()
    } else {
        parts.join(", ")
    }
}

/// A schedule's retention plan: one row per run, what happens to its items and why.
pub fn render_retention_plan(plan: &Value) -> String {
    let header = ["RUN", "CREATED", "ITEMS", "ACTION", "KEPT BY"].map(String::from).to_vec();
    let mut rows = vec![header];
    let action = if plan["dry_run"] == true { "would delete" } else { "deleted" };
    let mut runs: Vec<(&Value, &str)> = Vec::new();
    runs.extend(plan["keep"].as_array().into_iter().flatten().map(|r| (r, "keep")));
    runs.extend(plan["delete"].as_array().into_iter().flatten().map(|r| (r, action)));
    runs.sort_by_key(|(r, _)| r["created_at"].as_str().unwrap_or_default().to_owned());
    for (run, what) in &runs {
        let reasons: Vec<String> = run["reasons"].as_array().into_iter().flatten().map(text).collect();
        rows.push(vec![
            text(&run["run"]),
            text(&run["created_at"]),
            text(&run["items"]),
            what.to_string(),
            reasons.join(","),
        ]);
    }
    let deleted: usize =
        plan["delete"].as_array().into_iter().flatten().map(|r| r["items"].as_array().map_or(0, Vec::len)).sum();
    format!("{}\n{deleted} item(s) {action}{}", render_rows(&rows), cost_line(plan))
}

/// A dry run's cost preview on a line of its own; nothing for a plan carried out.
fn cost_line(plan: &Value) -> String {
    match plan.get("cost") {
        Some(cost) if !cost.is_null() => format!("\n{}", render_cost(cost)),
        _ => String::new(),
    }
}

/// Usage: a row per resource, then the totals per kind and overall.
pub fn render_usage(usage: &Value) -> String {
    let header = ["TENANT", "KIND", "NAME", "VM", "NOW", "GIB-HOURS", "FREE GIB-HOURS", "COST"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for item in usage["items"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&item["tenant"]),
            text(&item["kind"]),
            text(&item["name"]),
            text(&item["vm"]),
            human_size(item["bytes"].as_u64().unwrap_or(0)),
            format!("{:.3}", item["gib_hours"].as_f64().unwrap_or(0.0)),
            format!("{:.3}", item["free_gib_hours"].as_f64().unwrap_or(0.0)),
            money(&item["cost_micros"]),
        ]);
    }
    let totals = &usage["totals"];
    rows.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("{:.3}", totals["gib_hours"].as_f64().unwrap_or(0.0)),
        format!("{:.3}", totals["free_gib_hours"].as_f64().unwrap_or(0.0)),
        money(&totals["cost_micros"]),
    ]);
    let mut out = format!("{} to {}\n{}", text(&usage["from"]), text(&usage["to"]), render_rows(&rows));
    for tenant in usage["repository"].as_array().into_iter().flatten() {
        out += &format!(
            "\nbackup repository: tenant {} takes {} after dedup and compression (counted by gc at {})",
            text(&tenant["tenant"]),
            human_size(tenant["bytes"].as_u64().unwrap_or(0)),
            text(&tenant["measured_at"])
        );
    }
    out
}

/// Usage as CSV: a header, a line per resource and a total line; names are quoted when
/// they need to be.
pub fn usage_csv(usage: &Value) -> String {
    let mut out = String::from("tenant,kind,resource,name,vm,bytes,gib_hours,free_gib_hours,cost\n");
    let field = |value: &Value| {
        // An empty field, not the tables' "-", where there is nothing (a volume's VM).
        let text = if value.is_null() { String::new() } else { text(value) };
        if text.contains([',', '"', '\n']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text
        }
    };
    for item in usage["items"].as_array().into_iter().flatten() {
        out += &format!(
            "{},{},{},{},{},{},{},{},{}\n",
            field(&item["tenant"]),
            field(&item["kind"]),
            field(&item["resource"]),
            field(&item["name"]),
            field(&item["vm"]),
            item["bytes"].as_u64().unwrap_or(0),
            item["gib_hours"].as_f64().unwrap_or(0.0),
            item["free_gib_hours"].as_f64().unwrap_or(0.0),
            money(&item["cost_micros"]),
        );
    }
    let totals = &usage["totals"];
    out += &format!(
        "total,,,,,,{},{},{}\n",
        totals["gib_hours"].as_f64().unwrap_or(0.0),
        totals["free_gib_hours"].as_f64().unwrap_or(0.0),
        money(&totals["cost_micros"])
    );
    out
}

fn money(micros: &Value) -> String {
    cairn_control::metering::money(micros.as_u64().unwrap_or(0))
}

/// What a deletion would free and do to the monthly bill.
pub fn render_cost(cost: &Value) -> String {
    format!(
        "would free {}; monthly storage cost {} -> {}",
        human_size(cost["frees_bytes"].as_u64().unwrap_or(0)),
        text(&cost["monthly_cost_before"]),
        text(&cost["monthly_cost_after"])
    )
}

/// A tenant's quota: each limit next to what the tenant holds.
pub fn render_quota(view: &Value) -> String {
    let mut rows = vec![["", "HOLDS", "QUOTA"].map(String::from).to_vec()];
    for (what, limit) in
        [("bytes", "max_bytes"), ("volumes", "max_volumes"), ("snapshots", "max_snapshots"), ("backups", "max_backups")]
    {
        let held = view["holding"][what].as_u64().unwrap_or(0);
        let limit = view["quota"][limit].as_u64();
        let show = |n: u64| if what == "bytes" { human_size(n) } else { n.to_string() };
        rows.push(vec![what.to_string(), show(held), limit.map_or_else(|| "-".to_string(), show)]);
    }
    format!("tenant {}\n{}", text(&view["tenant"]), render_rows(&rows))
}

/// Protection status: one row per disk, then one per VM.
pub fn render_status(status: &Value) -> String {
    let header = ["DISK", "VM", "NEWEST RESTORE POINT", "AGE", "RPO", "NEXT RUN", "STATUS"].map(String::from).to_vec();
    let mut rows = vec![header];
    let verdict = |item: &Value| {
        let mut flags = Vec::new();
        if item["rpo_exceeded"] == true {
            flags.push("RPO EXCEEDED");
        }
        if item["over_quota"] == true {
            flags.push("LAST RUN OVER QUOTA");
        } else if item["last_run_failed"] == true {
            flags.push("LAST RUN FAILED");
        }
        if item["rpo_seconds"].is_null() {
            flags.push("no schedule");
        }
        if flags.is_empty() {
            "ok".to_owned()
        } else {
            flags.join(", ")
        }
    };
    let age = |point: &Value| point["age_seconds"].as_i64().map_or_else(none, |s| duration(s.max(0) as u64));
    let rpo = |item: &Value| item["rpo_seconds"].as_i64().map_or_else(none, |s| duration(s.max(0) as u64));
    for disk in status["volumes"].as_array().into_iter().flatten() {
        let point = &disk["newest_restore_point"];
        rows.push(vec![
            text(&disk["volume_name"]),
            text(&disk["vm"]),
            if point.is_null() { none() } else { format!("{} {}", text(&point["kind"]), text(&point["id"])) },
            age(point),
            rpo(disk),
            text(&disk["next_run_at"]),
            verdict(disk),
        ]);
    }
    let mut out = render_rows(&rows);
    let vms = status["vms"].as_array().map_or(&[][..], Vec::as_slice);
    if !vms.is_empty() {
        let mut vm_rows =
            vec![["VM", "DISKS", "OLDEST NEWEST POINT", "AGE", "RPO", "STATUS"].map(String::from).to_vec()];
        for vm in vms {
            let point = &vm["oldest_newest_restore_point"];
            vm_rows.push(vec![
                text(&vm["vm_name"]),
                vm["disks"].as_array().map_or(0, Vec::len).to_string(),
                if point.is_null() { none() } else { text(&point["created_at"]) },
                age(point),
                rpo(vm),
                verdict(vm),
            ]);
        }
        out = format!("{out}\n\n{}", render_rows(&vm_rows));
    }
    out
}

/// A prune plan: one row per backup, disk by disk, with what happens to it and why.
pub fn render_prune_plan(plan: &Value) -> String {
    let header = ["DISK", "BACKUP", "CREATED", "ACTION", "KEPT BY"].map(String::from).to_vec();
    let mut rows = vec![header];
    let action = if plan["dry_run"] == true { "would delete" } else { "deleted" };
    for disk in plan["disks"].as_array().into_iter().flatten() {
        let mut backups: Vec<(&Value, &str)> = Vec::new();
        backups.extend(disk["keep"].as_array().into_iter().flatten().map(|b| (b, "keep")));
        backups.extend(disk["forget"].as_array().into_iter().flatten().map(|b| (b, action)));
        backups.sort_by_key(|(b, _)| b["created_at"].as_str().unwrap_or_default().to_owned());
        for (backup, what) in backups {
            let reasons: Vec<String> = backup["reasons"].as_array().into_iter().flatten().map(text).collect();
            rows.push(vec![
                text(&disk["volume_name"]),
                text(&backup["backup"]),
                text(&backup["created_at"]),
                what.to_owned(),
                reasons.join(","),
            ]);
        }
    }
    let forgotten: usize =
        plan["disks"].as_array().into_iter().flatten().map(|d| d["forget"].as_array().map_or(0, Vec::len)).sum();
    format!("{}\n{forgotten} backup(s) {action}{}", render_rows(&rows), cost_line(plan))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(10 << 30), "10.0 GiB");
        assert_eq!(human_size(1_288_490_189), "1.2 GiB");
        assert_eq!(human_size(16 << 40), "16.0 TiB");
        // Just below 1 MiB rounds up into the next unit, never to `1024.0 KiB`.
        assert_eq!(human_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_size(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(125), "2m05s");
        assert_eq!(duration(3720), "1h02m");
    }

    #[test]
    fn amounts() {
        assert_eq!(amount_done(0, 0), "0 B");
        assert_eq!(amount_done(45, 100), "45%  45 B / 100 B");
        assert_eq!(amount_done(4 << 30, 4 << 30), "100%  4.0 GiB / 4.0 GiB");
        assert_eq!(percent(u64::MAX, u64::MAX), Some(100));
        assert_eq!(percent(7, 3), Some(100), "a done count past the total is capped");
    }

    #[test]
    fn text_of_values() {
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!("web1")), "web1");
        assert_eq!(text(&json!([])), "-");
        assert_eq!(text(&json!(["vol-1", "vol-2"])), "vol-1, vol-2");
        assert_eq!(text(&json!(true)), "true");
        assert_eq!(text(&json!({})["missing"]), "-");
    }

    #[test]
    fn sources() {
        assert_eq!(source(&json!({"kind": "blank"})), "blank");
        assert_eq!(source(&json!({"kind": "snapshot", "id": "snap-1"})), "snapshot snap-1");
        assert_eq!(source(&json!({"kind": "image", "path": "/img/a.qcow2"})), "image /img/a.qcow2");
        assert_eq!(source(&json!(null)), "-");
    }

    #[test]
    fn table_aligns_listed_columns() {
        let vms = json!([
            {"id": "vm-1", "name": "web1", "state": "running", "root_volume": "vol-1",
             "data_volumes": ["vol-2", "vol-3"], "template": null, "created_at": "2026-01-01T00:00:00Z"},
            {"id": "vm-22", "name": "db", "state": "stopped", "root_volume": "vol-4",
             "data_volumes": [], "template": "tpl-1", "created_at": "2026-01-02T00:00:00Z"},
        ]);
        let expected = "\
ID     NAME  STATE    ROOT_VOLUME  DATA_VOLUMES  TEMPLATE  CREATED_AT
vm-1   web1  running  vol-1        vol-2, vol-3  -         2026-01-01T00:00:00Z
vm-22  db    stopped  vol-4        -             tpl-1     2026-01-02T00:00:00Z";
        assert_eq!(render_table(VM_FIELDS, &vms), expected);
    }

    #[test]
    fn table_of_nothing_is_its_header() {
        assert_eq!(render_table(TENANT_FIELDS, &json!([])), "ID  NAME  ADMIN  CREATED_AT");
    }

    #[test]
    fn table_leaves_out_unlisted_fields_and_trailing_blanks() {
        let volumes = json!([{"id": "vol-1", "name": "a", "size": 1073741824, "state": "ready",
            "vm": null, "role": "data", "source": {"kind": "blank"},
            "created_at": "2026-01-01T00:00:00Z", "nbd": {"uri": null, "unix_uri": "nbd+unix:///vol-1"}}]);
        let expected = "\
ID     NAME  SIZE     STATE  VM  ROLE  SOURCE  URI
vol-1  a     1.0 GiB  ready  -   data  blank   -";
        assert_eq!(render_table(VOLUME_FIELDS, &volumes), expected);
    }

    #[test]
    fn block_aligns_values() {
        let volume = json!({"id": "vol-1", "name": "web1-root", "size": 10737418240u64, "state": "ready",
            "vm": "vm-1", "role": "root", "source": {"kind": "template", "id": "tpl-1"},
            "created_at": "2026-01-01T00:00:00Z", "data_bytes": 4194304, "stored_bytes": 1048576,
            "exclusive_bytes": 1048576, "shared_bytes": 3145728,
            "nbd": {"export": "vol-1", "uri": "nbd://127.0.0.1:10809/vol-1",
                    "unix_uri": "nbd+unix:///vol-1?socket=/d/nbd.sock"}});
        let expected = "\
id:               vol-1
name:             web1-root
size:             10.0 GiB
state:            ready
vm:               vm-1
role:             root
source:           template tpl-1
created_at:       2026-01-01T00:00:00Z
data_bytes:       4.0 MiB
stored_bytes:     1.0 MiB
exclusive_bytes:  1.0 MiB
shared_bytes:     3.0 MiB
uri:              nbd://127.0.0.1:10809/vol-1
unix_uri:         nbd+unix:///vol-1?socket=/d/nbd.sock";
        assert_eq!(render_block(&item_rows(VOLUME_FIELDS, &volume)), expected);
    }

    #[test]
    fn block_of_a_free_form_object() {
        let deleted = json!({"deleted": "vm-1", "deleted_volumes": ["vol-1"], "detached_volumes": []});
        let expected = "\
deleted:           vm-1
deleted_volumes:   vol-1
detached_volumes:  -";
        assert_eq!(render_block(&object_rows(&deleted)), expected);
    }

    #[test]
    fn job_fields() {
        let job = json!({"id": "job-1", "kind": "import", "state": "running", "resource": "vol-1",
            "path": "/img/a.raw", "bytes_done": 512, "bytes_total": 2048, "rate_bytes_per_sec": 1048576,
            "eta_seconds": null, "error": null, "created_at": "2026-01-01T00:00:00Z", "finished_at": null});
        let rows = item_rows(JOB_FIELDS, &job);
        let value = |label: &str| rows.iter().find(|(key, _)| key == label).map(|(_, value)| value.as_str());
        assert_eq!(value("progress"), Some("25%  512 B / 2.0 KiB"));
        assert_eq!(value("rate"), Some("1.0 MiB/s"));
        assert_eq!(value("eta"), Some("-"));
        let finished = json!({"rate_bytes_per_sec": 0});
        assert_eq!(item_rows(JOB_FIELDS, &finished)[6], ("rate".to_owned(), "-".to_owned()), "no rate is known");
    }
}
