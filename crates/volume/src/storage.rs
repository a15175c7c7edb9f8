//! The I/O backend under a store: a flat directory of files.
//!
//! The engine never touches the file system directly, so tests can run it on [`MemStorage`]
//! (which can also simulate a power loss, dropping all or part of what was not yet synced) and on
//! [`FaultyStorage`] (which fails with EIO or ENOSPC after a chosen number of operations).
//! [`DirStorage`] is the real one: `pread`/`pwrite` on sparse files in one directory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock};

/// One open file of a [`Storage`]. Reads past the end of the file return zeros.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write to this file durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a byte range; it reads back as zeros. The file size does not change.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// How this handle's file is used, for the backend to set up its caching. Only a hint: a
    /// backend without a page cache ignores it, and a failure to apply it changes no byte.
    fn set_access(&self, access: Access);
    /// Starts writing `[offset, offset+len)` back to the disk without waiting for it, so that
    /// a later sync has less to do. Only a hint, like [`StorageFile::set_access`].
    fn start_writeback(&self, offset: u64, len: u64);
    /// The open file's descriptor, for moving its data without a copy (`sendfile`), if the
    /// backend has one. Wrappers that must see every read (fault injection) leave it out.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// How a file's data is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Not written by guests (a frozen layer's data; a merge only fills in what it lacks).
    #[default]
    ReadMostly,
    /// Read and written in place, in pieces as small as a block (a head's data).
    InPlaceWrites,
}

/// A flat namespace of files: the directory of one store.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Opens `name`, creating it empty when `create` is set and it does not exist.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Removes `name`; a missing file is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Names of all files.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Makes creations, removals and renames durable (`fsync` on the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// Takes an exclusive lock on the whole store, held until the storage is dropped.
    fn lock_exclusive(&self) -> io::Result<()>;
}

/// Files in one directory of the local file system.
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    lock: Mutex<Option<File>>,
    /// The `posix_fadvise` advice for files written in place, chosen by the file system.
    in_place_advice: libc::c_int,
}

impl DirStorage {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        let in_place_advice = in_place_advice(file_system_magic(&File::open(dir.as_ref())?));
        Ok(Self { dir: dir.as_ref().to_path_buf(), lock: Mutex::new(None), in_place_advice })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The type of the file system `file` is on (`statfs`'s `f_type`), if it can be told.
fn file_system_magic(file: &File) -> Option<libc::__fsword_t> {
    // SAFETY: statfs is plain data, for which all zero bytes are a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes only into `stat`, which lives across the call; the descriptor is
    // open for as long as `file` is borrowed.
    (unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } == 0).then_some(stat.f_type)
}

/// Read-ahead for files written in place, on a file system of type `magic`.
///
/// Read-ahead grows the page cache's folios up to its window (2 MiB with an 8 MiB
/// `read_ahead_kb`); without it, reads bring in 4 KiB folios. On ext4 a 4 KiB write into a
/// large folio walks a buffer for every block of it, so read-ahead is off there. XFS keeps a
/// folio's block state in bitmaps, small writes into large folios cost it no more, and large
/// folios make sequential overwrites cheaper: read-ahead stays on. Any other file system (an
/// overlay too, whatever lies below it) is treated as ext4. Figures in docs/architecture.md.
fn in_place_advice(magic: Option<libc::__fsword_t>) -> libc::c_int {
    match magic {
        Some(libc::XFS_SUPER_MAGIC) => libc::POSIX_FADV_NORMAL,
        _ => libc::POSIX_FADV_RANDOM,
    }
}

#[derive(Debug)]
struct DirFile {
    file: File,
    /// [`DirStorage::in_place_advice`].
    in_place_advice: libc::c_int,
}

impl StorageFile for DirFile {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by self.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // File systems without hole punching still read back zeros if we write them.
            return write_zeros(self, offset, len);
        }
        Err(err)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn set_access(&self, access: Access) {
        let advice = match access {
            Access::ReadMostly => libc::POSIX_FADV_NORMAL,
            Access::InPlaceWrites => self.in_place_advice,
        };
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is owned by
        // self. Its result is ignored: advice that does not apply costs speed, never bytes.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, advice) };
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is owned by
        // self. Its result is ignored: the sync that follows writes whatever this did not.
        unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.file.as_raw_fd())
    }
}

