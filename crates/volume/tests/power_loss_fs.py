#!/usr/bin/python3
"""Power cuts on a real file system: the crash test's child (tests/crash.rs) runs random
volume operations on ext4 or XFS over a block device that logs every write and every flush in order,
together with the child's own records of each operation's start and end. Then the log is
replayed cut at many points, each into a disk image as a power loss at that point could leave
it: every write before the last flush, and of the writes after it none, all, a random half,
or all torn (a random half of each one's 512-byte sectors). Each image is
mounted (the file system replays its journal), and the crash test checks the store on it against the
records logged before the cut: every flushed byte, every completed snapshot and deletion.

The block device is a loop device (direct I/O) on a file that this script serves over FUSE,
so the kernel's loop driver hands it every write, and every flush as an fsync, one at a time.
Run by hand, as root (loop devices, mount, FUSE), with python3-fusepy installed:

    cargo test --release -p cairn-volume --test crash --no-run
    sudo /usr/bin/python3 crates/volume/tests/power_loss_fs.py [--fs ext4|xfs] [--seconds 20] [--cuts 60] [--seed N]

It prints one line per cut and a summary; a failing cut keeps its image and records in the
work directory (default /var/tmp/cairn-power-loss) and exits non-zero. Not part of CI: CI
machines may not grant loop devices, mounts or FUSE.
"""
import argparse
import errno
import glob
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

IMAGE_SIZE = 1 << 30
SECTOR = 512
RECORD = struct.Struct("<cQQ")  # kind (W write, F flush, M marker), offset, length; then data
READY = b"# ready\n"
MARK = b"@cairn "


# --- the logging device ---------------------------------------------------------------------

def serve(backing, log_path, mountpoint):
    """Serves `disk` (backed by `backing`) and `marker` over FUSE until unmounted. Writes to
    `disk` are applied and logged with their data; an fsync of `disk` is logged as a flush;
    writes to `marker` are logged as markers. One lock orders them all."""
    import fusepy

    class Device(fusepy.Operations):
        def __init__(self):
            self.fd = os.open(backing, os.O_RDWR)
            self.log = open(log_path, "ab", buffering=0)
            self.order = threading.Lock()
            self.size = os.fstat(self.fd).st_size

        def getattr(self, path, fh=None):
            now = time.time()
            kinds = {"/": (stat.S_IFDIR | 0o755, 0), "/disk": (stat.S_IFREG | 0o600, self.size),
                     "/marker": (stat.S_IFREG | 0o600, 0)}
            if path not in kinds:
                raise fusepy.FuseOSError(errno.ENOENT)
            mode, size = kinds[path]
            return dict(st_mode=mode, st_nlink=1, st_size=size, st_ctime=now, st_mtime=now, st_atime=now)

        def readdir(self, path, fh):
            return [".", "..", "disk", "marker"]

        def open(self, path, flags):
            return 0

        def truncate(self, path, length, fh=None):
            if path != "/marker":
                raise fusepy.FuseOSError(errno.EPERM)

        def read(self, path, size, offset, fh):
            return os.pread(self.fd, size, offset) if path == "/disk" else b""

        def write(self, path, data, offset, fh):
            with self.order:
                if path == "/disk":
                    os.pwrite(self.fd, data, offset)
                    self.log.write(RECORD.pack(b"W", offset, len(data)) + data)
                else:
                    self.log.write(RECORD.pack(b"M", 0, len(data)) + data)
            return len(data)

        def fsync(self, path, datasync, fh):
            with self.order:
                if path == "/disk":
                    self.log.write(RECORD.pack(b"F", 0, 0))
            return 0

    fusepy.FUSE(Device(), mountpoint, foreground=True, direct_io=True)


def read_log(path):
    """The log as a list of (kind, offset, data)."""
    records = []
    with open(path, "rb") as f:
        blob = f.read()
    at = 0
    while at < len(blob):
        kind, offset, length = RECORD.unpack_from(blob, at)
        at += RECORD.size
        data = blob[at:at + length] if kind in (b"W", b"M") else b""
        at += len(data)
        records.append((kind, offset, data))
    return records


