//! Lifecycle tests: a real `cairn serve` driven through the `cairn` CLI (`--json`, so the CLI
//! is exercised too), with data written and checked by real NBD clients (qemu-io, qemu-img,
//! nbdinfo) over the URIs the answers carry. Each test covers one of the design's
//! requirements (R4–R8) end to end.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// The NBD clients every data check here needs.
fn tools() -> bool {
    have_all(&["qemu-io", "qemu-img"])
}

/// A volume as `cairn volume show` prints it.
fn volume(srv: &TestServer, volume: &str) -> Value {
    srv.cli_json(&["volume", "show", volume])
}

/// The root volume of a VM.
fn root_of(srv: &TestServer, vm: &str) -> Value {
    let shown = srv.cli_json(&["vm", "show", vm]);
    volume(srv, &field(&shown, "root_volume"))
}

/// The one snapshot of `disk_role` in a VM snapshot's answer.
fn by_role<'a>(snaps: &'a Value, role: &str) -> &'a Value {
    let found: Vec<&Value> = snaps
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {snaps}"))
        .iter()
        .filter(|s| s["disk_role"] == role)
        .collect();
    assert_eq!(found.len(), 1, "one {role} snapshot expected in {snaps}");
    found[0]
}

/// The job a `--json` import or export printed: either the API's `{"job": Job, …}` or the Job.
fn job_id(printed: &Value) -> String {
    if printed["job"].is_object() {
        id(&printed["job"])
    } else if printed["id"].as_str().is_some_and(|i| i.starts_with("job-")) {
        id(printed)
    } else {
        panic!("no job in {printed}")
    }
}

/// Checks that the job a `--json` command printed has already succeeded: `--json` waits for
/// the job, so a script can use the result as soon as the command returns.
fn assert_job_succeeded(srv: &TestServer, printed: &Value, kind: &str) -> Value {
    let job = srv.cli_json(&["job", "show", &job_id(printed)]);
    assert_eq!(job["state"], "succeeded", "the CLI returned before the job ended well: {job}");
    assert_eq!(job["kind"], kind, "{job}");
    assert_eq!(job["error"], Value::Null, "{job}");
    assert!(job["finished_at"].is_string(), "a finished job has finished_at: {job}");
    job
}

