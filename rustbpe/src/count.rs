//! Counting unique chunks over a stream of documents.
//!
//! Memory grows with the number of unique chunks, not with the text: each thread keeps one table of the chunks it
//! has seen, the chunk bytes packed in one arena (no allocation per chunk), and the tables are merged once at the
//! end. Threads take documents from rayon's work-stealing queue, so a thread slowed down by another process on the
//! machine does not hold up the others.

use std::hash::Hasher;
use std::sync::Mutex;

use hashbrown::HashTable;
use rayon::prelude::*;
use rustc_hash::FxHasher;

use crate::split::Splitter;
use crate::Error;

/// A chunk in a `ChunkCounts` table: its bytes are `arena[start..start + len]`.
#[derive(Clone, Copy)]
struct Entry {
    start: u32,
    len: u32,
    count: u64,
}

/// Unique chunks and how often each occurs.
#[derive(Default)]
pub struct ChunkCounts {
    table: HashTable<Entry>,
    arena: Vec<u8>,
}

#[inline]
fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = FxHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

impl Entry {
    #[inline(always)]
    fn bytes<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.start as usize..self.start as usize + self.len as usize]
    }
}

impl ChunkCounts {
    /// Adds `count` occurrences of `chunk`.
    #[inline]
    pub fn add(&mut self, chunk: &[u8], count: u64) -> Result<(), Error> {
        let hash = hash_bytes(chunk);
        let arena = &self.arena;
        if let Some(entry) = self.table.find_mut(hash, |e| e.bytes(arena) == chunk) {
            entry.count += count;
            return Ok(());
        }
        // Offsets are u32 to keep entries small; 4 GiB of distinct chunk text is far past any real corpus.
        let too_many = |_| Error::TooManyChunks;
        let start = u32::try_from(self.arena.len()).map_err(too_many)?;
        let len = u32::try_from(chunk.len()).map_err(too_many)?;
        u32::try_from(self.arena.len() + chunk.len()).map_err(too_many)?;
        self.arena.extend_from_slice(chunk);
        let arena = &self.arena;
        let entry = Entry { start, len, count };
        self.table
            .insert_unique(hash, entry, |e| hash_bytes(e.bytes(arena)));
        Ok(())
    }

    /// Adds every chunk of `other`.
    pub fn merge(&mut self, other: &ChunkCounts) -> Result<(), Error> {
        for (chunk, count) in other.iter() {
            self.add(chunk, count)?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The unique chunks and their counts, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> + '_ {
        self.table.iter().map(|e| (e.bytes(&self.arena), e.count))
    }
}

/// Splits documents into chunks and counts them, in parallel over the documents.
pub struct ChunkCounter {
    splitter: Splitter,
    /// One table per rayon thread; the mutex is only ever taken by its own thread, so it is never contended.
    per_thread: Vec<Mutex<ChunkCounts>>,
}

impl ChunkCounter {
    pub fn new(splitter: Splitter) -> Self {
        let per_thread = (0..rayon::current_num_threads())
            .map(|_| Mutex::default())
            .collect();
        Self {
            splitter,
            per_thread,
        }
    }

    /// Counts the chunks of each document.
    pub fn add_documents<S: AsRef<str> + Sync>(&self, documents: &[S]) -> Result<(), Error> {
        documents.par_iter().try_for_each(|document| {
            let thread = rayon::current_thread_index().unwrap_or(0) % self.per_thread.len();
            let mut counts = self.per_thread[thread]
                .lock()
                .map_err(|_| Error::Internal("a counting thread panicked"))?;
            let mut result = Ok(());
            self.splitter.for_each_chunk(document.as_ref(), |chunk| {
                if result.is_ok() {
                    result = counts.add(chunk, 1);
                }
            })?;
            result
        })
    }

    /// All the counts, the threads' tables merged into one.
    pub fn finish(self) -> Result<ChunkCounts, Error> {
        let mut tables: Vec<ChunkCounts> = self
            .per_thread
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .map_err(|_| Error::Internal("a counting thread panicked"))
            })
            .collect::<Result<_, _>>()?;
        // Merge the smaller tables into the largest, so the fewest entries are re-inserted.
        tables.sort_by_key(|t| std::cmp::Reverse(t.len()));
        let mut tables = tables.into_iter();
        let mut total = tables.next().unwrap_or_default();
        for table in tables {
            total.merge(&table)?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn counts_chunks_across_documents() {
        let counter = ChunkCounter::new(Splitter::new(crate::split::DEFAULT_PATTERN).unwrap());
        let documents = ["the cat and the hat", "the end", ""];
        counter.add_documents(&documents).unwrap();
        counter.add_documents(&["the"]).unwrap();
        let counts: HashMap<Vec<u8>, u64> = counter
            .finish()
            .unwrap()
            .iter()
            .map(|(chunk, count)| (chunk.to_vec(), count))
            .collect();
        let expected: HashMap<Vec<u8>, u64> = [
            ("the", 3),
            (" the", 1),
            (" cat", 1),
            (" and", 1),
            (" hat", 1),
            (" end", 1),
        ]
        .into_iter()
        .map(|(chunk, count)| (chunk.as_bytes().to_vec(), count))
        .collect();
        assert_eq!(counts, expected);
    }

    #[test]
    fn table_merge_adds_counts() {
        let mut a = ChunkCounts::default();
        let mut b = ChunkCounts::default();
        a.add(b"x", 2).unwrap();
        b.add(b"x", 3).unwrap();
        b.add(b"yy", 1).unwrap();
        a.merge(&b).unwrap();
        let mut all: Vec<_> = a.iter().map(|(c, n)| (c.to_vec(), n)).collect();
        all.sort();
        assert_eq!(all, vec![(b"x".to_vec(), 5), (b"yy".to_vec(), 1)]);
    }
}
