//! A tour of the volume engine on a real directory (default ./cairn-data/volumes):
//! create a disk, write, snapshot, change, revert, clone, and list what changed.
//!
//! cargo run --release -p cairn-volume --example tour [DIR]

use cairn_volume::{ChangeTarget, Store, StoreOptions};

fn main() -> Result<(), cairn_volume::Error> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "cairn-data/volumes".into());
    let store = Store::open_dir(&dir, StoreOptions::default())?;
    let name = format!("tour-{}", store.list_volumes().len());
    let disk = store.create_volume(&name, 1 << 40)?;
    println!("created {name}: 1 TiB thin volume in {dir}");
    let vol = store.volume(disk.id)?;
    vol.write(b"version 1 of the boot sector", 0, true)?;
    let started = std::time::Instant::now();
    let before = store.snapshot(disk.id, "before-upgrade")?;
    println!("snapshot {} taken in {:?}", before.name, started.elapsed());
    vol.write(b"version 2 -- a bad upgrade!", 0, false)?;
    vol.write(&[0xAB; 65536], 1 << 30, true)?;
    let changed = store.changed_extents(before.id, ChangeTarget::Volume(disk.id))?;
    println!("changed since the snapshot: {changed:?}");
    let image = store.clone_snapshot(before.id, &format!("{name}-clone"), None)?;
    println!("cloned the snapshot into volume {}", image.name);
    store.revert(disk.id, before.id)?;
    let mut buf = [0u8; 28];
    vol.read(&mut buf, 0)?;
    println!("after revert: {:?}", String::from_utf8_lossy(&buf));
    let usage = store.snapshot_usage(before.id)?;
    println!("snapshot usage: {usage:?}");
    store.close()
}