#[test]
fn vm_lifecycle_revert_and_state() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    let vm = srv.cli_json(&["vm", "create", "web1", "--size", "8M"]);
    assert_eq!(vm["name"], "web1");
    assert_eq!(vm["state"], "running", "new VMs run");
    let vm_id = id(&vm);

    let shown = srv.cli_json(&["vm", "show", "web1"]);
    assert_eq!(id(&shown), vm_id);
    let root_id = field(&shown, "root_volume");
    let root = volume(&srv, &root_id);
    assert_eq!(root["size"], 8 * MIB);
    assert_eq!(root["role"], "root");
    assert_eq!(root["vm"], vm_id.as_str());
    assert_eq!(root["name"], "web1-root");
    let uri = unix_uri(&root);
    assert!(uri.starts_with(&format!("nbd+unix:///{root_id}?socket=/")), "{uri}");
    assert!(tcp_uri(&root).starts_with("nbd://127.0.0.1:"), "{root}");

    // A blank disk reads zeros; then it takes a write.
    assert_reads(&uri, 0, 0, 8 * MIB);
    qemu_write(&uri, 0xaa, 0, 2 * MIB);

    let snap = srv.cli_json(&["snapshot", "create", &root_id, "--name", "before"]);
    assert_eq!(snap["volume"], root_id.as_str());
    assert_eq!(snap["vm"], vm_id.as_str());
    assert_eq!(snap["disk_role"], "root");
    assert_eq!(snap["name"], "before");
    qemu_write(&uri, 0xbb, 0, 2 * MIB);
    assert_reads(&uri, 0xbb, 0, 2 * MIB);

    // Reverting under a running VM would swap its disk while the guest uses it: refused,
    // and the disk is left as it was.
    srv.cli_fails(&["volume", "revert", &root_id, "before"]);
    assert_reads(&uri, 0xbb, 0, 2 * MIB);

    let stopped = srv.cli_json(&["vm", "stop", "web1"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(srv.cli_json(&["vm", "show", &vm_id])["state"], "stopped", "the state is stored, not just answered");

    // R4: revert is a rollback of the same volume (same id, same export).
    let reverted = srv.cli_json(&["volume", "revert", &root_id, "before"]);
    assert_eq!(id(&reverted), root_id);
    assert_eq!(reverted["size"], 8 * MIB);
    let after = volume(&srv, &root_id);
    assert_reads(&unix_uri(&after), 0xaa, 0, 2 * MIB);
    assert_reads(&tcp_uri(&after), 0xaa, 0, 2 * MIB);
    assert_reads(&unix_uri(&after), 0, 2 * MIB, 6 * MIB);
    // The snapshot survives the revert and can be used again.
    assert_reads(&unix_uri(&srv.cli_json(&["snapshot", "show", "before"])), 0xaa, 0, 2 * MIB);

    let started = srv.cli_json(&["vm", "start", "web1"]);
    assert_eq!(started["state"], "running");
    assert_eq!(srv.cli_json(&["vm", "show", "web1"])["state"], "running");
}

#[test]
fn snapshot_export_reads_its_point_in_time() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    let vol = srv.cli_json(&["volume", "create", "data1", "--size", "4M"]);
    let vol_id = id(&vol);
    let uri = unix_uri(&vol);
    qemu_write(&uri, 0x11, 0, 4 * MIB);

    let snap = srv.cli_json(&["snapshot", "create", "data1", "--name", "t1"]);
    let snap_id = id(&snap);
    assert_eq!(snap["disk_role"], "data");
    assert_eq!(snap["logical_bytes"], 4 * MIB);
    // The live disk moves on.
    qemu_write(&uri, 0x22, MIB, 2 * MIB);

    // VOLUME@SNAPSHOT is the disk as it was at the snapshot, whatever the live disk did since.
    let at = export_uri(&uri, &format!("{vol_id}@{snap_id}"));
    assert_reads(&at, 0x11, 0, 4 * MIB);
    // So is the export the snapshot's own answer names (VOLUME@SNAPSHOT or SNAPSHOT).
    let export = field(&snap["nbd"], "export");
    assert!(export == format!("{vol_id}@{snap_id}") || export == snap_id, "snapshot export name {export}");
    assert_reads(&unix_uri(&snap), 0x11, 0, 4 * MIB);
    assert_reads(&tcp_uri(&snap), 0x11, 0, 4 * MIB);
    // The live disk has the new data in the middle only.
    assert_reads(&uri, 0x11, 0, MIB);
    assert_reads(&uri, 0x22, MIB, 2 * MIB);
    assert_reads(&uri, 0x11, 3 * MIB, MIB);

    // A snapshot is read-only: a client cannot change the past.
    assert!(qemu_write_fails(&at), "a write to snapshot export {at} succeeded");
    assert_reads(&at, 0x11, 0, 4 * MIB);

    // A second snapshot is its own point in time; the first is unchanged.
    let snap2 = srv.cli_json(&["snapshot", "create", "data1", "--name", "t2"]);
    qemu_write(&uri, 0x33, 0, 4 * MIB);
    assert_reads(&unix_uri(&snap2), 0x22, MIB, 2 * MIB);
    assert_reads(&unix_uri(&snap2), 0x11, 0, MIB);
    assert_reads(&at, 0x11, 0, 4 * MIB);
}

