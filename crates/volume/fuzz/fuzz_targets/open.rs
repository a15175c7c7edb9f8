//! A store directory of arbitrary files: opening it yields a store or an error, never a panic
//! or a hang, and an opened store reads, maps and snapshots without one either.
//!
//! Input: files back to back, each a name selector byte, a `u16` length (little-endian) and
//! the bytes: selector 0 is `catalog.log`; others name layer `selector >> 1`'s map journal
//! (even) or first data segment (odd). `fuzz/seeds/open` holds real stores in this form.
#![no_main]

use cairn_volume::storage::{MemStorage, Storage};
use cairn_volume::{Store, StoreOptions};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fn file_name(selector: u8) -> String {
    let layer = u64::from(selector >> 1);
    match selector {
        0 => "catalog.log".to_string(),
        s if s % 2 == 0 => format!("layer-{layer:016x}.map"),
        _ => format!("layer-{layer:016x}.d0"),
    }
}

fuzz_target!(|data: &[u8]| {
    let storage = MemStorage::new();
    let mut rest = data;
    while let [selector, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let file = storage.open(&file_name(*selector), true).unwrap();
        file.write_at(&tail[..len], 0).unwrap();
        rest = &tail[len..];
    }
    storage.sync_dir().unwrap();
    let options = StoreOptions { background_merge: false, merge_bytes_per_sec: None, ..StoreOptions::default() };
    let Ok(store) = Store::open(Arc::new(storage) as Arc<dyn Storage>, options) else { return };
    for info in store.list_volumes() {
        let Ok(volume) = store.volume(info.id) else { continue };
        // The first and last blocks, and the map of the first 64 MiB: enough to walk every
        // layer without reading a volume that may claim terabytes.
        let mut buf = vec![0u8; 4096];
        let _ = volume.read(&mut buf, 0);
        let _ = volume.read(&mut buf, info.size.saturating_sub(4096));
        let _ = volume.allocation(0, info.size.min(64 << 20));
        let _ = store.snapshot(info.id, "fuzz");
    }
    for snapshot in store.list_snapshots(None) {
        if let Ok(view) = store.open_snapshot(snapshot.id) {
            let mut buf = vec![0u8; 4096];
            let _ = view.read(&mut buf, 0);
        }
    }
    while let Ok(true) = store.merge_step() {}
});
