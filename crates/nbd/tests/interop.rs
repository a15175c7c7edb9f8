mod common;
use common::*;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cairn_volume::{AllocExtent, Allocation, Volume};

// Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine) against the server,
// each test on its own server and store. Results are checked through the clients and through
// the volume engine directly (`server.store`), so a server that misreports allocation, loses
// writes or leaks the live volume into a snapshot export fails here.

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---- helpers ----------------------------------------------------------------------------

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses a tool's JSON output, skipping anything it printed before the JSON (fio says
/// "connected to NBD server" first).
fn parse_json(text: &str) -> serde_json::Value {
    let start = text.find(['{', '[']).unwrap_or_else(|| panic!("no JSON in {text:?}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

fn run_json(cmd: &mut Command) -> serde_json::Value {
    parse_json(&stdout(&run(cmd)))
}

fn volume(server: &TestServer, name: &str) -> Volume {
    let id = server.store.volume_id(name).expect("volume exists");
    server.store.volume(id).expect("volume opens")
}

/// The whole content of a volume, read through the engine (not through NBD).
fn read_volume(server: &TestServer, name: &str) -> Vec<u8> {
    let v = volume(server, name);
    let mut buf = vec![0u8; v.size() as usize];
    v.read(&mut buf, 0).expect("engine read");
    buf
}

fn allocation(server: &TestServer, name: &str) -> Vec<AllocExtent> {
    let v = volume(server, name);
    v.allocation(0, v.size()).expect("engine allocation")
}

/// (offset, length) of the extents of `kind`.
fn runs_of(extents: &[AllocExtent], kind: Allocation) -> Vec<(u64, u64)> {
    extents.iter().filter(|e| e.kind == kind).map(|e| (e.offset, e.length)).collect()
}

/// The kind of every byte in `[offset, offset+len)`, failing if the range is not uniform.
fn kind_of(extents: &[AllocExtent], offset: u64, len: u64) -> Allocation {
    let e = extents
        .iter()
        .find(|e| e.offset <= offset && offset < e.offset + e.length)
        .unwrap_or_else(|| panic!("no extent at {offset} in {extents:?}"));
    assert!(offset + len <= e.offset + e.length, "{offset}+{len} is not one kind in {extents:?}");
    e.kind
}

/// Joins runs (in order) with the same value where they touch or overlap: tools and the
/// engine may split differently.
fn coalesce<T: PartialEq + Copy>(runs: impl IntoIterator<Item = (u64, u64, T)>) -> Vec<(u64, u64, T)> {
    let mut out: Vec<(u64, u64, T)> = Vec::new();
    for (start, len, v) in runs {
        match out.last_mut() {
            Some((s, l, last)) if *last == v && start <= *s + *l => *l = (start + len).max(*s + *l) - *s,
            _ => out.push((start, len, v)),
        }
    }
    out
}

/// `runs` widened to whole MiBs and joined where they then touch or overlap.
fn mib_runs(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let widened = runs.iter().map(|&(start, len)| {
        let first = start / MIB * MIB;
        (first, (start + len).div_ceil(MIB) * MIB - first, ())
    });
    coalesce(widened).into_iter().map(|(start, len, ())| (start, len)).collect()
}

/// Writes a sparse file of `size` bytes holding `data` at each offset and holes elsewhere,
/// and returns its full content.
fn sparse_file(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let f = std::fs::File::create(path).expect("create file");
    f.set_len(size).expect("size file");
    let mut content = vec![0u8; size as usize];
    for (offset, bytes) in data {
        f.write_all_at(bytes, *offset).expect("write file");
        content[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
    }
    f.sync_all().expect("sync file");
    content
}

fn tmp(server: &TestServer, name: &str) -> PathBuf {
    server.dir.path().join(name)
}

/// Runs qemu-io on a raw NBD export with `commands`, failing the test if any command fails
/// (qemu-io exits non-zero then, e.g. on "Pattern verification failed").
fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(uri));
    let text = stdout(&out);
    assert!(!text.contains("failed"), "qemu-io reported a failure:\n{text}");
    text
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[track_caller]
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = first_difference(actual, expected) {
        panic!(
            "{what}: differs at byte {at} (lengths {} and {}): {:?} vs {:?}",
            actual.len(),
            expected.len(),
            actual.get(at..(at + 16).min(actual.len())),
            expected.get(at..(at + 16).min(expected.len()))
        );
    }
}

/// The file layout the qemu-img and nbdcopy tests import: data, holes, explicit zeros written
/// as data (the importer must detect them), a single block, and data at the very end.
fn mixed_layout(size: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, pattern(4 * MIB as usize, seed)),
        (8 * MIB, pattern(4 * KIB as usize, seed + 1)),
        (12 * MIB, vec![0u8; 4 * MIB as usize]),
        (17 * MIB, pattern(MIB as usize + 8 * KIB as usize, seed + 2)),
        (size - 2 * MIB, pattern(2 * MIB as usize, seed + 3)),
    ]
}

