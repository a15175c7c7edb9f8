//! Checks shared by the tests that cut power or kill the process, and block arithmetic.
#![allow(dead_code)] // each test binary uses a different part

use cairn_volume::{Extent, BLOCK_SIZE};

/// The blocks of `[at, at + len)`.
pub fn blocks(at: u64, len: u64) -> std::ops::Range<u64> {
    at / BLOCK_SIZE..(at + len).div_ceil(BLOCK_SIZE)
}

/// Where `byte` at offset `i` may come from after a power loss: the content as of the last
/// flush (`durable`), or any write made since (`maybe`: offset and bytes), finished or not.
fn survived(byte: u8, i: usize, durable: &[u8], maybe: &[(u64, Vec<u8>)]) -> bool {
    byte == durable[i]
        || maybe.iter().any(|(at, data)| {
            let at = *at as usize;
            i >= at && i < at + data.len() && data[i - at] == byte
        })
}

/// Panics at the first byte of `actual` that [`survived`] does not allow.
pub fn assert_survived(actual: &[u8], durable: &[u8], maybe: &[(u64, Vec<u8>)], what: &str) {
    for (i, byte) in actual.iter().enumerate() {
        assert!(survived(*byte, i, durable, maybe), "{what}: byte {i} = {byte} was neither flushed nor written since");
    }
}

/// The first block that differs between `base` and `now` (over the shorter of the two) yet is
/// not covered by `changed`, the extents change tracking listed between them.
pub fn unlisted_change(changed: &[Extent], base: &[u8], now: &[u8]) -> Option<usize> {
    let block = BLOCK_SIZE as usize;
    let mut listed = vec![false; now.len().div_ceil(block)];
    for e in changed {
        let (first, end) = (e.offset as usize / block, (e.offset + e.length) as usize);
        listed[first..end.div_ceil(block)].fill(true);
    }
    base.chunks(block).zip(now.chunks(block)).enumerate().position(|(b, (x, y))| x != y && !listed[b])
}
