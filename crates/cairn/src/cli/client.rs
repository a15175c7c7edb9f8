//! The HTTP side of the client: where the daemon is, which token to use, and the calls.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use std::error::Error as _;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const DEFAULT_URL: &str = "http://127.0.0.1:8474";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous, because one call may be a snapshot or restore waiting on the volume engine.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Pauses before the second and third attempt of a request that is safe to repeat.
const RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(1000)];

/// Where `cairn serve` leaves `api.url` and `admin.token`: `$CAIRN_DATA_DIR`, else `./cairn-data`
/// (the daemon's default data directory).
pub fn data_dir() -> PathBuf {
    std::env::var_os("CAIRN_DATA_DIR").map_or_else(|| PathBuf::from("cairn-data"), PathBuf::from)
}

/// The API's base URL: the one given (`--url` or `CAIRN_URL`), else the one the daemon wrote into
/// its data directory, else the daemon's default.
pub fn resolve_url(given: Option<&str>, data_dir: &Path) -> String {
    given
        .map(str::to_owned)
        .or_else(|| read_trimmed(&data_dir.join("api.url")))
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// The bearer token: the one given (`--token` or `CAIRN_TOKEN`), else the admin token the daemon
/// wrote into its data directory.
pub fn resolve_token(given: Option<&str>, data_dir: &Path) -> Result<String> {
    given.map(str::to_owned).or_else(|| read_trimmed(&data_dir.join("admin.token"))).ok_or_else(|| {
        anyhow!("no API token: pass --token, set CAIRN_TOKEN, or run where cairn-data/admin.token is readable")
    })
}

/// A file's content without surrounding whitespace; `None` when it is missing, unreadable or
/// blank, which all mean "not configured here".
fn read_trimmed(path: &Path) -> Option<String> {
    let content = fs::read_to_string(path).ok()?;
    let trimmed = content.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so that whatever a user types
/// as a resource stays one path segment or one query value.
pub fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// The message of a non-2xx answer: the API's `error.message` and the `field` it names, or, from
/// something that is not the cairn API (a proxy), the status and the start of the body.
pub fn error_message(status: u16, body: &str) -> String {
    let error = serde_json::from_str::<Value>(body).ok().map(|answer| answer["error"].clone());
    match error.as_ref().and_then(|error| error["message"].as_str().map(|message| (message, &error["field"]))) {
        Some((message, Value::String(field))) => format!("{message} (field: {field})"),
        Some((message, _)) => message.to_owned(),
        None => format!("HTTP {status}: {}", body.lines().next().unwrap_or_default()),
    }
}

/// A fresh key per creating call, so that repeating that call after a lost answer returns the
/// first answer instead of creating a second resource.
fn idempotency_key() -> Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .context("reading /dev/urandom for an idempotency key")?;
    Ok(bytes.iter().fold(String::from("cli-"), |mut key, byte| {
        let _ = write!(key, "{byte:02x}");
        key
    }))
}

/// A connection to the cairn REST API as one tenant.
#[derive(Debug)]
pub struct Client {
    base_url: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base_url: &str, token: String) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(IO_TIMEOUT)
            .timeout_write(IO_TIMEOUT)
            .build();
        Client { base_url: base_url.trim_end_matches('/').to_owned(), token, agent }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None, None)
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call("DELETE", path, None, None)
    }

    /// A `POST` that acts on an existing resource (start, attach, revert…): sent once, since
    /// repeating it is not always harmless.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("POST", path, Some(body), None)
    }

    /// A `PATCH`: changes to an existing resource, sent once.
    pub fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("PATCH", path, Some(body), None)
    }

    /// A `PUT`: sets a resource whole; repeating it is harmless.
    pub fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("PUT", path, Some(body), None)
    }

    /// A `POST` that creates something: it carries an idempotency key, which makes it safe to
    /// repeat when the connection fails.
    pub fn create(&self, path: &str, body: &Value) -> Result<Value> {
        self.call("POST", path, Some(body), Some(&idempotency_key()?))
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>, idempotency_key: Option<&str>) -> Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let repeatable = method == "GET" || idempotency_key.is_some();
        let mut delays = RETRY_DELAYS.iter();
        loop {
            let mut request = self.agent.request(method, &url).set("Authorization", &format!("Bearer {}", self.token));
            if let Some(key) = idempotency_key {
                request = request.set("Idempotency-Key", key);
            }
            let answer = match body {
                Some(body) => request.send_json(body),
                None => request.call(),
            };
            match answer {
                Ok(response) => {
                    return response.into_json().with_context(|| format!("reading the answer to {method} {path}"));
                }
                Err(ureq::Error::Status(status, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    return Err(anyhow!(error_message(status, &body)));
                }
                Err(ureq::Error::Transport(failure)) => match delays.next() {
                    Some(delay) if repeatable && is_transient(&failure) => thread::sleep(*delay),
                    _ => {
                        // The transport's own text repeats the URL and its cause; the cause alone
                        // (refused, timed out) is the news.
                        let cause = failure.source().map_or_else(|| failure.to_string(), ToString::to_string);
                        bail!("could not reach the cairn API at {}: {cause}", self.base_url)
                    }
                },
            }
        }
    }
}

