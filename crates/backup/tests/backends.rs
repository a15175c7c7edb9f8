//! One conformance suite for every backend: what the repository relies on.

use std::sync::Arc;

use bytes::Bytes;
use cairn_backup::{Backend, BackendError, DirBackend, Fault, FaultyBackend, ObjectStoreBackend};

fn conforms(backend: &dyn Backend) {
    backend.put("packs/ab/one", Bytes::from_static(b"hello world")).unwrap();
    backend.put("index/two", Bytes::from_static(b"xyz")).unwrap();
    backend.put("config", Bytes::from_static(b"{}")).unwrap();
    assert_eq!(&backend.get("packs/ab/one").unwrap()[..], b"hello world");
    assert_eq!(&backend.get_range("packs/ab/one", 6..11).unwrap()[..], b"world");
    // A put replaces an object whole.
    backend.put("index/two", Bytes::from_static(b"abc")).unwrap();
    assert_eq!(&backend.get("index/two").unwrap()[..], b"abc");
    let keys = |prefix: &str| -> Vec<String> {
        let mut keys: Vec<String> = backend.list(prefix).unwrap().into_iter().map(|o| o.key).collect();
        keys.sort();
        keys
    };
    assert_eq!(keys("packs/"), ["packs/ab/one"]);
    assert_eq!(keys(""), ["config", "index/two", "packs/ab/one"]);
    assert_eq!(backend.list("index/").unwrap()[0].size, 3);
    assert!(keys("backups/").is_empty(), "listing a prefix nothing was put under is empty");
    assert!(matches!(backend.get("missing"), Err(BackendError::NotFound(_))));
    backend.delete("index/two").unwrap();
    backend.delete("index/two").unwrap();
    assert!(matches!(backend.get("index/two"), Err(BackendError::NotFound(_))));
}

#[test]
fn the_directory_backend_conforms_and_rejects_keys_that_climb_out() {
    let dir = tempfile::tempdir().unwrap();
    let backend = DirBackend::new(&dir.path().join("repo")).unwrap();
    conforms(&backend);
    assert!(backend.put("../escape", Bytes::from_static(b"x")).is_err());
    assert!(!dir.path().join("escape").exists());
}

#[test]
fn the_memory_backend_conforms() {
    conforms(&ObjectStoreBackend::memory());
}

#[test]
fn the_faulty_backend_conforms_when_healed_and_fails_on_command() {
    let faulty = FaultyBackend::new(Arc::new(ObjectStoreBackend::memory()));
    conforms(&faulty);
    faulty.fail_after(0, Fault::Error, true);
    assert!(faulty.get("config").is_err());
    faulty.heal();
    faulty.fail_after(0, Fault::PartialWrite, false);
    assert!(faulty.put("packs/cd/torn", Bytes::from_static(b"0123456789")).is_err());
    faulty.heal();
    assert_eq!(&faulty.get("packs/cd/torn").unwrap()[..], b"01234", "a torn write leaves half an object");
}
