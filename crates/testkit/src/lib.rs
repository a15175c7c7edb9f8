//! What cairn's test suites share: finding the client tools they drive (a missing tool fails
//! the run under `CI=true`, so CI never skips silently), running them, test data, and (feature
//! `s3`) an S3 server on loopback.

use std::process::{Command, Output};

#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3")]
pub use s3::{start_s3_server, S3Server};

/// Checks that a client tool is installed. Under CI a missing tool fails the test; elsewhere
/// the test says it is skipped and returns false.
pub fn have(tool: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is not installed; .ci/run installs it");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// `have` for each tool; false if any is missing.
pub fn have_all(tools: &[&str]) -> bool {
    tools.iter().all(|t| have(t))
}

/// Runs a command and returns its output, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command expected to fail; returns its stderr.
pub fn run_failing(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} succeeded but should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic bytes that differ per position and seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
