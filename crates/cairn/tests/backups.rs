//! Backups through the CLI into the daemon's repository: incremental by changed-block
//! tracking, restored into a new volume or over the old one, verified; R7 holds for backups.

mod common;

use common::{assert_reads, assert_same, have_all, id, qemu_write, unix_uri, TestServer};
use serde_json::Value;

/// Runs a backup or restore command with --json (which waits for the job) and checks the job
/// succeeded.
fn job(srv: &TestServer, args: &[&str]) -> Value {
    let job = srv.cli_json(args);
    assert_eq!(job["state"], "succeeded", "{args:?}: {job}");
    job
}

#[test]
fn backups_are_incremental_and_restore_byte_for_byte() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let srv = TestServer::start();
    srv.cli_json(&["vm", "create", "web", "--size", "8M"]);
    let root = srv.cli_json(&["volume", "show", "web-root"]);
    let root_uri = unix_uri(&root);
    qemu_write(&root_uri, 0xaa, 0, 1 << 20);
    qemu_write(&root_uri, 0xbb, 5 << 20, 64 << 10);

    job(&srv, &["backup", "create", "--vm", "web"]);
    let first = srv.cli_json(&["backup", "list", "--vm", "web"]);
    assert_eq!(first.as_array().unwrap().len(), 1, "{first}");
    let first = &first[0];
    // The first backup reads what is allocated, not the whole 8 MiB.
    assert_eq!(first["bytes_read"], (1 << 20) + (64 << 10), "{first}");
    assert_eq!(first["disk_role"], "root");

    // One 4 KiB write: the next backup reads the one 64 KiB chunk around it.
    qemu_write(&root_uri, 0xcc, 2 << 20, 4096);
    job(&srv, &["backup", "create", "web-root"]);
    let all = srv.cli_json(&["backup", "list", "--volume", "web-root"]);
    let second = &all[1];
    assert_eq!(second["bytes_read"], 64 << 10, "{second}");

    // R7: a root disk's backup does not become a standalone volume.
    let refused = srv.cli_fails(&["backup", "restore", &id(first)]);
    assert!(refused.contains("root disk"), "{refused}");
    // Back to its own VM as a data disk: the first backup's content, byte for byte.
    srv.cli_json(&["backup", "restore", &id(first), "--vm", "web", "--name", "back"]);
    let back = srv.cli_json(&["volume", "show", "back"]);
    assert_eq!(back["state"], "ready");
    assert_eq!(back["from_root_disk"], true);
    let back_uri = unix_uri(&back);
    assert_reads(&back_uri, 0xaa, 0, 1 << 20);
    assert_reads(&back_uri, 0, 2 << 20, 4096);
    assert_reads(&back_uri, 0xbb, 5 << 20, 64 << 10);

    // Over the root disk, writing only what differs: the VM must be stopped first.
    let running = srv.cli_fails(&["backup", "restore", &id(first), "--over", "web-root"]);
    assert!(running.contains("stop"), "{running}");
    srv.cli_json(&["vm", "stop", "web"]);
    job(&srv, &["backup", "restore", &id(first), "--over", "web-root"]);
    assert_same(&root_uri, &back_uri);

    let report = srv.cli_json(&["repo", "verify"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["backups"], 2);

    // Out of cairn, for the user's own infrastructure: raw and qcow2 files equal to the disk.
    for format in ["raw", "qcow2"] {
        let file = srv.dir.path().join(format!("first.{format}"));
        job(&srv, &["backup", "export", &id(first), common::p(&file), "--format", format]);
        assert_eq!(common::qemu_img_format(&file), format);
        assert!(common::images_equal("raw", &back_uri, format, common::p(&file)), "{format} export differs");
    }
}