/// The 4 KiB blocks holding non-zero bytes, as (offset, length) runs.
fn nonzero_blocks(content: &[u8]) -> Vec<(u64, u64)> {
    let runs = content.chunks(4096).enumerate().map(|(i, b)| (i as u64 * 4096, 4096, b.iter().any(|&x| x != 0)));
    coalesce(runs).into_iter().filter(|r| r.2).map(|(s, l, _)| (s, l)).collect()
}

/// The extents qemu reports for the engine's allocation: qemu's NBD driver maps
/// NBD_STATE_HOLE to "data": false and NBD_STATE_ZERO to "zero": true, so an explicitly
/// zeroed range is (data, zero) and a hole is (no data, zero).
fn qemu_expected_map(extents: &[AllocExtent]) -> Vec<(u64, u64, (bool, bool))> {
    coalesce(extents.iter().map(|e| {
        let flags = match e.kind {
            Allocation::Data => (true, false),
            Allocation::Zero => (true, true),
            Allocation::Hole => (false, true),
        };
        (e.offset, e.length, flags)
    }))
}

fn qemu_img_map(uri: &str) -> Vec<(u64, u64, (bool, bool))> {
    let map = run_json(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let entries = map.as_array().expect("qemu-img map gives an array");
    coalesce(entries.iter().map(|e| {
        let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
        let b = |k: &str| e[k].as_bool().unwrap_or_else(|| panic!("{k} in {e}"));
        (n("start"), n("length"), (b("data"), b("zero")))
    }))
}

// ---- qemu-img -----------------------------------------------------------------------------

#[test]
fn qemu_img_info_convert_compare_map_round_trip() {
    if !have("qemu-img") {
        return;
    }
    let server = TestServer::start();
    let size = 32 * MIB;
    server.store.create_volume("disk", size).unwrap();
    let uri = server.uri("disk");

    let info = run_json(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");

    // A fresh volume is one hole, and qemu sees it so.
    assert_eq!(qemu_img_map(&uri), vec![(0, size, (false, true))]);

    let src = tmp(&server, "src.raw");
    let content = sparse_file(&src, size, &mixed_layout(size, 1));
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
    assert_same_bytes(&read_volume(&server, "disk"), &content, "volume after qemu-img convert");

    // The import is sparse: the volume holds data exactly where the file has non-zero blocks
    // (qemu-img detects the zeros written as data too).
    let alloc = allocation(&server, "disk");
    assert_eq!(runs_of(&alloc, Allocation::Data), nonzero_blocks(&content), "data extents: {alloc:?}");

    // What qemu sees over NBD is the engine's allocation, extent for extent.
    assert_eq!(qemu_img_map(&uri), qemu_expected_map(&alloc));

    // qemu-img compare notices a difference.
    let other = tmp(&server, "other.raw");
    let mut changed = content.clone();
    changed[9 * MIB as usize] = 1;
    write_file(&other, &changed);
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&other).arg(&uri).output();
    let out = out.expect("run qemu-img compare");
    assert_eq!(out.status.code(), Some(1), "compare must report a difference: {}", stdout(&out));
    assert!(stdout(&out).contains(&format!("offset {}", 9 * MIB)), "{}", stdout(&out));

    // Back out to a new raw file: the same bytes, and holes where the volume has no data.
    let exported = tmp(&server, "exported.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&exported));
    let bytes = std::fs::read(&exported).unwrap();
    assert_same_bytes(&bytes, &content, "file exported by qemu-img convert");
    // File systems allocate in their own units (XFS on a loop device gave whole MiBs around a
    // 4 KiB write), so both sides are compared in whole MiBs; an export that wrote out the
    // holes shows as one run.
    assert_eq!(
        mib_runs(&file_data_runs(&exported)),
        mib_runs(&runs_of(&alloc, Allocation::Data)),
        "data extents of the exported file"
    );
}

/// The runs of `path` that hold data, as `SEEK_DATA` and `SEEK_HOLE` report them.
fn file_data_runs(path: &Path) -> Vec<(u64, u64)> {
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len() as libc::off_t;
    let seek = |from: libc::off_t, whence: libc::c_int| {
        // SAFETY: lseek only reads its integer arguments; the descriptor is open for `file`'s
        // lifetime. ENXIO past the last data is the -1 case.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        if at < 0 {
            size
        } else {
            at
        }
    };
    let mut runs = Vec::new();
    let mut at = 0;
    while at < size {
        let data = seek(at, libc::SEEK_DATA);
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE);
        runs.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    runs
}

// ---- qemu-io ------------------------------------------------------------------------------

#[test]
fn qemu_io_write_read_discard_and_zero() {
    if !have("qemu-io") {
        return;
    }
    let server = TestServer::start();
    let size = 8 * MIB;
    server.store.create_volume("disk", size).unwrap();
    let uri = server.uri("disk");
    let unaligned = 4 * MIB + 100;
    let cmds: Vec<String> = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "discard 0 64k",
        "read -P 0 0 64k",
        "read -P 0xab 64k 960k",
        "write -P 0xee 1M 1M",
        // Without -u, qemu asks for zeroes that stay allocated (NBD_CMD_FLAG_NO_HOLE).
        "write -z 1M 1M",
        "read -P 0 1M 1M",
        "write -P 0xcd 2M 1M",
        // With -u it lets the server punch them.
        "write -z -u 2M 512k",
        "read -P 0 2M 512k",
        "read -P 0xcd 2560k 512k",
        // Short and unaligned, across a 4 KiB block boundary: a read-modify-write.
        &format!("write -P 0x3c {unaligned} 5000"),
        &format!("read -P 0x3c {unaligned} 5000"),
        "read -P 0 4M 100",
        &format!("read -P 0 {} {}", unaligned + 5000, 4 * MIB + 8192 - unaligned - 5000),
        // Zeroes that stay allocated, unaligned and longer than the server's zeroing step.
        "write -P 0x99 5M 2M",
        &format!("write -z {} {}", 5 * MIB + 512, 3 * MIB / 2 + 1024),
        "read -P 0x99 5M 512",
        &format!("read -P 0 {} {}", 5 * MIB + 512, 3 * MIB / 2 + 1024),
        &format!("read -P 0x99 {} {}", 5 * MIB + 512 + 3 * MIB / 2 + 1024, MIB / 2 - 1536),
        // The last byte of the disk.
        &format!("write -P 0x7f {} 1", size - 1),
        &format!("read -P 0x7f {} 1", size - 1),
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_io(&uri, &cmds);
    // A pattern check that must fail, so the checks above mean something.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 4M 4M"]).arg(&uri).output().unwrap();
    assert!(!out.status.success() && stdout(&out).contains("Pattern verification failed"), "{}", stdout(&out));

    let mut expected = vec![0u8; size as usize];
    let mut fill = |at: u64, len: u64, b: u8| expected[at as usize..(at + len) as usize].fill(b);
    fill(64 * KIB, 960 * KIB, 0xab);
    fill(2560 * KIB, 512 * KIB, 0xcd);
    fill(unaligned, 5000, 0x3c);
    fill(5 * MIB, 2 * MIB, 0x99);
    fill(5 * MIB + 512, 3 * MIB / 2 + 1024, 0);
    fill(size - 1, 1, 0x7f);
    assert_same_bytes(&read_volume(&server, "disk"), &expected, "volume after qemu-io");

    let alloc = allocation(&server, "disk");
    // Trim and zeroing with unmap free whole blocks; zeroing without unmap keeps them.
    assert_eq!(kind_of(&alloc, 0, 64 * KIB), Allocation::Zero, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 64 * KIB, 2 * MIB - 64 * KIB), Allocation::Data, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 2 * MIB, 512 * KIB), Allocation::Zero, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 2560 * KIB, 512 * KIB), Allocation::Data, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 3 * MIB, MIB), Allocation::Hole, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 4 * MIB, 8 * KIB), Allocation::Data, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 4 * MIB + 8 * KIB, MIB - 8 * KIB), Allocation::Hole, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 5 * MIB, 2 * MIB), Allocation::Data, "{alloc:?}");
    assert_eq!(kind_of(&alloc, 7 * MIB, MIB - 4 * KIB), Allocation::Hole, "{alloc:?}");
    assert_eq!(kind_of(&alloc, size - 4 * KIB, 4 * KIB), Allocation::Data, "{alloc:?}");
    assert_eq!(qemu_img_map(&uri), qemu_expected_map(&alloc));
}

