"""Benchmark the tokenizer trainer against its peers, and our encoder against tiktoken.

Trainers, each in its own process on the same text with the same split pattern:
  ours          this repo's `rustbpe` extension (build it first: `pip install -e .` in the repo root)
  rustbpe-0.1.0 PyPI's rustbpe 0.1.0, the original nanochat trainer
  hf            Hugging Face `tokenizers` BpeTrainer, byte-level, pre-tokenized by Split(pattern) + ByteLevel
For each vocab size it prints training wall time, peak RSS of the worker process and ours/peer ratios, then checks
whether our merges equal rustbpe 0.1.0's (same tie-break rule, so they should) and where they first differ if not.
Finally it measures encode throughput of ours vs a tiktoken.Encoding built from our ranks, and checks they agree.

The peers' package names collide with ours (`rustbpe`), so they live in their own venv, which this script creates
with pip under the cache dir ($NANOCHAT_BASE_DIR or ~/.cache/nanochat, then bench/). The corpus is built there too,
from the HTML of Debian's documentation packages (real technical prose); install them once with
    apt-get install -y python3.11-doc linux-doc-6.1 postgresql-doc-15 python-django-doc git-doc debian-handbook

Run (nice it: the machine is shared):
    nice python bench/tokenizer.py                       # vocab 4096 and 32768 on a 60 MB corpus
    nice python bench/tokenizer.py --vocab-sizes 32768 --trainers ours rustbpe-0.1.0
    nice python bench/tokenizer.py --repeats 3              # best of 3, on a machine shared with other work
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from multiprocessing import Pool
from pathlib import Path

# GPT-4's split pattern with numbers in runs of at most 2 digits: nanochat's SPLIT_PATTERN (copied, not imported, so
# the workers in the peers' venv need nothing from this repo).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
PEER_PACKAGES = ["rustbpe==0.1.0", "tokenizers"]
DOC_PACKAGES = "python3.11-doc linux-doc-6.1 postgresql-doc-15 python-django-doc git-doc debian-handbook"
HTML_ROOTS = ["/usr/share/doc/python3.11/html", "/usr/share/doc/linux-doc-*/html", "/usr/share/doc/postgresql-doc-*/html",
              "/usr/share/doc/python-django-doc/html", "/usr/share/doc/git-doc", "/usr/share/doc/debian-handbook/html/en-US"]
DOC_SEPARATOR = "\x1e"  # ASCII record separator: never in prose, so the corpus is one flat file of documents
DOC_TARGET_CHARS = 2000  # pages are cut into documents of about this size, like the web documents nanochat trains on
TRAINERS = ["ours", "rustbpe-0.1.0", "hf"]


def cache_dir() -> Path:
    base = Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat").expanduser()
    path = base / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -----------------------------------------------------------------------------
# The corpus: text of the documentation pages, main content only, cut into documents of ~2000 characters

class _PageText(HTMLParser):
    """Collects the text of a page, skipping scripts, styles and navigation. Sphinx pages mark their content with
    role="main"; where a page has one, only the text inside it counts."""

    BLOCK_TAGS = frozenset({"p", "div", "pre", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
                            "table", "blockquote", "br"})
    SKIP_CLASSES = frozenset({"navheader", "navfooter", "sphinxsidebar", "related", "footer", "headerlink"})

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.main_only = main_only
        self.main_depth = 0  # >0 while inside the role="main" element (counted in open divs)
        self.skip_depth = 0  # >0 while inside a skipped element
        self.skip_tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if self.skip_depth:
            self.skip_depth += tag == self.skip_tag
            return
        classes = set((attributes.get("class") or "").split())
        if tag in ("script", "style") or classes & self.SKIP_CLASSES:
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "div":
            if self.main_depth:
                self.main_depth += 1
            elif attributes.get("role") == "main":
                self.main_depth = 1
        if tag in self.BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_depth:
            self.skip_depth -= tag == self.skip_tag
            return
        if tag == "div" and self.main_depth:
            self.main_depth -= 1
        if tag in self.BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_depth and (self.main_depth or not self.main_only):
            self.parts.append(data)


def page_documents(path: str) -> list[str]:
    """The documents of one HTML page: its text, paragraphs packed into documents of ~DOC_TARGET_CHARS."""
    html = Path(path).read_text(encoding="utf-8", errors="replace")
    parser = _PageText(main_only='role="main"' in html)
    parser.feed(html)
    text = "".join(parser.parts).replace(DOC_SEPARATOR, " ")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    documents, current, size = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= DOC_TARGET_CHARS:
            documents.append("\n\n".join(current))
            current, size = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


def build_corpus(corpus_mb: int) -> Path:
    """The corpus file (documents separated by DOC_SEPARATOR), built once and cached."""
    path = cache_dir() / f"corpus_{corpus_mb}mb.txt"
    if path.exists():
        return path
    pages = sorted(str(p) for root in HTML_ROOTS for d in Path("/").glob(root.lstrip("/")) for p in d.rglob("*.html")
                   if not p.name.startswith(("genindex", "search", "py-modindex")))
    if not pages:
        sys.exit(f"no documentation HTML found under {HTML_ROOTS}: run `apt-get install -y {DOC_PACKAGES}`")
    print(f"building the corpus from {len(pages)} HTML pages -> {path}", flush=True)
    budget = corpus_mb * 1_000_000
    written = 0
    tmp = path.with_suffix(".tmp")
    with Pool() as pool, open(tmp, "w", encoding="utf-8", newline="") as out:
        for documents in pool.imap(page_documents, pages, chunksize=16):
            for document in documents:
                if written >= budget:
                    break
                out.write(document + DOC_SEPARATOR)
                written += len(document.encode()) + 1
    if written < budget:
        tmp.unlink()
        sys.exit(f"only {written / 1e6:.1f} MB of text in {HTML_ROOTS}, {corpus_mb} MB asked: install more "
                 f"documentation (`apt-get install -y {DOC_PACKAGES}`) or pass a smaller --corpus-mb")
    tmp.rename(path)
    return path


def iter_documents(path: Path, max_bytes: int | None = None):
    """Stream the documents of a corpus file; reading in 1 MB blocks keeps the corpus out of the workers' RSS."""
    seen = 0
    with open(path, encoding="utf-8", newline="") as f:
        rest = ""
        while block := f.read(1 << 20):
            parts = (rest + block).split(DOC_SEPARATOR)
            rest = parts.pop()
            for part in parts:
                yield part
                seen += len(part)
                if max_bytes is not None and seen >= max_bytes:
                    return
        if rest:
            yield rest


