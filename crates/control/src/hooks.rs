//! Hooks around a snapshot (R9): a command on the daemon's machine or a webhook, run before
//! the snapshot (freeze, flush) and after it (thaw). What is run and what it is told is
//! documented in docs/scheduling.md; which hook runs when is the service's business.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// One hook: exactly one of `command` (program and arguments, run without a shell) and `url`
/// (a webhook cairn POSTs to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// 1–3600 seconds [default 60].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

const DEFAULT_TIMEOUT_SECONDS: u32 = 60;
const LONGEST_TIMEOUT_SECONDS: u32 = 3600;
/// How much of a failed command's standard error its error keeps (the end, where the reason
/// usually is).
const STDERR_TAIL_BYTES: usize = 400;
/// After a command exits, how long its standard error may stay open (held by a child it left
/// running) before the error is reported with what was read so far.
const STDERR_GRACE: Duration = Duration::from_millis(200);

impl Hook {
    /// Whether the hook can run at all: checked when it is set, not when it fires.
    pub fn check(&self) -> Result<(), HookError> {
        match (&self.command, &self.url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(HookError::Invalid("a hook has either a command or a url, not both or neither".into()))
            }
            (Some(command), None) => {
                if command.first().is_none_or(|program| program.trim().is_empty()) {
                    return Err(HookError::Invalid("a hook's command starts with the program to run".into()));
                }
            }
            (None, Some(url)) => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| HookError::Invalid(format!("hook url {url:?} is not a URL: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(HookError::Invalid(format!("hook url {url:?} is not http or https")));
                }
            }
        }
        if let Some(seconds) = self.timeout_seconds {
            if !(1..=LONGEST_TIMEOUT_SECONDS).contains(&seconds) {
                return Err(HookError::Invalid(format!(
                    "a hook's timeout_seconds is 1 to {LONGEST_TIMEOUT_SECONDS}, not {seconds}"
                )));
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pre,
    Post,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        })
    }
}

/// What a hook is told: the environment of a command, the JSON body of a webhook.
#[derive(Debug, Clone, Serialize)]
pub struct HookContext {
    pub phase: Phase,
    pub tenant: String,
    pub vm: Option<String>,
    pub volumes: Vec<String>,
    pub schedule: Option<String>,
    pub run: Option<String>,
    /// The snapshots taken (post hook only).
    pub snapshots: Vec<String>,
}

impl HookContext {
    fn environment(&self) -> [(&'static str, String); 7] {
        [
            ("CAIRN_HOOK_PHASE", self.phase.to_string()),
            ("CAIRN_TENANT", self.tenant.clone()),
            ("CAIRN_VM", self.vm.clone().unwrap_or_default()),
            ("CAIRN_VOLUMES", self.volumes.join(" ")),
            ("CAIRN_SCHEDULE", self.schedule.clone().unwrap_or_default()),
            ("CAIRN_RUN", self.run.clone().unwrap_or_default()),
            ("CAIRN_SNAPSHOTS", self.snapshots.join(" ")),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{0}")]
    Invalid(String),
    #[error("{phase} hook timed out after {seconds} s")]
    Timeout { phase: Phase, seconds: u64 },
    #[error("{phase} hook failed ({status}){}", tail(stderr))]
    Failed { phase: Phase, status: String, stderr: String },
    #[error("{phase} hook could not start {program:?}: {source}")]
    Spawn { phase: Phase, program: String, source: std::io::Error },
    #[error("{phase} hook failed: {url} answered HTTP {status}")]
    Http { phase: Phase, url: String, status: u16 },
    #[error("{phase} hook could not reach {url}: {reason}")]
    Unreachable { phase: Phase, url: String, reason: String },
}

fn tail(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Runs the hook for `context.phase`; Ok when the command exits 0 or the webhook answers 2xx
/// within the hook's timeout.
pub async fn run_hook(hook: &Hook, context: &HookContext) -> Result<(), HookError> {
    hook.check()?;
    match (&hook.command, &hook.url) {
        (Some(command), _) => run_command(command, hook.timeout(), context).await,
        (None, Some(url)) => call_webhook(url, hook.timeout(), context).await,
        (None, None) => unreachable!("check refuses a hook without command or url"),
    }
}

/// Kills a command's whole process group when dropped armed: on timeout, and when the run
/// that waits for the hook is itself cancelled, so nothing the hook started lingers.
struct ProcessGroup {
    id: Option<libc::pid_t>,
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            // SAFETY: killpg has no memory-safety preconditions; a group that is already
            // gone makes it fail with ESRCH, which is fine.
            unsafe {
                libc::killpg(id, libc::SIGKILL);
            }
        }
    }
}

async fn run_command(command: &[String], timeout: Duration, context: &HookContext) -> Result<(), HookError> {
    let phase = context.phase;
    let (program, arguments) = command.split_first().expect("checked: the command names a program");
    let mut child = tokio::process::Command::new(program)
        .args(arguments)
        .envs(context.environment())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HookError::Spawn { phase, program: program.clone(), source })?;
    // The child leads its own group: its id is the group's.
    let mut group = ProcessGroup { id: child.id().and_then(|id| libc::pid_t::try_from(id).ok()) };
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let mut stderr = Vec::new();
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let status = match status {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => return Err(HookError::Spawn { phase, program: program.clone(), source }),
        // Dropping `group` kills the command and whatever it started.
        Err(_) => return Err(HookError::Timeout { phase, seconds: timeout.as_secs() }),
    };
    // Exited in time: what it left running in the background is its own business.
    group.id = None;
    if status.success() {
        return Ok(());
    }
    let _ = tokio::time::timeout(STDERR_GRACE, stderr_pipe.read_to_end(&mut stderr)).await;
    let stderr = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(STDERR_TAIL_BYTES)..]).trim().to_string();
    Err(HookError::Failed { phase, status: status.to_string(), stderr })
}