#[test]
fn qemu_io_aio_at_depth() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let server = TestServer::start();
    let size = 16 * MIB;
    server.store.create_volume("disk", size).unwrap();
    let uri = server.uri("disk");
    let mut expected = vec![0u8; size as usize];
    let mut cmds = Vec::new();
    // 32 writes of 128 KiB in flight at once, every other chunk of the first 8 MiB, then
    // reads checking them and the gaps between.
    let chunk = 128 * KIB;
    for i in 0..32u64 {
        cmds.push(format!("aio_write -P {} {} {chunk}", i + 1, i * 2 * chunk));
        expected[(i * 2 * chunk) as usize..((i * 2 + 1) * chunk) as usize].fill(i as u8 + 1);
    }
    // Eight 512-byte writes into the same 4 KiB block, all in flight together: each is a
    // read-modify-write of that block on the server, and none may undo another.
    let block = 15 * MIB + 4 * KIB;
    for i in 0..8u64 {
        cmds.push(format!("aio_write -P {} {} 512", 0xa0 + i, block + i * 512));
        expected[(block + i * 512) as usize..(block + (i + 1) * 512) as usize].fill(0xa0 + i as u8);
    }
    // And unaligned writes straddling block boundaries next to each other.
    let base = 14 * MIB;
    for i in 0..8u64 {
        let at = base + i * 4096 + 3000;
        cmds.push(format!("aio_write -P {} {at} 2000", 0x50 + i));
        expected[at as usize..(at + 2000) as usize].fill(0x50 + i as u8);
    }
    cmds.push("aio_flush".into());
    for i in 0..32u64 {
        cmds.push(format!("aio_read -P {} {} {chunk}", i + 1, i * 2 * chunk));
        cmds.push(format!("aio_read -P 0 {} {chunk}", (i * 2 + 1) * chunk));
    }
    for i in 0..8u64 {
        cmds.push(format!("aio_read -P {} {} 512", 0xa0 + i, block + i * 512));
    }
    cmds.push("aio_flush".into());
    let out = qemu_io(&uri, &cmds);
    assert_eq!(out.matches("wrote ").count(), 48, "{out}");
    assert_eq!(out.matches("read ").count(), 72, "{out}");
    assert_same_bytes(&read_volume(&server, "disk"), &expected, "volume after aio");
    // Reading the whole disk through NBD in one go agrees too.
    let whole = tmp(&server, "whole.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&whole));
    assert_same_bytes(&std::fs::read(&whole).unwrap(), &expected, "disk read back through NBD");
}