#[test]
fn vm_snapshot_covers_every_disk_in_one_group() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    let vm_id = id(&srv.cli_json(&["vm", "create", "app", "--size", "8M"]));
    let data = srv.cli_json(&["volume", "create", "app-data", "--size", "4M", "--vm", "app"]);
    let data_id = id(&data);
    assert_eq!(data["vm"], vm_id.as_str());
    assert_eq!(data["role"], "data");
    let shown = srv.cli_json(&["vm", "show", "app"]);
    assert_eq!(shown["data_volumes"], json!([data_id]));
    let root_id = field(&shown, "root_volume");
    let root_uri = unix_uri(&volume(&srv, &root_id));
    let data_uri = unix_uri(&data);
    qemu_write(&root_uri, 0xa1, 0, MIB);
    qemu_write(&data_uri, 0xd1, 0, MIB);

    let snaps = srv.cli_json(&["vm", "snapshot", "app"]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(2), "one snapshot per disk: {snaps}");
    let (root_snap, data_snap) = (by_role(&snaps, "root"), by_role(&snaps, "data"));
    assert_eq!(root_snap["volume"], root_id.as_str());
    assert_eq!(data_snap["volume"], data_id.as_str());
    for snap in [root_snap, data_snap] {
        assert_eq!(snap["vm"], vm_id.as_str());
    }
    // Taken together, so one group ties them (a restore can bring the VM back whole).
    let group = field(root_snap, "group");
    assert_eq!(data_snap["group"], group.as_str());

    // Each holds its own disk's data, not the other's, and not what came later.
    qemu_write(&root_uri, 0xa2, 0, MIB);
    qemu_write(&data_uri, 0xd2, 0, MIB);
    assert_reads(&unix_uri(root_snap), 0xa1, 0, MIB);
    assert_reads(&unix_uri(data_snap), 0xd1, 0, MIB);

    let want = ids(&snaps);
    assert_eq!(ids(&srv.cli_json(&["vm", "snapshots", "app"])), want);
    assert_eq!(ids(&srv.cli_json(&["snapshot", "list", "--vm", "app"])), want);
    assert_eq!(ids(&srv.cli_json(&["snapshot", "list", "--vm", &vm_id])), want);
    assert_eq!(ids(&srv.cli_json(&["snapshot", "list", "--volume", &data_id])), vec![id(data_snap)]);
    // A second VM's snapshots do not show up under the first.
    srv.cli_json(&["vm", "create", "other", "--size", "1M"]);
    srv.cli_json(&["vm", "snapshot", "other"]);
    assert_eq!(ids(&srv.cli_json(&["vm", "snapshots", "app"])), want);
}

