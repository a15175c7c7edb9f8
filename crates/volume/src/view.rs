//! Reading through a chain of layers in O(1) per block: a flattened, lazily built map from
//! block to the position of the topmost layer that holds it.
//!
//! The flattened map is kept per page of 512 blocks (1 KiB per 2 MiB page that holds data
//! somewhere in the chain, so at most 512 MiB per TiB of touched disk). A page whose blocks all
//! have one entry (a region written in one go, in one layer) keeps just that entry. Pages no
//! layer holds are never cached: they read as holes after one lookup per layer.

use crate::blockmap::{BlockRun, BLOCK_SHIFT, BLOCK_SIZE, PAGE_BLOCKS};
use crate::layer::Layer;
use crate::storage::StorageFile;
use std::collections::HashMap;
use std::sync::Arc;

/// Flattened entry: no layer holds the block.
pub const HOLE: u16 = 0;
/// Flattened entry: the topmost layer holding the block says it reads as zeros.
pub const ZERO: u16 = u16::MAX;
/// The deepest chain a flattened entry can address.
pub const MAX_CHAIN: usize = (u16::MAX - 2) as usize;

/// One cached page of the flattened map.
#[derive(Debug, Clone)]
enum FlatPage {
    /// Every block of the page has this entry. Disks are mostly written in long runs, so this
    /// is the common page, and a read from it skips loading an entry from a 1 KiB array: on
    /// 4 KiB random reads that load missed the CPU cache more often than not.
    Uniform(u16),
    /// One entry per block.
    Mixed(Box<[u16; PAGE_BLOCKS as usize]>),
}

impl FlatPage {
    fn from_entries(entries: Box<[u16; PAGE_BLOCKS as usize]>) -> Self {
        match entries.iter().all(|e| *e == entries[0]) {
            true => FlatPage::Uniform(entries[0]),
            false => FlatPage::Mixed(entries),
        }
    }

    /// Appends the entries of blocks `range` of the page to `out`.
    fn extend_into(&self, out: &mut Vec<u16>, range: std::ops::Range<usize>) {
        match self {
            FlatPage::Uniform(value) => out.extend(std::iter::repeat_n(*value, range.len())),
            FlatPage::Mixed(entries) => out.extend_from_slice(&entries[range]),
        }
    }

    /// Sets the entries of blocks `range` to `value`.
    fn fill(&mut self, range: std::ops::Range<usize>, value: u16) {
        match self {
            FlatPage::Uniform(current) if *current == value => {}
            FlatPage::Uniform(current) => {
                let mut entries = Box::new([*current; PAGE_BLOCKS as usize]);
                entries[range].fill(value);
                *self = FlatPage::from_entries(entries);
            }
            FlatPage::Mixed(entries) => {
                entries[range].fill(value);
                // A page filled up by sequential writes becomes uniform again. The check costs
                // a scan of 1 KiB, little next to the write that caused it.
                if entries.iter().all(|e| *e == value) {
                    *self = FlatPage::Uniform(value);
                }
            }
        }
    }
}

/// Page numbers are trusted integers: a multiplicative hash is enough and much cheaper than
/// SipHash on the per-read lookup.
#[derive(Debug, Default, Clone, Copy)]
struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).rotate_left(5);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type FlatMap = HashMap<u64, FlatPage, std::hash::BuildHasherDefault<PageHasher>>;

/// What a range of a volume or snapshot holds, for block status and sparse copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Some layer holds data.
    Data,
    /// Explicitly zeroed or trimmed: reads as zeros, holds no data.
    Zero,
    /// Never written anywhere in the chain: reads as zeros.
    Hole,
}

/// A byte range with one [`Allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocExtent {
    pub offset: u64,
    pub length: u64,
    pub kind: Allocation,
}

/// The lock around a view: readers on different threads do not contend (see `brlock`).
pub type ViewLock = crate::brlock::ShardedRwLock<ViewState>;

/// The chain, size and flattened map of one view (a live volume or a snapshot).
#[derive(Debug)]
pub struct ViewState {
    /// Layers from the bottom; the last is the top (a live volume's head).
    pub chain: Arc<[Arc<Layer>]>,
    pub size: u64,
    flat: FlatMap,
}

