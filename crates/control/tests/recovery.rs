//! What a crash leaves between the metadata and the volume engine is repaired when the control
//! plane opens: engine objects without rows go, jobs in flight are failed and what they were
//! making is removed, and everything the metadata names is untouched.

use std::path::Path;
use std::sync::Arc;

use cairn_control::db::{self, MetaStore};
use cairn_control::model::*;
use cairn_control::names::{new_id, Kind, SizeArg};
use cairn_control::{engine_snapshot_name, Control, Recovery, Settings};
use cairn_volume::{Store, StoreOptions};

async fn open(dir: &Path) -> (Arc<Control>, Recovery) {
    Control::open_dir(Settings::in_dir(dir)).await.unwrap()
}

async fn admin(control: &Control, dir: &Path) -> Tenant {
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    control.authenticate(token.trim()).await.unwrap()
}

/// Closes everything, as a clean stop would; the next `open` sees what is on disk.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

async fn close(control: Arc<Control>) {
    control.close().await;
    let engine = control.engine().clone();
    drop(control);
    // The exports and control held the other references; the store flushes as it goes.
    drop(engine);
}

#[tokio::test]
async fn engine_objects_without_metadata_are_removed_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (control, recovery) = open(dir.path()).await;
    assert!(recovery.admin_token.is_some());
    let t = admin(&control, dir.path()).await;
    let kept = control.create_volume(&t, "kept", &SizeArg::Text("1M".into()), None).await.unwrap();
    let snap = control.snapshot_volume(&t, "kept", &Default::default()).await.unwrap();
    // What a crash between the engine's change and the metadata's leaves behind:
    let engine = control.engine();
    let orphan_volume = new_id(Kind::Volume);
    engine.create_volume(&orphan_volume, 1 << 20).unwrap();
    let orphan_snapshot = engine_snapshot_name(&kept.volume.id, &new_id(Kind::Snapshot));
    engine.snapshot(engine.volume_id(&kept.volume.id).unwrap(), &orphan_snapshot).unwrap();
    let orphan_template = new_id(Kind::Template);
    let tpl_volume = engine.create_volume(&orphan_template, 1 << 20).unwrap();
    engine.snapshot(tpl_volume.id, "base").unwrap();
    // Not named like a cairn resource: not the control plane's to judge.
    engine.create_volume("made-by-hand", 1 << 20).unwrap();
    close(control).await;

    let (control, recovery) = open(dir.path()).await;
    assert_eq!(recovery.admin_token, None, "the admin is made once");
    let mut removed = recovery.orphans_removed.clone();
    removed.sort();
    let mut expected = vec![
        format!("volume {orphan_volume}"),
        format!("snapshot {orphan_snapshot}"),
        format!("volume {orphan_template}"),
        "snapshot base".to_string(),
    ];
    expected.sort();
    assert_eq!(removed, expected);
    let names: Vec<String> = control.engine().list_volumes().into_iter().map(|v| v.name).collect();
    assert!(names.contains(&kept.volume.id) && names.contains(&"made-by-hand".to_string()), "{names:?}");
    let t = admin(&control, dir.path()).await;
    assert_eq!(control.get_snapshot(&t, &snap.snapshot.id).await.unwrap().snapshot.volume, kept.volume.id);
    // A second start finds nothing more to do.
    close(control).await;
    assert!(open(dir.path()).await.1.orphans_removed.is_empty());
}