/// A connection that broke before the answer came: the request may or may not have been done,
/// so only a request that is safe to repeat is sent again. A refused connection (no daemon) or a
/// timeout (a daemon still at work) is not worth repeating.
fn is_transient(failure: &ureq::Transport) -> bool {
    let io_error = failure.source().and_then(|source| source.downcast_ref::<std::io::Error>());
    io_error.is_some_and(|error| {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        matches!(error.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_given_wins_over_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("api.url"), "http://127.0.0.1:9999\n").unwrap();
        assert_eq!(resolve_url(Some("http://example:1"), dir.path()), "http://example:1");
    }

    #[test]
    fn url_from_the_data_dir_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("api.url"), "  http://127.0.0.1:9999\n").unwrap();
        assert_eq!(resolve_url(None, dir.path()), "http://127.0.0.1:9999");
    }

    #[test]
    fn url_defaults_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_url(None, dir.path()), DEFAULT_URL);
        fs::write(dir.path().join("api.url"), "\n").unwrap();
        assert_eq!(resolve_url(None, dir.path()), DEFAULT_URL, "a blank file is no URL");
    }

    #[test]
    fn token_given_wins_over_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("admin.token"), "from-file").unwrap();
        assert_eq!(resolve_token(Some("given"), dir.path()).unwrap(), "given");
        assert_eq!(resolve_token(None, dir.path()).unwrap(), "from-file");
    }

    #[test]
    fn no_token_anywhere_says_where_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let error = resolve_token(None, dir.path()).unwrap_err().to_string();
        assert_eq!(
            error,
            "no API token: pass --token, set CAIRN_TOKEN, or run where cairn-data/admin.token is readable"
        );
    }

    #[test]
    fn encoding_keeps_names_and_ids_and_escapes_the_rest() {
        assert_eq!(encode("web1-root_2.x"), "web1-root_2.x");
        assert_eq!(encode("snap-0123456789abcdef"), "snap-0123456789abcdef");
        assert_eq!(encode("a/b c?d"), "a%2Fb%20c%3Fd");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn error_messages() {
        let invalid =
            r#"{"error": {"code": "invalid", "message": "size must be a multiple of 512 bytes", "field": "size"}}"#;
        assert_eq!(error_message(400, invalid), "size must be a multiple of 512 bytes (field: size)");
        let conflict = r#"{"error": {"code": "conflict", "message": "volume is attached", "field": null}}"#;
        assert_eq!(error_message(409, conflict), "volume is attached");
        assert_eq!(error_message(502, "<html>Bad Gateway</html>\nmore"), "HTTP 502: <html>Bad Gateway</html>");
    }

    #[test]
    fn idempotency_keys_are_fresh_and_valid() {
        let (first, second) = (idempotency_key().unwrap(), idempotency_key().unwrap());
        assert_ne!(first, second);
        assert_eq!(first.len(), 36);
        assert!(first.bytes().all(|byte| byte.is_ascii_graphic()));
    }
}