#[test]
fn restore_rules_for_data_and_root_snapshots() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    let va = id(&srv.cli_json(&["vm", "create", "va", "--size", "8M"]));
    let vb = id(&srv.cli_json(&["vm", "create", "vb", "--size", "8M"]));
    let data_id = id(&srv.cli_json(&["volume", "create", "va-data", "--size", "4M", "--vm", "va"]));
    let old_root = root_of(&srv, "va");
    let old_root_id = id(&old_root);
    qemu_write(&unix_uri(&old_root), 0x5a, 0, MIB);
    qemu_write(&unix_uri(&volume(&srv, &data_id)), 0xd5, 0, MIB);
    let snaps = srv.cli_json(&["vm", "snapshot", "va"]);
    let (root_snap, data_snap) = (by_role(&snaps, "root").clone(), by_role(&snaps, "data").clone());
    let (root_snap_id, data_snap_id) = (id(&root_snap), id(&data_snap));
    // The live disks move on, so a restore that copied the live disk would show.
    qemu_write(&unix_uri(&old_root), 0x77, 0, MIB);
    qemu_write(&unix_uri(&volume(&srv, &data_id)), 0x78, 0, MIB);

    // R7: a data-disk snapshot becomes a standalone volume with the snapshot's bytes.
    let restored = srv.cli_json(&["snapshot", "restore", &data_snap_id]);
    let restored_id = id(&restored);
    assert_eq!(restored["vm"], Value::Null, "standalone: {restored}");
    assert_eq!(restored["role"], "data");
    assert_eq!(restored["size"], 4 * MIB);
    assert_eq!(restored["source"], json!({"kind": "snapshot", "id": data_snap_id}));
    assert_eq!(restored["name"], format!("{}-restore", field(&data_snap, "name")), "the documented default name");
    assert_same(&unix_uri(&data_snap), &unix_uri(&restored));
    assert_reads(&unix_uri(&restored), 0xd5, 0, MIB);
    // ... attachable to any VM.
    let attached = srv.cli_json(&["volume", "attach", &restored_id, "vb"]);
    assert_eq!(attached["vm"], vb.as_str());
    assert_eq!(srv.cli_json(&["vm", "show", "vb"])["data_volumes"], json!([restored_id]));
    // ... and its own disk: writing it leaves the snapshot alone.
    qemu_write(&unix_uri(&restored), 0x99, 0, MIB);
    assert_reads(&unix_uri(&data_snap), 0xd5, 0, MIB);

    // R7: a root-disk snapshot never becomes a standalone volume nor another VM's disk.
    let err = srv.cli_fails(&["snapshot", "restore", &root_snap_id]);
    assert!(err.to_lowercase().contains("root"), "the error should say why (a root-disk snapshot): {err}");
    let err = srv.cli_fails(&["snapshot", "restore", &root_snap_id, "--vm", "vb"]);
    assert!(err.to_lowercase().contains("root"), "{err}");
    srv.cli_fails(&["snapshot", "restore", &root_snap_id, "--vm", "vb", "--as", "root"]);
    // A data-disk snapshot never becomes a root disk.
    srv.cli_fails(&["snapshot", "restore", &data_snap_id, "--vm", "va", "--as", "root"]);
    // Swapping the root disk of a running VM is refused too.
    srv.cli_fails(&["snapshot", "restore", &root_snap_id, "--vm", "va", "--as", "root"]);
    // None of the refused restores left a volume behind: va-root, vb-root, va-data, restored.
    assert_eq!(srv.cli_json(&["volume", "list"]).as_array().map(Vec::len), Some(4));

    // R5: the root snapshot comes back as the same VM's root disk while it is stopped.
    srv.cli_json(&["vm", "stop", "va"]);
    let new_root = srv.cli_json(&["snapshot", "restore", &root_snap_id, "--vm", "va", "--as", "root"]);
    let new_root_id = id(&new_root);
    assert_ne!(new_root_id, old_root_id);
    assert_eq!(new_root["role"], "root");
    assert_eq!(new_root["vm"], va.as_str());
    let va_now = srv.cli_json(&["vm", "show", "va"]);
    assert_eq!(va_now["root_volume"], new_root_id.as_str(), "the VM boots from the restored disk");
    assert_eq!(va_now["data_volumes"], json!([data_id]), "the data disk stays attached");
    assert_reads(&unix_uri(&volume(&srv, &new_root_id)), 0x5a, 0, MIB);
    // (The snapshot's URI is read afresh: its volume, the old root, is gone now.)
    let root_snap_now = srv.cli_json(&["snapshot", "show", &root_snap_id]);
    assert_same(&unix_uri(&root_snap_now), &unix_uri(&volume(&srv, &new_root_id)));

    // The old root is gone, but nothing is lost: a snapshot named ROOTNAME-replaced-… holds it.
    let (status, body) = srv.http("GET", &format!("/v1/volumes/{old_root_id}"), None, Some(&srv.admin_token));
    assert_eq!(status, 404, "{body}");
    let all = srv.cli_json(&["snapshot", "list"]);
    let replaced: Vec<&Value> =
        all.as_array().unwrap().iter().filter(|s| s["name"].as_str().unwrap_or("").contains("-replaced-")).collect();
    assert_eq!(replaced.len(), 1, "one snapshot of the replaced root in {all}");
    assert!(field(replaced[0], "name").starts_with("va-root-replaced-"), "{}", replaced[0]);
    assert_eq!(replaced[0]["volume"], old_root_id.as_str());
    assert_eq!(replaced[0]["disk_role"], "root");
    assert_reads(&unix_uri(replaced[0]), 0x77, 0, MIB);
}