async fn call_webhook(url: &str, timeout: Duration, context: &HookContext) -> Result<(), HookError> {
    let phase = context.phase;
    let unreachable = |e: reqwest::Error| {
        if e.is_timeout() {
            HookError::Timeout { phase, seconds: timeout.as_secs() }
        } else {
            HookError::Unreachable { phase, url: url.to_string(), reason: error_chain(&e) }
        }
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(unreachable)?;
    let answer = client.post(url).json(context).send().await.map_err(unreachable)?;
    let status = answer.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(HookError::Http { phase, url: url.to_string(), status: status.as_u16() })
    }
}

/// reqwest's own message is "error sending request"; the reason is further down the chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn context(phase: Phase) -> HookContext {
        HookContext {
            phase,
            tenant: "acme".into(),
            vm: Some("vm-1".into()),
            volumes: vec!["vol-1".into(), "vol-2".into()],
            schedule: Some("sch-1".into()),
            run: Some("run-1".into()),
            snapshots: vec!["snap-1".into()],
        }
    }

    fn shell(script: &str, timeout_seconds: u32) -> Hook {
        Hook {
            command: Some(vec!["sh".into(), "-c".into(), script.into()]),
            url: None,
            timeout_seconds: Some(timeout_seconds),
        }
    }

    #[test]
    fn check_refuses_hooks_that_cannot_run() {
        let url = |u: &str| Hook { command: None, url: Some(u.into()), timeout_seconds: None };
        assert!(url("https://hooks.example/freeze").check().is_ok());
        assert!(shell("true", 3600).check().is_ok());
        for (hook, reason) in [
            (Hook { command: None, url: None, timeout_seconds: None }, "either a command or a url"),
            (
                Hook { command: Some(vec!["true".into()]), url: Some("http://x".into()), timeout_seconds: None },
                "either a command or a url",
            ),
            (Hook { command: Some(vec![]), url: None, timeout_seconds: None }, "starts with the program"),
            (Hook { command: Some(vec![" ".into()]), url: None, timeout_seconds: None }, "starts with the program"),
            (url("ftp://hooks.example/"), "not http or https"),
            (url("not a url"), "is not a URL"),
            (shell("true", 0), "timeout_seconds is 1 to 3600"),
            (shell("true", 3601), "timeout_seconds is 1 to 3600"),
        ] {
            let error = hook.check().unwrap_err().to_string();
            assert!(error.contains(reason), "{hook:?}: {error}");
        }
        assert_eq!(url("http://x").timeout(), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_command_is_told_the_context_in_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let script = format!(
            "echo \"$CAIRN_HOOK_PHASE|$CAIRN_TENANT|$CAIRN_VM|$CAIRN_VOLUMES|$CAIRN_SCHEDULE|$CAIRN_RUN|$CAIRN_SNAPSHOTS\" > {}",
            out.display()
        );
        run_hook(&shell(&script, 10), &context(Phase::Post)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "post|acme|vm-1|vol-1 vol-2|sch-1|run-1|snap-1\n");
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_status_and_the_end_of_its_stderr() {
        let script = "head -c 2000 /dev/zero | tr '\\0' x >&2; echo; echo database busy >&2; exit 3";
        let error = run_hook(&shell(script, 10), &context(Phase::Pre)).await.unwrap_err().to_string();
        assert!(error.starts_with("pre hook failed (exit status: 3): "), "{error}");
        assert!(error.ends_with("database busy"), "{error}");
        assert!(error.len() < 500, "the stderr tail is bounded: {} bytes", error.len());

        let missing = Hook { command: Some(vec!["/nonexistent/freeze".into()]), url: None, timeout_seconds: None };
        let error = run_hook(&missing, &context(Phase::Pre)).await.unwrap_err().to_string();
        assert!(error.contains("could not start \"/nonexistent/freeze\""), "{error}");
    }

    fn alive(pid: i32) -> bool {
        // A killed process may linger as a zombie until its parent (init) reaps it.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let error = run_hook(&shell(&script, 1), &context(Phase::Pre)).await.unwrap_err();
        assert!(matches!(error, HookError::Timeout { phase: Phase::Pre, seconds: 1 }), "{error}");
        let child: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // SIGKILL is delivered before killpg returns; only the reaping by init is awaited.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(child) {
            assert!(std::time::Instant::now() < deadline, "the hook's child {child} outlived the timeout");
            tokio::task::yield_now().await;
        }
    }

    /// A one-request HTTP server answering `status`; returns its URL and the request it got.
    async fn answer_once(status: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            // Read the head, then the body its Content-Length announces.
            loop {
                let n = socket.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let response = format!("HTTP/1.1 {status}\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n");
            socket.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&request).to_string()
        });
        (url, served)
    }

    fn webhook(url: &str) -> Hook {
        Hook { command: None, url: Some(url.into()), timeout_seconds: Some(5) }
    }

    #[tokio::test]
    async fn a_webhook_gets_the_context_as_json_and_succeeds_on_2xx() {
        let (url, served) = answer_once("204 No Content").await;
        run_hook(&webhook(&url), &context(Phase::Pre)).await.unwrap();
        let request = served.await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
        let body: serde_json::Value = serde_json::from_str(request.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["phase"], "pre");
        assert_eq!(body["tenant"], "acme");
        assert_eq!(body["volumes"], serde_json::json!(["vol-1", "vol-2"]));
        assert_eq!(body["run"], "run-1");
    }

    #[tokio::test]
    async fn a_webhook_fails_on_other_answers_redirects_and_silence() {
        let (url, _served) = answer_once("503 Service Unavailable").await;
        let error = run_hook(&webhook(&url), &context(Phase::Post)).await.unwrap_err().to_string();
        assert_eq!(error, format!("post hook failed: {url} answered HTTP 503"));

        let (url, _served) = answer_once("302 Found").await;
        let error = run_hook(&webhook(&url), &context(Phase::Pre)).await.unwrap_err().to_string();
        assert_eq!(error, format!("pre hook failed: {url} answered HTTP 302"));

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", closed.local_addr().unwrap());
        drop(closed);
        let error = run_hook(&webhook(&url), &context(Phase::Pre)).await.unwrap_err();
        assert!(matches!(error, HookError::Unreachable { .. }), "{error}");

        // Accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let hook = Hook { command: None, url: Some(url), timeout_seconds: Some(1) };
        let error = run_hook(&hook, &context(Phase::Pre)).await.unwrap_err();
        assert!(matches!(error, HookError::Timeout { phase: Phase::Pre, seconds: 1 }), "{error}");
        drop(silent);
    }
}
