//! Random bytes for request and trace IDs, from the system's source, fetched 512 bytes at a time
//! per thread: one `getrandom` call per 32 request IDs instead of one each. The bytes are the
//! system RNG's own, each handed out once.

use std::cell::RefCell;

const BATCH: usize = 512;

struct Buffer {
    bytes: [u8; BATCH],
    /// Bytes already handed out.
    used: usize,
}

thread_local! {
    static BUFFER: RefCell<Buffer> = const { RefCell::new(Buffer { bytes: [0; BATCH], used: BATCH }) };
}

/// Fills `out` (at most 512 bytes); `false` if the system's source failed (`out` is then
/// untouched).
pub fn fill(out: &mut [u8]) -> bool {
    use ring::rand::SecureRandom as _;
    assert!(out.len() <= BATCH, "at most {BATCH} random bytes at a time");
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        if BATCH - b.used < out.len() {
            if ring::rand::SystemRandom::new().fill(&mut b.bytes).is_err() {
                return false;
            }
            b.used = 0;
        }
        let start = b.used;
        out.copy_from_slice(&b.bytes[start..start + out.len()]);
        // Handed out once: never again, not even in a later call's tail.
        b.bytes[start..start + out.len()].fill(0);
        b.used += out.len();
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut id = [0u8; 16];
            assert!(fill(&mut id));
            assert!(seen.insert(id), "an ID came out twice");
        }
        // Sizes that do not divide the batch refill without reuse.
        let mut a = [0u8; 300];
        let mut b = [0u8; 300];
        assert!(fill(&mut a) && fill(&mut b));
        assert_ne!(a, b);
    }
}