#[test]
fn a_data_disks_backup_restores_anywhere_and_survives_its_volume() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let srv = TestServer::start();
    let volume = srv.cli_json(&["volume", "create", "data", "--size", "3M"]);
    qemu_write(&unix_uri(&volume), 0x5a, 100 << 10, 1 << 20);
    job(&srv, &["backup", "create", "data", "--snapshot-name", "at-backup"]);
    let backup = id(&srv.cli_json(&["backup", "list"])[0]);
    // The policy said keep: a snapshot of the backup's instant stays, and only that one.
    let snapshots = srv.cli_json(&["snapshot", "list"]);
    assert_eq!(snapshots.as_array().unwrap().len(), 1, "{snapshots}");
    assert_eq!(snapshots[0]["name"], "at-backup");
    job(&srv, &["backup", "create", "data"]);
    assert_eq!(srv.cli_json(&["snapshot", "list"]).as_array().unwrap().len(), 1, "by default none is kept");
    // The disk goes; its backup stays and is listed by the old volume's id (R8, R13).
    srv.cli_json(&["volume", "delete", "data"]);
    let left = srv.cli_json(&["backup", "list", "--volume", &id(&volume)]);
    assert_eq!(left.as_array().unwrap().len(), 2);
    srv.cli_json(&["vm", "create", "other", "--size", "1M"]);
    srv.cli_json(&["backup", "restore", &backup, "--vm", "other", "--name", "again"]);
    let again = srv.cli_json(&["volume", "show", "again"]);
    assert_eq!(again["size"], 3 << 20);
    assert_reads(&unix_uri(&again), 0x5a, 100 << 10, 1 << 20);
    assert_reads(&unix_uri(&again), 0, 0, 100 << 10);
}

#[test]
fn a_backup_cut_by_kill_9_leaves_the_repository_sound() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let mut srv = TestServer::start();
    let volume = srv.cli_json(&["volume", "create", "big", "--size", "256M"]);
    let uri = unix_uri(&volume);
    qemu_write(&uri, 0x11, 0, 1 << 20);
    job(&srv, &["backup", "create", "big"]);
    let first = id(&srv.cli_json(&["backup", "list"])[0]);
    // Enough new data that the next backup is still running when the daemon dies.
    for (i, pattern) in [0x21u8, 0x22, 0x23, 0x24].iter().enumerate() {
        qemu_write(&uri, *pattern, (8 + 48 * i as u64) << 20, 48 << 20);
    }
    let accepted = srv.cli_json(&["backup", "create", "big", "--no-wait"]);
    let job_id = id(&accepted["job"]);
    srv.kill9();
    srv.restart();
    // The cut job is failed, not left running; whatever it wrote leaves the repository sound.
    let cut = srv.cli_json(&["job", "show", &job_id]);
    assert_eq!((&cut["state"], &cut["error"]), (&"failed".into(), &"interrupted by a restart".into()), "{cut}");
    let report = srv.cli_json(&["repo", "verify"]);
    assert_eq!(report["ok"], true, "{report}");
    // The earlier backup restores, and a new backup of the disk works and is complete.
    srv.cli_json(&["backup", "restore", &first, "--name", "early"]);
    assert_reads(&unix_uri(&srv.cli_json(&["volume", "show", "early"])), 0x11, 0, 1 << 20);
    job(&srv, &["backup", "create", "big"]);
    let newest = srv.cli_json(&["backup", "list", "--volume", "big"]);
    let newest = id(newest.as_array().unwrap().last().unwrap());
    srv.cli_json(&["backup", "restore", &newest, "--name", "late"]);
    assert_same(&uri, &unix_uri(&srv.cli_json(&["volume", "show", "late"])));
}

/// Bytes of packs in the test daemon's repository (the default, beside its data directory).
fn repository_pack_bytes(srv: &TestServer) -> u64 {
    fn walk(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .map(|p| if p.is_dir() { walk(&p) } else { p.metadata().unwrap().len() })
            .sum()
    }
    walk(&srv.dir.path().join("cairn-backups").join("packs"))
}