#[test]
fn deleting_a_vm_keeps_data_volumes_and_snapshots() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    let vm_id = id(&srv.cli_json(&["vm", "create", "gone", "--size", "8M"]));
    let keep = srv.cli_json(&["volume", "create", "keep", "--size", "4M", "--vm", "gone"]);
    let keep_id = id(&keep);
    let root = root_of(&srv, "gone");
    let root_id = id(&root);
    qemu_write(&unix_uri(&root), 0x51, 0, MIB);
    qemu_write(&unix_uri(&keep), 0x52, 0, MIB);
    let snaps = srv.cli_json(&["vm", "snapshot", "gone"]);
    let snap_ids = ids(&snaps);

    // R8: the root disk goes with the VM; the data disk is detached and stays.
    let deleted = srv.cli_json(&["vm", "delete", "gone"]);
    assert_eq!(deleted["deleted"], vm_id.as_str());
    assert_eq!(deleted["deleted_volumes"], json!([root_id]));
    assert_eq!(deleted["detached_volumes"], json!([keep_id]));
    for path in [format!("/v1/vms/{vm_id}"), format!("/v1/volumes/{root_id}")] {
        let (status, body) = srv.http("GET", &path, None, Some(&srv.admin_token));
        assert_eq!(status, 404, "GET {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    srv.cli_fails(&["volume", "show", &root_id]);
    let kept = volume(&srv, &keep_id);
    assert_eq!(kept["vm"], Value::Null);
    assert_reads(&unix_uri(&kept), 0x52, 0, MIB);

    // The snapshots of both disks stay, listed under the deleted VM's id and readable.
    assert_eq!(ids(&srv.cli_json(&["vm", "snapshots", &vm_id])), snap_ids);
    let listed = ids(&srv.cli_json(&["snapshot", "list"]));
    assert!(snap_ids.iter().all(|s| listed.contains(s)), "{snap_ids:?} not all in {listed:?}");
    let root_snap = srv.cli_json(&["snapshot", "show", &id(by_role(&snaps, "root"))]);
    assert_eq!(root_snap["vm"], vm_id.as_str(), "what the disk was when taken stays recorded");
    assert_eq!(root_snap["disk_role"], "root");
    assert_eq!(root_snap["volume"], root_id.as_str());
    assert_reads(&unix_uri(&root_snap), 0x51, 0, MIB);
    // The URI handed out when the snapshot was taken (VOLUME@SNAPSHOT) keeps working after
    // the volume is gone: a backup tool may hold it, and docs/api.md names every snapshot so.
    assert_reads(&unix_uri(by_role(&snaps, "root")), 0x51, 0, MIB);
    let data_snap = srv.cli_json(&["snapshot", "show", &id(by_role(&snaps, "data"))]);
    assert_reads(&unix_uri(&data_snap), 0x52, 0, MIB);

    // Detached for real: it can now be deleted, and its snapshot still outlives it.
    srv.cli_json(&["volume", "delete", "keep"]);
    assert_reads(&unix_uri(&srv.cli_json(&["snapshot", "show", &id(&data_snap)])), 0x52, 0, MIB);
}

#[test]
fn templates_from_root_snapshots() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    srv.cli_json(&["vm", "create", "src", "--size", "8M"]);
    let src_root = root_of(&srv, "src");
    qemu_write(&unix_uri(&src_root), 0x3c, 0, MIB);
    qemu_write(&unix_uri(&src_root), 0x3d, 4 * MIB, MIB);
    let snap = srv.cli_json(&["snapshot", "create", &id(&src_root), "--name", "golden"]);

    // R6: a root-disk snapshot becomes a template.
    let tpl = srv.cli_json(&["template", "create", "gold", "--snapshot", "golden"]);
    let tpl_id = id(&tpl);
    assert_eq!(tpl["size"], 8 * MIB);
    assert_eq!(tpl["state"], "ready");
    assert_eq!(tpl["source"], json!({"kind": "snapshot", "id": id(&snap)}));
    let tpl_uri = unix_uri(&tpl);
    assert_same(&unix_uri(&snap), &tpl_uri);
    // The source VM goes on living; the template does not follow it.
    qemu_write(&unix_uri(&src_root), 0x3e, 0, MIB);
    assert_reads(&tpl_uri, 0x3c, 0, MIB);

    let clone = srv.cli_json(&["vm", "create", "clone", "--template", "gold"]);
    assert_eq!(clone["template"], tpl_id.as_str());
    let clone_root = root_of(&srv, "clone");
    assert_eq!(clone_root["source"], json!({"kind": "template", "id": tpl_id}));
    assert_eq!(clone_root["size"], 8 * MIB);
    let clone_uri = unix_uri(&clone_root);
    assert_same(&tpl_uri, &clone_uri);

    // The clone's writes are its own: the template and later clones stay golden.
    qemu_write(&clone_uri, 0xee, 0, MIB);
    assert_reads(&tpl_uri, 0x3c, 0, MIB);
    assert!(qemu_write_fails(&tpl_uri), "a template export took a write");
    srv.cli_json(&["vm", "create", "clone2", "--template", &tpl_id]);
    assert_same(&tpl_uri, &unix_uri(&root_of(&srv, "clone2")));

    // A data disk is not an OS image (R6/R7).
    srv.cli_json(&["volume", "create", "dd", "--size", "4M"]);
    srv.cli_json(&["snapshot", "create", "dd", "--name", "dsnap"]);
    srv.cli_fails(&["template", "create", "bad", "--snapshot", "dsnap"]);
    assert_eq!(ids(&srv.cli_json(&["template", "list"])), vec![tpl_id.clone()]);

    // Deleting the template leaves the VMs made from it working.
    srv.cli_json(&["template", "delete", "gold"]);
    srv.cli_fails(&["template", "show", &tpl_id]);
    assert_reads(&clone_uri, 0xee, 0, MIB);
    assert_reads(&clone_uri, 0x3d, 4 * MIB, MIB);
}

