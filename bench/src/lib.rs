//! What the benchmark runners share: sizes, argument parsing, the work directory and the
//! machine's load, which every report prints because other work skews the figures.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Parses sizes such as `4096`, `512M` or `1T`.
pub fn parse_size(s: &str) -> Result<u64> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let unit = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => KIB,
        "M" => MIB,
        "G" => GIB,
        "T" => TIB,
        _ => bail!("bad size {s:?}: use a number with an optional K, M, G or T"),
    };
    digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)).with_context(|| format!("bad size {s:?}"))
}

/// A fresh directory for the run's data, removed when the run ends, also on error.
#[derive(Debug)]
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    pub fn create(parent: &Path) -> Result<Self> {
        let path = parent.join(format!("cairn-bench.{}", std::process::id()));
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// Writes `size` bytes to a scratch file at `scratch` and deletes it, untimed, so that the page
/// cache the next writes need comes from memory the machine has just used. On a VM, memory the
/// guest has not touched for a while (or handed back to the host) costs a host fault per page on
/// first use: a 1 GiB write into new page cache measured 0.2 s or 3 s here depending only on
/// that, and nbdcopy into a new cairn volume ran at 420 MiB/s cold against 1050 warmed. A
/// layered volume's writes land in new pages (its head is empty) while a raw file overwrites
/// cached ones, so without this a write figure measures the VM's memory.
pub fn warm_free_memory(scratch: &Path, size: u64) -> Result<()> {
    let mut file = std::fs::File::create(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let block = vec![0u8; MIB as usize];
    for _ in 0..size.div_ceil(MIB) {
        std::io::Write::write_all(&mut file, &block)?;
    }
    drop(file);
    Ok(std::fs::remove_file(scratch)?)
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    if fields.is_empty() {
        "unknown".to_string()
    } else {
        fields.join(" ")
    }
}

/// CPU time the hypervisor gave to others while this machine's virtual CPUs were ready to run
/// ("steal" in /proc/stat), summed over all CPUs since boot; `None` where the kernel does not
/// report it. Whatever ran on a stolen CPU stopped for that long, unseen by the guest: a lock
/// holder, a writer in the middle of a write, or the timed call itself.
pub fn cpu_steal() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let total = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal, in clock ticks.
    let ticks: u64 = total.split_whitespace().nth(7)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the running system and touches no memory of ours.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|t| *t > 0)?;
    Some(std::time::Duration::from_millis(ticks * 1000 / per_second))
}

/// The file system `path` lives on, as "TYPE on SOURCE (OPTIONS)", from the mount with the
/// longest mount point that contains it: reports name it, because the file system and its
/// options change the figures.
pub fn file_system_of(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        let mount: Vec<&str> = mount.split(' ').collect();
        let fs: Vec<&str> = fs.split(' ').collect();
        let (Some(point), Some(options), [kind, source, super_options, ..]) =
            (mount.get(4), mount.get(5), fs.as_slice())
        else {
            continue;
        };
        let point = point.replace("\\040", " ");
        if path.starts_with(&point) && best.as_ref().is_none_or(|(len, _)| point.len() > *len) {
            // The mount's own options, then the file system's (where ext4 lists `discard`).
            let mut all: Vec<&str> = options.split(',').collect();
            for option in super_options.split(',') {
                if !all.contains(&option) {
                    all.push(option);
                }
            }
            best = Some((point.len(), format!("{kind} on {source} ({})", all.join(","))));
        }
    }
    best.map(|(_, description)| description)
}

/// The read-ahead, in KiB, of the block device `path` lives on (a partition's is its disk's),
/// or None where the file system has no block device (tmpfs, overlay). On ext4 it sets how
/// large the page cache's folios grow on reads, and a small write into a large folio costs
/// more.
pub fn read_ahead_kib_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let device = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev)));
    read_ahead_kib_in(&device)
}

/// [`read_ahead_kib_of`] for a device's sysfs directory: its own queue, or its parent's when it
/// is a partition.
fn read_ahead_kib_in(device: &Path) -> Option<u64> {
    [device.join("queue/read_ahead_kb"), device.join("../queue/read_ahead_kb")]
        .iter()
        .find_map(|file| std::fs::read_to_string(file).ok()?.trim().parse().ok())
}

pub fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= TIB && b % TIB == 0 => format!("{} TiB", b / TIB),
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b => format!("{} MiB", b / MIB),
    }
}

/// The standard image generator, ../shared/bench/mkimage.py from the project root.
pub fn default_mkimage() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/mkimage.py")
}

/// Runs a command to the end; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::piped()).output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes back dirty data and empties the page cache, so every measured program starts from
/// the same cold state. Needs root; returns whether it worked.
pub fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// The middle value (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_time_is_read_from_proc_stat_and_never_goes_back() {
        let first = cpu_steal().expect("Linux reports steal time in /proc/stat");
        let later = cpu_steal().expect("still there");
        assert!(later >= first);
        // The same field read by hand: the 8th number on the "cpu" line, in clock ticks.
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        let ticks: u64 = stat.lines().next().unwrap().split_whitespace().nth(8).unwrap().parse().unwrap();
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert!(first.as_millis() as u64 <= ticks * 1000 / per_second);
    }

    #[test]
    fn read_ahead_is_read_from_the_device_or_the_disk_of_a_partition() {
        let sys = tempfile::tempdir().unwrap();
        let disk = sys.path().join("vda");
        std::fs::create_dir_all(disk.join("queue")).unwrap();
        std::fs::create_dir_all(disk.join("vda1")).unwrap();
        std::fs::write(disk.join("queue/read_ahead_kb"), "8192\n").unwrap();
        assert_eq!(read_ahead_kib_in(&disk), Some(8192));
        assert_eq!(read_ahead_kib_in(&disk.join("vda1")), Some(8192), "a partition has its disk's");
        assert_eq!(read_ahead_kib_in(&sys.path().join("missing")), None);
    }

    #[test]
    fn the_root_file_system_is_described() {
        let root = file_system_of(Path::new("/")).expect("/ is mounted");
        assert!(root.contains(" on ") && root.ends_with(')'), "{root}");
    }
}
