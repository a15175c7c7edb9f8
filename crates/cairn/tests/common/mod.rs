//! Shared by the end-to-end tests: a real `cairn serve` process on a temporary data directory,
//! driven over HTTP (ureq), through the `cairn` CLI binary, and with real NBD clients
//! (qemu-io, qemu-img, nbdinfo) on the NBD URIs the API hands out.
#![allow(dead_code)] // each test binary uses a different part

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use cairn_testkit::{have, have_all, pattern, run};
use serde_json::Value;

/// The binary under test: both the daemon (`cairn serve`) and the CLI.
pub const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// How long a daemon may take to write `api.url`. Generous: the machine is shared with builds.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `cairn serve`. Dropping it kills the process; a failing test prints its logs.
pub struct TestServer {
    /// Holds the data directory and the daemon's logs; removed on drop.
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    /// The API base URL, read from `DATA_DIR/api.url`, without a trailing slash.
    pub url: String,
    /// The admin tenant's token, read from `DATA_DIR/admin.token`.
    pub admin_token: String,
    child: Option<Child>,
    /// How many processes were started on this data directory (names the log files).
    starts: u32,
    /// Flags and environment every start of the daemon gets, beyond the defaults.
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts a daemon on a new, empty data directory, with the API and NBD on loopback
    /// ports chosen by the kernel, and waits until it says it is listening.
    pub fn start() -> TestServer {
        Self::start_with(&[], &[])
    }

