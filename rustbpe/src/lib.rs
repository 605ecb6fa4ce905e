//! rustbpe: a byte-level BPE tokenizer trainer, exposed to Python as the `rustbpe` module.
//!
//! Training streams text from a Python iterator in batches. While Rust splits and counts a batch on all cores
//! (with the GIL released), Python fills the next one. Memory grows with the number of unique chunks, not with the
//! text. Then the merges are learned over the unique chunks (see `train`).
//!
//! The pieces, each usable from Rust without Python (`cargo test` runs them so):
//!   split   text -> chunks, by hand for the GPT-4 style patterns, fancy-regex for others
//!   count   chunks -> unique chunks and their counts, in parallel
//!   train   unique chunks -> merges
//!   encode  text -> token ids, given the merges

pub mod count;
pub mod encode;
pub mod split;
pub mod train;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};

use crate::count::ChunkCounter;
use crate::encode::Encoder;
use crate::split::{Splitter, DEFAULT_PATTERN};
use crate::train::Pair;

/// What can go wrong, as plain Rust; the Python layer turns each into an exception.
#[derive(Debug)]
pub enum Error {
    VocabTooSmall(u32),
    InvalidPattern(String),
    /// fancy-regex gave up on a match (its backtracking limit)
    Split(String),
    TooManyChunks,
    Internal(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VocabTooSmall(n) => {
                write!(
                    f,
                    "vocab_size must be at least 256 (one token per byte), got {n}"
                )
            }
            Self::InvalidPattern(e) => write!(f, "invalid split pattern {e}"),
            Self::Split(e) => write!(
                f,
                "the split pattern failed on the text: {e}; simplify the pattern"
            ),
            Self::TooManyChunks => write!(
                f,
                "more unique chunks than this trainer can index (4 GiB of them)"
            ),
            Self::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::VocabTooSmall(_) | Error::InvalidPattern(_) | Error::Split(_) => {
                PyValueError::new_err(e.to_string())
            }
            Error::TooManyChunks | Error::Internal(_) => PyRuntimeError::new_err(e.to_string()),
        }
    }
}

/// A byte-level BPE tokenizer: train it on text, then read its merges as tiktoken-style ranks or encode with it.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    /// merge i made token 256 + i
    merges: Vec<Pair>,
    encoder: Encoder,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills `batch` with up to `size` documents from the iterator; returns false once it is exhausted.
fn next_batch(
    iterator: &mut Bound<'_, PyIterator>,
    batch: &mut Vec<String>,
    size: usize,
    seen: &mut usize,
) -> PyResult<bool> {
    batch.clear();
    while batch.len() < size {
        let Some(item) = iterator.next() else {
            return Ok(false);
        };
        let item = item?;
        let text = item.cast::<PyString>().map_err(|_| {
            let type_name = item
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            PyTypeError::new_err(format!(
                "train_from_iterator: item {} of the iterator is a {type_name}, expected str",
                *seen
            ))
        })?;
        batch.push(text.to_str()?.to_owned());
        *seen += 1;
    }
    Ok(true)
}

#[pymethods]
impl Tokenizer {
    #[new]
    pub fn new() -> Self {
        Self {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::default(),
            merges: Vec::new(),
            encoder: Encoder::new(&[]),
        }
    }

    /// Learns `vocab_size - 256` merges from the texts of `iterator` (fewer if the text runs out of pairs).
    /// `buffer_size` texts are read at a time; `pattern` (default: GPT-4's with `\p{N}{1,2}`) splits them.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    pub fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        let vocab_size = match u32::try_from(vocab_size) {
            Ok(v) if v >= 256 => v,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "vocab_size must be at least 256 (one token per byte) and at most {}, got {vocab_size}",
                    u32::MAX
                )))
            }
        };
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be at least 1, got {buffer_size}"
            )));
        }
        let buffer_size = buffer_size as usize;
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern)?;
        let mut iterator = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator needs an iterable of str, got {}",
                iterator
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "?".into())
            ))
        })?;

        // Double buffering: a scoped thread counts one batch (on all cores) while this thread, holding the GIL,
        // reads the next one from Python; then it waits for the count with the GIL released.
        let counter = ChunkCounter::new(splitter.clone());
        let mut seen = 0;
        std::thread::scope(|scope| -> PyResult<()> {
            let counter = &counter;
            // (capacity capped: buffer_size is the caller's, and the vectors grow as needed anyway)
            let mut batch = Vec::with_capacity(buffer_size.min(1 << 16));
            let mut next = Vec::with_capacity(buffer_size.min(1 << 16));
            let mut more = next_batch(&mut iterator, &mut batch, buffer_size, &mut seen)?;
            while !batch.is_empty() {
                let worker = scope.spawn(move || {
                    let result = counter.add_documents(&batch);
                    (batch, result)
                });
                let read_ahead = if more {
                    next_batch(&mut iterator, &mut next, buffer_size, &mut seen)
                } else {
                    Ok(false)
                };
                let (mut counted, result) = py
                    .detach(|| worker.join())
                    .map_err(|_| Error::Internal("the counting thread panicked"))?;
                result?;
                more = read_ahead?;
                counted.clear();
                batch = std::mem::replace(&mut next, counted);
            }
            Ok(())
        })?;
        let counts = counter.finish()?;
        let merges = py.detach(|| train::train(counts.iter(), vocab_size))?;
        self.encoder = Encoder::new(&merges);
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    /// The split pattern: the one given to the last training, else the default.
    pub fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Every token's bytes and rank (= token id): the 256 single bytes first, then the merges in training order.
    pub fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        encode::token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(id, bytes)| (PyBytes::new(py, bytes), id as u32))
            .collect()
    }

    /// The token ids of `text`.
    pub fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.encoder.encode(&self.splitter, text))?)
    }

    /// 256 + the number of merges learned.
    #[getter]
    pub fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    /// A small deterministic generator for property-style tests (splitmix64).
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in 0..n (n > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }
}
