//! `cairn serve` takes its settings from a TOML file and CAIRN_* variables, flags winning over
//! variables and variables over the file; a bad file is refused with a message naming it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// Kills the daemon however the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the daemon to write `api.url` in `data_dir` (it does once it listens).
fn wait_for_url(daemon: &mut Daemon, data_dir: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(url) = std::fs::read_to_string(data_dir.join("api.url")) {
            if url.ends_with('\n') {
                return url.trim().to_string();
            }
        }
        if let Some(status) = daemon.0.try_wait().unwrap() {
            panic!("cairn serve exited with {status} before listening");
        }
        assert!(Instant::now() < deadline, "no api.url in {}", data_dir.display());
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn post(url: &str, token: &str, path: &str, body: Value) -> Value {
    ureq::post(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
        .into_json()
        .unwrap()
}

#[test]
fn settings_come_from_the_file_the_environment_and_flags_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let from_file = dir.path().join("from-file");
    let socket = dir.path().join("elsewhere.sock");
    let config = dir.path().join("cairn.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:1\"\nnbd_listen = \"127.0.0.1:0\"\nnbd_socket = \"/nonexistent/x.sock\"\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    // The file's listen port 1 is overridden by the flag, its NBD TCP by the variable ("off"),
    // its socket by the variable; its data_dir stands.
    let child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("CAIRN_NBD_LISTEN", "off")
        .env("CAIRN_NBD_SOCKET", &socket)
        .env_remove("CAIRN_DATA_DIR")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let url = wait_for_url(&mut daemon, &from_file);
    let token = std::fs::read_to_string(from_file.join("admin.token")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(from_file.join("admin.token")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the admin token is readable by its owner only");
    assert!(socket.exists(), "the NBD socket is where CAIRN_NBD_SOCKET says");
    let volume = post(&url, token.trim(), "/v1/volumes", serde_json::json!({"name": "v", "size": "1M"}));
    assert_eq!(volume["nbd"]["uri"], Value::Null, "no NBD over TCP: {volume}");
    assert!(volume["nbd"]["unix_uri"].as_str().unwrap().ends_with(&format!("?socket={}", socket.display())));
}

#[test]
fn a_bad_config_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "data_dri = \"/tmp/x\"\n").unwrap();
    let out = Command::new(BIN).args(["serve", "--config", config.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error:") && stderr.contains("bad.toml") && stderr.contains("data_dri"), "{stderr}");
}

#[test]
fn with_a_transfer_directory_each_tenant_uses_its_own_part() {
    if !cairn_testkit::have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let transfer = dir.path().join("transfer");
    for tenant in ["alice", "bob"] {
        std::fs::create_dir_all(transfer.join(tenant)).unwrap();
        std::fs::write(transfer.join(tenant).join("disk.raw"), vec![7u8; 1 << 20]).unwrap();
    }
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--nbd-listen", "off", "--data-dir", data.to_str().unwrap()])
        .args(["--transfer-dir", transfer.to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let url = wait_for_url(&mut daemon, &data);
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let alice = post(&url, admin.trim(), "/v1/tenants", serde_json::json!({"name": "alice"}));
    let alice = alice["token"].as_str().unwrap();
    let own = transfer.join("alice/disk.raw");
    let accepted = post(&url, alice, "/v1/volumes/import", serde_json::json!({"name": "a", "path": own}));
    assert_eq!(accepted["job"]["state"], "running", "{accepted}");
    let bobs = transfer.join("bob/disk.raw");
    let refused = ureq::post(&format!("{url}/v1/volumes/import"))
        .set("Authorization", &format!("Bearer {alice}"))
        .send_json(serde_json::json!({"name": "b", "path": bobs}));
    match refused {
        Err(ureq::Error::Status(403, _)) => {}
        other => panic!("alice importing bob's file: {other:?}"),
    }
}
