//! One conformance suite for every backend: what the repository relies on.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use cairn_backup::{Backend, BackendError, DirBackend, Fault, FaultyBackend, ObjectStoreBackend, RetryingBackend};
use common::conforms;

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

#[test]
fn the_retrying_backend_conforms_and_does_not_retry_not_found() {
    let faulty = Arc::new(FaultyBackend::new(Arc::new(ObjectStoreBackend::memory())));
    let retrying = RetryingBackend::new(faulty.clone(), 3, std::time::Duration::ZERO);
    conforms(&retrying);
    let before = faulty.calls();
    assert!(matches!(retrying.get("missing"), Err(BackendError::NotFound(_))));
    assert_eq!(faulty.calls() - before, 1, "not found is an answer");
}
