//! Checks shared by the tests that cut power.

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
