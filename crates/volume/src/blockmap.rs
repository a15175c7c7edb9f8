//! Per-layer block maps: which 4 KiB blocks a layer holds (data or zero) and which blocks were
//! written while it was a volume's head. Pure data structures, no I/O.
//!
//! Blocks are grouped in pages of [`PAGE_BLOCKS`] blocks (2 MiB); a page costs three 512-bit
//! bitmaps (192 bytes) and only pages that were touched exist, so a layer's map costs about
//! 96 MiB per TiB it holds and nothing for unwritten space.

use std::collections::BTreeMap;

/// Size of a block, the unit of copy-on-write, block status and change tracking.
pub const BLOCK_SIZE: u64 = 4096;
/// log2 of [`BLOCK_SIZE`].
pub const BLOCK_SHIFT: u32 = 12;
/// Blocks per map page.
pub const PAGE_BLOCKS: u64 = 512;
const WORDS: usize = (PAGE_BLOCKS / 64) as usize;

/// What a layer says about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// The layer's data file holds the block's bytes.
    Data,
    /// The block reads as zeros (written as zeros or trimmed), whatever lower layers hold.
    Zero,
}

/// A run of blocks `[start, start + count)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub count: u64,
}

impl BlockRun {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.start + self.count
    }
}

/// Three bitmaps over the blocks of one page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    data: [u64; WORDS],
    zero: [u64; WORDS],
    written: [u64; WORDS],
}

impl Page {
    /// Blocks holding data, as a bitmap.
    pub fn data_bits(&self) -> &[u64; WORDS] {
        &self.data
    }

    /// Blocks reading as zeros, as a bitmap.
    pub fn zero_bits(&self) -> &[u64; WORDS] {
        &self.zero
    }

    fn is_empty(&self) -> bool {
        self.data.iter().chain(&self.zero).chain(&self.written).all(|w| *w == 0)
    }
}

/// Applies `f` to each word of a page's bitmap with the mask of the blocks in `[from, to)`
/// (block indices within the page).
fn for_each_masked_word(from: u64, to: u64, mut f: impl FnMut(usize, u64)) {
    let mut b = from;
    while b < to {
        let word = (b / 64) as usize;
        let bit = b % 64;
        let n = (64 - bit).min(to - b);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
        f(word, mask);
        b += n;
    }
}

/// The map of one layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerMap {
    pages: BTreeMap<u64, Page>,
    data_blocks: u64,
}

/// What [`LayerMap::set`] does to each block of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOp {
    /// Set the block's state; mark it written when `written` is set.
    Set { state: BlockState, written: bool },
    /// Only mark the block written (change tracking folded in from a merged layer).
    MarkWritten,
}

impl LayerMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of one block, if the layer has one.
    pub fn get(&self, block: u64) -> Option<BlockState> {
        let page = self.pages.get(&(block / PAGE_BLOCKS))?;
        let i = block % PAGE_BLOCKS;
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        if page.data[word] & bit != 0 {
            Some(BlockState::Data)
        } else if page.zero[word] & bit != 0 {
            Some(BlockState::Zero)
        } else {
            None
        }
    }

    /// Whether the block was written while this layer was a head.
    #[cfg(test)]
    pub fn is_written(&self, block: u64) -> bool {
        let Some(page) = self.pages.get(&(block / PAGE_BLOCKS)) else {
            return false;
        };
        let i = block % PAGE_BLOCKS;
        page.written[(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }

    /// Applies `op` to every block of `run`.
    pub fn set(&mut self, run: BlockRun, op: MapOp) {
        let mut block = run.start;
        let end = run.end();
        while block < end {
            let page_no = block / PAGE_BLOCKS;
            let from = block % PAGE_BLOCKS;
            let to = (from + (end - block)).min(PAGE_BLOCKS);
            let page = self.pages.entry(page_no).or_default();
            let mut data_delta: i64 = 0;
            for_each_masked_word(from, to, |w, mask| match op {
                MapOp::Set { state, written } => {
                    let before = page.data[w].count_ones() as i64;
                    match state {
                        BlockState::Data => {
                            page.data[w] |= mask;
                            page.zero[w] &= !mask;
                        }
                        BlockState::Zero => {
                            page.data[w] &= !mask;
                            page.zero[w] |= mask;
                        }
                    }
                    if written {
                        page.written[w] |= mask;
                    }
                    data_delta += page.data[w].count_ones() as i64 - before;
                }
                MapOp::MarkWritten => page.written[w] |= mask,
            });
            self.data_blocks = (self.data_blocks as i64 + data_delta) as u64;
            block += to - from;
        }
    }

    /// Forgets block states but keeps change tracking (a layer whose data was merged away).
    pub fn keep_only_written(&mut self) {
        self.pages.retain(|_, page| {
            page.data = [0; WORDS];
            page.zero = [0; WORDS];
            !page.is_empty()
        });
        self.data_blocks = 0;
    }

    /// Number of blocks holding data.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// The page with number `page_no`, if any block in it was touched.
    pub fn page(&self, page_no: u64) -> Option<&Page> {
        self.pages.get(&page_no)
    }

    /// Page numbers in `[from, to)` that exist, in order.
    pub fn page_numbers(&self, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
        self.pages.range(from..to).map(|(k, _)| *k)
    }

    /// Runs of blocks with state `state` (in order), coalesced across pages.
    pub fn state_runs(&self, state: BlockState) -> Vec<BlockRun> {
        self.runs(|p| match state {
            BlockState::Data => p.data,
            BlockState::Zero => p.zero,
        })
    }

    /// Runs of written blocks, in order.
    pub fn written_runs(&self) -> Vec<BlockRun> {
        self.runs(|p| p.written)
    }

    /// Runs of data blocks not marked written (a merge copied them in), in order.
    pub fn unwritten_data_runs(&self) -> Vec<BlockRun> {
        self.runs(|p| std::array::from_fn(|w| p.data[w] & !p.written[w]))
    }

    fn runs(&self, bits: impl Fn(&Page) -> [u64; WORDS]) -> Vec<BlockRun> {
        let mut runs = RunBuilder::default();
        for (page_no, page) in &self.pages {
            push_bitmap_runs(&mut runs, page_no * PAGE_BLOCKS, &bits(page));
        }
        runs.finish()
    }
}

/// Collects blocks in increasing order into coalesced runs.
#[derive(Debug, Default)]
pub struct RunBuilder {
    runs: Vec<BlockRun>,
}

impl RunBuilder {
    /// Adds `count` blocks from `start`; `start` must not be below the previous run's end.
    pub fn push(&mut self, start: u64, count: u64) {
        if count == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.end() == start {
                last.count += count;
                return;
            }
        }
        self.runs.push(BlockRun { start, count });
    }

    /// The runs collected.
    pub fn finish(self) -> Vec<BlockRun> {
        self.runs
    }
}