fn write_zeros(file: &dyn StorageFile, mut offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        file.write_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

impl Storage for DirStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(self.path(name))?;
        Ok(Arc::new(DirFile { file, in_place_advice: self.in_place_advice }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path(from), self.path(to))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn lock_exclusive(&self) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path(LOCK_FILE))?;
        // SAFETY: flock only reads its integer arguments; the descriptor stays open in self.lock.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another process", self.dir.display()),
                ));
            }
            return Err(err);
        }
        *self.lock.lock().expect("lock file mutex") = Some(file);
        Ok(())
    }
}

/// The name of the file that holds the store's process lock.
pub const LOCK_FILE: &str = "store.lock";

const MEM_PAGE: u64 = 4096;
/// What a disk writes whole: a power loss may keep some sectors of a page and not others.
const SECTOR: usize = 512;

/// Sparse in-memory file content: 4 KiB pages, absent pages read as zeros.
#[derive(Debug, Clone, Default)]
struct MemContent {
    pages: BTreeMap<u64, Box<[u8]>>,
    len: u64,
}

/// Splits `len` bytes from `offset` at page boundaries: (page, offset in it, range of the buffer).
fn page_parts(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let within = (pos % MEM_PAGE) as usize;
        let n = (MEM_PAGE as usize - within).min(len - done);
        let part = (pos / MEM_PAGE, within, done..done + n);
        done += n;
        Some(part)
    })
}

impl MemContent {
    fn read(&self, buf: &mut [u8], offset: u64) {
        for (page, within, range) in page_parts(offset, buf.len()) {
            let pos = offset + range.start as u64;
            let n = range.len();
            let out = &mut buf[range];
            match self.pages.get(&page) {
                Some(p) if pos < self.len => out.copy_from_slice(&p[within..within + n]),
                _ => out.fill(0),
            }
            // Bytes past the end of the file read as zeros even if a page holds stale bytes.
            if pos + n as u64 > self.len {
                let valid = self.len.saturating_sub(pos) as usize;
                out[valid..].fill(0);
            }
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) {
        for (page, within, range) in page_parts(offset, buf.len()) {
            let p = self.pages.entry(page).or_insert_with(|| vec![0u8; MEM_PAGE as usize].into_boxed_slice());
            p[within..within + range.len()].copy_from_slice(&buf[range]);
        }
        self.len = self.len.max(offset + buf.len() as u64);
    }

    fn zero_range(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / MEM_PAGE;
            let within = pos % MEM_PAGE;
            let n = (MEM_PAGE - within).min(end - pos);
            if within == 0 && n == MEM_PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                p[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero_range(len, self.len - len);
        }
        self.len = len;
    }
}

#[derive(Debug, Default)]
struct MemFileState {
    current: MemContent,
    durable: MemContent,
}

impl MemFileState {
    /// Content that is all durable, as after a power loss.
    fn settled(content: MemContent) -> Self {
        MemFileState { current: content.clone(), durable: content }
    }
}

#[derive(Debug, Default)]
struct MemFile {
    state: Mutex<MemFileState>,
    /// The access hint of the latest handle (in a kernel, each open file has its own).
    access: Mutex<Access>,
    /// Bytes whose writeback callers asked to start, for tests of that hint.
    writeback_started: AtomicU64,
    /// What the file shares with its storage: the sync hook, and the lock that makes syncs
    /// and crash images exclude each other.
    syncs: Arc<SyncShared>,
}

impl MemFile {
    fn state(&self) -> std::sync::MutexGuard<'_, MemFileState> {
        self.state.lock().expect("mem file mutex")
    }
}

