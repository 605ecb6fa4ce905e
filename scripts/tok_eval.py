"""Evaluate the trained tokenizer's compression: UTF-8 bytes per token (higher = fewer tokens for the same text)
on several genres, next to GPT-2's and GPT-4's (cl100k) tokenizers when tiktoken can load them.

    python -m scripts.tok_eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tiktoken

from nanochat.common import get_base_dir
from nanochat.dataset import iter_documents_batched
from nanochat.tokenizer import Tokenizer
from report import TOKENIZER_EVALUATION, get_report

# -----------------------------------------------------------------------------
# Genre samples: short real texts, embedded so the evaluation needs no download

# Jane Austen, Pride and Prejudice (1813), chapter 1; Charles Dickens, A Tale of Two Cities (1859), opening.
PROSE = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want \
of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth \
is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one \
or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it \
was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness, \
it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us, we \
were all going direct to Heaven, we were all going direct the other way--in short, the period was so far like the \
present period, that some of its noisiest authorities insisted on its being received, for good or for evil, in the \
superlative degree of comparison only.
"""

# CPython's Lib/bisect.py (PSF license), then a small command-line program.
CODE = '''def bisect_right(a, x, lo=0, hi=None, *, key=None):
    """Return the index where to insert item x in list a, assuming a is sorted.

    The return value i is such that all e in a[:i] have e <= x, and all e in
    a[i:] have e > x.  So if x already appears in the list, a.insert(i, x) will
    insert just after the rightmost x already there.

    Optional args lo (default 0) and hi (default len(a)) bound the
    slice of a to be searched.
    """

    if lo < 0:
        raise ValueError('lo must be non-negative')
    if hi is None:
        hi = len(a)
    # Note, the comparison uses "<" to match the
    # __lt__() logic in list.sort() and in heapq.
    if key is None:
        while lo < hi:
            mid = (lo + hi) // 2
            if x < a[mid]:
                hi = mid
            else:
                lo = mid + 1
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if x < key(a[mid]):
                hi = mid
            else:
                lo = mid + 1
    return lo


import argparse
from collections import Counter
from pathlib import Path


def count_words(path: Path, top: int = 10) -> list[tuple[str, int]]:
    counts = Counter()
    with path.open(encoding="utf-8") as f:
        for line in f:
            counts.update(word.lower().strip(".,;:!?\\"'") for word in line.split())
    return counts.most_common(top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the most common words of a text file.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    for word, count in count_words(args.path, args.top):
        print(f"{count:8d}  {word}")
'''

MATH = r"""\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in a real inner product space $V$,
\[ |\langle u, v \rangle|^2 \le \langle u, u \rangle \, \langle v, v \rangle . \]
\end{theorem}

\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \frac{\langle u, v \rangle}{\langle v, v \rangle}$. Then
\[ 0 \le \| u - \lambda v \|^2 = \langle u, u \rangle - 2 \lambda \langle u, v \rangle + \lambda^2 \langle v, v \rangle
     = \langle u, u \rangle - \frac{\langle u, v \rangle^2}{\langle v, v \rangle}, \]
and multiplying by $\langle v, v \rangle > 0$ gives the claim.
\end{proof}

The Gaussian integral follows from polar coordinates:
\begin{align}
\left( \int_{-\infty}^{\infty} e^{-x^2} \, dx \right)^2
  &= \int_{\mathbb{R}^2} e^{-(x^2 + y^2)} \, dx \, dy
   = \int_0^{2\pi} \int_0^{\infty} e^{-r^2} r \, dr \, d\theta = \pi, \\
\sum_{k=1}^{n} k &= \frac{n(n+1)}{2}, \qquad \sum_{k=0}^{\infty} \frac{x^k}{k!} = e^x, \qquad e^{i\pi} + 1 = 0.
\end{align}
"""

# Franz Kafka, Die Verwandlung (1915), opening; Universal Declaration of Human Rights, articles 1-3.
GERMAN = """Als Gregor Samsa eines Morgens aus unruhigen Träumen erwachte, fand er sich in seinem Bett zu einem \
ungeheueren Ungeziefer verwandelt. Er lag auf seinem panzerartig harten Rücken und sah, wenn er den Kopf ein wenig \
hob, seinen gewölbten, braunen, von bogenförmigen Versteifungen geteilten Bauch, auf dessen Höhe sich die Bettdecke, \
zum gänzlichen Niedergleiten bereit, kaum noch erhalten konnte. Seine vielen, im Vergleich zu seinem sonstigen \
Umfang kläglich dünnen Beine flimmerten ihm hilflos vor den Augen.

Alle Menschen sind frei und gleich an Würde und Rechten geboren. Sie sind mit Vernunft und Gewissen begabt und \
sollen einander im Geist der Brüderlichkeit begegnen.

Jeder hat Anspruch auf die in dieser Erklärung verkündeten Rechte und Freiheiten ohne irgendeinen Unterschied, etwa \
nach Rasse, Hautfarbe, Geschlecht, Sprache, Religion, politischer oder sonstiger Überzeugung, nationaler oder \
sozialer Herkunft, Vermögen, Geburt oder sonstigem Stand.

Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person.
"""