/// Appends the runs of set bits of one page's bitmap, whose first block is `base`.
pub fn push_bitmap_runs(runs: &mut RunBuilder, base: u64, bits: &[u64; WORDS]) {
    for (w, &word) in bits.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let start = rest.trailing_zeros() as u64;
            let len = (rest >> start).trailing_ones() as u64;
            runs.push(base + w as u64 * 64 + start, len);
            rest = if start + len >= 64 { 0 } else { rest & !(((1u64 << len) - 1) << start) };
        }
    }
}

/// Union of several bitmaps, page by page (for change tracking across layers).
#[derive(Debug, Default)]
pub struct BlockSet {
    pages: BTreeMap<u64, [u64; WORDS]>,
}

impl BlockSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every block a layer marks written in pages `[from, to)`.
    pub fn add_written(&mut self, map: &LayerMap, from: u64, to: u64) {
        for (page_no, page) in map.pages.range(from..to) {
            let dst = self.pages.entry(*page_no).or_insert([0; WORDS]);
            for (d, s) in dst.iter_mut().zip(page.written.iter()) {
                *d |= *s;
            }
        }
    }

    /// The blocks as runs, clipped to `[first, end)`.
    pub fn runs(&self, first: u64, end: u64) -> Vec<BlockRun> {
        let mut runs = RunBuilder::default();
        for (page_no, bits) in &self.pages {
            push_bitmap_runs(&mut runs, page_no * PAGE_BLOCKS, bits);
        }
        runs.finish()
            .into_iter()
            .filter_map(|r| {
                let s = r.start.max(first);
                let e = r.end().min(end);
                (s < e).then_some(BlockRun { start: s, count: e - s })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn set_and_get_across_pages() {
        let mut m = LayerMap::new();
        m.set(BlockRun { start: 500, count: 30 }, MapOp::Set { state: BlockState::Data, written: true });
        assert_eq!(m.get(499), None);
        assert_eq!(m.get(500), Some(BlockState::Data));
        assert_eq!(m.get(529), Some(BlockState::Data));
        assert_eq!(m.data_blocks(), 30);
        m.set(BlockRun { start: 510, count: 5 }, MapOp::Set { state: BlockState::Zero, written: false });
        assert_eq!(m.get(512), Some(BlockState::Zero));
        assert_eq!(m.data_blocks(), 25);
        assert_eq!(
            m.state_runs(BlockState::Data),
            vec![BlockRun { start: 500, count: 10 }, BlockRun { start: 515, count: 15 }]
        );
        assert_eq!(m.written_runs(), vec![BlockRun { start: 500, count: 30 }]);
        m.keep_only_written();
        assert_eq!(m.get(500), None);
        assert!(m.is_written(529));
        assert_eq!(m.data_blocks(), 0);
    }

    proptest! {
        /// The bitmaps behave like a plain per-block table.
        #[test]
        fn map_matches_a_table(ops in proptest::collection::vec((0u64..2000, 1u64..700, 0u8..4), 1..40)) {
            let mut m = LayerMap::new();
            let mut model: HashMap<u64, (Option<BlockState>, bool)> = HashMap::new();
            for (start, count, kind) in ops {
                let op = match kind {
                    0 => MapOp::Set { state: BlockState::Data, written: true },
                    1 => MapOp::Set { state: BlockState::Zero, written: true },
                    2 => MapOp::Set { state: BlockState::Data, written: false },
                    _ => MapOp::MarkWritten,
                };
                m.set(BlockRun { start, count }, op);
                for b in start..start + count {
                    let e = model.entry(b).or_insert((None, false));
                    match op {
                        MapOp::Set { state, written } => { e.0 = Some(state); e.1 |= written; }
                        MapOp::MarkWritten => e.1 = true,
                    }
                }
            }
            let mut data = 0;
            for b in 0..2800 {
                let (state, written) = model.get(&b).copied().unwrap_or((None, false));
                prop_assert_eq!(m.get(b), state);
                prop_assert_eq!(m.is_written(b), written);
                data += u64::from(state == Some(BlockState::Data));
            }
            prop_assert_eq!(m.data_blocks(), data);
            let runs_total: u64 = m.state_runs(BlockState::Data).iter().map(|r| r.count).sum();
            prop_assert_eq!(runs_total, data);
        }
    }
}