#[test]
fn backups_are_pruned_by_rules_after_a_dry_run_and_gc_reclaims_their_space() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let mut srv = TestServer::start();
    let volume = srv.cli_json(&["volume", "create", "data", "--size", "8M"]);
    let uri = unix_uri(&volume);
    // Three backups, each of different data (made with one qemu-img write of random bytes).
    let mut contents = Vec::new();
    for seed in 1..=3u64 {
        let image = srv.dir.path().join(format!("random-{seed}.raw"));
        common::make_raw_image(&image, 2 << 20, seed);
        copy_image_into(&image, &uri);
        job(&srv, &["backup", "create", "data"]);
        contents.push(image);
    }
    let all = srv.cli_json(&["backup", "list", "--volume", "data"]);
    let ids: Vec<String> = all.as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids.len(), 3);

    // A dry run says what would go and deletes nothing.
    let plan = srv.cli_json(&["backup", "prune", "--volume", "data", "--keep-last", "1", "--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    let forget: Vec<String> =
        plan["disks"][0]["forget"].as_array().unwrap().iter().map(|b| common::field(b, "backup")).collect();
    assert_eq!(forget, ids[..2], "{plan}");
    assert_eq!(plan["disks"][0]["keep"][0]["reasons"][0], "last");
    let text = String::from_utf8(srv.cli(&["backup", "prune", "--keep-last", "1", "--dry-run"]).stdout).unwrap();
    assert!(text.contains("would delete") && text.contains(&ids[0]), "{text}");
    assert_eq!(srv.cli_json(&["backup", "list"]).as_array().unwrap().len(), 3);
    // No rule at all would delete everything: refused.
    let refused = srv.cli_fails(&["backup", "prune", "--volume", "data"]);
    assert!(refused.contains("keep"), "{refused}");
    let refused = srv.cli_fails(&["backup", "prune", "--keep-daily", "1", "--time-zone", "Mars/Olympus"]);
    assert!(refused.contains("time zone"), "{refused}");

    let plan = srv.cli_json(&["backup", "prune", "--volume", "data", "--keep-last", "1"]);
    assert_eq!(plan["forgotten"], 2, "{plan}");
    assert_eq!(ids_of(&srv.cli_json(&["backup", "list"])), ids[2..]);

    // GC takes back the forgotten backups' data; the kept backup restores byte for byte.
    let before = repository_pack_bytes(&srv);
    let dry = srv.cli_json(&["repo", "gc", "--grace", "0", "--dry-run"]);
    assert_eq!(repository_pack_bytes(&srv), before, "a dry run deletes nothing: {dry}");
    let report = srv.cli_json(&["repo", "gc", "--grace", "0"]);
    assert_eq!(report["packs_deleted"], dry["packs_deleted"], "{report}");
    let after = repository_pack_bytes(&srv);
    // Each image is 1.5 MiB of random data and a hole.
    assert!(before - after >= 3 << 20, "{before} -> {after}: two backups' data went");
    srv.cli_json(&["backup", "restore", &ids[2], "--name", "kept"]);
    let kept = unix_uri(&srv.cli_json(&["volume", "show", "kept"]));
    assert!(common::images_equal("raw", common::p(&contents[2]), "raw", &kept));
    assert_eq!(srv.cli_json(&["repo", "verify"])["ok"], true);

    // A gc cut by kill -9 leaves a repository that verifies and a gc that finishes.
    srv.cli_json(&["backup", "delete", &ids[2]]);
    assert!(srv.cli_json(&["backup", "list"]).as_array().unwrap().is_empty());
    let started = srv.cli_json(&["repo", "gc", "--grace", "0", "--no-wait"]);
    assert_eq!(started["job"]["kind"], "gc");
    srv.kill9();
    srv.restart();
    assert_eq!(srv.cli_json(&["repo", "verify"])["ok"], true);
    srv.cli_json(&["repo", "gc", "--grace", "0"]);
    assert_eq!(repository_pack_bytes(&srv), 0, "nothing is referenced, so nothing is left");
    // Only an administrator runs repository jobs.
    let tenant = srv.expect("POST", "/v1/tenants", Some(serde_json::json!({"name": "alice"})), 201);
    let (status, _) = srv.http("POST", "/v1/repository/gc", None, tenant["token"].as_str());
    assert_eq!(status, 403);
}

/// Writes a raw image over the start of an NBD export.
fn copy_image_into(image: &std::path::Path, uri: &str) {
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", common::p(image), uri])
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert into {uri}");
}

/// An S3 server on loopback with `bucket` in it, and a daemon given `args` and the server's
/// endpoint and keys (plus `env`). The server lives as long as the first value.
fn with_s3_bucket(bucket: &str, args: &[&str], env: &[(&str, &str)]) -> (cairn_testkit::S3Server, TestServer) {
    let s3 = cairn_testkit::start_s3_server();
    s3.create_bucket(bucket);
    let endpoint = s3.endpoint();
    let mut all = vec![
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", cairn_testkit::s3::ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", cairn_testkit::s3::SECRET_ACCESS_KEY),
    ];
    all.extend_from_slice(env);
    let srv = TestServer::start_with(args, &all);
    (s3, srv)
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(id).collect()
}