#[test]
fn grow_only_grows() {
    if !have_all(&["qemu-io", "qemu-img", "nbdinfo"]) {
        return;
    }
    let srv = TestServer::start();
    let vol = srv.cli_json(&["volume", "create", "g", "--size", "4M"]);
    qemu_write(&unix_uri(&vol), 0x47, 0, 4 * MIB);

    let grown = srv.cli_json(&["volume", "grow", "g", "8M"]);
    assert_eq!(grown["size"], 8 * MIB);
    let uri = unix_uri(&volume(&srv, "g"));
    // What clients see, not only what the API says.
    assert_eq!(qemu_img_size("raw", &uri), 8 * MIB);
    assert_eq!(nbd_size(&uri), 8 * MIB);
    // Old data stays, the new space is zeros and takes writes.
    assert_reads(&uri, 0x47, 0, 4 * MIB);
    assert_reads(&uri, 0, 4 * MIB, 4 * MIB);
    qemu_write(&uri, 0x48, 6 * MIB, MIB);
    assert_reads(&uri, 0x48, 6 * MIB, MIB);

    // Shrinking would cut data off: refused, size unchanged.
    srv.cli_fails(&["volume", "grow", "g", "2M"]);
    assert_eq!(volume(&srv, "g")["size"], 8 * MIB);
    assert_eq!(nbd_size(&uri), 8 * MIB);
}