impl ViewState {
    pub fn new(chain: Vec<Arc<Layer>>, size: u64) -> Self {
        Self { chain: chain.into(), size, flat: FlatMap::default() }
    }

    /// Replaces the chain; the flattened map is rebuilt lazily.
    pub fn set_chain(&mut self, chain: Vec<Arc<Layer>>) {
        self.chain = chain.into();
        self.flat.clear();
    }

    /// Appends a new top layer (a snapshot's new head): every cached entry stays valid.
    pub fn push_top(&mut self, layer: Arc<Layer>) {
        let mut chain = self.chain.to_vec();
        chain.push(layer);
        self.chain = chain.into();
    }

    /// Records that the top layer now holds `run` (as data, or as zeros).
    pub fn note_top_write(&mut self, run: BlockRun, zero: bool) {
        let value = if zero { ZERO } else { self.chain.len() as u16 };
        let mut block = run.start;
        while block < run.end() {
            let page_no = block / PAGE_BLOCKS;
            let from = (block % PAGE_BLOCKS) as usize;
            let to = ((run.end() - page_no * PAGE_BLOCKS).min(PAGE_BLOCKS)) as usize;
            if let Some(page) = self.flat.get_mut(&page_no) {
                page.fill(from..to, value);
            }
            block = page_no * PAGE_BLOCKS + to as u64;
        }
    }
}

/// Builds the flattened page `page_no` of `chain`, or `None` if no layer holds any block of it.
fn resolve_page(chain: &[Arc<Layer>], page_no: u64) -> Option<FlatPage> {
    let mut flat: Option<Box<[u16; PAGE_BLOCKS as usize]>> = None;
    let mut unresolved = [u64::MAX; (PAGE_BLOCKS / 64) as usize];
    for (pos, layer) in chain.iter().enumerate().rev() {
        let state = layer.map();
        let Some(page) = state.map.page(page_no) else {
            continue;
        };
        let out = flat.get_or_insert_with(|| Box::new([HOLE; PAGE_BLOCKS as usize]));
        let mut remaining = 0u64;
        for w in 0..unresolved.len() {
            let data = page.data_bits()[w] & unresolved[w];
            let zero = page.zero_bits()[w] & unresolved[w];
            for (bits, value) in [(data, pos as u16 + 1), (zero, ZERO)] {
                let mut rest = bits;
                while rest != 0 {
                    let bit = rest.trailing_zeros() as usize;
                    out[w * 64 + bit] = value;
                    rest &= rest - 1;
                }
            }
            unresolved[w] &= !(data | zero);
            remaining |= unresolved[w];
        }
        if remaining == 0 {
            break;
        }
    }
    flat.map(FlatPage::from_entries)
}

/// The flattened entries of blocks `[first, first + count)`, with the chain they refer to.
pub fn lookup(view: &ViewLock, first: u64, count: u64) -> (Arc<[Arc<Layer>]>, Vec<u16>) {
    let mut out = Vec::with_capacity(count as usize);
    {
        let v = view.read();
        if fill_entries(&v, first, count, &mut out, |_| None) {
            return (v.chain.clone(), out);
        }
    }
    // A page some layer holds is not cached yet: build it under the write lock, so no write
    // to the head can slip between building and caching it.
    out.clear();
    let mut v = view.write();
    let chain = v.chain.clone();
    let mut built = Vec::new();
    fill_entries(&v, first, count, &mut out, |page_no| {
        let page = resolve_page(&chain, page_no)?;
        built.push((page_no, page.clone()));
        Some(page)
    });
    for (page_no, page) in built {
        v.flat.insert(page_no, page);
    }
    (chain, out)
}

