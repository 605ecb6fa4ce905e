//! Encoding text with learned merges: split into chunks, then within each chunk apply the earliest-learned merge
//! available, again and again (the same result as replaying the merges in training order).

use rustc_hash::FxHashMap;

use crate::split::Splitter;
use crate::train::Pair;
use crate::Error;

/// Token ids for a list of merges. Token ids double as ranks: merge `i` made token `256 + i`, so a smaller id is
/// an earlier merge.
pub struct Encoder {
    /// (left, right) -> the token they merge into
    merges: FxHashMap<Pair, u32>,
    /// The bytes of every token: a chunk that is a whole token encodes to it directly (as in tiktoken), which
    /// covers most chunks once the vocabulary is a few thousand tokens.
    token_of_bytes: FxHashMap<Box<[u8]>, u32>,
}

/// The bytes of each token id, in id order: the 256 single bytes, then each merge's two parts joined.
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(left, right) in merges {
        let mut bytes = tokens[left as usize].clone();
        bytes.extend_from_slice(&tokens[right as usize]);
        tokens.push(bytes);
    }
    tokens
}

impl Encoder {
    pub fn new(merges: &[Pair]) -> Self {
        let merges_map = merges
            .iter()
            .enumerate()
            .map(|(i, &pair)| (pair, 256 + i as u32))
            .collect();
        let token_of_bytes = token_bytes(merges)
            .into_iter()
            .enumerate()
            .map(|(id, bytes)| (bytes.into_boxed_slice(), id as u32))
            .collect();
        Self {
            merges: merges_map,
            token_of_bytes,
        }
    }

    pub fn encode(&self, splitter: &Splitter, text: &str) -> Result<Vec<u32>, Error> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut scratch = ChunkScratch::default();
        splitter.for_each_chunk(text, |chunk| {
            self.encode_chunk(chunk, &mut ids, &mut scratch)
        })?;
        Ok(ids)
    }

    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>, scratch: &mut ChunkScratch) {
        if let Some(&id) = self.token_of_bytes.get(chunk) {
            out.push(id);
            return;
        }
        // tokens[i] and the merge of (tokens[i], tokens[i + 1]), if any; after a merge only the neighbours'
        // entries change, so each step is one scan for the earliest merge plus two lookups.
        let ChunkScratch { tokens, merged } = scratch;
        tokens.clear();
        tokens.extend(chunk.iter().map(|&b| b as u32));
        merged.clear();
        merged.extend(tokens.windows(2).map(|w| self.merge_of(w[0], w[1])));
        while let Some((i, &t)) = merged.iter().enumerate().min_by_key(|&(_, &t)| t) {
            if t == u32::MAX {
                break;
            }
            tokens[i] = t;
            tokens.remove(i + 1);
            merged.remove(i);
            if i + 1 < tokens.len() {
                merged[i] = self.merge_of(t, tokens[i + 1]);
            }
            if i > 0 {
                merged[i - 1] = self.merge_of(tokens[i - 1], t);
            }
        }
        out.extend_from_slice(tokens);
    }

    /// The token that (left, right) merges into, or u32::MAX if they do not merge.
    #[inline]
    fn merge_of(&self, left: u32, right: u32) -> u32 {
        self.merges.get(&(left, right)).copied().unwrap_or(u32::MAX)
    }
}

#[derive(Default)]
struct ChunkScratch {
    tokens: Vec<u32>,
    merged: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::DEFAULT_PATTERN;

    #[test]
    fn applies_the_earliest_merge_first() {
        // (a, a) -> 256, (256, a) -> 257
        let encoder = Encoder::new(&[(97, 97), (256, 97)]);
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        assert_eq!(encoder.encode(&splitter, "aaa").unwrap(), vec![257]);
        assert_eq!(encoder.encode(&splitter, "aaaa").unwrap(), vec![256, 256]);
        assert_eq!(encoder.encode(&splitter, "aaaaa").unwrap(), vec![256, 257]);
        assert_eq!(
            encoder.encode(&splitter, "ab a").unwrap(),
            vec![97, 98, 32, 97]
        );
    }

    #[test]
    fn token_bytes_join_the_merged_parts() {
        let tokens = token_bytes(&[(104, 105), (256, 33)]);
        assert_eq!(tokens.len(), 258);
        assert_eq!(tokens[256], b"hi");
        assert_eq!(tokens[257], b"hi!");
    }
}