# -----------------------------------------------------------------------------
# Workers: one trainer per process, so each one's peak RSS is its own

def train_ours_or_rustbpe(corpus: Path, vocab_size: int) -> list[bytes]:
    import rustbpe

    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(iter_documents(corpus), vocab_size, pattern=SPLIT_PATTERN)
    return [bytes(token) for token, _ in sorted(tokenizer.get_mergeable_ranks(), key=lambda item: item[1])]


def train_hf(corpus: Path, vocab_size: int) -> list[bytes]:
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(iter_documents(corpus), trainer)
    # ByteLevel maps each byte to a printable character; undo it to get the tokens' bytes
    byte_of_char = {char: byte for byte, char in enumerate(_byte_level_chars())}
    vocab = tokenizer.get_vocab()
    return [bytes(byte_of_char[c] for c in token) for token, _ in sorted(vocab.items(), key=lambda item: item[1])]


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table that ByteLevel uses, indexed by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def run_worker(args: argparse.Namespace) -> None:
    corpus = Path(args.corpus)
    if args.worker == "encode":
        run_encode_worker(corpus, args.vocab_size, args.encode_mb)
        return
    start = time.perf_counter()
    train = train_hf if args.worker == "hf" else train_ours_or_rustbpe
    tokens = train(corpus, args.vocab_size)
    train_s = time.perf_counter() - start
    Path(args.out).write_text(json.dumps([t.hex() for t in tokens]))
    print(json.dumps({"train_s": train_s, "vocab": len(tokens)}))


def run_encode_worker(corpus: Path, vocab_size: int, encode_mb: float) -> None:
    import tiktoken

    import rustbpe

    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(iter_documents(corpus), vocab_size, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in tokenizer.get_mergeable_ranks()}
    encoding = tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    documents = list(iter_documents(corpus, max_bytes=int(encode_mb * 1e6)))
    n_bytes = sum(len(d.encode()) for d in documents)
    timings = {}
    outputs = {}
    for name, encode in [("ours", tokenizer.encode), ("tiktoken", encoding.encode_ordinary)]:
        start = time.perf_counter()
        outputs[name] = [encode(d) for d in documents]
        timings[name] = time.perf_counter() - start
    mismatches = sum(a != b for a, b in zip(outputs["ours"], outputs["tiktoken"]))
    print(json.dumps({"bytes": n_bytes, "ours_s": timings["ours"], "tiktoken_s": timings["tiktoken"],
                      "documents": len(documents), "mismatched_documents": mismatches,
                      "tokens": sum(map(len, outputs["ours"]))}))


# -----------------------------------------------------------------------------
# The driver: set up the peers' venv, run each worker, compare