// ---- nbdinfo ------------------------------------------------------------------------------

fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    nbdinfo_context_map(uri, cairn_nbd::proto::BASE_ALLOCATION)
}

/// `nbdinfo --map=CONTEXT` as (offset, length, value) runs.
fn nbdinfo_context_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = stdout(&run(Command::new("nbdinfo").arg(format!("--map={context}")).arg(uri)));
    coalesce(out.lines().map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "bad --map line {line:?}");
        (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
    }))
}

/// base:allocation flags for the engine's allocation: hole is 3 (hole|zero), zero is 2.
fn nbd_expected_map(extents: &[AllocExtent]) -> Vec<(u64, u64, u32)> {
    coalesce(extents.iter().map(|e| {
        let flags = match e.kind {
            Allocation::Data => 0,
            Allocation::Zero => 2,
            Allocation::Hole => 3,
        };
        (e.offset, e.length, flags)
    }))
}

#[test]
fn nbdinfo_size_list_map_and_json() {
    if !have("nbdinfo") {
        return;
    }
    let server = TestServer::start();
    let disk = server.store.create_volume("disk", 16 * MIB).unwrap();
    let other = server.store.create_volume("other", 4 * MIB).unwrap();
    let v = volume(&server, "disk");
    v.write(&pattern(2 * MIB as usize, 3), MIB, false).unwrap();
    v.write_zeroes(2 * MIB, 512 * KIB, false).unwrap();
    v.write(&pattern(100, 4), 10 * MIB + 10, false).unwrap();
    let snap = server.store.snapshot(disk.id, "s1").unwrap();
    // After the snapshot the live disk moves on; the snapshot keeps the old map.
    v.write_zeroes(0, 16 * MIB, false).unwrap();
    v.write(&pattern(4096, 5), 8 * MIB, false).unwrap();

    let uri = server.uri("disk");
    let plain = stdout(&run(Command::new("nbdinfo").arg(&uri)));
    assert!(plain.contains(&format!("export-size: {}", 16 * MIB)), "{plain}");
    assert!(plain.contains("base:allocation"), "{plain}");
    assert!(plain.contains("is_read_only: false"), "{plain}");

    let size = |uri: &str| stdout(&run(Command::new("nbdinfo").args(["--size", uri]))).trim().to_string();
    assert_eq!(size(&uri), (16 * MIB).to_string());
    assert_eq!(size(&server.uri("other")), (4 * MIB).to_string());
    assert_eq!(size(&server.uri("disk@s1")), (16 * MIB).to_string());
    // Numeric ids name the same exports.
    assert_eq!(size(&server.uri(&other.id.0.to_string())), (4 * MIB).to_string());
    assert_eq!(size(&server.uri(&format!("{}@{}", disk.id.0, snap.id.0))), (16 * MIB).to_string());

    let list = stdout(&run(Command::new("nbdinfo").args(["--list", &uri])));
    for name in ["export=\"disk\"", "export=\"other\"", "export=\"disk@s1\""] {
        assert!(list.contains(name), "{name} missing from\n{list}");
    }
    assert!(list.contains("snapshot (read-only)"), "{list}");
    let list = run_json(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let exports = list["exports"].as_array().expect("exports");
    let names: Vec<&str> = exports.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["disk", "other", "disk@s1"], "{list}");
    for e in exports {
        let read_only = e["export-name"].as_str().unwrap().contains('@');
        assert_eq!(e["is_read_only"].as_bool(), Some(read_only), "{e}");
    }

    let info = run_json(Command::new("nbdinfo").args(["--json", &uri]));
    let e = &info["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(16 * MIB), "{info}");
    for (flag, want) in [
        ("is_read_only", false),
        ("can_multi_conn", true),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_df", true),
        ("can_cache", true),
    ] {
        assert_eq!(e[flag].as_bool(), Some(want), "{flag} in {info}");
    }
    assert_eq!(info["structured"].as_bool(), Some(true), "{info}");
    let info = run_json(Command::new("nbdinfo").args(["--json", &server.uri("disk@s1")]));
    let e = &info["exports"][0];
    for (flag, want) in [("is_read_only", true), ("can_trim", false), ("can_zero", false), ("can_flush", true)] {
        assert_eq!(e[flag].as_bool(), Some(want), "{flag} in {info}");
    }

    // --map is the engine's allocation, for the live volume and for the snapshot.
    let live = allocation(&server, "disk");
    assert_eq!(nbdinfo_map(&uri), nbd_expected_map(&live));
    assert_eq!(
        nbdinfo_map(&uri),
        vec![(0, 8 * MIB, 2), (8 * MIB, 4 * KIB, 0), (8 * MIB + 4 * KIB, 8 * MIB - 4 * KIB, 2)]
    );
    let view = server.store.open_snapshot(snap.id).unwrap();
    let snap_alloc = view.allocation(0, 16 * MIB).unwrap();
    let snap_map = nbdinfo_map(&server.uri("disk@s1"));
    assert_eq!(snap_map, nbd_expected_map(&snap_alloc));
    assert_eq!(
        snap_map,
        vec![
            (0, MIB, 3),
            (MIB, MIB, 0),
            (2 * MIB, 512 * KIB, 2),
            (2 * MIB + 512 * KIB, 512 * KIB, 0),
            (3 * MIB, 7 * MIB, 3),
            (10 * MIB, 4 * KIB, 0),
            (10 * MIB + 4 * KIB, 6 * MIB - 4 * KIB, 3),
        ]
    );
    assert_eq!(nbdinfo_map(&server.uri("other")), vec![(0, 4 * MIB, 3)]);
}

// ---- nbdcopy ------------------------------------------------------------------------------

/// Copies with nbdcopy over four connections per NBD side, checking it really used four:
/// nbdcopy falls back to one unless the server advertises multi-conn.
fn nbdcopy_multi_conn(from: &std::ffi::OsStr, to: &std::ffi::OsStr) {
    let out = run(Command::new("nbdcopy").args(["-v", "--connections=4", "--threads=4", "--flush"]).arg(from).arg(to));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("connections=4 "), "nbdcopy did not use multi-conn");
}

