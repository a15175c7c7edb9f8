//! Long operations run by qemu-img (import, export) with their progress.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::model::ImageFormat;
use crate::Error;

/// A running job's progress, shared between the task doing the work and readers. The counters
/// are the backup repository's own, so backup and restore jobs feed them directly.
#[derive(Debug)]
pub struct Progress {
    pub counters: cairn_backup::Progress,
    started: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let counters = cairn_backup::Progress::default();
        counters.total.store(total, Ordering::Relaxed);
        Self { counters, started: Instant::now() }
    }

    pub fn done(&self) -> u64 {
        self.counters.done.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.counters.total.load(Ordering::Relaxed)
    }

    fn set_percent(&self, percent: f64) {
        let total = self.total();
        let done = (total as f64 * percent / 100.0) as u64;
        self.counters.done.store(done.min(total), Ordering::Relaxed);
    }

    /// Bytes per second so far, and seconds left at that rate.
    pub fn rate_and_eta(&self) -> (u64, Option<u64>) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.done();
        if elapsed <= 0.0 || done == 0 {
            return (0, None);
        }
        let rate = done as f64 / elapsed;
        (rate as u64, Some((self.total().saturating_sub(done) as f64 / rate).ceil() as u64))
    }
}

/// The last progress figure in qemu-img's `-p` output, which redraws `    (45.12/100%)\r`.
pub fn parse_progress(output: &str) -> Option<f64> {
    let end = output.rfind("/100%)")?;
    let start = output[..end].rfind('(')? + 1;
    output[start..end].trim().parse().ok()
}

/// What `qemu-img info` says of an image: its format and its virtual size in bytes.
pub async fn image_info(path: &Path, format: Option<ImageFormat>) -> Result<(ImageFormat, u64), Error> {
    let mut command = Command::new("qemu-img");
    command.arg("info").arg("--output=json");
    if let Some(f) = format {
        command.arg("-f").arg(f.as_str());
    }
    let output = command.arg(path).output().await.map_err(|e| Error::Internal(format!("running qemu-img: {e}")))?;
    if !output.status.success() {
        let reason = String::from_utf8_lossy(&output.stderr);
        return Err(Error::invalid("path", format!("{} is not a readable image: {}", path.display(), reason.trim())));
    }
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::Internal(format!("qemu-img info printed something unexpected: {e}")))?;
    // A backing file or an external data file would make qemu-img read another file, which
    // the caller's path checks never saw.
    if info.get("backing-filename").is_some() || info["format-specific"]["data"].get("data-file").is_some() {
        return Err(Error::invalid(
            "path",
            format!("{} refers to other files (a backing or data file); import a standalone image", path.display()),
        ));
    }
    let detected = info["format"].as_str().unwrap_or("");
    let format = ImageFormat::parse(detected).ok_or_else(|| {
        Error::invalid("path", format!("{} is a {detected} image; cairn imports raw and qcow2", path.display()))
    })?;
    let size = info["virtual-size"]
        .as_u64()
        .ok_or_else(|| Error::Internal("qemu-img info gave no virtual-size".to_string()))?;
    Ok((format, size))
}

/// Runs `qemu-img convert -p ARGS`, feeding its progress into `progress`; on failure, the
/// error is qemu-img's own last words.
pub async fn convert(args: &[&std::ffi::OsStr], progress: &Progress) -> Result<(), String> {
    let mut child = Command::new("qemu-img")
        .arg("convert")
        .arg("-p")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running qemu-img: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut buf = vec![0u8; 4096];
    loop {
        match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(percent) = parse_progress(&String::from_utf8_lossy(&buf[..n])) {
                    progress.set_percent(percent);
                }
            }
        }
    }
    let status = child.wait().await.map_err(|e| format!("waiting for qemu-img: {e}"))?;
    let errors = errors.await.unwrap_or_default();
    if status.success() {
        progress.set_percent(100.0);
        Ok(())
    } else {
        let last = errors.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        Err(format!("qemu-img failed ({status}): {}", last.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_the_last_figure() {
        assert_eq!(parse_progress("    (0.00/100%)\r    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_progress("    (100.00/100%)\r\n"), Some(100.0));
        assert_eq!(parse_progress("no progress here"), None);
        assert_eq!(parse_progress("(abc/100%)"), None);
    }

    #[test]
    fn rate_and_eta_follow_progress() {
        let p = Progress::new(1000);
        assert_eq!(p.rate_and_eta(), (0, None));
        p.set_percent(50.0);
        assert_eq!(p.done(), 500);
        let (_, eta) = p.rate_and_eta();
        assert!(eta.is_some());
        p.set_percent(250.0);
        assert_eq!(p.done(), 1000, "never more than the total");
    }
}