# Universal Declaration of Human Rights, articles 1-3 (Korean).
KOREAN = """모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다. 인간은 천부적으로 이성과 양심을 \
부여받았으며 서로 형제애의 정신으로 행동하여야 한다.

모든 사람은 인종, 피부색, 성, 언어, 종교, 정치적 또는 기타의 견해, 민족적 또는 사회적 출신, 재산, 출생 또는 \
기타의 신분과 같은 어떠한 종류의 차별이 없이, 이 선언에 규정된 모든 권리와 자유를 향유할 자격이 있다.

모든 사람은 생명과 신체의 자유와 안전에 대한 권리를 가진다.
"""

# Universal Declaration of Human Rights, articles 1-3 (Chinese); the Analects, 1.1.
CHINESE = """人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。

人人有资格享有本宣言所载的一切权利和自由，不分种族、肤色、性别、语言、宗教、政治或其他见解、国籍或社会出身、财产、\
出生或其他身分等任何区别。

人人有权享有生命、自由和人身安全。

子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？
"""

GENRES = {"prose": PROSE, "code": CODE, "math": MATH, "german": GERMAN, "korean": KOREAN, "chinese": CHINESE}
REFERENCES = {"gpt2": "GPT-2", "cl100k_base": "cl100k"}

# -----------------------------------------------------------------------------


def shard_texts() -> dict[str, str]:
    """The first row group of the pretraining train and val splits, if the shards are there."""
    texts = {}
    for split in ("train", "val"):
        try:
            texts[f"shards-{split}"] = "\n".join(next(iter_documents_batched(split)))
        except (FileNotFoundError, StopIteration) as e:
            print(f"pretraining shards not available, {split} row skipped: {e}")
    return texts


def load_reference_encodings() -> dict[str, tiktoken.Encoding]:
    """GPT-2 and cl100k from tiktoken; it downloads them once (or reads $TIKTOKEN_CACHE_DIR), so offline they
    may be missing, and the comparison is then skipped rather than failing the evaluation."""
    encodings, missing = {}, []
    for name, label in REFERENCES.items():
        try:
            encodings[label] = tiktoken.get_encoding(name)
        except (OSError, ValueError):  # requests' ConnectionError is an OSError; a bad cached file a ValueError
            missing.append(label)
    if missing:
        verb = "encodings" if len(missing) > 1 else "encoding"
        print(f"{' / '.join(missing)} {verb} could not be loaded (no network and no TIKTOKEN_CACHE_DIR copy); "
              "comparison skipped")
    return encodings


def evaluate(tokenizer: Tokenizer, texts: dict[str, str], references: dict[str, tiktoken.Encoding]) -> list[dict]:
    rows = []
    for genre, text in texts.items():
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise RuntimeError(f"the tokenizer does not round-trip the {genre} sample: it is broken, retrain it")
        num_bytes = len(text.encode("utf-8"))
        row = {"genre": genre, "bytes": num_bytes, "tokens": len(ids), "bytes_per_token": num_bytes / len(ids)}
        for label, encoding in references.items():
            row[f"{label}_bytes_per_token"] = num_bytes / len(encoding.encode_ordinary(text))
        rows.append(row)
    return rows


def format_table(rows: list[dict], vocab_size: int, references: dict[str, tiktoken.Encoding]) -> str:
    headers = ["genre", "bytes", "tokens", f"ours ({vocab_size})"]
    headers += [f"{label} ({encoding.n_vocab})" for label, encoding in references.items()]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [row["genre"], str(row["bytes"]), str(row["tokens"]), f"{row['bytes_per_token']:.2f}"]
        cells += [f"{row[f'{label}_bytes_per_token']:.2f}" for label in references]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bytes per token of the trained tokenizer on several genres.")
    parser.add_argument("--tokenizer-dir", type=Path, help="default: $NANOCHAT_BASE_DIR/tokenizer")
    args = parser.parse_args(argv)
    try:
        tokenizer = Tokenizer.from_directory(args.tokenizer_dir or get_base_dir() / "tokenizer")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    texts = GENRES | shard_texts()
    references = load_reference_encodings()
    rows = evaluate(tokenizer, texts, references)
    table = format_table(rows, tokenizer.get_vocab_size(), references)
    print("Bytes per token (higher = better compression)")
    print(table)

    summary = {"vocab_size": tokenizer.get_vocab_size(), "fingerprint": tokenizer.fingerprint(),
               "compared_with": sorted(references) or "none (encodings unavailable)"}
    get_report().log(TOKENIZER_EVALUATION, [summary, "Bytes per token (higher = better compression)\n\n" + table])


if __name__ == "__main__":
    main()