#[test]
fn nbdcopy_multi_conn_file_to_volume_to_file() {
    if !have("nbdcopy") {
        return;
    }
    let server = TestServer::start();
    let size = 32 * MIB;
    server.store.create_volume("disk", size).unwrap();
    let uri = server.uri("disk");
    let src = tmp(&server, "src.raw");
    let content = sparse_file(&src, size, &mixed_layout(size, 7));
    // Fill the volume with other data first, so the copy must overwrite and zero it.
    volume(&server, "disk").write(&pattern(size as usize, 99), 0, false).unwrap();

    nbdcopy_multi_conn(src.as_os_str(), uri.as_ref());
    assert_same_bytes(&read_volume(&server, "disk"), &content, "volume after nbdcopy from a file");
    let alloc = allocation(&server, "disk");
    assert_eq!(runs_of(&alloc, Allocation::Data), nonzero_blocks(&content), "data extents: {alloc:?}");
    assert!(runs_of(&alloc, Allocation::Hole).is_empty(), "the old data must be zeroed, not left: {alloc:?}");

    let out = tmp(&server, "out.raw");
    std::fs::File::create(&out).unwrap();
    nbdcopy_multi_conn(uri.as_ref(), out.as_os_str());
    assert_same_bytes(&std::fs::read(&out).unwrap(), &content, "file after nbdcopy from the volume");
}