#[test]
fn import_and_export_images() {
    if !tools() {
        return;
    }
    let srv = TestServer::start();
    let files = srv.dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let raw = files.join("disk.raw");
    let qcow2 = files.join("disk.qcow2");
    make_raw_image(&raw, 4 * MIB as usize, 7);
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).args([&raw, &qcow2]));

    // Raw and qcow2 imports (the format detected); --json returns once the job is done.
    for (name, file) in [("imp-raw", &raw), ("imp-qcow", &qcow2)] {
        let printed = srv.cli_json(&["volume", "import", p(file), "--name", name]);
        let job = assert_job_succeeded(&srv, &printed, "import");
        let vol = volume(&srv, name);
        assert_eq!(job["resource"], vol["id"], "{job}");
        assert_eq!(vol["state"], "ready");
        assert_eq!(vol["size"], 4 * MIB);
        assert_eq!(vol["role"], "data");
        assert_eq!(vol["source"], json!({"kind": "image", "path": p(file)}));
        assert!(images_equal("raw", &unix_uri(&vol), "raw", p(&raw)), "{name} differs from {}", raw.display());
    }

    // Export to qcow2: a real qcow2 file with the volume's content.
    let out_qcow2 = files.join("out.qcow2");
    let printed = srv.cli_json(&["volume", "export", "imp-raw", p(&out_qcow2), "--format", "qcow2"]);
    assert_job_succeeded(&srv, &printed, "export");
    assert_eq!(qemu_img_format(&out_qcow2), "qcow2");
    assert!(images_equal("raw", &unix_uri(&volume(&srv, "imp-raw")), "qcow2", p(&out_qcow2)));
    assert!(images_equal("raw", p(&raw), "qcow2", p(&out_qcow2)));

    // A snapshot exports its point in time (raw by default), not the live disk.
    let snap = srv.cli_json(&["snapshot", "create", "imp-qcow", "--name", "s"]);
    qemu_write(&unix_uri(&volume(&srv, "imp-qcow")), 0xff, 0, MIB);
    let out_snap = files.join("snap.raw");
    let printed = srv.cli_json(&["snapshot", "export", "s", p(&out_snap)]);
    assert_job_succeeded(&srv, &printed, "export");
    assert_eq!(std::fs::read(&out_snap).unwrap(), std::fs::read(&raw).unwrap(), "the snapshot export is not the image");
    assert_same(&unix_uri(&snap), p(&out_snap));

    // An export never overwrites a file: refused, and the file keeps its bytes.
    let precious = files.join("precious");
    std::fs::write(&precious, b"do not overwrite").unwrap();
    srv.cli_fails(&["volume", "export", "imp-raw", p(&precious)]);
    srv.cli_fails(&["snapshot", "export", "s", p(&precious)]);
    assert_eq!(std::fs::read(&precious).unwrap(), b"do not overwrite");

    // A VM whose root disk is imported from an image.
    srv.cli_json(&["vm", "create", "vimg", "--image", p(&qcow2)]);
    let root = root_of(&srv, "vimg");
    assert_eq!(root["state"], "ready", "--json waits for the import: {root}");
    assert_eq!(root["role"], "root");
    assert!(images_equal("raw", &unix_uri(&root), "raw", p(&raw)));
}