impl StorageFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.state().current.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.state().current.write(buf, offset);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.syncs.call_hook();
        let _syncing = self.syncs.syncing.read().expect("syncing lock");
        let mut state = self.state();
        state.durable = state.current.clone();
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.state();
        let end = (offset + len).min(state.current.len);
        if end > offset {
            state.current.zero_range(offset, end - offset);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.state().current.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.state().current.set_len(len);
        Ok(())
    }

    fn set_access(&self, access: Access) {
        *self.access.lock().expect("mem file access") = access;
    }

    fn start_writeback(&self, _offset: u64, len: u64) {
        // Memory has no writeback to start: only counted.
        self.writeback_started.fetch_add(len, Ordering::Relaxed);
    }
}

/// A change to a [`MemStorage`] directory since its last [`Storage::sync_dir`].
#[derive(Debug, Clone)]
enum DirChange {
    Create(String, Arc<MemFile>),
    Remove(String),
    Rename(String, String),
}

impl DirChange {
    fn apply(&self, names: &mut HashMap<String, Arc<MemFile>>) {
        match self {
            DirChange::Create(name, file) => {
                names.insert(name.clone(), file.clone());
            }
            DirChange::Remove(name) => {
                names.remove(name);
            }
            DirChange::Rename(from, to) => {
                if let Some(file) = names.remove(from) {
                    names.insert(to.clone(), file);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct MemDir {
    /// The names as the storage's users see them.
    current: HashMap<String, Arc<MemFile>>,
    /// The names as of the last directory sync.
    durable: HashMap<String, Arc<MemFile>>,
    /// Changes since the last directory sync, oldest first. A power loss keeps a prefix of
    /// them: a journaling file system commits directory changes in the order they were made.
    changes: Vec<DirChange>,
}

impl MemDir {
    /// A directory whose names are all durable, as after a power loss.
    fn settled(names: HashMap<String, Arc<MemFile>>) -> Self {
        MemDir { current: names.clone(), durable: names, changes: Vec::new() }
    }

    fn change(&mut self, change: DirChange) {
        change.apply(&mut self.current);
        self.changes.push(change);
    }
}

/// A function a [`MemStorage`] calls before every file or directory sync.
pub type SyncHook = Arc<dyn Fn() + Send + Sync>;

/// What a [`MemStorage`] shares with its files about syncs.
#[derive(Default)]
struct SyncShared {
    hook: Mutex<Option<SyncHook>>,
    /// Held to read by a sync while it makes content durable, and to write by a crash image,
    /// so that an image sees each sync of other threads whole or not at all, in every file at
    /// once. Taken before the directory's lock.
    syncing: RwLock<()>,
}

impl SyncShared {
    fn call_hook(&self) {
        // Cloned out first: the hook may use the storage, and must not run under this lock.
        let hook = self.hook.lock().expect("sync hook mutex").clone();
        if let Some(hook) = hook {
            hook();
        }
    }
}

impl std::fmt::Debug for SyncShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncShared")
    }
}

/// Files in memory, durable as on a real disk: a file's contents only after
/// [`StorageFile::sync`], and creations, removals and renames only after
/// [`Storage::sync_dir`]. [`MemStorage::power_loss`] and
/// [`MemStorage::power_loss_keeping`] model a crash of the machine, and
/// [`MemStorage::crash_image`] what such a crash would leave, at any moment.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    dir: Arc<Mutex<MemDir>>,
    syncs: Arc<SyncShared>,
}

/// A deterministic coin (xorshift64) for power losses that keep a random part.
struct Coin(u64);

impl Coin {
    fn new(seed: u64) -> Self {
        // Xorshift stays at zero from zero.
        Coin(seed | 1 << 63)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn flip(&mut self) -> bool {
        self.next() >> 32 & 1 == 1
    }
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops everything not synced, as a power loss may: file contents since their last sync,
    /// and directory changes since the last directory sync. Handles opened before keep working
    /// on the reverted content, so callers should drop their store first.
    pub fn power_loss(&self) {
        self.power_loss_keeping(None);
    }

    /// A power loss that keeps nothing that was not synced (`keep` `None`, as
    /// [`MemStorage::power_loss`]), or a random part of it chosen by the seed, as a disk that
    /// wrote back some of its cache does: a prefix of the directory changes since the last
    /// directory sync, and of each file, every unsynced 4 KiB page as written, as synced or
    /// torn (each 512-byte sector one or the other), and either its synced or its current
    /// length (bytes past it read as zeros).
    pub fn power_loss_keeping(&self, keep: Option<u64>) {
        let survivors = self.survivors(keep);
        let mut names = HashMap::new();
        for (name, file, content) in survivors {
            *file.state() = MemFileState::settled(content);
            names.insert(name, file);
        }
        *self.dir() = MemDir::settled(names);
    }

    /// A new storage holding what [`MemStorage::power_loss_keeping`] with `keep` would leave.
    /// This one is left as it is, so a test can take an image at any moment, even in the
    /// middle of an operation (see [`MemStorage::before_each_sync`]), and open a store on it
    /// later.
    pub fn crash_image(&self, keep: Option<u64>) -> MemStorage {
        let syncs = Arc::<SyncShared>::default();
        let mut names = HashMap::new();
        for (name, _, content) in self.survivors(keep) {
            let copy = MemFile { syncs: syncs.clone(), ..MemFile::default() };
            *copy.state() = MemFileState::settled(content);
            names.insert(name, Arc::new(copy));
        }
        MemStorage { dir: Arc::new(Mutex::new(MemDir::settled(names))), syncs }
    }

    /// Calls `hook` before every file and directory sync from now on (`None` stops it): the
    /// moments where a power loss tells most, as what was written so far is about to become
    /// durable. The hook may use this storage, [`MemStorage::crash_image`] for one.
    pub fn before_each_sync(&self, hook: Option<SyncHook>) {
        *self.syncs.hook.lock().expect("sync hook mutex") = hook;
    }

    /// What a power loss now would leave, file by file (name, file, content): with `keep`
    /// `None`, only what was synced; with a seed, a random part of the rest too (see
    /// [`MemStorage::power_loss_keeping`]).
    fn survivors(&self, keep: Option<u64>) -> Vec<(String, Arc<MemFile>, MemContent)> {
        let mut coin = keep.map(Coin::new);
        let _no_sync_meanwhile = self.syncs.syncing.write().expect("syncing lock");
        let dir = self.dir();
        let kept = coin.as_mut().map_or(0, |c| (c.next() % (dir.changes.len() as u64 + 1)) as usize);
        let mut names = dir.durable.clone();
        for change in &dir.changes[..kept] {
            change.apply(&mut names);
        }
        let mut files: Vec<(String, Arc<MemFile>)> = names.into_iter().collect();
        // Sorted, so that the same seed keeps the same pages.
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut survivors = Vec::new();
        for (name, file) in files {
            let state = file.state();
            let (current, durable) = (&state.current, &state.durable);
            let mut survived = durable.clone();
            // Without a seed nothing unsynced survives.
            if let Some(coin) = coin.as_mut() {
                let written: BTreeSet<u64> = current.pages.keys().chain(durable.pages.keys()).copied().collect();
                for page in written {
                    let (now, synced) = (current.pages.get(&page), durable.pages.get(&page));
                    if now == synced {
                        continue;
                    }
                    // As synced, as written, or torn: each 512-byte sector one or the other, as
                    // a disk that writes sectors atomically but not a page's sectors together.
                    match coin.next() % 3 {
                        0 => {}
                        1 => {
                            match now {
                                Some(bytes) => survived.pages.insert(page, bytes.clone()),
                                None => survived.pages.remove(&page),
                            };
                        }
                        _ => {
                            let zeros = [0u8; MEM_PAGE as usize];
                            let (now, synced) = (now.map_or(&zeros[..], |b| b), synced.map_or(&zeros[..], |b| b));
                            let torn: Vec<u8> = now
                                .chunks(SECTOR)
                                .zip(synced.chunks(SECTOR))
                                .flat_map(|(now, synced)| if coin.flip() { now } else { synced })
                                .copied()
                                .collect();
                            survived.pages.insert(page, torn.into_boxed_slice());
                        }
                    }
                }
                let len = if coin.flip() { current.len } else { durable.len };
                survived.len = current.len.max(durable.len);
                survived.set_len(len);
            }
            drop(state);
            survivors.push((name, file, survived));
        }
        survivors
    }

    /// The access hint of the latest handle on `name`, if the file exists.
    pub fn access(&self, name: &str) -> Option<Access> {
        self.dir().current.get(name).map(|file| *file.access.lock().expect("mem file access"))
    }

    /// Bytes of `name` whose writeback was asked to start ([`StorageFile::start_writeback`]).
    pub fn writeback_started(&self, name: &str) -> Option<u64> {
        self.dir().current.get(name).map(|file| file.writeback_started.load(Ordering::Relaxed))
    }

    fn dir(&self) -> std::sync::MutexGuard<'_, MemDir> {
        self.dir.lock().expect("mem storage mutex")
    }
}

impl Storage for MemStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut dir = self.dir();
        match dir.current.get(name) {
            Some(file) => {
                // A new handle starts with no hint, as a new open file does.
                *file.access.lock().expect("mem file access") = Access::default();
                Ok(file.clone())
            }
            None if create => {
                let file = Arc::new(MemFile { syncs: self.syncs.clone(), ..MemFile::default() });
                dir.change(DirChange::Create(name.to_string(), file.clone()));
                Ok(file)
            }
            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))),
        }
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut dir = self.dir();
        if dir.current.contains_key(name) {
            dir.change(DirChange::Remove(name.to_string()));
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut dir = self.dir();
        if !dir.current.contains_key(from) {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{from}: no such file")));
        }
        dir.change(DirChange::Rename(from.to_string(), to.to_string()));
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.dir().current.keys().cloned().collect())
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.syncs.call_hook();
        let _syncing = self.syncs.syncing.read().expect("syncing lock");
        let mut dir = self.dir();
        dir.durable = dir.current.clone();
        dir.changes.clear();
        Ok(())
    }

    fn lock_exclusive(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Which error a [`FaultyStorage`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: the device failed.
    Io,
    /// `ENOSPC`: the file system is full.
    NoSpace,
}

impl Fault {
    fn error(self) -> io::Error {
        match self {
            Fault::Io => io::Error::from_raw_os_error(libc::EIO),
            Fault::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }
}

/// Wraps another storage and fails every operation from the `fail_after`-th one on.
/// Reads fail too, except when `fail_reads` is off (a full disk still reads).
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    control: Arc<FaultControl>,
}

/// The shared countdown of a [`FaultyStorage`] and the files it opened.
#[derive(Debug)]
pub struct FaultControl {
    ops: AtomicU64,
    fail_after: AtomicU64,
    fault: Mutex<Fault>,
    fail_reads: std::sync::atomic::AtomicBool,
    /// Set by [`FaultControl::fail_once`]: the first failure heals the storage.
    once: std::sync::atomic::AtomicBool,
    /// Set by [`FaultControl::stall_next_sync`].
    stall: Mutex<Option<Arc<Barrier>>>,
}

impl FaultControl {
    /// Operations counted so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Fails every operation after `n` more have succeeded.
    pub fn fail_after(&self, n: u64, fault: Fault, fail_reads: bool) {
        self.arm(n, fault, fail_reads, false);
    }

    /// Fails the first operation after `n` more have succeeded (the first write, if reads do
    /// not fail), and no other: a transient fault, after which the storage works again.
    pub fn fail_once(&self, n: u64, fault: Fault, fail_reads: bool) {
        self.arm(n, fault, fail_reads, true);
    }

    fn arm(&self, n: u64, fault: Fault, fail_reads: bool, once: bool) {
        *self.fault.lock().expect("fault mutex") = fault;
        self.fail_reads.store(fail_reads, Ordering::SeqCst);
        self.once.store(once, Ordering::SeqCst);
        self.fail_after.store(self.ops().saturating_add(n), Ordering::SeqCst);
    }

    /// Makes the next file sync stop once it has begun, as on a slow disk, for tests of what
    /// runs meanwhile. The sync waits at the returned barrier twice: the test's first wait
    /// returns once the sync is stalled, its second lets the sync go on.
    pub fn stall_next_sync(&self) -> Arc<Barrier> {
        let barrier = Arc::new(Barrier::new(2));
        *self.stall.lock().expect("stall mutex") = Some(barrier.clone());
        barrier
    }

    /// Stops injecting faults.
    pub fn heal(&self) {
        self.fail_after.store(u64::MAX, Ordering::SeqCst);
    }

    fn check(&self, is_read: bool) -> io::Result<()> {
        let op = self.ops.fetch_add(1, Ordering::SeqCst);
        let armed = self.fail_after.load(Ordering::SeqCst);
        if op >= armed && (!is_read || self.fail_reads.load(Ordering::SeqCst)) {
            // Once: of operations racing past the armed point, only the one that heals fails.
            let once = self.once.load(Ordering::SeqCst);
            if once && self.fail_after.compare_exchange(armed, u64::MAX, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                return Ok(());
            }
            return Err(self.fault.lock().expect("fault mutex").error());
        }
        Ok(())
    }
}

impl FaultyStorage {
    /// Wraps `inner`; no faults until [`FaultControl::fail_after`] is called.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        let control = Arc::new(FaultControl {
            ops: AtomicU64::new(0),
            fail_after: AtomicU64::new(u64::MAX),
            fault: Mutex::new(Fault::Io),
            fail_reads: std::sync::atomic::AtomicBool::new(true),
            once: std::sync::atomic::AtomicBool::new(false),
            stall: Mutex::new(None),
        });
        Self { inner, control }
    }

    /// The countdown, to arm or heal the faults.
    pub fn control(&self) -> Arc<FaultControl> {
        self.control.clone()
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn StorageFile>,
    control: Arc<FaultControl>,
}

