//! Rules that keep tenants and disks apart: who may read and write which files on the
//! daemon's machine, and a root disk's copies staying with their VM (R7).

mod common;

use std::process::Command;

use common::{have_all, id, make_raw_image, p, run, TestServer};
use serde_json::json;

#[test]
fn files_on_the_daemons_machine_are_the_administrators_only() {
    if !have_all(&["qemu-img"]) {
        return;
    }
    let srv = TestServer::start();
    let image = srv.dir.path().join("disk.raw");
    make_raw_image(&image, 1 << 20, 1);
    let created = srv.expect("POST", "/v1/tenants", Some(json!({"name": "alice"})), 201);
    let alice = created["token"].as_str().unwrap().to_string();
    // A tenant may not read the machine's files: this daemon has no transfer directory.
    let (status, body) =
        srv.http("POST", "/v1/volumes/import", Some(json!({"name": "x", "path": p(&image)})), Some(&alice));
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let volume = srv.expect_as(&alice, "POST", "/v1/volumes", Some(json!({"name": "v", "size": "1M"})), 201);
    let out = srv.dir.path().join("out.raw");
    let (status, body) =
        srv.http("POST", &format!("/v1/volumes/{}/export", id(&volume)), Some(json!({"path": p(&out)})), Some(&alice));
    assert_eq!(status, 403, "{body}");
    assert!(!out.exists());
    // Not even the administrator reads cairn's own files through an import.
    let token_file = srv.data_dir.join("admin.token");
    let (status, body) = srv.http(
        "POST",
        "/v1/volumes/import",
        Some(json!({"name": "t", "path": p(&token_file), "format": "raw"})),
        Some(&srv.admin_token),
    );
    assert_eq!(status, 403, "{body}");
    // A qcow2 whose backing file is elsewhere would read that file: refused.
    let overlay = srv.dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-F", "raw", "-b", p(&image), p(&overlay)]));
    let (status, body) =
        srv.http("POST", "/v1/volumes/import", Some(json!({"name": "o", "path": p(&overlay)})), Some(&srv.admin_token));
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("path")), "{body}");
    // The administrator may import a plain image from anywhere else.
    srv.expect("POST", "/v1/volumes/import", Some(json!({"name": "ok", "path": p(&image)})), 202);
}

#[test]
fn a_root_disks_copy_stays_with_its_vm() {
    let srv = TestServer::start();
    srv.expect("POST", "/v1/vms", Some(json!({"name": "web", "size": "1M"})), 201);
    srv.expect("POST", "/v1/vms", Some(json!({"name": "other", "size": "1M"})), 201);
    srv.expect("POST", "/v1/vms/web/snapshots", Some(json!({"name": "s"})), 201);
    // Back to its own VM as a data disk: allowed, and it is marked as a root disk's copy.
    let copy = srv.expect("POST", "/v1/snapshots/s/restore", Some(json!({"vm": "web", "as": "data"})), 201);
    assert_eq!(copy["from_root_disk"], true, "{copy}");
    let copy_id = id(&copy);
    // It can not leave: no detach, and its snapshots are root-disk snapshots.
    let (status, body) = srv.http("POST", &format!("/v1/volumes/{copy_id}/detach"), None, Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    let snap = srv.expect("POST", &format!("/v1/volumes/{copy_id}/snapshots"), Some(json!({"name": "c"})), 201);
    assert_eq!(snap["disk_role"], "root", "{snap}");
    let (status, body) =
        srv.http("POST", "/v1/snapshots/c/restore", Some(json!({"vm": "other"})), Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    let (status, body) = srv.http("POST", "/v1/snapshots/c/restore", None, Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    // Deleting the VM takes the copy with the root disk; the snapshots stay (R8).
    let deleted = srv.expect("DELETE", "/v1/vms/web", None, 200);
    assert!(deleted["deleted_volumes"].as_array().unwrap().iter().any(|v| v == &json!(copy_id)), "{deleted}");
    srv.expect("GET", &format!("/v1/volumes/{copy_id}"), None, 404);
    srv.expect("GET", "/v1/snapshots/c", None, 200);
    srv.expect("GET", "/v1/snapshots/s", None, 200);
}

#[test]
fn a_vm_snapshot_always_has_a_group_and_one_name_per_disk() {
    let srv = TestServer::start();
    srv.expect("POST", "/v1/vms", Some(json!({"name": "one", "size": "1M"})), 201);
    let single = srv.expect("POST", "/v1/vms/one/snapshots", Some(json!({"name": "a"})), 201);
    assert!(single[0]["group"].as_str().is_some_and(|g| g.starts_with("grp-")), "{single}");
    assert_eq!(single[0]["name"], "a");
    srv.expect("POST", "/v1/volumes", Some(json!({"name": "data", "size": "1M", "vm": "one"})), 201);
    let both = srv.expect("POST", "/v1/vms/one/snapshots", Some(json!({"name": "b"})), 201);
    let mut names: Vec<&str> = both.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["b-data", "b-one-root"]);
}