#[test]
fn restart_keeps_everything() {
    if !tools() {
        return;
    }
    let mut srv = TestServer::start();
    let alice = field(&srv.expect("POST", "/v1/tenants", Some(json!({"name": "alice"})), 201), "token");
    srv.cli_json(&["vm", "create", "r1", "--size", "8M"]);
    let data = srv.cli_json(&["volume", "create", "rdata", "--size", "4M", "--vm", "r1"]);
    let root = root_of(&srv, "r1");
    qemu_write(&unix_uri(&root), 0x42, 0, MIB);
    qemu_write(&unix_uri(&data), 0x43, 0, MIB);
    let snap = srv.cli_json(&["snapshot", "create", "rdata", "--name", "rs"]);
    srv.cli_json(&["snapshot", "create", &id(&root), "--name", "rroot"]);
    let tpl = srv.cli_json(&["template", "create", "rtpl", "--snapshot", "rroot"]);
    // Written (and flushed by qemu-io) after the snapshot: only the live disk has it.
    qemu_write(&unix_uri(&data), 0x44, 0, MIB);
    srv.cli_json(&["vm", "stop", "r1"]);

    let lists = |srv: &TestServer| -> Vec<Vec<String>> {
        ["vm", "volume", "snapshot", "template", "tenant"]
            .iter()
            .map(|kind| ids(&srv.cli_json(&[*kind, "list"])))
            .collect()
    };
    let before = lists(&srv);
    let admin_token = srv.admin_token.clone();

    // No shutdown: what was acknowledged must be on disk already.
    srv.kill9();
    srv.restart();
    assert_eq!(srv.admin_token, admin_token, "the admin token is made once, on first start");
    assert_eq!(lists(&srv), before, "the same resources, with the same ids");
    assert_eq!(srv.expect_as(&alice, "GET", "/v1/whoami", None, 200)["name"], "alice");
    let vm = srv.cli_json(&["vm", "show", "r1"]);
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["root_volume"], root["id"]);
    assert_eq!(vm["data_volumes"], json!([id(&data)]));

    // The data reads back, through the URIs of the new daemon (its ports are new).
    assert_reads(&unix_uri(&root_of(&srv, "r1")), 0x42, 0, MIB);
    let data_uri = unix_uri(&volume(&srv, "rdata"));
    assert_reads(&data_uri, 0x44, 0, MIB);
    assert_reads(&tcp_uri(&volume(&srv, "rdata")), 0x44, 0, MIB);
    let snap_now = srv.cli_json(&["snapshot", "show", &id(&snap)]);
    assert_reads(&unix_uri(&snap_now), 0x43, 0, MIB);
    assert_reads(&unix_uri(&srv.cli_json(&["template", "show", &id(&tpl)])), 0x42, 0, MIB);

    // And it keeps working: writes, a restore from a snapshot taken before the restart.
    qemu_write(&data_uri, 0x45, MIB, MIB);
    assert_reads(&data_uri, 0x45, MIB, MIB);
    let restored = srv.cli_json(&["snapshot", "restore", "rs"]);
    assert_reads(&unix_uri(&restored), 0x43, 0, MIB);
    let file = srv.dir.path().join("rs.raw");
    let printed = srv.cli_json(&["snapshot", "export", "rs", p(&file)]);
    assert_job_succeeded(&srv, &printed, "export");
    assert_same(&unix_uri(&snap_now), p(&file));
}

#[test]
fn cli_errors_and_json_output() {
    let srv = TestServer::start();

    // An unknown VM: a non-zero exit and one `error:` line naming what is missing.
    let err = srv.cli_fails(&["vm", "show", "nosuch"]);
    assert!(err.contains("nosuch") || err.to_lowercase().contains("not found"), "{err}");
    // Under --json the failure is the same: nothing half-printed on stdout for a script.
    let args = ["--json", "vm", "show", "nosuch"];
    let out = srv.cli(&args);
    one_line_error(&args, &out);
    assert!(out.stdout.is_empty(), "stdout on failure: {}", String::from_utf8_lossy(&out.stdout));

    // A wrong token is an error, not an empty list.
    let args = ["vm", "list"];
    one_line_error(&args, &srv.cli_as("wrong-token", &args));

    // --json vm list is exactly the API's array.
    assert_eq!(srv.cli_json(&["vm", "list"]), json!([]));
    let vm = srv.cli_json(&["vm", "create", "listed", "--size", "1M"]);
    let list = srv.cli_json(&["vm", "list"]);
    assert!(list.is_array(), "{list}");
    assert_eq!(ids(&list), vec![id(&vm)]);
    let (_, api_list) = srv.http("GET", "/v1/vms", None, Some(&srv.admin_token));
    assert_eq!(list, api_list);

    // The table for people names the VM.
    let out = srv.cli(&["vm", "list"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("listed") && table.contains(&id(&vm)), "{table}");

    // --url and --token flags are the same as the environment.
    let out = Command::new(BIN)
        .args(["--url", &srv.url, "--token", &srv.admin_token, "--json", "vm", "list"])
        .env_remove("CAIRN_URL")
        .env_remove("CAIRN_TOKEN")
        .env("CAIRN_DATA_DIR", Path::new("/nonexistent"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), api_list);
}