#[test]
fn nbdcopy_volume_to_volume_over_unix_and_tcp() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let server = TestServer::start_with(Default::default(), true);
    let size = 32 * MIB;
    server.store.create_volume("src", size).unwrap();
    server.store.create_volume("dst", size).unwrap();
    let mut content = vec![0u8; size as usize];
    let v = volume(&server, "src");
    for (offset, bytes) in mixed_layout(size, 11) {
        v.write(&bytes, offset, false).unwrap();
        content[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
    }
    volume(&server, "dst").write(&pattern(size as usize, 12), 0, false).unwrap();
    let tcp = server.tcp.unwrap();
    let dst_uri = format!("nbd://{}:{}/dst", tcp.ip(), tcp.port());
    nbdcopy_multi_conn(server.uri("src").as_ref(), dst_uri.as_ref());
    assert_same_bytes(&read_volume(&server, "dst"), &content, "destination volume");
    // Where the source has data the destination has data; the rest is zeroed without data.
    // (The source's explicit zeros, written as data through the engine, are detected.)
    let dst = allocation(&server, "dst");
    assert_eq!(runs_of(&dst, Allocation::Data), nonzero_blocks(&content), "{dst:?}");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &server.uri("src"), &dst_uri]));
}

// ---- fio ----------------------------------------------------------------------------------

fn fio(server: &TestServer, uri: &str, args: &[&str]) -> serde_json::Value {
    let report = run_json(
        Command::new("fio")
            .current_dir(server.dir.path())
            .args(["--name=v", "--ioengine=nbd", "--output-format=json", "--verify_fatal=1"])
            .arg(format!("--uri={uri}"))
            .args(args),
    );
    let job = &report["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "{report}");
    report
}

#[test]
fn fio_randwrite_then_verify() {
    if !have("fio") {
        return;
    }
    let server = TestServer::start();
    let size = 32 * MIB;
    server.store.create_volume("disk", size).unwrap();
    let report = fio(
        &server,
        &server.uri("disk"),
        &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M", "--verify=crc32c", "--do_verify=1"],
    );
    let job = &report["jobs"][0];
    // Every block written once, then every block read back and checked.
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(size), "{report}");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(size), "{report}");
    let alloc = allocation(&server, "disk");
    assert_eq!(runs_of(&alloc, Allocation::Data), vec![(0, size)], "{alloc:?}");
}

#[test]
fn fio_randrw_with_verify() {
    if !have("fio") {
        return;
    }
    let server = TestServer::start();
    server.store.create_volume("disk", 64 * MIB).unwrap();
    let report = fio(
        &server,
        &server.uri("disk"),
        &[
            "--rw=randrw",
            "--bssplit=4k/50:16k/30:64k/20",
            "--iodepth=32",
            "--size=32M",
            "--offset=16M",
            "--verify=crc32c",
            "--do_verify=1",
        ],
    );
    let job = &report["jobs"][0];
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let read = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(written > 0 && read >= written, "verify reads back what was written: {report}");
    // fio stayed inside its region.
    let alloc = allocation(&server, "disk");
    let data = runs_of(&alloc, Allocation::Data);
    assert!(data.iter().all(|&(s, l)| s >= 16 * MIB && s + l <= 48 * MIB), "{alloc:?}");
}

// ---- snapshots ----------------------------------------------------------------------------

