//! Trains on a text file without Python and prints the time of each phase; for profiling (`perf record`).
//!
//!     cargo run --release --example train_file -- CORPUS [VOCAB_SIZE]
//!
//! Documents in CORPUS are separated by the ASCII record separator (0x1E), as in bench/tokenizer.py's corpus.

use std::time::Instant;

use rustbpe::count::ChunkCounter;
use rustbpe::split::{Splitter, DEFAULT_PATTERN};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: train_file CORPUS [VOCAB_SIZE]")?;
    let vocab_size: u32 = args.next().map(|v| v.parse()).transpose()?.unwrap_or(32768);
    let text = std::fs::read_to_string(&path)?;
    let documents: Vec<&str> = text.split('\u{1e}').collect();

    let start = Instant::now();
    let counter = ChunkCounter::new(Splitter::new(DEFAULT_PATTERN)?);
    for batch in documents.chunks(8192) {
        counter.add_documents(batch)?;
    }
    let counted = Instant::now();
    let counts = counter.finish()?;
    let merged = Instant::now();
    let merges = rustbpe::train::train(counts.iter(), vocab_size)?;
    let trained = Instant::now();
    println!(
        "{} MB, {} documents, {} unique chunks: split+count {:.2} s, merge tables {:.2} s, train {} merges {:.2} s",
        text.len() / 1_000_000,
        documents.len(),
        counts.len(),
        (counted - start).as_secs_f64(),
        (merged - counted).as_secs_f64(),
        merges.len(),
        (trained - merged).as_secs_f64(),
    );
    Ok(())
}