    /// [`Self::start`], with more flags and environment variables for the daemon.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let mut s = TestServer {
            dir,
            data_dir,
            url: String::new(),
            admin_token: String::new(),
            child: None,
            starts: 0,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            extra_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        s.spawn();
        s
    }

    fn log_path(&self, n: u32, stream: &str) -> PathBuf {
        self.dir.path().join(format!("server-{n}.{stream}"))
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let out = File::create(self.log_path(self.starts, "stdout")).expect("log file");
        let err = File::create(self.log_path(self.starts, "stderr")).expect("log file");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn cairn serve");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits for `api.url` (the daemon writes it only once it listens), then reads the admin
    /// token. Fails with the daemon's logs if it exits or takes too long.
    fn wait_ready(&mut self) {
        let url_file = self.data_dir.join("api.url");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&url_file) {
                // A complete URL, not a half-written file: scheme, host and a port.
                let url = text.trim().trim_end_matches('/').to_string();
                let port = url.strip_prefix("http://").and_then(|h| h.rsplit_once(':')).map(|(_, p)| p);
                if port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p != 0)) {
                    self.url = url;
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                panic!("cairn serve exited ({status}) before writing api.url (its logs follow)");
            }
            if Instant::now() > deadline {
                panic!(
                    "cairn serve did not write a URL to {} within {START_TIMEOUT:?} (its logs follow)",
                    url_file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("admin.token not readable once api.url exists: {e}"));
        self.admin_token = token.trim().to_string();
        assert!(!self.admin_token.is_empty(), "admin.token is empty");
    }

    /// The tail of every log this data directory's daemons wrote, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.starts {
            for stream in ["stdout", "stderr"] {
                let text = std::fs::read_to_string(self.log_path(n, stream)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(150)..];
                all.push_str(&format!("--- cairn serve #{n} {stream} ---\n{}\n", tail.join("\n")));
            }
        }
        all
    }

    /// Kills the daemon with SIGKILL (no graceful shutdown) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on unix
            let _ = child.wait();
        }
    }

    /// Starts a new daemon on the same data directory (killing the old one with SIGKILL if it
    /// still runs) and waits for the fresh `api.url`; the old one is deleted first so a stale
    /// URL is never taken for the new daemon's. Ports change: re-read NBD URIs afterwards.
    pub fn restart(&mut self) {
        self.kill9();
        match std::fs::remove_file(self.data_dir.join("api.url")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove api.url: {e}"),
        }
        self.spawn();
    }

    /// One HTTP call: returns the status and the body parsed as JSON (`Null` when empty).
    /// A non-2xx status is an answer, not a failure.
    pub fn http(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        self.http_with(method, path, body.as_deref(), token, &[])
    }

    /// An HTTP call with a raw body (sent as `application/json`) and extra headers.
    pub fn http_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let (status, text) = self.http_text(method, path, body, token, headers);
        if text.trim().is_empty() {
            return (status, Value::Null);
        }
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} answered {status} with a body that is not JSON ({e}): {text}"));
        (status, value)
    }

    /// An HTTP call returning the status and the body as text.
    pub fn http_text(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
        let mut req = agent.request(method, &format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        for (name, value) in headers {
            req = req.set(name, value);
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e} (the daemon's logs follow)"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_else(|e| panic!("{method} {path}: reading the body: {e}"));
        (status, text)
    }

    /// An admin call that must answer `status`; returns the body.
    pub fn expect(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        self.expect_as(&self.admin_token, method, path, body, status)
    }

    /// A call with `token` that must answer `status`; returns the body.
    pub fn expect_as(&self, token: &str, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, value) = self.http(method, path, body.clone(), Some(token));
        assert_eq!(status, want, "{method} {path} with body {body:?} answered {status}: {value}");
        value
    }

    /// Runs the CLI as the admin (CAIRN_URL and CAIRN_TOKEN set).
    pub fn cli<S: AsRef<str>>(&self, args: &[S]) -> Output {
        self.cli_as(&self.admin_token, args)
    }

    /// Runs the CLI with another tenant's token.
    pub fn cli_as<S: AsRef<str>>(&self, token: &str, args: &[S]) -> Output {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        Command::new(BIN)
            .args(&args)
            .env("CAIRN_URL", &self.url)
            .env("CAIRN_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run cairn {args:?}: {e}"))
    }

    /// Runs `cairn --json ARGS` as the admin; it must succeed, and its stdout is returned
    /// parsed as JSON.
    pub fn cli_json<S: AsRef<str>>(&self, args: &[S]) -> Value {
        let mut all = vec!["--json"];
        all.extend(args.iter().map(AsRef::as_ref));
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "cairn {all:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("cairn {all:?} printed something that is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs the CLI as the admin expecting a failure; checks the error is one line starting
    /// with `error:` (what scripts and people read) and returns that line.
    pub fn cli_fails<S: AsRef<str>>(&self, args: &[S]) -> String {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        one_line_error(&args, &self.cli(&args))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what the daemon said: the logs are deleted with the tempdir.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Checks that a CLI run failed with one line on stderr starting with `error:` (what people
/// and scripts' logs read) and returns that line.
pub fn one_line_error(args: &[&str], out: &Output) -> String {
    assert!(
        !out.status.success(),
        "cairn {args:?} succeeded but should have failed\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(stderr.starts_with("error:"), "cairn {args:?}: stderr does not start with `error:`: {stderr:?}");
    assert!(!stderr.contains('\n'), "cairn {args:?}: the error is not one line: {stderr:?}");
    stderr
}

/// The `id` field of a resource.
pub fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// A string field of a resource.
pub fn field(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key:?} in {v}")).to_string()
}

/// The ids of a JSON array of resources, sorted.
pub fn ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        list.as_array().unwrap_or_else(|| panic!("not an array: {list}")).iter().map(id).collect();
    ids.sort();
    ids
}

/// A resource's `nbd.unix_uri`.
pub fn unix_uri(v: &Value) -> String {
    v["nbd"]["unix_uri"].as_str().unwrap_or_else(|| panic!("no nbd.unix_uri in {v}")).to_string()
}

/// A resource's `nbd.uri` (TCP).
pub fn tcp_uri(v: &Value) -> String {
    v["nbd"]["uri"].as_str().unwrap_or_else(|| panic!("no nbd.uri in {v}")).to_string()
}

/// The nbd+unix URI of another export on the same socket as `uri`.
pub fn export_uri(uri: &str, export: &str) -> String {
    let socket = uri.split_once("?socket=").unwrap_or_else(|| panic!("no socket in {uri}")).1;
    format!("nbd+unix:///{export}?socket={socket}")
}

fn both(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Writes `len` bytes of `pat` at `off` through a real NBD client, then flushes, so the data
/// is acknowledged as durable before the call returns.
pub fn qemu_write(uri: &str, pat: u8, off: u64, len: u64) {
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P {pat:#04x} {off} {len}"), "-c", "flush"])
        .arg(uri));
    let text = both(&out);
    assert!(text.contains("wrote"), "qemu-io did not write to {uri}: {text}");
}

/// Whether `len` bytes at `off` of `uri` all equal `pat`, read by qemu-io (read-only open).
/// Panics when the read itself fails (cannot connect, I/O error): only a real pattern
/// mismatch answers false, so a negative check cannot pass because the export is broken.
pub fn qemu_reads(uri: &str, pat: u8, off: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", &format!("read -P {pat:#04x} {off} {len}")])
        .arg(uri)
        .output()
        .expect("run qemu-io");
    let text = both(&out);
    let mismatch = text.contains("Pattern verification failed");
    if out.status.success() && !mismatch && text.contains("read ") {
        return true;
    }
    if mismatch && text.contains(&format!("read {len}/{len} bytes")) {
        return false;
    }
    panic!("qemu-io could not read {off}+{len} of {uri} ({}): {text}", out.status);
}

/// Asserts that `len` bytes at `off` of `uri` all equal `pat`.
pub fn assert_reads(uri: &str, pat: u8, off: u64, len: u64) {
    assert!(qemu_reads(uri, pat, off, len), "{uri}: bytes {off}+{len} are not all {pat:#04x}");
}

/// Whether a write through qemu-io to `uri` fails (for read-only exports).
pub fn qemu_write_fails(uri: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x01 0 512", "-c", "flush"])
        .arg(uri)
        .output()
        .expect("run qemu-io");
    !out.status.success() || !both(&out).contains("wrote")
}

/// Whether two images have the same content, by `qemu-img compare` (exit 0 = identical,
/// 1 = different, anything else is an error and fails the test).
pub fn images_equal(fmt_a: &str, a: &str, fmt_b: &str, b: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fmt_a, "-F", fmt_b, a, b])
        .output()
        .expect("run qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {a} {b} failed ({}): {}", out.status, both(&out)),
    }
}

/// Asserts that two raw images (NBD URIs or files) are byte for byte equal.
pub fn assert_same(a: &str, b: &str) {
    assert!(images_equal("raw", a, "raw", b), "{a} and {b} differ");
}

/// The virtual size of an image (NBD URI or file) as `qemu-img info` reports it.
pub fn qemu_img_size(fmt: &str, image: &str) -> u64 {
    let out = run(Command::new("qemu-img").args(["info", "--output=json", "-f", fmt, image]));
    let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    info["virtual-size"].as_u64().unwrap_or_else(|| panic!("no virtual-size in {info}"))
}

/// The format `qemu-img info` detects for a file.
pub fn qemu_img_format(path: &Path) -> String {
    let out = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(path));
    let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    field(&info, "format")
}

/// The size of an NBD export as `nbdinfo --size` reports it.
pub fn nbd_size(uri: &str) -> u64 {
    let out = run(Command::new("nbdinfo").args(["--size", uri]));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("nbdinfo --size prints a number")
}

/// Makes a raw disk image: `len` bytes of varied data with a zero stretch in the middle, so
/// both data and holes have to survive a copy.
pub fn make_raw_image(path: &Path, len: usize, seed: u64) {
    let mut data = pattern(len, seed);
    let hole = len / 4..len / 2;
    data[hole].fill(0);
    std::fs::write(path, data).expect("write image");
}

/// A path's text, for command arguments.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}