#[test]
fn snapshot_export_is_its_point_in_time_while_live_is_written() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let server = TestServer::start();
    let size = 32 * MIB;
    let disk = server.store.create_volume("disk", size).unwrap();
    let a = pattern(size as usize, 21);
    let b = pattern(size as usize, 22);
    let (file_a, file_b) = (tmp(&server, "a.raw"), tmp(&server, "b.raw"));
    write_file(&file_a, &a);
    write_file(&file_b, &b);
    run(Command::new("nbdcopy").arg(&file_a).arg(server.uri("disk")));
    server.store.snapshot(disk.id, "snap").unwrap();

    // Overwrite the live disk with B while reading the snapshot out, both over NBD at once.
    let out = tmp(&server, "snap.raw");
    std::fs::File::create(&out).unwrap();
    let mut writer = Command::new("nbdcopy")
        .args(["--connections=4", "--threads=4", "--flush"])
        .arg(&file_b)
        .arg(server.uri("disk"))
        .spawn()
        .unwrap();
    let mut reader = Command::new("nbdcopy")
        .args(["--connections=4", "--threads=4"])
        .arg(server.uri("disk@snap"))
        .arg(&out)
        .spawn()
        .unwrap();
    assert!(writer.wait().unwrap().success(), "writer failed");
    assert!(reader.wait().unwrap().success(), "reader failed");
    assert_same_bytes(&std::fs::read(&out).unwrap(), &a, "snapshot read while the volume was written");
    assert_same_bytes(&read_volume(&server, "disk"), &b, "live volume after the writer");

    // Afterwards, too: the snapshot is A, the live disk is B.
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&file_a).arg(server.uri("disk@snap")));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&file_b).arg(server.uri("disk")));
}

#[test]
fn snapshot_export_refuses_writes() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let server = TestServer::start();
    let disk = server.store.create_volume("disk", 4 * MIB).unwrap();
    volume(&server, "disk").write(&[0x42; 4096], 0, false).unwrap();
    server.store.snapshot(disk.id, "snap").unwrap();
    let snap_uri = server.uri("disk@snap");

    assert!(stdout(&run(Command::new("nbdinfo").arg(&snap_uri))).contains("is_read_only: true"));
    // qemu refuses to open it for writing ...
    let err = run_failing(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k", &snap_uri]));
    assert!(err.contains("Permission denied") || err.to_lowercase().contains("read-only"), "{err}");
    // ... nbdcopy refuses to write to it ...
    let src = tmp(&server, "src.raw");
    write_file(&src, &vec![1u8; 4 * MIB as usize]);
    let err = run_failing(Command::new("nbdcopy").arg(&src).arg(&snap_uri));
    assert!(err.to_lowercase().contains("read"), "{err}");
    // ... reading it works, and nothing changed.
    let read = ["-r", "-f", "raw", "-c", "read -P 0x42 0 4k", "-c", "read -P 0 4k 1M", &snap_uri];
    assert!(stdout(&run(Command::new("qemu-io").args(read))).contains("read 1048576/1048576 bytes at offset 4096"));
    assert_eq!(volume(&server, "disk").allocation(0, 4 * MIB).unwrap().len(), 2, "only the first block has data");
    let view = server.store.open_snapshot(server.store.snapshot_id(disk.id, "snap").unwrap()).unwrap();
    let mut buf = vec![0u8; 8192];
    view.read(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x42) && buf[4096..].iter().all(|&b| b == 0));
}

// ---- errors -------------------------------------------------------------------------------

#[test]
fn unknown_export_fails_clearly_and_server_keeps_serving() {
    if !have("qemu-img") || !have("nbdinfo") {
        return;
    }
    let server = TestServer::start();
    let disk = server.store.create_volume("disk", 4 * MIB).unwrap();
    server.store.snapshot(disk.id, "snap").unwrap();
    for name in ["nope", "disk@nosnap", "nope@snap", "999", "disk@999", "disk@"] {
        let err = run_failing(Command::new("qemu-img").args(["info", &server.uri(name)]));
        assert!(err.contains("Requested export not available"), "qemu-img on {name}: {err}");
        assert!(
            err.contains(&format!("no export named \"{name}\"")),
            "qemu-img should show the server's message: {err}"
        );
        let err = run_failing(Command::new("nbdinfo").arg(server.uri(name)));
        assert!(err.contains(&format!("for export: {name}\n")), "nbdinfo on {name}: {err}");
        // The server still serves, through new connections.
        let info = run_json(Command::new("qemu-img").args(["info", "--output=json", &server.uri("disk")]));
        assert_eq!(info["virtual-size"].as_u64(), Some(4 * MIB));
    }
    assert_eq!(stdout(&run(Command::new("nbdinfo").args(["--size", &server.uri("disk@snap")]))).trim(), "4194304");
}

// ---- multi-conn ---------------------------------------------------------------------------