/// Appends the entries of `[first, first+count)` to `out`. Uncached pages that some layer holds
/// go to `build`; returns false if one is needed and `build` gave none.
fn fill_entries(
    v: &ViewState,
    first: u64,
    count: u64,
    out: &mut Vec<u16>,
    mut build: impl FnMut(u64) -> Option<FlatPage>,
) -> bool {
    let end = first + count;
    let mut block = first;
    while block < end {
        let page_no = block / PAGE_BLOCKS;
        let from = (block % PAGE_BLOCKS) as usize;
        let to = ((end - page_no * PAGE_BLOCKS).min(PAGE_BLOCKS)) as usize;
        if let Some(page) = v.flat.get(&page_no) {
            page.extend_into(out, from..to);
        } else if v.chain.iter().all(|l| l.map().map.page(page_no).is_none()) {
            out.extend(std::iter::repeat_n(HOLE, to - from));
        } else if let Some(page) = build(page_no) {
            page.extend_into(out, from..to);
        } else {
            return false;
        }
        block = page_no * PAGE_BLOCKS + to as u64;
    }
    true
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("range {offset}+{len} is beyond the end ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads `buf.len()` bytes at `offset` after checking the range against the view's size.
pub fn read(view: &ViewLock, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
    for_each_run(view, offset, buf.len() as u64, |chain, value, at, len| {
        let start = (at - offset) as usize;
        read_run(chain, value, &mut buf[start..start + len], at)
    })
}

/// Where the bytes of `[offset, offset + len)` are, in order: ranges of data files and zeros,
/// adjacent ones joined. A caller can then move the data without copying it through memory of
/// its own (the NBD server sends it from the page cache to the socket).
pub fn read_parts(view: &ViewLock, offset: u64, len: u64) -> Result<Vec<ReadPart>, ReadError> {
    let mut parts: Vec<ReadPart> = Vec::new();
    for_each_run(view, offset, len, |chain, value, at, len| match value {
        HOLE | ZERO => {
            push_joined(&mut parts, ReadPart::Zeros(len as u64));
            Ok(())
        }
        pos => chain[pos as usize - 1].data_parts(at, len as u64, &mut |part| push_joined(&mut parts, part)),
    })?;
    Ok(parts)
}

/// Appends `part`, joining it to the last part where the two are adjacent.
fn push_joined(parts: &mut Vec<ReadPart>, part: ReadPart) {
    match (parts.last_mut(), part) {
        (Some(ReadPart::Zeros(n)), ReadPart::Zeros(more)) => *n += more,
        (Some(ReadPart::File { file, offset, len }), ReadPart::File { file: next, offset: at, len: more })
            if Arc::ptr_eq(file, &next) && *offset + *len == at =>
        {
            *len += more
        }
        (_, part) => parts.push(part),
    }
}

/// Where some bytes of a read are.
#[derive(Debug, Clone)]
pub enum ReadPart {
    /// `len` bytes of `file` from `offset`.
    File { file: Arc<dyn StorageFile>, offset: u64, len: u64 },
    /// This many zero bytes.
    Zeros(u64),
}

/// Calls `each(chain, entry, offset, len)` for the runs of blocks with one flattened entry
/// that cover `[offset, offset + len)`, in order, after checking the range against the view's
/// size.
///
/// When the pages are resolved already (the common case), `each` runs while the view's read
/// lock is held: the chain cannot change meanwhile, so a reader needs no other lock and no
/// reference count, both of which cost more than the lookup when threads share a volume.
fn for_each_run(
    view: &ViewLock,
    offset: u64,
    len: u64,
    mut each: impl FnMut(&[Arc<Layer>], u16, u64, usize) -> std::io::Result<()>,
) -> Result<(), ReadError> {
    let first = offset >> BLOCK_SHIFT;
    {
        let v = view.read();
        if offset.checked_add(len).is_none_or(|end| end > v.size) {
            return Err(ReadError::OutOfRange { offset, len, size: v.size });
        }
        if len == 0 {
            return Ok(());
        }
        let count = (offset + len).div_ceil(BLOCK_SIZE) - first;
        // The common case, a request inside one cached page, reads straight from the page's
        // entries: no allocation and no copy on the hot path.
        let page_no = first / PAGE_BLOCKS;
        if (first + count - 1) / PAGE_BLOCKS == page_no {
            match v.flat.get(&page_no) {
                Some(FlatPage::Uniform(value)) => return Ok(each(&v.chain, *value, offset, len as usize)?),
                Some(FlatPage::Mixed(entries)) => {
                    let from = (first % PAGE_BLOCKS) as usize;
                    return Ok(each_run(&v.chain, &entries[from..from + count as usize], first, offset, len, each)?);
                }
                None => {}
            }
        }
        let mut entries = Vec::with_capacity(count as usize);
        if fill_entries(&v, first, count, &mut entries, |_| None) {
            return Ok(each_run(&v.chain, &entries, first, offset, len, each)?);
        }
    }
    // Some page must be built first, under the write lock; the runs are walked after it.
    let count = (offset + len).div_ceil(BLOCK_SIZE) - first;
    let (chain, entries) = lookup(view, first, count);
    Ok(each_run(&chain, &entries, first, offset, len, each)?)
}

/// Calls `each` for the runs of equal `entries` (one per block from `first`), clipped to
/// `[offset, offset + len)`.
fn each_run(
    chain: &[Arc<Layer>],
    entries: &[u16],
    first: u64,
    offset: u64,
    len: u64,
    mut each: impl FnMut(&[Arc<Layer>], u16, u64, usize) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut i = 0usize;
    while i < entries.len() {
        let value = entries[i];
        let mut j = i + 1;
        while j < entries.len() && entries[j] == value {
            j += 1;
        }
        // Bytes of the request covered by blocks [first+i, first+j).
        let run_start = ((first + i as u64) << BLOCK_SHIFT).max(offset);
        let run_end = ((first + j as u64) << BLOCK_SHIFT).min(offset + len);
        each(chain, value, run_start, (run_end - run_start) as usize)?;
        i = j;
    }
    Ok(())
}

/// Reads `dst` at `offset` from blocks that all have the flattened entry `value`.
fn read_run(chain: &[Arc<Layer>], value: u16, dst: &mut [u8], offset: u64) -> std::io::Result<()> {
    match value {
        HOLE | ZERO => {
            dst.fill(0);
            Ok(())
        }
        pos => chain[pos as usize - 1].read_data(dst, offset),
    }
}

/// Ranges of up to this many pages (32 MiB) skip the per-layer search for held pages.
const DIRECT_PAGES: u64 = 16;

/// The allocation of `[offset, offset + len)`, as extents in order, merged where adjacent.
pub fn allocation(view: &ViewLock, offset: u64, len: u64) -> Vec<AllocExtent> {
    let mut runs = Runs::default();
    let mut push = |offset, length, kind| runs.push(offset, length, kind);
    let end = offset + len;
    let first_page = (offset >> BLOCK_SHIFT) / PAGE_BLOCKS;
    let last_page = (end.saturating_sub(1) >> BLOCK_SHIFT) / PAGE_BLOCKS;
    // A short range (a read's) looks at its few pages directly, through the flattened cache;
    // a long one (a whole disk's map) only at pages some layer holds, everything between
    // being a hole — but that asks every layer of the chain.
    let pages: Vec<u64> = if last_page - first_page < DIRECT_PAGES {
        (first_page..=last_page).collect()
    } else {
        held_pages(&view.read().chain, first_page, last_page)
    };
    let mut pos = offset;
    for page_no in pages {
        let page_start = (page_no * PAGE_BLOCKS) << BLOCK_SHIFT;
        let page_end = (((page_no + 1) * PAGE_BLOCKS) << BLOCK_SHIFT).min(end);
        let from = page_start.max(offset);
        push(pos, from - pos, Allocation::Hole);
        pos = page_end;
        // A cached uniform page is one extent; others are looked up (and cached) block by block.
        let uniform = match view.read().flat.get(&page_no) {
            Some(FlatPage::Uniform(value)) => Some(*value),
            _ => None,
        };
        if let Some(value) = uniform {
            push(from, page_end - from, allocation_of(value));
            continue;
        }
        let first = from >> BLOCK_SHIFT;
        let last = page_end.div_ceil(BLOCK_SIZE);
        let (_, entries) = lookup(view, first, last - first);
        let mut k = 0;
        while k < entries.len() {
            let run = entries[k..].iter().take_while(|e| **e == entries[k]).count();
            let b_start = ((first + k as u64) << BLOCK_SHIFT).max(from);
            let b_end = ((first + (k + run) as u64) << BLOCK_SHIFT).min(page_end);
            push(b_start, b_end - b_start, allocation_of(entries[k]));
            k += run;
        }
    }
    push(pos, end - pos, Allocation::Hole);
    runs.0.into_iter().map(|(offset, length, kind)| AllocExtent { offset, length, kind }).collect()
}

fn allocation_of(entry: u16) -> Allocation {
    match entry {
        HOLE => Allocation::Hole,
        ZERO => Allocation::Zero,
        _ => Allocation::Data,
    }
}

/// Byte runs with one value each, in order, joined where adjacent and equal.
struct Runs<T>(Vec<(u64, u64, T)>);

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Runs(Vec::new())
    }
}