impl StorageFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.control.check(true)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.control.check(false)?;
        self.inner.write_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.control.check(false)?;
        let stall = self.control.stall.lock().expect("stall mutex").take();
        if let Some(barrier) = stall {
            barrier.wait();
            barrier.wait();
        }
        self.inner.sync()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.control.check(false)?;
        self.inner.punch_hole(offset, len)
    }

    fn size(&self) -> io::Result<u64> {
        self.control.check(true)?;
        self.inner.size()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.control.check(false)?;
        self.inner.set_len(len)
    }

    fn set_access(&self, access: Access) {
        self.inner.set_access(access)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len)
    }
}

impl Storage for FaultyStorage {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        self.control.check(!create)?;
        let inner = self.inner.open(name, create)?;
        Ok(Arc::new(FaultyFile { inner, control: self.control.clone() }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.control.check(false)?;
        self.inner.remove(name)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.control.check(false)?;
        self.inner.rename(from, to)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.control.check(true)?;
        self.inner.list()
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.control.check(false)?;
        self.inner.sync_dir()
    }

    fn lock_exclusive(&self) -> io::Result<()> {
        self.inner.lock_exclusive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conformance suite every backend passes.
    fn conformance(storage: &dyn Storage) {
        let f = storage.open("a", true).unwrap();
        f.write_at(b"hello", 4094).unwrap();
        assert_eq!(f.size().unwrap(), 4099);
        let mut buf = [1u8; 8];
        f.read_at(&mut buf, 4094).unwrap();
        assert_eq!(&buf, b"hello\0\0\0", "reads past the end are zeros");
        f.punch_hole(4095, 2).unwrap();
        f.read_at(&mut buf[..5], 4094).unwrap();
        assert_eq!(&buf[..5], b"h\0\0lo");
        assert_eq!(f.size().unwrap(), 4099, "punching keeps the size");
        f.set_len(4095).unwrap();
        f.set_len(5000).unwrap();
        f.read_at(&mut buf[..5], 4094).unwrap();
        assert_eq!(&buf[..5], b"h\0\0\0\0", "truncated bytes come back as zeros");
        f.sync().unwrap();
        storage.rename("a", "b").unwrap();
        assert!(storage.open("a", false).is_err());
        let mut names = storage.list().unwrap();
        names.retain(|n| n != LOCK_FILE);
        assert_eq!(names, vec!["b".to_string()]);
        storage.remove("b").unwrap();
        storage.remove("b").unwrap();
        storage.sync_dir().unwrap();
    }

    #[test]
    fn dir_storage_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(&DirStorage::new(dir.path()).unwrap());
    }

    #[test]
    fn mem_storage_conforms() {
        conformance(&MemStorage::new());
    }

    #[test]
    fn faulty_storage_conforms_until_armed() {
        let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
        conformance(&faulty);
        faulty.control().fail_after(1, Fault::NoSpace, false);
        let f = faulty.open("c", true).unwrap();
        let err = f.write_at(b"x", 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let mut buf = [0u8; 1];
        f.read_at(&mut buf, 0).unwrap();
        faulty.control().heal();
        f.write_at(b"x", 0).unwrap();
    }

    #[test]
    fn mem_power_loss_drops_unsynced_writes() {
        let storage = MemStorage::new();
        let f = storage.open("a", true).unwrap();
        storage.sync_dir().unwrap();
        f.write_at(b"old", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"new", 0).unwrap();
        storage.power_loss();
        let mut buf = [0u8; 3];
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"old");
    }

    fn names(storage: &MemStorage) -> BTreeSet<String> {
        storage.list().unwrap().into_iter().collect()
    }

    #[test]
    fn mem_power_loss_undoes_directory_changes_since_the_directory_sync() {
        let storage = MemStorage::new();
        for name in ["kept", "removed", "renamed"] {
            storage.open(name, true).unwrap().sync().unwrap();
        }
        storage.sync_dir().unwrap();
        storage.open("created", true).unwrap().sync().unwrap();
        storage.remove("removed").unwrap();
        storage.rename("renamed", "new-name").unwrap();
        assert_eq!(names(&storage), ["created", "kept", "new-name"].map(String::from).into());
        storage.power_loss();
        assert_eq!(names(&storage), ["kept", "removed", "renamed"].map(String::from).into());
    }

    fn contents(storage: &MemStorage, name: &str) -> Vec<u8> {
        let file = storage.open(name, false).unwrap();
        let mut buf = vec![0u8; file.size().unwrap() as usize];
        file.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn a_crash_image_is_what_a_power_loss_would_leave_and_changes_nothing() {
        for keep in [None, Some(7), Some(8)] {
            let storage = MemStorage::new();
            let syncs = Arc::new(AtomicU64::new(0));
            let counter = syncs.clone();
            storage.before_each_sync(Some(Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })));
            let f = storage.open("a", true).unwrap();
            storage.sync_dir().unwrap();
            f.write_at(&[1u8; 8192], 0).unwrap();
            f.sync().unwrap();
            assert_eq!(syncs.load(Ordering::SeqCst), 2, "the hook ran before each sync");
            storage.before_each_sync(None);
            f.write_at(&[2u8; 12288], 0).unwrap();
            storage.open("b", true).unwrap();
            let image = storage.crash_image(keep);
            assert_eq!(names(&storage), ["a", "b"].map(String::from).into(), "the storage itself is untouched");
            assert_eq!(contents(&storage, "a"), vec![2u8; 12288]);
            storage.power_loss_keeping(keep);
            assert_eq!(names(&image), names(&storage), "keep {keep:?}");
            assert_eq!(contents(&image, "a"), contents(&storage, "a"), "keep {keep:?}");
            // The image is a storage of its own, its files with its hook.
            let image_syncs = Arc::new(AtomicU64::new(0));
            let counter = image_syncs.clone();
            image.before_each_sync(Some(Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })));
            let copied = image.open("a", false).unwrap();
            copied.write_at(b"x", 0).unwrap();
            copied.sync().unwrap();
            assert_eq!(image_syncs.load(Ordering::SeqCst), 1);
            assert_ne!(contents(&image, "a"), contents(&storage, "a"));
        }
    }

    #[test]
    fn mem_partial_power_loss_keeps_a_prefix_of_directory_changes_and_some_sectors() {
        let page = MEM_PAGE as usize;
        let (mut prefixes, mut page_outcomes, mut lengths) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for seed in 0..64 {
            let storage = MemStorage::new();
            let f = storage.open("data", true).unwrap();
            storage.sync_dir().unwrap();
            f.write_at(&vec![1u8; 2 * page], 0).unwrap();
            f.sync().unwrap();
            f.write_at(&vec![2u8; 3 * page], 0).unwrap();
            storage.open("first", true).unwrap();
            storage.open("second", true).unwrap();
            storage.power_loss_keeping(Some(seed));
            let kept = names(&storage);
            let prefix = ["data", "first", "second"].iter().take_while(|n| kept.contains(**n)).count();
            assert_eq!(prefix, kept.len(), "seed {seed}: {kept:?} is not a prefix of the creations");
            prefixes.insert(prefix);
            let len = f.size().unwrap();
            assert!(len == 2 * MEM_PAGE || len == 3 * MEM_PAGE, "seed {seed}: length {len}");
            lengths.insert(len);
            let mut buf = vec![0u8; 3 * page];
            f.read_at(&mut buf, 0).unwrap();
            for (i, chunk) in buf.chunks(page).enumerate() {
                let expected: &[u8] = if i < 2 { &[1, 2] } else { &[0, 2] };
                for sector in chunk.chunks(SECTOR) {
                    assert!(expected.contains(&sector[0]), "seed {seed}: page {i} holds {}", sector[0]);
                    assert!(sector.iter().all(|b| *b == sector[0]), "seed {seed}: a sector of page {i} is torn");
                }
                let torn = chunk.chunks(SECTOR).any(|sector| sector[0] != chunk[0]);
                page_outcomes.insert((i, if torn { 3 } else { chunk[0] }));
            }
            // What survived is now durable: a second power loss changes nothing.
            storage.power_loss();
            let mut again = vec![0u8; 3 * page];
            f.read_at(&mut again, 0).unwrap();
            assert_eq!(again, buf);
            assert_eq!(names(&storage), kept);
        }
        assert_eq!(prefixes.len(), 3, "every prefix of the creations occurs: {prefixes:?}");
        assert_eq!(lengths.len(), 2);
        for outcome in [1, 2, 3] {
            assert!(page_outcomes.contains(&(0, outcome)), "page 0 synced, written and torn: {page_outcomes:?}");
        }
    }

    #[test]
    fn files_written_in_place_keep_read_ahead_only_on_xfs() {
        assert_eq!(in_place_advice(Some(libc::XFS_SUPER_MAGIC)), libc::POSIX_FADV_NORMAL);
        assert_eq!(in_place_advice(Some(libc::EXT4_SUPER_MAGIC)), libc::POSIX_FADV_RANDOM);
        assert_eq!(in_place_advice(Some(libc::OVERLAYFS_SUPER_MAGIC)), libc::POSIX_FADV_RANDOM, "whatever is below");
        assert_eq!(in_place_advice(None), libc::POSIX_FADV_RANDOM);
        // The type read is the one coreutils reports for the same directory.
        let dir = tempfile::tempdir().unwrap();
        let magic = file_system_magic(&File::open(dir.path()).unwrap()).expect("statfs of a directory");
        let out = std::process::Command::new("stat").args(["-f", "--format=%t"]).arg(dir.path()).output().unwrap();
        let expected = i64::from_str_radix(String::from_utf8(out.stdout).unwrap().trim(), 16).unwrap();
        assert_eq!(magic as i64, expected);
    }

    #[test]
    fn dir_storage_lock_is_exclusive_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirStorage::new(dir.path()).unwrap();
        a.lock_exclusive().unwrap();
        let b = DirStorage::new(dir.path()).unwrap();
        assert_eq!(b.lock_exclusive().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }
}
