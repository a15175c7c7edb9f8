//! Metering, prices, free backups and quotas with the real daemon and CLI: `cairn usage`
//! (table, --json, --csv), `cairn tenant quota`, a refused request, a delete preview, and a
//! restart that neither loses nor doubles what was metered.

mod common;

use std::time::Instant;

use common::{have_all, id, qemu_write, unix_uri, TestServer};
use serde_json::Value;

fn line<'a>(usage: &'a Value, name_prefix: &str) -> Vec<&'a Value> {
    usage["items"].as_array().unwrap().iter().filter(|i| i["name"].as_str().unwrap().starts_with(name_prefix)).collect()
}

#[test]
fn usage_free_backups_quotas_and_a_restart() {
    if !have_all(&["qemu-io"]) {
        return;
    }
    let started = Instant::now();
    let mut srv = TestServer::start_with(&["--price", "backup=0.10", "--free-backups-per-vm", "1"], &[]);
    srv.cli_json(&["vm", "create", "web", "--size", "8M"]);
    let root_uri = unix_uri(&srv.cli_json(&["volume", "show", "web-root"]));
    qemu_write(&root_uri, 0xaa, 0, 1 << 20);
    let first = srv.cli_json(&["backup", "create", "--vm", "web"]);
    assert_eq!(first["state"], "succeeded", "{first}");
    // In another chunk than the first write, which the second backup then shares.
    qemu_write(&root_uri, 0xbb, 6 << 20, 1 << 20);
    srv.cli_json(&["backup", "create", "--vm", "web"]);

    let usage = srv.cli_json(&["usage"]);
    assert_eq!(usage["prices"]["backup"], "0.100000");
    assert_eq!(usage["free_backups_per_vm"], 1);
    let mut backups = line(&usage, "web-root@");
    backups.sort_by_key(|b| b["name"].as_str().unwrap().to_string());
    assert_eq!(backups.len(), 2, "{usage:#}");
    // The VM's oldest restore point is free, the newer one billed.
    assert_eq!(backups[0]["gib_hours"], 0.0, "{usage:#}");
    assert!(backups[0]["free_gib_hours"].as_f64().unwrap() > 0.0, "{usage:#}");
    assert!(backups[1]["gib_hours"].as_f64().unwrap() > 0.0, "{usage:#}");
    assert_eq!(backups[1]["free_gib_hours"], 0.0);
    assert_eq!(line(&usage, "web-root")[0]["kind"], "volume");

    // A gc counts what each tenant's backups take in the repository, shared chunks once.
    assert_eq!(usage["repository"], serde_json::json!([]), "nothing counted before a gc");
    let gc = srv.cli_json(&["repo", "gc", "--grace", "0", "--dry-run"]);
    let counted = srv.cli_json(&["usage"]);
    let repository = &counted["repository"][0];
    assert_eq!(repository["tenant"], "admin", "{counted:#}");
    // Both backups' chunks, compressed (the patterns written shrink to almost nothing), each
    // counted once: within what the packs hold, and what the backups added.
    let added: u64 = backups.iter().map(|b| b["bytes"].as_u64().unwrap()).sum();
    let stored = repository["bytes"].as_u64().unwrap();
    let packs = gc["pack_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored <= packs && stored <= added, "stored {stored}, packs {packs}, added {added}");
    let table = String::from_utf8(srv.cli(&["usage"]).stdout).unwrap();
    assert!(table.contains("backup repository: tenant admin"), "{table}");
    // The same gc gave each backup its share: the first backup's chunks are the second's too,
    // so it alone holds only its manifest; the second also holds what was written between.
    let mut listed: Vec<Value> = srv.cli_json(&["backup", "list", "--vm", "web"]).as_array().unwrap().clone();
    listed.sort_by_key(|b| b["created_at"].as_str().unwrap().to_string());
    let bytes = |b: &Value, key: &str| b[key].as_u64().unwrap_or_else(|| panic!("no {key} in {b}"));
    assert!(bytes(&listed[0], "shared_bytes") > 0, "{listed:#?}");
    assert!(bytes(&listed[1], "exclusive_bytes") > bytes(&listed[0], "exclusive_bytes"), "{listed:#?}");
    // Backups are billed on what is attributed to them once a gc has counted it: each blob once,
    // for the oldest backup using it, so the two add up to what the tenant's backups store.
    let attributed = |b: &Value| bytes(b, "attributed_bytes");
    assert_eq!(attributed(&listed[0]) + attributed(&listed[1]), stored, "{listed:#?}");
    let billed = |usage: &Value, backup: &Value| {
        let item = line(usage, "web-root@").into_iter().find(|i| i["resource"] == backup["id"]).unwrap();
        item["bytes"].as_u64().unwrap()
    };
    assert_eq!(billed(&counted, &listed[1]), attributed(&listed[1]), "{counted:#}");
    // The first backup goes: the blobs it stored that the second still uses are the second's
    // from the next gc on, not dropped from the bill.
    srv.cli_json(&["backup", "delete", &id(&listed[0])]);
    srv.cli_json(&["repo", "gc", "--grace", "0", "--dry-run"]);
    let recounted = srv.cli_json(&["usage"]);
    let second = srv.cli_json(&["backup", "show", &id(&listed[1])]);
    let now_stored = recounted["repository"][0]["bytes"].as_u64().unwrap();
    assert_eq!(attributed(&second), now_stored, "{second:#} {recounted:#}");
    assert!(attributed(&second) > attributed(&listed[1]), "{second:#} {listed:#?}");
    assert_eq!(billed(&recounted, &second), now_stored, "{recounted:#}");

    // CSV: a header, a line per resource, a total.
    let csv = srv.cli(&["usage", "--csv"]);
    let csv = String::from_utf8(csv.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "tenant,kind,resource,name,vm,bytes,gib_hours,free_gib_hours,cost");
    assert_eq!(lines.len(), usage["items"].as_array().unwrap().len() + 2, "{csv}");
    assert!(lines.last().unwrap().starts_with("total,"), "{csv}");
    let table = String::from_utf8(srv.cli(&["usage"]).stdout).unwrap();
    assert!(table.contains("GIB-HOURS") && table.contains("web-root"), "{table}");

    // Quotas: set by the administrator, shown with what is held, enforced before work.
    let acme = srv.cli_json(&["tenant", "create", "acme"]);
    let token = acme["token"].as_str().unwrap().to_string();
    let quota = srv.cli_json(&["tenant", "quota", "acme", "--max-volumes", "1", "--max-bytes", "2M"]);
    assert_eq!(quota["quota"]["max_volumes"], 1);
    assert_eq!(quota["quota"]["max_bytes"], 2 << 20);
    let made = srv.cli_as(&token, &["volume", "create", "a", "--size", "1M"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let refused = srv.cli_as(&token, &["volume", "create", "b", "--size", "1M"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("over quota") && why.contains("volumes"), "{why}");
    let shown = String::from_utf8(srv.cli(&["tenant", "quota", "acme"]).stdout).unwrap();
    assert!(shown.contains("volumes") && shown.contains("HOLDS"), "{shown}");
    srv.cli_json(&["tenant", "quota", "acme", "--clear"]);
    assert!(srv.cli_as(&token, &["volume", "create", "b", "--size", "1M"]).status.success());

    // A delete preview frees nothing yet.
    srv.cli_json(&["snapshot", "create", "web-root", "--name", "s1"]);
    let preview = String::from_utf8(srv.cli(&["snapshot", "delete", "s1", "--dry-run"]).stdout).unwrap();
    assert!(preview.contains("would free") && preview.contains("->"), "{preview}");
    srv.cli_json(&["snapshot", "show", "s1"]);

    // A kill -9 and a restart: the meter goes on from where it was, once.
    srv.restart();
    let usage = srv.cli_json(&["usage"]);
    let elapsed_hours = started.elapsed().as_secs_f64() / 3600.0;
    let root = line(&usage, "web-root").into_iter().find(|i| i["kind"] == "volume").unwrap();
    let root_gib = 8.0 / 1024.0;
    let hours = root["gib_hours"].as_f64().unwrap() / root_gib;
    assert!(hours > 0.0 && hours <= elapsed_hours, "billed {hours} h of {elapsed_hours} h");
    assert_eq!(id(&srv.cli_json(&["volume", "show", "web-root"])), root["resource"].as_str().unwrap());
}