impl<T: PartialEq> Runs<T> {
    fn push(&mut self, offset: u64, length: u64, value: T) {
        if length == 0 {
            return;
        }
        match self.0.last_mut() {
            Some((o, l, v)) if *v == value && *o + *l == offset => *l += length,
            _ => self.0.push((offset, length, value)),
        }
    }
}

/// The pages in `[first_page, last_page]` that some layer of `chain` holds, in order.
fn held_pages(chain: &[Arc<Layer>], first_page: u64, last_page: u64) -> Vec<u64> {
    let held: std::collections::BTreeSet<u64> =
        chain.iter().flat_map(|l| l.map().map.page_numbers(first_page, last_page + 1).collect::<Vec<_>>()).collect();
    held.into_iter().collect()
}

/// A byte range whose blocks all sit at one depth of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthExtent {
    pub offset: u64,
    pub length: u64,
    /// 0: no layer holds the range (it reads as zeros); 1: the top layer holds it (a live
    /// volume's head); 2: the layer below, and so on. Zeroed blocks count as held.
    pub depth: u32,
}

/// Where in the chain `[offset, offset + len)` is held, as extents in order. Pages are
/// resolved from the layers' maps on each call (the flattened cache does not keep the layer of
/// zeroed blocks), so this costs O(chain depth) per 2 MiB page that some layer holds.
pub fn allocation_depth(view: &ViewLock, offset: u64, len: u64) -> Vec<DepthExtent> {
    let v = view.read();
    let chain = &v.chain;
    let mut runs = Runs::default();
    let mut push = |offset, length, depth| runs.push(offset, length, depth);
    let end = offset + len;
    let first_page = (offset >> BLOCK_SHIFT) / PAGE_BLOCKS;
    let last_page = (end.saturating_sub(1) >> BLOCK_SHIFT) / PAGE_BLOCKS;
    let mut pos = offset;
    for page_no in held_pages(chain, first_page, last_page) {
        let depths = page_depths(chain, page_no);
        let page_first = page_no * PAGE_BLOCKS;
        let from = (page_first << BLOCK_SHIFT).max(offset);
        let to = ((page_first + PAGE_BLOCKS) << BLOCK_SHIFT).min(end);
        push(pos, from - pos, 0);
        let mut at = from;
        while at < to {
            let block = at >> BLOCK_SHIFT;
            let next = ((block + 1) << BLOCK_SHIFT).min(to);
            push(at, next - at, depths[(block - page_first) as usize]);
            at = next;
        }
        pos = to;
    }
    push(pos, end - pos, 0);
    runs.0.into_iter().map(|(offset, length, depth)| DepthExtent { offset, length, depth }).collect()
}

/// The depth of each block of page `page_no`: the topmost layer holding it as data or zero,
/// counted from the top (1), or 0 if none does.
fn page_depths(chain: &[Arc<Layer>], page_no: u64) -> [u32; PAGE_BLOCKS as usize] {
    let mut depths = [0u32; PAGE_BLOCKS as usize];
    let mut unresolved = [u64::MAX; (PAGE_BLOCKS / 64) as usize];
    for (from_top, layer) in chain.iter().rev().enumerate() {
        let state = layer.map();
        let Some(page) = state.map.page(page_no) else {
            continue;
        };
        for w in 0..unresolved.len() {
            let mut held = (page.data_bits()[w] | page.zero_bits()[w]) & unresolved[w];
            unresolved[w] &= !held;
            while held != 0 {
                let bit = held.trailing_zeros() as usize;
                depths[w * 64 + bit] = from_top as u32 + 1;
                held &= held - 1;
            }
        }
    }
    depths
}