# --- helpers --------------------------------------------------------------------------------

def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def wait_for(predicate, what, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def crash_binary(root):
    """The newest release build of the crash test (cargo test --release --test crash --no-run)."""
    found = [p for p in glob.glob(os.path.join(root, "target/release/deps/crash-*"))
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("no crash test binary: run `cargo test --release -p cairn-volume --test crash --no-run`")
    return max(found, key=os.path.getmtime)


class Mounted:
    """The file system on a loop device over `image`, mounted at `at`."""

    def __init__(self, image, at, direct_io=False):
        self.at = at
        flags = ["--direct-io=on"] if direct_io else []
        self.loop = run("losetup", *flags, "-f", "--show", image, capture_output=True, text=True).stdout.strip()
        os.makedirs(at, exist_ok=True)
        run("mount", self.loop, at)

    def close(self):
        run("umount", self.at)
        run("losetup", "-d", self.loop)


# --- recording ------------------------------------------------------------------------------

# How to make each file system: everything initialised at once, so that the log holds the
# store's writes, not the file system's lazy initialisation.
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}


def record(work, binary, fs, seconds, seed):
    """Makes the file system, runs the child on it for `seconds` and kills it. Returns the base
    image (before any logged write) and the log."""
    base, disk, log = (os.path.join(work, n) for n in ("base.img", "disk.img", "log.bin"))
    with open(base, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run(*MKFS[fs], base)
    run("cp", "--sparse=always", base, disk)
    fuse_dir = os.path.join(work, "device")
    os.makedirs(fuse_dir, exist_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", disk, log, fuse_dir])
    mounted = None
    try:
        wait_for(lambda: os.path.exists(os.path.join(fuse_dir, "marker")), "the FUSE device")
        mounted = Mounted(os.path.join(fuse_dir, "disk"), os.path.join(work, "fs"), direct_io=True)
        store = os.path.join(mounted.at, "store")
        run(binary, "power_cut_entry", "--exact", "--ignored", "--nocapture", env={**os.environ, "CAIRN_POWER_SETUP": store},
            stdout=subprocess.DEVNULL)
        marker = os.path.join(fuse_dir, "marker")
        with open(marker, "wb", buffering=0) as f:
            f.write(READY)
        env = {**os.environ, "CAIRN_CRASH_CHILD": f"{seed}:1000000:{store}", "CAIRN_CRASH_MARKERS": marker}
        child = subprocess.Popen([binary, "crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"], env=env,
                                 stdout=subprocess.DEVNULL)
        time.sleep(seconds)
        if child.poll() is not None:
            sys.exit(f"the child ended by itself ({child.returncode})")
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if mounted:
            mounted.close()
        run("fusermount", "-u", fuse_dir)
        server.wait()
    return base, read_log(log)


# --- replay ---------------------------------------------------------------------------------

def choose_cuts(records, count, rng):
    """Cut points after the store was set up: just before some flushes (power lost while a
    flush waits) and at random records in between, in log order."""
    ready = next(i for i, (kind, _, data) in enumerate(records) if kind == b"M" and data == READY)
    flushes = [i for i in range(ready + 1, len(records)) if records[i][0] == b"F"]
    cuts = set(rng.sample(flushes, min(len(flushes), count // 2)))
    cuts.update(rng.randrange(ready + 1, len(records) + 1) for _ in range(count - len(cuts)))
    return sorted(cuts)


def check_cut(work, binary, durable, records, last_flush, cut, keep, rng):
    """Builds the image of a cut at `cut` (the durable image plus the kept writes after the last
    flush), mounts it and runs the check. Returns (ok, detail, unsynced writes kept)."""
    image = os.path.join(work, "cut.img")
    run("cp", "--sparse=always", durable, image)
    tail = [r for r in records[last_flush + 1:cut] if r[0] == b"W"]
    kept = [r for r in tail if keep in ("all", "torn") or (keep == "some" and rng.random() < 0.5)]
    with open(image, "r+b") as f:
        for _, offset, data in kept:
            # Torn: a disk writes a sector whole, but not a request's sectors together.
            sectors = range(0, len(data), SECTOR) if keep != "torn" else \
                [at for at in range(0, len(data), SECTOR) if rng.random() < 0.5]
            for at in sectors:
                f.seek(offset + at)
                f.write(data[at:at + SECTOR])
    lines = b"".join(data for kind, _, data in records[:cut] if kind == b"M" and data.startswith(MARK))
    log = os.path.join(work, "cut.log")
    with open(log, "wb") as f:
        f.write(lines)
    mounted = Mounted(image, os.path.join(work, "check"))
    try:
        env = {**os.environ, "CAIRN_POWER_CHECK": os.path.join(mounted.at, "store"), "CAIRN_POWER_LOG": log}
        result = subprocess.run([binary, "power_cut_entry", "--exact", "--ignored", "--nocapture"], env=env,
                                capture_output=True, text=True)
    finally:
        mounted.close()
    return result.returncode == 0, result.stdout + result.stderr, (len(kept), len(tail))


def replay(work, binary, base, records, cuts, rng):
    """Checks every cut, in log order, keeping one image up to date with the durable writes."""
    durable = os.path.join(work, "durable.img")
    run("cp", "--sparse=always", base, durable)
    applied = 0  # records[:applied] are in `durable`
    failures = 0
    with open(durable, "r+b") as f:
        for n, cut in enumerate(cuts, 1):
            last_flush = max((i for i in range(applied, cut) if records[i][0] == b"F"), default=applied - 1)
            for kind, offset, data in records[applied:last_flush + 1]:
                if kind == b"W":
                    f.seek(offset)
                    f.write(data)
            applied = max(applied, last_flush + 1)
            f.flush()
            keep = rng.choice(["none", "all", "some", "torn"])
            ops = sum(1 for kind, _, data in records[:cut] if kind == b"M" and b" done " in data)
            ok, detail, (kept, unsynced) = check_cut(work, binary, durable, records, applied - 1, cut, keep, rng)
            print(f"cut {n}/{len(cuts)} at record {cut}: {ops} operations done, kept {kept} of {unsynced} "
                  f"unsynced writes ({keep}): {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failures += 1
                kept_as = os.path.join(work, f"failed-{cut}")
                os.makedirs(kept_as, exist_ok=True)
                shutil.copy(os.path.join(work, "cut.log"), kept_as)
                os.rename(os.path.join(work, "cut.img"), os.path.join(kept_as, "cut.img"))
                print(detail[-3000:], flush=True)
    return failures


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="how long the child runs (default 20)")
    parser.add_argument("--cuts", type=int, default=60, help="cut points to check (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the child's operations and of the cuts")
    parser.add_argument("--fs", choices=sorted(MKFS), default="ext4", help="the file system (default ext4)")
    parser.add_argument("--work", default="/var/tmp/cairn-power-loss", help="work directory (emptied first)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: loop devices, mount and FUSE")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../.."))
    binary = crash_binary(root)
    seed = args.seed if args.seed is not None else random.randrange(1 << 63)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    print(f"{args.fs}, seed {seed}; crash test binary {binary}; work directory {args.work}", flush=True)
    started = time.monotonic()
    base, records = record(args.work, binary, args.fs, args.seconds, seed)
    writes = sum(1 for r in records if r[0] == b"W")
    flushes = sum(1 for r in records if r[0] == b"F")
    done = sum(1 for r in records if r[0] == b"M" and b" done " in r[2])
    print(f"recorded {writes} writes, {flushes} flushes and {done} operations in {time.monotonic() - started:.0f} s",
          flush=True)
    rng = random.Random(seed)
    cuts = choose_cuts(records, args.cuts, rng)
    failures = replay(args.work, binary, base, records, cuts, rng)
    print(f"{len(cuts) - failures} of {len(cuts)} cuts passed in {time.monotonic() - started:.0f} s (seed {seed})")
    if failures:
        sys.exit(1)
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
