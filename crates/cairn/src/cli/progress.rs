//! Following a job to its end, with a progress bar on stderr for a person watching.

use std::io::{self, IsTerminal, Write};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::client::{encode, Client};
use super::output::{amount_done, duration, percent, rate};

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const BAR_WIDTH: u64 = 30;

/// Polls the job until it is no longer `running` and returns its final state; a `failed` job is
/// an error carrying the job's own reason.
pub fn wait_for_job(client: &Client, job: Value) -> Result<Value> {
    let job = wait_for_job_end(client, job)?;
    check_succeeded(&job)?;
    Ok(job)
}

/// Polls a job, drawing its progress, until it ends, however it ends.
pub fn wait_for_job_end(client: &Client, mut job: Value) -> Result<Value> {
    let id = job["id"].as_str().context("the API answered a job without an id")?.to_owned();
    let mut bar = ProgressBar::on_stderr();
    while job["state"] == "running" {
        bar.draw(&job);
        thread::sleep(POLL_INTERVAL);
        job = client.get(&format!("/v1/jobs/{}", encode(&id)))?;
    }
    Ok(job)
}

/// Polls a schedule's runs until `run` ends, and returns it as it ended.
pub fn wait_for_run(client: &Client, schedule: &str, mut run: Value) -> Result<Value> {
    let id = run["id"].as_str().context("the API answered a run without an id")?.to_owned();
    while run["state"] == "running" {
        thread::sleep(POLL_INTERVAL);
        let runs = client.get(&format!("/v1/schedules/{}/runs", encode(schedule)))?;
        run = runs
            .as_array()
            .and_then(|runs| runs.iter().find(|r| r["id"] == id.as_str()).cloned())
            .with_context(|| format!("run {id} is no longer listed"))?;
    }
    Ok(run)
}

/// An error naming the job and its reason if it failed.
pub fn check_succeeded(job: &Value) -> Result<()> {
    if job["state"] == "failed" {
        bail!(
            "job {} failed: {}",
            job["id"].as_str().unwrap_or("?"),
            job["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// `[#####.....]  45%  1.2 GiB / 4.0 GiB  300 MiB/s  ETA 9s`; the rate and ETA are left out
/// until the daemon knows them.
pub fn progress_line(done: u64, total: u64, bytes_per_sec: u64, eta_seconds: Option<u64>) -> String {
    let filled = percent(done, total).unwrap_or(0) * BAR_WIDTH / 100;
    let bar: String = (0..BAR_WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
    let mut line = format!("[{bar}]  {}", amount_done(done, total));
    if let Some(rate) = rate(bytes_per_sec) {
        line += &format!("  {rate}");
    }
    if let Some(eta) = eta_seconds {
        line += &format!("  ETA {}", duration(eta));
    }
    line
}

/// Redraws one line of stderr in place; draws nothing when stderr is not a terminal, so logs and
/// pipes stay clean.
#[derive(Debug)]
struct ProgressBar {
    drawn: bool,
    enabled: bool,
}

impl ProgressBar {
    fn on_stderr() -> Self {
        ProgressBar { drawn: false, enabled: io::stderr().is_terminal() }
    }

    fn draw(&mut self, job: &Value) {
        if !self.enabled {
            return;
        }
        let number = |key: &str| job[key].as_u64().unwrap_or(0);
        let line = progress_line(
            number("bytes_done"),
            number("bytes_total"),
            number("rate_bytes_per_sec"),
            job["eta_seconds"].as_u64(),
        );
        // `\x1b[K` erases what a longer previous line left behind. A failed write to the
        // terminal only loses the bar, never the job.
        let _ = write!(io::stderr(), "\r{line}\x1b[K");
        self.drawn = true;
    }
}

impl Drop for ProgressBar {
    /// Takes the bar away however the wait ends, so the next output starts on a clean line.
    fn drop(&mut self) {
        if self.drawn {
            let _ = write!(io::stderr(), "\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_with_everything_known() {
        assert_eq!(
            progress_line(180 << 20, 400 << 20, 30 << 20, Some(9)),
            "[#############.................]  45%  180.0 MiB / 400.0 MiB  30.0 MiB/s  ETA 9s"
        );
    }

    #[test]
    fn line_before_the_rate_is_known() {
        assert_eq!(progress_line(0, 1 << 30, 0, None), "[..............................]  0%  0 B / 1.0 GiB");
    }

    #[test]
    fn line_when_done() {
        assert_eq!(
            progress_line(1 << 30, 1 << 30, 1 << 30, Some(0)),
            "[##############################]  100%  1.0 GiB / 1.0 GiB  1.0 GiB/s  ETA 0s"
        );
    }

    #[test]
    fn line_without_a_total() {
        assert_eq!(progress_line(2048, 0, 0, None), "[..............................]  2.0 KiB");
    }
}
