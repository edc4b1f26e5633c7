//! Prefix-block hashing. A worker's prefix cache keys full KV blocks by these hashes, and the
//! router computes the same ones to send a prompt where its prefix is already cached: both must
//! agree bit for bit, across builds and machines.

use crate::rng::mix64;

/// Hash of a full block, chained over its parent so that equal blocks after different prefixes
/// differ: FNV-1a over the tokens' little-endian bytes, finalised by a 64-bit mix.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ parent;
    for &t in tokens {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    mix64(h)
}

/// Hashes of every full block of `tokens`, in order (a partial last block is not hashed).
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = 0;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            parent = block_hash(parent, chunk);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_the_parent() {
        let x = prefix_hashes(&[5, 6, 5, 6], 2);
        assert_ne!(
            x[0], x[1],
            "the same tokens after another prefix hash differently"
        );
        assert_eq!(
            prefix_hashes(&[5, 6, 5, 6, 9], 2),
            x,
            "a partial block is not hashed"
        );
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        // Routers and workers of different versions must agree: pin one value.
        assert_eq!(
            prefix_hashes(&[1, 2, 3, 4], 4),
            vec![block_hash(0, &[1, 2, 3, 4])]
        );
        assert_eq!(block_hash(0, &[1, 2, 3, 4]), 0x6ED6_EB98_0728_4289);
    }
}