def peers_python() -> Path:
    venv = cache_dir() / "venv-peers"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {' '.join(PEER_PACKAGES)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def run_in_process(python: Path, worker_args: list[str]) -> tuple[dict, float, float]:
    """Run one worker; returns its JSON result, wall seconds and peak RSS in MB (its own, via wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen([str(python), __file__, *worker_args], stdout=subprocess.PIPE)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"worker {worker_args} failed with exit code {process.returncode}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return result, wall, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def describe_difference(ours: list[bytes], peer: list[bytes]) -> str:
    if ours == peer:
        return f"identical ({len(ours)} tokens)"
    first = next((i for i, (a, b) in enumerate(zip(ours, peer)) if a != b), min(len(ours), len(peer)))
    if first == min(len(ours), len(peer)):
        return f"same for the first {first} tokens, then one list ends (ours {len(ours)}, peer {len(peer)})"
    a, b = ours[first], peer[first]
    where_a = peer.index(a) if a in peer else None
    where_b = ours.index(b) if b in ours else None
    if ours[first + 1:first + 2] == [b] and peer[first + 1:first + 2] == [a]:
        why = "the next two merges come in swapped order: most likely equal counts, with ties broken differently"
    elif set(ours) == set(peer):
        why = "the same tokens in a different order: ties broken differently, or counts that differ"
    else:
        why = "the vocabularies diverge from here"
    return (f"first difference at rank {first}: ours {a!r} (peer has it at {where_a}), peer {b!r} (ours has it at "
            f"{where_b}); {why}; shared tokens {len(set(ours) & set(peer))}/{len(ours)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--corpus-mb", type=int, default=60, help="size of the training text in MB")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=TRAINERS)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each trainer; the best time counts")
    parser.add_argument("--encode-mb", type=float, default=8.0, help="text to encode for the throughput test (0: skip)")
    parser.add_argument("--worker", choices=[*TRAINERS, "encode"], help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    corpus = build_corpus(args.corpus_mb)
    pythons = {"ours": Path(sys.executable)}
    if set(args.trainers) - {"ours"}:
        pythons["rustbpe-0.1.0"] = pythons["hf"] = peers_python()
    from nanochat.common import describe_cpu  # here: the workers run in the peers' venv, without nanochat

    print(f"machine: CPU {describe_cpu()}")
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for vocab_size in args.vocab_sizes:
        print(f"\n== vocab {vocab_size} ==")
        results, tokens = {}, {}  # trainer -> (best train s, highest peak RSS MB), trainer -> its tokens
        for _ in range(args.repeats):
            for trainer in args.trainers:  # interleaved, so a burst of load elsewhere hits every trainer alike
                out = cache_dir() / f"tokens_{trainer}_{vocab_size}.json"
                worker_args = ["--worker", trainer, "--vocab-size", str(vocab_size), "--corpus", str(corpus),
                               "--out", str(out)]
                result, wall, rss_mb = run_in_process(pythons[trainer], worker_args)
                tokens[trainer] = [bytes.fromhex(t) for t in json.loads(out.read_text())]
                print(f"{trainer:>14}: train {result['train_s']:6.2f} s  (process {wall:6.2f} s)  "
                      f"peak RSS {rss_mb:7.1f} MB  vocab {result['vocab']}", flush=True)
                best_s, most_rss = results.get(trainer, (float("inf"), 0.0))
                results[trainer] = (min(best_s, result["train_s"]), max(most_rss, rss_mb))
        if args.repeats > 1:
            for trainer, (best_s, most_rss) in results.items():
                print(f"{trainer:>14}: best of {args.repeats}: train {best_s:6.2f} s, highest peak RSS {most_rss:7.1f} MB")
        if "ours" in results:
            ours_s, ours_rss = results["ours"]
            for peer in sorted(results.keys() - {"ours"}):
                peer_s, peer_rss = results[peer]
                print(f"  ours vs {peer}: {peer_s / ours_s:.2f}x faster, RSS ratio ours/peer {ours_rss / peer_rss:.2f}")
        if "ours" in tokens and "rustbpe-0.1.0" in tokens:
            print(f"  merges, ours vs rustbpe-0.1.0: {describe_difference(tokens['ours'], tokens['rustbpe-0.1.0'])}")
        if "ours" in tokens and "hf" in tokens:
            # hf numbers its 256 byte tokens in its own order; line them up by byte value, then compare the merges
            hf = [bytes([b]) for b in range(256)] + tokens["hf"][256:]
            print(f"  merges, ours vs hf (its own tie-break rule): {describe_difference(tokens['ours'], hf)}")

    if args.encode_mb > 0:
        vocab_size = max(args.vocab_sizes)
        worker_args = ["--worker", "encode", "--vocab-size", str(vocab_size), "--corpus", str(corpus),
                       "--encode-mb", str(args.encode_mb)]
        result, _, _ = run_in_process(pythons["ours"], worker_args)
        mb = result["bytes"] / 1e6
        print(f"\n== encode, vocab {vocab_size}, {mb:.1f} MB in {result['documents']} documents, one thread ==")
        print(f"  ours {mb / result['ours_s']:.1f} MB/s, tiktoken {mb / result['tiktoken_s']:.1f} MB/s, "
              f"ours/tiktoken throughput {result['tiktoken_s'] / result['ours_s']:.2f}; "
              f"documents encoded differently: {result['mismatched_documents']}")


if __name__ == "__main__":
    main()