#[tokio::test]
async fn a_job_cut_short_fails_and_its_half_made_resources_go() {
    let dir = tempfile::tempdir().unwrap();
    let (control, _) = open(dir.path()).await;
    let t = admin(&control, dir.path()).await;
    // An import into a new VM's root disk, as `create_vm` leaves it the moment before a kill.
    let vm = Vm {
        id: new_id(Kind::Vm),
        tenant: t.id.clone(),
        name: "half".into(),
        state: VmState::Running,
        root_volume: new_id(Kind::Volume),
        data_volumes: vec![],
        template: None,
        created_at: cairn_control::now(),
    };
    let volume = Volume {
        id: vm.root_volume.clone(),
        tenant: t.id.clone(),
        name: "half-root".into(),
        size: 1 << 20,
        state: ResourceState::Importing,
        vm: Some(vm.id.clone()),
        role: DiskRole::Root,
        from_root_disk: true,
        source: Source::Image { path: "/nowhere.raw".into() },
        created_at: cairn_control::now(),
    };
    let job = Job {
        id: new_id(Kind::Job),
        tenant: t.id.clone(),
        kind: JobKind::Import,
        state: JobState::Running,
        resource: volume.id.clone(),
        path: "/nowhere.raw".into(),
        bytes_done: 0,
        bytes_total: 1 << 20,
        error: None,
        created_at: cairn_control::now(),
        finished_at: None,
        result: None,
    };
    control.engine().create_volume(&volume.id, volume.size).unwrap();
    let meta = MetaStore::open_sqlite(&dir.path().join("cairn.db")).await.unwrap();
    let mut tx = meta.begin().await.unwrap();
    db::insert_volume(&mut tx, &volume).await.unwrap();
    db::insert_vm(&mut tx, &vm).await.unwrap();
    db::insert_job(&mut tx, &job).await.unwrap();
    tx.commit().await.unwrap();
    meta.close().await;
    close(control).await;

    let (control, recovery) = open(dir.path()).await;
    assert_eq!(recovery.interrupted_jobs, vec![job.id.clone()]);
    let t = admin(&control, dir.path()).await;
    let failed = control.get_job(&t, &job.id).await.unwrap();
    assert_eq!(failed.job.state, JobState::Failed);
    assert_eq!(failed.job.error.as_deref(), Some("interrupted by a restart"));
    assert!(matches!(control.get_vm(&t, "half").await, Err(cairn_control::Error::NotFound { .. })));
    assert!(matches!(control.get_volume(&t, &volume.id).await, Err(cairn_control::Error::NotFound { .. })));
    assert!(control.engine().volume_id(&volume.id).is_err(), "the engine volume went too");
}

#[tokio::test]
async fn a_lost_database_over_existing_volumes_is_refused_not_taken_for_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let (control, _) = open(dir.path()).await;
    let t = admin(&control, dir.path()).await;
    let volume = control.create_volume(&t, "precious", &SizeArg::Text("1M".into()), None).await.unwrap();
    close(control).await;
    // The volume store alone, in a directory of its own: deleting the database files in place
    // would race with the closing connection's last write of its WAL.
    let lost = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("volumes"), &lost.path().join("volumes"));
    let refused = Control::open_dir(Settings::in_dir(lost.path())).await;
    assert!(matches!(&refused, Err(cairn_control::Error::Internal(m)) if m.contains("refusing")), "{refused:?}");
    let engine = Store::open_dir(lost.path().join("volumes"), StoreOptions::default()).unwrap();
    assert!(engine.volume_id(&volume.volume.id).is_ok(), "the volume is still there");
}

/// A backup deleted just before a crash (its row gone, its record still in the repository) is
/// forgotten in the repository when the control plane next opens.
#[tokio::test]
async fn a_deleted_backups_record_is_forgotten_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let settings = || Settings {
        backup_repository: Some(cairn_backup::RepoLocation::Dir(repo_dir.clone())),
        ..Settings::in_dir(dir.path())
    };
    let (control, _) = Control::open_dir(settings()).await.unwrap();
    let t = admin(&control, dir.path()).await;
    control.create_volume(&t, "disk", &SizeArg::Text("1M".into()), None).await.unwrap();
    control.start_backup(&t, Some("disk"), None, None).await.unwrap();
    control.drain_jobs(std::time::Duration::from_secs(60)).await;
    let backup = control.list_backups(&t, None, None).await.unwrap().remove(0);
    let backend = Arc::new(cairn_backup::DirBackend::new(&repo_dir).unwrap());
    let records = || cairn_backup::Repository::open(backend.clone(), None).unwrap().list_backups().unwrap().len();
    assert_eq!(records(), 1);
    // The row's deletion commits; the crash comes before the repository hears of it.
    let meta = MetaStore::open_sqlite(&dir.path().join("cairn.db")).await.unwrap();
    let mut tx = meta.begin().await.unwrap();
    db::delete_backups(&mut tx, std::slice::from_ref(&backup), &cairn_control::now()).await.unwrap();
    tx.commit().await.unwrap();
    meta.close().await;
    close(control).await;
    assert_eq!(records(), 1);

    let (control, _) = Control::open_dir(settings()).await.unwrap();
    assert_eq!(records(), 0, "the record went at start");
    assert!(control.list_backups(&t, None, None).await.unwrap().is_empty());
}