/// An interactive qemu-io session: one NBD connection that stays open across commands.
struct QemuIo {
    child: std::process::Child,
    out: std::process::ChildStdout,
}

const PROMPT: &str = "qemu-io> ";

impl QemuIo {
    fn open(uri: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start qemu-io");
        let out = child.stdout.take().unwrap();
        let mut session = QemuIo { child, out };
        session.until_prompt();
        session
    }

    /// Output up to the next prompt, which qemu-io prints (and flushes) once it is ready
    /// for a command, so after the previous one has completed.
    fn until_prompt(&mut self) -> String {
        let mut text = Vec::new();
        while !text.ends_with(PROMPT.as_bytes()) {
            let mut buf = [0u8; 4096];
            let n = self.out.read(&mut buf).unwrap();
            assert!(n > 0, "qemu-io ended early: {}", String::from_utf8_lossy(&text));
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text[..text.len() - PROMPT.len()]).into_owned()
    }

    /// Runs one command to completion and returns its output. (qemu-io takes one line per
    /// wake-up from stdin, so commands go one at a time.)
    fn exec(&mut self, cmd: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let text = self.until_prompt();
        assert!(!text.contains("failed"), "{cmd}: {text}");
        text
    }

    fn quit(mut self) {
        writeln!(self.child.stdin.as_mut().unwrap(), "quit").unwrap();
        drop(self.child.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn flush_on_one_connection_is_seen_on_another() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let server = TestServer::start();
    server.store.create_volume("disk", 8 * MIB).unwrap();
    let uri = server.uri("disk");
    assert!(Command::new("nbdinfo").args(["--can", "multi-conn", &uri]).status().unwrap().success());

    let mut first = QemuIo::open(&uri);
    let mut second = QemuIo::open(&uri);
    assert!(first.exec("write -P 0x5a 0 1M").contains("wrote 1048576/1048576 bytes at offset 0"));
    first.exec("flush");
    // Both connections are open; what the first flushed, the second reads.
    assert!(second.exec("read -P 0x5a 0 1M").contains("read 1048576/1048576 bytes at offset 0"));
    // And the other way round, including zeroing.
    second.exec("write -P 0x6b 1M 64k");
    second.exec("write -z -u 0 4k");
    second.exec("flush");
    first.exec("read -P 0x6b 1M 64k");
    first.exec("read -P 0 0 4k");
    first.exec("read -P 0x5a 4k 1020k");
    // A third, short-lived connection sees the same.
    qemu_io(&uri, &["read -P 0 0 4k".into(), "read -P 0x5a 4k 1020k".into(), "read -P 0x6b 1M 64k".into()]);
    first.quit();
    second.quit();

    let bytes = read_volume(&server, "disk");
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(bytes[4096..MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(bytes[MIB as usize..(MIB + 64 * KIB) as usize].iter().all(|&b| b == 0x6b));
    assert!(bytes[(MIB + 64 * KIB) as usize..].iter().all(|&b| b == 0));
}

#[test]
fn nbdinfo_maps_allocation_depth_over_a_snapshot_chain() {
    if !have("nbdinfo") {
        return;
    }
    let server = TestServer::start();
    let info = server.store.create_volume("disk", 4 << 20).unwrap();
    let v = server.store.volume(info.id).unwrap();
    v.write(&[1; 1 << 20], 0, false).unwrap();
    server.store.snapshot(info.id, "base").unwrap();
    v.write(&[2; 1 << 20], 1 << 20, false).unwrap();
    server.store.snapshot(info.id, "next").unwrap();
    v.write(&[3; 4096], 0, false).unwrap();
    let depth = cairn_nbd::proto::QEMU_ALLOCATION_DEPTH;
    // The head holds 4 KiB, the newest snapshot's layer the second MiB, the oldest the first.
    assert_eq!(
        nbdinfo_context_map(&server.uri("disk"), depth),
        vec![(0, 4096, 1), (4096, (1 << 20) - 4096, 3), (1 << 20, 1 << 20, 2), (2 << 20, 2 << 20, 0)]
    );
    assert_eq!(
        nbdinfo_context_map(&server.uri("disk@next"), depth),
        vec![(0, 1 << 20, 2), (1 << 20, 1 << 20, 1), (2 << 20, 2 << 20, 0)]
    );
    // nbdinfo lists both contexts.
    let listed = stdout(&run(Command::new("nbdinfo").arg(server.uri("disk"))));
    assert!(listed.contains(depth) && listed.contains(cairn_nbd::proto::BASE_ALLOCATION), "{listed}");
}