#[test]
fn backups_copy_offsite_to_s3_incrementally_and_restore_from_there_when_the_repository_is_lost() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let (_s3, srv) = with_s3_bucket(
        "offsite",
        &["--copy-repo", "offsite=s3://offsite/cairn"],
        &[("CAIRN_BACKUP_PASSPHRASE", "correct horse")],
    );
    let volume = srv.cli_json(&["volume", "create", "data", "--size", "8M"]);
    let uri = unix_uri(&volume);
    // 2 MiB of random data with a 512 KiB hole: 24 chunks of 64 KiB hold data.
    let image = srv.dir.path().join("random.raw");
    common::make_raw_image(&image, 2 << 20, 7);
    copy_image_into(&image, &uri);
    job(&srv, &["backup", "create", "data"]);
    qemu_write(&uri, 0x77, 0, 4096);
    job(&srv, &["backup", "create", "data"]);

    // Both go off-site, oldest first; the second sends only its one changed chunk.
    let report = srv.cli_json(&["backup", "copy", "--to", "offsite", "--volume", "data"]);
    assert_eq!(report["copied"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["chunks_fetched"], 25, "{report}");
    let listed = srv.cli_json(&["backup", "list", "--volume", "data"]);
    assert!(listed.as_array().unwrap().iter().all(|b| b["copies"] == serde_json::json!(["offsite"])), "{listed}");
    let again = srv.cli_json(&["backup", "copy", "--to", "offsite", "--volume", "data"]);
    assert_eq!(again["copied"], serde_json::json!([]), "nothing left to copy: {again}");
    let unknown = srv.cli_fails(&["backup", "copy", "--to", "nowhere"]);
    assert!(unknown.contains("nowhere") && unknown.contains("offsite"), "{unknown}");

    // The backup repository is lost; the off-site copy restores the newest backup exactly.
    std::fs::remove_dir_all(srv.dir.path().join("cairn-backups").join("packs")).unwrap();
    let newest = id(&listed[1]);
    srv.cli_json(&["backup", "restore", &newest, "--from", "offsite", "--name", "back"]);
    let back = srv.cli_json(&["volume", "show", "back"]);
    assert_eq!(back["state"], "ready", "{back}");
    assert_same(&uri, &unix_uri(&back));

    // The second repository is verified and collected like the first: deleting the older
    // backup forgets its copy there too, and gc there keeps what the newer one needs.
    assert_eq!(srv.cli_json(&["repo", "verify", "--repository", "offsite"])["backups"], 2);
    srv.cli_json(&["backup", "delete", &id(&listed[0])]);
    let collected = srv.cli_json(&["repo", "gc", "--repository", "offsite", "--grace", "0"]);
    assert_eq!(collected["backups"], 1, "{collected}");
    let report = srv.cli_json(&["repo", "verify", "--repository", "offsite"]);
    assert_eq!((&report["ok"], &report["backups"]), (&true.into(), &1.into()), "{report}");
    srv.cli_json(&["backup", "restore", &newest, "--from", "offsite", "--name", "again"]);
    assert_same(&uri, &unix_uri(&srv.cli_json(&["volume", "show", "again"])));
}

#[test]
fn the_backup_repository_itself_can_be_on_s3() {
    if !have_all(&["qemu-io", "qemu-img"]) {
        return;
    }
    let (_s3, srv) = with_s3_bucket("primary", &["--backup-repo", "s3://primary/cairn"], &[]);
    let volume = srv.cli_json(&["volume", "create", "data", "--size", "2M"]);
    qemu_write(&unix_uri(&volume), 0x3c, 64 << 10, 1 << 20);
    job(&srv, &["backup", "create", "data"]);
    assert!(!srv.dir.path().join("cairn-backups").exists(), "nothing went to the local default");
    let backup = id(&srv.cli_json(&["backup", "list"])[0]);
    srv.cli_json(&["backup", "restore", &backup, "--name", "back"]);
    assert_same(&unix_uri(&volume), &unix_uri(&srv.cli_json(&["volume", "show", "back"])));
    assert_eq!(srv.cli_json(&["repo", "verify"])["ok"], true);
}
