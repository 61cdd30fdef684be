"""
prepare.py -- turn a text corpus into verified, memory-mapped token shards.

Where it sits:  bpe.py -> [prepare.py] -> model.py -> train.py -> sample.py
bpe.py knows how to split text into tokens; this file runs it over a whole corpus
(from 1 MB to larger than RAM) and writes the result as flat binary files that
train.py maps into memory and slices batches from, without parsing anything.

Run it:
    python prepare.py                                  # built-in corpus: this Python's stdlib (~13 MB, offline)
    python prepare.py --dataset=tinyshakespeare        # downloads 1 MB to data/downloads/, writes data/tinyshakespeare/
    python prepare.py --dataset=tinystories            # ~2 GB download, official validation file as val
    python prepare.py --input='books/*.txt' --doc_sep='\\n\\n\\n' --out_dir=data/books
    python prepare.py --input=a.txt --tokenizer=gpt2/encoder.json     # reuse GPT-2's tokenizer (vocab.bpe beside it)
    python prepare.py --bench=True                     # throughput benchmark (1 vs 2 processes) + end-to-end time
    python prepare.py --help                           # every setting with its default

What ends up in the data directory (default data/stdlib/):
    train_0000.bin, train_0001.bin, ...   token shards of the training split
    val_0000.bin, ...                     token shards of the validation split
    tokenizer.bpe                         the tokenizer (bpe.py's own file format)
    meta.json                             sources, counts per split, bytes per token, settings, fingerprint
meta.json is written last: it is the "commit marker". A data directory without it
(an interrupted run) is refused by the reader, never half-used.

Sections:
    1. Settings
    2. Finding the text: the built-in corpus, --input globs, documents
    3. Downloads: resumable, retried, checked
    4. The shard format: header, writer, reader API (open_shard, load_split, load_meta, load_tokenizer)
    5. Train/val split by document hash
    6. The tokenizer: train one or load one
    7. Tokenizing in parallel, in bounded memory
    8. The whole build: reuse, write, meta.json
    9. Benchmark
   10. main
"""
import codecs
import dataclasses
import datetime
import glob
import hashlib
import http.client
import json
import multiprocessing
import os
import struct
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque

import numpy as np

import bpe

# -----------------------------------------------------------------------------
# 1. Settings


@dataclasses.dataclass
class Settings:
    dataset: str = ""            # "" = built-in stdlib corpus (or --input); tinyshakespeare | tinystories download
    input: str = ""              # comma-separated globs/dirs of local text files, e.g. 'books/*.txt,notes/'
    doc_sep: str = ""            # split files into documents on this string ('' = one document per file); \n \t ok
    val_input: str = ""          # globs of files whose documents form the val split (instead of --val_fraction)
    val_fraction: float = 0.01   # share of documents held out for validation (hash of content; at least 1 doc)
    out_dir: str = ""            # '' = data/stdlib, data/<dataset> or data/custom (for --input)
    download_dir: str = "data/downloads"  # cache for --dataset downloads (kept between runs)
    vocab_size: int = 4096       # BPE vocabulary size to train, specials included
    tokenizer: str = ""          # reuse a tokenizer instead: our .bpe file, or GPT-2 encoder.json (vocab.bpe beside it)
    tokenizer_max_mb: float = 64.0  # train the BPE on a hash sample of about this many MB of train text (0 = all)
    max_doc_tokens: int = 0      # truncate documents to this many tokens, BOS included (0 = no limit)
    shard_tokens: int = 50_000_000  # tokens per shard file (documents may continue into the next shard)
    dtype: str = "auto"          # token dtype on disk: auto (uint16 when the vocab fits) | uint16 | uint32
    num_proc: int = 0            # tokenizer worker processes (0 = one per CPU core)
    chunk_mb: float = 1.0        # MB of text per worker task (bounds memory: a few tasks are in flight)
    force: bool = False          # rebuild even if the data directory is up to date
    bench: bool = False          # measure tokenize-and-write MB/s (1 vs 2 processes) and end-to-end time
    bench_reps: int = 3          # repetitions per benchmark configuration (medians are reported)
    bench_synthetic_mb: int = 0  # with --bench: instead, build a corpus this big (1000 = 1 GB) and report peak RSS

    def __post_init__(self):
        if self.dataset and self.dataset not in DATASETS:
            raise ValueError(f"--dataset={self.dataset}: choose one of {', '.join(DATASETS)} "
                             f"(or leave it empty and give --input=GLOB)")
        if self.dataset and self.input:
            raise ValueError("give either --dataset or --input, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction={self.val_fraction}: must be in [0, 1), e.g. 0.01")
        if self.vocab_size < 257:
            raise ValueError(f"--vocab_size={self.vocab_size}: must be at least 257 (256 bytes + <|endoftext|>)")
        if self.dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"--dtype={self.dtype}: choose auto, uint16 or uint32")
        if self.shard_tokens < 1 or self.max_doc_tokens < 0 or self.num_proc < 0:
            raise ValueError("--shard_tokens must be >= 1, --max_doc_tokens and --num_proc >= 0")
        if self.chunk_mb <= 0 or self.tokenizer_max_mb < 0 or self.bench_reps < 1:
            raise ValueError("--chunk_mb must be > 0, --tokenizer_max_mb >= 0, --bench_reps >= 1")
        # The command line gives '\n' as two characters; documents are usually separated
        # by real newlines, so the common escapes are turned into the characters they name.
        for escape, char in (("\\n", "\n"), ("\\t", "\t"), ("\\r", "\r")):
            self.doc_sep = self.doc_sep.replace(escape, char)


def resolve_out_dir(s):
    """Where the shards go when --out_dir is not given."""
    if s.out_dir:
        return s.out_dir
    if s.dataset:
        return os.path.join("data", s.dataset)
    return os.path.join("data", "custom" if s.input else "stdlib")


def resolve_num_proc(n):
    """0 means one worker per CPU core this process may run on."""
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


# -----------------------------------------------------------------------------
# 2. Finding the text: the built-in corpus, --input globs, documents
#
# A *document* is the unit the model sees between two BOS tokens and the unit of
# the train/val split: one file, or one piece of a file cut at --doc_sep.
# Everything here streams: a file is read in blocks, and only the current
# document (at most MAX_DOC_BYTES) is held in memory.

STDLIB_SKIP_DIRS = {"test", "tests", "site-packages", "__pycache__"}  # tests are huge and repetitive
BINARY_SNIFF_BYTES = 8192            # like git: a NUL byte in the first 8 KB means "binary"
READ_BLOCK_CHARS = 1 << 20           # characters per read() when splitting a file on --doc_sep
MAX_DOC_BYTES = 64 << 20             # one document must fit in a worker's memory (with its token list)
MB = 1e6


def stdlib_files():
    """The built-in corpus: *.py under the running interpreter's stdlib, tests and
    site-packages excluded, sorted by path (so every machine sees the same order).
    Returns (root, [paths])."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return root, sorted(paths, key=lambda p: os.path.relpath(p, root))


def is_binary(path):
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def resolve_globs(spec, what="--input"):
    """'a/*.txt,b/' -> sorted, de-duplicated list of text files. A directory means
    every file below it. One-line errors for the ways this goes wrong."""
    paths = []
    for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise bpe.UserError(f"{what}: '{pattern}' matches no files; check the path (quote globs in the shell)")
        for m in matches:
            if os.path.isdir(m):
                for dirpath, dirnames, filenames in os.walk(m):
                    dirnames.sort()
                    paths += [os.path.join(dirpath, f) for f in sorted(filenames)]
            else:
                paths.append(m)
    paths = list(dict.fromkeys(paths))  # keep order, drop repeats (two globs matching one file)
    if not paths:
        raise bpe.UserError(f"{what}={spec}: found no files (empty directories?)")
    text = [p for p in paths if not is_binary(p)]
    if not text:
        raise bpe.UserError(f"{what}={spec}: all {len(paths)} files look binary (NUL bytes); give text files")
    if len(text) < len(paths):
        print(f"skipping {len(paths) - len(text)} binary file(s) under {what}", file=sys.stderr)
    if sum(os.path.getsize(p) for p in text) == 0:
        raise bpe.UserError(f"{what}={spec}: all {len(text)} files are empty; give files with text in them")
    return text


class ReplacementCounter:
    """Decodes UTF-8 with U+FFFD for invalid bytes, and counts how often it had to.

    Python's built-in errors="replace" does the same substitution but keeps no
    count; we register our own error handler that substitutes and counts, so the
    user learns that (say) 12 characters in a Latin-1 file were garbled."""
    count = 0

    @classmethod
    def handler(cls, err):
        cls.count += 1
        return "\ufffd", err.end

    @classmethod
    def name(cls):
        name = "nanostack_count_replace"
        try:
            codecs.lookup_error(name)
        except LookupError:  # first use in this process: register (no import-time side effect)
            codecs.register_error(name, cls.handler)
        return name


def iter_documents(paths, doc_sep=""):
    """Yield the documents of the given files, in order.

    doc_sep == "": each file is one document, verbatim.
    doc_sep given: each file is cut at every occurrence of doc_sep; the pieces are
    stripped of surrounding whitespace (the separator's padding) and empty pieces are
    dropped. Example: "a\\n<sep>\\nb\\n<sep>" with doc_sep="<sep>" -> "a", "b".
    The file is read in blocks, so a 2 GB file never sits in memory at once."""
    errors = ReplacementCounter.name()
    for path in paths:
        with open(path, encoding="utf-8", errors=errors, newline="") as f:
            if not doc_sep:
                text = f.read(MAX_DOC_BYTES + 1)
                if len(text) > MAX_DOC_BYTES:
                    raise bpe.UserError(f"{path} is over {MAX_DOC_BYTES // (1 << 20)} MB as one document; "
                                        f"split it into documents with --doc_sep (e.g. --doc_sep='\\n\\n')")
                if text:
                    yield text
                continue
            tail = ""
            while True:
                block = f.read(READ_BLOCK_CHARS)
                if not block:
                    break
                # Only the tail (the unfinished document) is carried; search from where
                # a separator could start so a long document is not rescanned per block.
                search_from = max(0, len(tail) - len(doc_sep) + 1)
                tail += block
                if tail.find(doc_sep, search_from) < 0:
                    if len(tail) > MAX_DOC_BYTES:
                        raise bpe.UserError(f"{path}: a document longer than {MAX_DOC_BYTES // (1 << 20)} MB "
                                            f"(no --doc_sep={doc_sep!r} found); check --doc_sep")
                    continue
                *pieces, tail = tail.split(doc_sep)
                for piece in pieces:
                    piece = piece.strip()
                    if piece:
                        yield piece
            if tail.strip():
                yield tail.strip()


# -----------------------------------------------------------------------------
# 3. Downloads: resumable, retried, checked
#
# urllib only. The file grows as <name>.part; an interrupted download resumes with
# an HTTP Range request from where it stopped. Only a complete file whose size and
# sha256 match (when we know them) is renamed to its final name, so the cache never
# holds a file that looks done but is not.


PROGRESS_EVERY_S = 1.0       # seconds between progress lines on a terminal (10x that in a log file)


class Progress:
    """'tokenizing 12.0/50.3 MB  8.1 MB/s  ETA 5 s' on stderr, at most once a second
    (rewritten in place on a terminal, one line per 10 s in a log file)."""

    def __init__(self, label, total_bytes):
        self.label, self.total, self.done = label, total_bytes, 0
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, nbytes, final=False):
        self.done += nbytes
        now = time.time()
        if not final and now - self.last < (PROGRESS_EVERY_S if self.tty else 10 * PROGRESS_EVERY_S):
            return
        self.last = now
        rate = self.done / MB / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / MB / rate if rate > 0 else 0.0
        line = (f"{self.label} {self.done / MB:.1f}/{self.total / MB:.1f} MB  {rate:.1f} MB/s  "
                f"ETA {eta:.0f} s")
        print(("\r" + line) if self.tty else line, end="\n" if (final or not self.tty) else "",
              file=sys.stderr, flush=True)


@dataclasses.dataclass
class Remote:
    url: str
    name: str                # file name inside --download_dir
    size: int = 0            # bytes, 0 = unknown
    sha256: str = ""         # hex digest, "" = unknown (printed after download so it can be pinned)


HF_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
DATASETS = {
    # Karpathy's char-rnn tiny Shakespeare: one 1.1 MB file. Documents = speeches
    # (blank-line separated), so the hash split holds out whole speeches.
    "tinyshakespeare": dict(
        train=[Remote("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                      "tinyshakespeare.txt", 1115394,
                      "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")],
        val=[], doc_sep="\n\n"),
    # TinyStories (Eldan & Li 2023), GPT-4 generated stories; the official -valid
    # file is the val split so numbers compare with other projects.
    "tinystories": dict(
        train=[Remote(HF_TINYSTORIES + "TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-train.txt")],
        val=[Remote(HF_TINYSTORIES + "TinyStoriesV2-GPT4-valid.txt", "TinyStoriesV2-GPT4-valid.txt")],
        doc_sep="<|endoftext|>"),
}
DOWNLOAD_RETRIES = 5          # attempts per file before giving up
DOWNLOAD_BACKOFF_S = 2.0      # wait 2, 4, 8, ... seconds between attempts
DOWNLOAD_TIMEOUT_S = 30       # socket timeout per request
DOWNLOAD_BLOCK = 1 << 20      # bytes per read


class TransientError(Exception):
    """A download failure worth retrying (network hiccup, 5xx, short read)."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(DOWNLOAD_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_into(url, part):
    """One attempt: append the rest of url to the file part (resuming from its size).
    Returns the total size the server announced (0 if unknown)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "nanostack-prepare"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # "range not satisfiable": we already have every byte
            return have
        if e.code >= 500 or e.code in (408, 429):
            raise TransientError(f"HTTP {e.code}") from None
        raise bpe.UserError(f"download of {url} failed: HTTP {e.code} {e.reason}; check the URL") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # offline, refused, reset
        raise TransientError(str(getattr(e, "reason", e))) from None
    with response:
        if have and response.status == 206:
            mode = "ab"  # the server honoured Range: append
        else:
            mode, have = "wb", 0  # plain 200: the server sends everything again
        length = int(response.headers.get("Content-Length") or 0)
        total = have + length if length else 0
        progress = Progress("downloading", length or 1)
        try:
            with open(part, mode) as f:
                for block in iter(lambda: response.read(DOWNLOAD_BLOCK), b""):
                    f.write(block)
                    progress.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:  # the .part keeps what arrived
            raise TransientError(str(e)) from None
    progress.update(0, final=True)
    got = os.path.getsize(part)
    if total and got < total:
        raise TransientError(f"connection closed after {got} of {total} bytes")
    return total


def download(remote, directory, retries=DOWNLOAD_RETRIES, backoff=DOWNLOAD_BACKOFF_S, log=print):
    """Download remote into directory (once) and return the local path.

    A finished file is reused when its size/sha256 match. A <name>.part left by an
    interrupted run is resumed. Failures are retried with exponential back-off; if
    every attempt fails (offline), one UserError line says what to do instead."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, remote.name)
    part = path + ".part"
    if os.path.exists(path) and (not remote.size or os.path.getsize(path) == remote.size):
        log(f"using cached {path}")
        return path
    for attempt in range(retries):
        try:
            resumed = os.path.getsize(part) if os.path.exists(part) else 0
            log(f"downloading {remote.url} -> {path}" + (f" (resuming at {resumed} bytes)" if resumed else ""))
            _fetch_into(remote.url, part)
            break
        except TransientError as e:
            if attempt == retries - 1:
                raise bpe.UserError(
                    f"could not download {remote.url} after {retries} attempts ({e}); are you offline? "
                    f"put the file at {path} yourself, or use the offline default corpus (no --dataset)") from None
            wait = backoff * 2 ** attempt
            log(f"download failed ({e}); retrying in {wait:.0f} s")
            time.sleep(wait)
    size = os.path.getsize(part)
    if remote.size and size != remote.size:
        os.remove(part)
        raise bpe.UserError(f"{remote.url}: got {size} bytes, expected {remote.size}; the file was deleted, "
                            f"re-run to download it again")
    digest = sha256_file(part)
    if remote.sha256 and digest != remote.sha256:
        os.remove(part)
        raise bpe.UserError(f"{remote.url}: sha256 {digest[:16]}... does not match the expected "
                            f"{remote.sha256[:16]}...; the file was deleted, re-run to download it again")
    os.replace(part, path)
    log(f"downloaded {path} ({size / MB:.1f} MB, sha256 {digest})")
    return path


# -----------------------------------------------------------------------------
# 4. The shard format: header, writer, reader API
#
# One shard file, little-endian throughout:
#
#     offset 0                 256-byte header (struct SHARD_HEADER, zero padded)
#     offset 256               n_tokens token ids, uint16 or uint32
#     offset 256 + n_tokens*w  n_docs int64 document start offsets (the doc index)
#
# The header carries a magic string (so a foreign file is refused), the format
# version, the token width w, the counts, the vocab size, the BOS id and the
# tokenizer fingerprint (so shards made with another tokenizer are refused). The
# exact file size follows from the header, so a truncated copy is detected without
# reading it. The document index at the end lets train.py know where documents
# start without scanning tokens; each listed offset holds a BOS token. A document
# may run past the end of a shard and continue at offset 0 of the next one (shards
# are filled to exactly --shard_tokens), in which case that shard's index does not
# list offset 0.

SHARD_MAGIC = b"NANOSTK1"
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256
# magic, version, itemsize, n_tokens, n_docs, vocab_size, bos_id, fingerprint (64 hex chars)
SHARD_HEADER = struct.Struct("<8sIIQQII64s")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # itemsize -> on-disk dtype
UINT16_VOCAB_LIMIT = 1 << 16                      # ids 0..65535 fit in uint16


class ShardError(bpe.UserError):
    """A shard (or data directory) that cannot be used; the message names the file
    and says to re-run prepare.py."""


@dataclasses.dataclass
class Shard:
    path: str
    tokens: np.ndarray       # (n_tokens,) read-only np.memmap, uint16/uint32
    doc_starts: np.ndarray   # (n_docs,) int64 offsets into tokens where a document's BOS sits
    header: dict             # version, dtype, n_tokens, n_docs, vocab_size, bos_id, fingerprint


def choose_dtype(vocab_size, requested="auto"):
    """uint16 when every id fits (vocab <= 65536), else uint32; refuse impossible requests."""
    if requested == "uint32" or (requested == "auto" and vocab_size > UINT16_VOCAB_LIMIT):
        return DTYPES[4]
    if vocab_size > UINT16_VOCAB_LIMIT:
        raise bpe.UserError(f"--dtype=uint16 cannot hold a vocab of {vocab_size} (max {UINT16_VOCAB_LIMIT}); "
                            f"use --dtype=uint32 or auto")
    return DTYPES[2]


def pack_header(dtype, n_tokens, n_docs, vocab_size, bos_id, fingerprint):
    fp = fingerprint.encode("ascii")
    assert len(fp) <= 64, "fingerprint must be at most 64 ASCII characters (sha256 hex)"
    raw = SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, n_tokens, n_docs,
                            vocab_size, bos_id, fp)
    return raw.ljust(SHARD_HEADER_BYTES, b"\0")


class ShardWriter:
    """Appends documents' tokens to <split>_0000.bin, <split>_0001.bin, ... .

    Each shard grows under a hidden temporary name (.train_0000.bin.tmp<pid>) and is
    renamed to its real name only after its header and index are written and
    fsync'ed. Use as a context manager: on an exception the temporary file is deleted,
    so an interrupted run leaves no shard that looks valid."""

    def __init__(self, out_dir, split, dtype, shard_tokens, vocab_size, bos_id, fingerprint):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.bos_id, self.fingerprint = bos_id, fingerprint
        self.names = []          # finished shard file names
        self.n_tokens = 0        # tokens written so far, all shards
        self._file = None        # current temporary file
        self._tmp = None
        self._n = 0              # tokens in the current shard
        self._starts = []        # doc start offsets in the current shard (arrays)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self):
        name = f"{self.split}_{len(self.names):04d}.bin"
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * SHARD_HEADER_BYTES)  # placeholder; the real header comes last
        self._n, self._starts = 0, []

    def _write_tokens(self, tokens):
        self._file.write(tokens.tobytes())

    def _finish(self):
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        self._file.write(starts.astype("<i8").tobytes())
        self._file.seek(0)
        self._file.write(pack_header(self.dtype, self._n, len(starts), self.vocab_size,
                                     self.bos_id, self.fingerprint))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = f"{self.split}_{len(self.names):04d}.bin"
        os.replace(self._tmp, os.path.join(self.out_dir, name))
        self.names.append(name)
        self._file = self._tmp = None

    def add(self, tokens, doc_lengths):
        """tokens: (N,) ids of whole documents back to back, each starting with BOS;
        doc_lengths: (D,) their lengths (sum = N)."""
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)  # (D,) in tokens
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            take = min(self.shard_tokens - self._n, len(tokens) - pos)
            self._write_tokens(tokens[pos:pos + take])
            lo, hi = np.searchsorted(starts, [pos, pos + take])  # documents starting in this slice
            self._starts.append(starts[lo:hi] - pos + self._n)
            self._n += take
            self.n_tokens += take
            pos += take
            if self._n == self.shard_tokens:
                self._finish()

    def close(self):
        if self._file is not None:
            self._finish()
        return self.names

    def abort(self):
        """Delete everything this writer made, finished shards included: a half-done
        split is useless, and leaving its first shards would only invite mistakes."""
        if self._file is not None:
            self._file.close()
            os.remove(self._tmp)
            self._file = self._tmp = None
        for name in self.names:
            path = os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        self.names = []


def read_header(path):
    """The header of a shard as a dict; ShardError if it is not one of ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(SHARD_HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror}); re-run prepare.py") from None
    if len(raw) < SHARD_HEADER_BYTES or raw[:8] != SHARD_MAGIC:
        raise ShardError(f"{path}: not a nanostack token shard (bad magic); re-run prepare.py")
    magic, version, itemsize, n_tokens, n_docs, vocab_size, bos_id, fp = SHARD_HEADER.unpack_from(raw)
    if version != SHARD_VERSION or itemsize not in DTYPES:
        raise ShardError(f"{path}: shard format version {version} / width {itemsize} is not "
                         f"{SHARD_VERSION} / 2 or 4; re-run prepare.py --force")
    return dict(version=version, dtype=DTYPES[itemsize].name, n_tokens=n_tokens, n_docs=n_docs,
                vocab_size=vocab_size, bos_id=bos_id, fingerprint=fp.rstrip(b"\0").decode("ascii"))


def open_shard(path, expected_fingerprint=None):
    """Map a shard into memory after checking its header, size and fingerprint.

    Costs O(n_docs), not O(n_tokens): the tokens are memory-mapped (pages are read
    when train.py touches them), only the small document index is read."""
    h = read_header(path)
    itemsize = np.dtype(h["dtype"]).itemsize
    expected_size = SHARD_HEADER_BYTES + h["n_tokens"] * itemsize + h["n_docs"] * 8
    size = os.path.getsize(path)
    if size != expected_size:
        raise ShardError(f"{path}: file is {size} bytes but its header says {expected_size} "
                         f"(truncated or corrupt); re-run prepare.py --force")
    if expected_fingerprint is not None and h["fingerprint"] != expected_fingerprint:
        raise ShardError(f"{path}: made with tokenizer {h['fingerprint'][:12]}, expected "
                         f"{expected_fingerprint[:12]}; re-run prepare.py --force with this tokenizer")
    if h["n_tokens"] == 0:
        raise ShardError(f"{path}: shard holds no tokens; re-run prepare.py --force")
    tokens = np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=SHARD_HEADER_BYTES,
                       shape=(h["n_tokens"],))
    doc_starts = np.fromfile(path, dtype="<i8", count=h["n_docs"],
                             offset=SHARD_HEADER_BYTES + h["n_tokens"] * itemsize).astype(np.int64)
    # The index is cheap to verify: sorted, in range, and every entry points at a BOS.
    if len(doc_starts) and (np.any(np.diff(doc_starts) <= 0) or doc_starts[0] < 0
                            or doc_starts[-1] >= h["n_tokens"]
                            or np.any(tokens[doc_starts] != h["bos_id"])):
        raise ShardError(f"{path}: document index does not match the tokens (corrupt); "
                         f"re-run prepare.py --force")
    return Shard(path=path, tokens=tokens, doc_starts=doc_starts, header=h)


def load_meta(data_dir):
    """meta.json of a prepared data directory (written last, so its presence means
    the build finished)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise ShardError(f"{path} not found: the data is missing or its build was interrupted; "
                         f"run prepare.py (its --out_dir must match --data_dir)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot be read ({e}); re-run prepare.py --force") from None


def load_split(data_dir, split, expected_fingerprint=None):
    """Open every shard of one split ('train' or 'val'), in order.

    The shards must match meta.json's tokenizer fingerprint and, if given,
    expected_fingerprint (e.g. the one stored in a checkpoint being resumed)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = load_meta(data_dir)
    names = meta["splits"][split]["shards"]
    if not names:
        raise ShardError(f"{data_dir}: the {split} split has no shards; re-run prepare.py --force")
    if expected_fingerprint is not None and expected_fingerprint != meta["fingerprint"]:
        raise ShardError(f"{data_dir}: data was tokenized with {meta['fingerprint'][:12]}, expected "
                         f"{expected_fingerprint[:12]}; re-run prepare.py --force with the matching tokenizer")
    return [open_shard(os.path.join(data_dir, n), meta["fingerprint"]) for n in names]


def load_tokenizer(data_dir):
    """The tokenizer the shards were made with (the file named in meta.json)."""
    meta = load_meta(data_dir)
    tok = bpe.Tokenizer.load(os.path.join(data_dir, meta["tokenizer"]))
    if tok.fingerprint != meta["fingerprint"]:
        raise ShardError(f"{os.path.join(data_dir, meta['tokenizer'])}: fingerprint does not match meta.json; "
                         f"re-run prepare.py --force")
    return tok


# -----------------------------------------------------------------------------
# 5. Train/val split by document hash
#
# A document goes to val when a hash of its *content* falls below val_fraction:
#     u = int(blake2b(utf8(doc))[:8]) / 2**64,   val  <=>  u < val_fraction
# Deterministic (no RNG, no order dependence: adding files never moves other
# documents between splits), and exact duplicates always land in the same split,
# so val never contains a verbatim copy of a train document. Bytes 8..16 of the
# same digest give an independent number used to sample text for BPE training.
# If no document falls below the fraction (tiny corpora), the one with the smallest
# u goes to val, so val is never empty.

HASH_SCALE = float(1 << 64)


def doc_hash(text):
    """-> (u_split, u_sample), two independent numbers in [0, 1) from the content."""
    d = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little") / HASH_SCALE, int.from_bytes(d[8:], "little") / HASH_SCALE


@dataclasses.dataclass
class Scan:
    """What one cheap pass over the corpus learns before anything is written."""
    docs: int = 0
    bytes: int = 0
    val_docs: int = 0
    min_u: float = 1.0        # smallest u_split seen (the fallback val document)
    replaced: int = 0         # characters that were not valid UTF-8


def scan_corpus(paths, doc_sep, val_fraction, log):
    ReplacementCounter.count = 0
    scan = Scan()
    t0 = time.time()
    for text in iter_documents(paths, doc_sep):
        u, _ = doc_hash(text)
        scan.docs += 1
        scan.bytes += len(text.encode("utf-8", errors="surrogatepass"))
        scan.val_docs += u < val_fraction
        scan.min_u = min(scan.min_u, u)
    scan.replaced = ReplacementCounter.count
    if scan.docs == 0:
        raise bpe.UserError("the inputs contain no documents (only whitespace?); give files with text in them")
    log(f"scanned {scan.docs:,} documents, {scan.bytes / MB:.1f} MB in {time.time() - t0:.1f} s")
    if scan.replaced:
        log(f"warning: {scan.replaced:,} characters were not valid UTF-8 and were replaced by U+FFFD")
    return scan


def make_is_val(scan, val_fraction, has_val_input):
    """The split rule as a function of u_split (see the section comment)."""
    if has_val_input:
        return lambda u: False  # val comes from --val_input; every main document trains
    if scan.docs < 2:
        raise bpe.UserError("the corpus is a single document, so it cannot be split into train and val; "
                            "cut it with --doc_sep (e.g. --doc_sep='\\n\\n') or give --val_input=GLOB")
    if scan.val_docs == scan.docs:
        raise bpe.UserError(f"all {scan.docs} documents fell into val; lower --val_fraction={val_fraction}")
    if scan.val_docs == 0:
        return lambda u: u < val_fraction or u == scan.min_u
    return lambda u: u < val_fraction


# -----------------------------------------------------------------------------
# 6. The tokenizer: train one or load one


def tokenizer_files(spec):
    """--tokenizer=PATH -> the file(s) it names: [our .bpe file], or GPT-2's
    [encoder.json, vocab.bpe] (given as the .json, a directory holding both, or
    'encoder.json,vocab.bpe')."""
    if "," in spec:
        paths = [p.strip() for p in spec.split(",", 1)]
    elif os.path.isdir(spec):
        paths = [os.path.join(spec, "encoder.json"), os.path.join(spec, "vocab.bpe")]
    elif spec.endswith(".json"):
        paths = [spec, os.path.join(os.path.dirname(spec), "vocab.bpe")]
    else:
        paths = [spec]
    for p in paths:
        if not os.path.isfile(p):
            need = " (GPT-2 needs encoder.json and vocab.bpe)" if len(paths) == 2 else ""
            raise bpe.UserError(f"--tokenizer={spec}: {p} not found{need}")
    return paths


def load_tokenizer_arg(spec):
    """Load the tokenizer named by --tokenizer (see tokenizer_files)."""
    paths = tokenizer_files(spec)
    if len(paths) == 1:
        return bpe.Tokenizer.load(paths[0])  # raises UserError on a bad file
    try:
        return bpe.Tokenizer.from_gpt2(*paths)
    except bpe.UserError:
        raise
    except Exception as e:  # json/format errors from foreign files
        raise bpe.UserError(f"--tokenizer={spec}: not a valid GPT-2 encoder.json/vocab.bpe pair "
                            f"({type(e).__name__}: {e})") from None


def train_tokenizer(paths, doc_sep, is_val, scan, s, num_proc, log, quiet=False):
    """Train a BPE on (a deterministic sample of) the training documents only, so the
    tokenizer has never seen the validation text either."""
    train_bytes = max(1, scan.bytes)
    fraction = 1.0 if s.tokenizer_max_mb == 0 else min(1.0, s.tokenizer_max_mb * MB / train_bytes)

    def texts():
        for text in iter_documents(paths, doc_sep):
            u, v = doc_hash(text)
            if not is_val(u) and v < fraction:
                yield text

    t0 = time.time()
    log(f"training BPE, vocab {s.vocab_size}, on {100 * fraction:.0f}% of the training text")
    tok = bpe.Tokenizer.train(texts(), s.vocab_size, num_proc=num_proc, quiet=quiet)
    log(f"trained tokenizer in {time.time() - t0:.1f} s (vocab {tok.vocab_size})")
    return tok


def check_tokenizer(tok, where):
    if getattr(tok, "eot_id", None) is None:
        raise bpe.UserError(f"{where}: the tokenizer has no {bpe.EOT} token, which marks document starts; "
                            f"use one trained with it")
    return tok


# -----------------------------------------------------------------------------
# 7. Tokenizing in parallel, in bounded memory
#
# The main process reads documents and cuts them into tasks of about --chunk_mb MB;
# worker processes encode them and send back flat numpy arrays; the main process
# writes them in order. At most MAX_TASKS_PER_WORKER tasks per worker are in
# flight, so memory is bounded by a few chunks whatever the corpus size (Pool.imap
# would read the whole input ahead into its queue). Order is preserved, so 1 and N
# processes write identical shards.
#
# Every document becomes [BOS] + encode_ordinary(text): the BOS id is added here,
# never parsed from the text, so a document that *contains* the string
# "<|endoftext|>" cannot fake a document boundary.

MAX_TASKS_PER_WORKER = 2

_worker = {}  # per-process state: tokenizer, bos id, max tokens, dtype


def _worker_init(tok, max_doc_tokens, dtype_str):
    # With the "fork" start method (Linux) the tokenizer arrives as a copy-on-write
    # copy of ours, encode cache included; with "spawn" it is pickled (caches empty).
    _worker.update(tok=tok, bos=tok.eot_id, max=max_doc_tokens, dtype=np.dtype(dtype_str))


def _encode_task(texts):
    """Encode a list of documents -> (tokens (N,), lengths (D,), n_truncated)."""
    tok, bos, cap, dtype = _worker["tok"], _worker["bos"], _worker["max"], _worker["dtype"]
    arrays, lengths, truncated = [], [], 0
    for text in texts:
        ids = tok.encode_ordinary(text)
        if cap and len(ids) + 1 > cap:
            ids, truncated = ids[:cap - 1], truncated + 1
        a = np.empty(len(ids) + 1, dtype=dtype)
        a[0] = bos
        a[1:] = ids
        arrays.append(a)
        lengths.append(len(a))
    return np.concatenate(arrays), np.array(lengths, dtype=np.int64), truncated


def iter_tasks(streams, chunk_bytes):
    """streams: [(split or None, doc iterator)], where None means "decide by hash".
    Yields (texts, splits, doc_bytes) with about chunk_bytes of text in all."""
    texts, splits, doc_bytes, total = [], [], [], 0
    for split, docs in streams:
        for text in docs:
            texts.append(text)
            splits.append(split)
            doc_bytes.append(len(text.encode("utf-8", errors="surrogatepass")))
            total += doc_bytes[-1]
            if total >= chunk_bytes:
                yield texts, splits, doc_bytes
                texts, splits, doc_bytes, total = [], [], [], 0
    if texts:
        yield texts, splits, doc_bytes


def tokenize_to_shards(streams, is_val, tok, out_dir, s, dtype, num_proc, total_bytes, quiet=False):
    """Encode every document of streams into <out_dir>/{train,val}_NNNN.bin.
    Returns per-split stats dicts."""
    stats = {sp: dict(docs=0, bytes=0, tokens=0, shards=[]) for sp in ("train", "val")}
    truncated = 0
    progress = Progress("tokenizing", total_bytes) if not quiet else None
    writers = {sp: ShardWriter(out_dir, sp, dtype, s.shard_tokens, tok.vocab_size, tok.eot_id,
                               tok.fingerprint) for sp in ("train", "val")}
    pool = None
    if num_proc > 1:
        pool = multiprocessing.get_context().Pool(
            num_proc, initializer=_worker_init, initargs=(tok, s.max_doc_tokens, dtype.str))
    else:
        _worker.update(tok=tok, bos=tok.eot_id, max=s.max_doc_tokens, dtype=dtype)

    def consume(result, task):
        """Route one finished task's documents to the train/val writers, in order."""
        nonlocal truncated
        tokens, lengths, n_trunc = result
        texts, splits, doc_bytes = task
        truncated += n_trunc
        to_val = np.array([is_val(doc_hash(t)[0]) if sp is None else sp == "val"
                           for t, sp in zip(texts, splits)])                 # (D,) bool
        token_to_val = np.repeat(to_val, lengths)                           # (N,) bool
        doc_bytes = np.array(doc_bytes, dtype=np.int64)                     # (D,)
        for sp, mask, tmask in (("train", ~to_val, ~token_to_val), ("val", to_val, token_to_val)):
            if mask.any():
                writers[sp].add(tokens[tmask], lengths[mask])
                stats[sp]["docs"] += int(mask.sum())
                stats[sp]["bytes"] += int(doc_bytes[mask].sum())
                stats[sp]["tokens"] += int(lengths[mask].sum())
        if progress:
            progress.update(int(doc_bytes.sum()))

    try:
        pending = deque()  # (AsyncResult, task) in submission order
        for task in iter_tasks(streams, int(s.chunk_mb * MB)):
            if pool is None:
                consume(_encode_task(task[0]), task)
                continue
            pending.append((pool.apply_async(_encode_task, (task[0],)), task))
            if len(pending) >= MAX_TASKS_PER_WORKER * num_proc:  # wait for the oldest: bounded memory
                result, done = pending.popleft()
                consume(result.get(), done)
        while pending:
            result, done = pending.popleft()
            consume(result.get(), done)
        for sp in writers:
            stats[sp]["shards"] = writers[sp].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if progress:
        progress.update(0, final=True)
    if truncated:
        print(f"truncated {truncated:,} documents to --max_doc_tokens={s.max_doc_tokens}", file=sys.stderr)
    return stats


# -----------------------------------------------------------------------------
# 8. The whole build: reuse, write, meta.json
#
# The build key is a hash of everything the output depends on: the source files'
# paths, sizes and modification times (like make), the settings that change the
# tokens, and the format version. A re-run with the same key finds meta.json and
# reuses the directory. The tokenizer has its own, smaller key (it does not depend
# on e.g. --shard_tokens), so changing only how shards are cut skips BPE training.

OUTPUT_SETTINGS = ("doc_sep", "val_fraction", "vocab_size", "tokenizer", "tokenizer_max_mb",
                   "max_doc_tokens", "shard_tokens", "dtype")
TOKENIZER_SETTINGS = ("doc_sep", "val_fraction", "vocab_size", "tokenizer", "tokenizer_max_mb")
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.bpe"


def file_identity(paths):
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def key_of(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def resolve_sources(s, log):
    """-> (train paths, val paths, doc_sep, description for meta.json)."""
    if s.dataset:
        spec = DATASETS[s.dataset]
        train = [download(r, s.download_dir, log=log) for r in spec["train"]]
        val = [download(r, s.download_dir, log=log) for r in spec["val"]]
        doc_sep = s.doc_sep or spec["doc_sep"]
        desc = dict(kind="dataset", name=s.dataset, urls=[r.url for r in spec["train"] + spec["val"]])
    elif s.input:
        train, val, doc_sep = resolve_globs(s.input), [], s.doc_sep
        desc = dict(kind="files", globs=s.input)
    else:
        root, train = stdlib_files()
        val, doc_sep = [], s.doc_sep
        desc = dict(kind="python-stdlib", root=root, python=sys.version.split()[0])
    if s.val_input:
        val = resolve_globs(s.val_input, "--val_input")
    desc["files"] = len(train)
    desc["val_files"] = len(val)
    return train, val, doc_sep, desc


def existing_is_current(out_dir, build_key):
    """True when out_dir holds a finished build with this key whose shards open."""
    try:
        meta = load_meta(out_dir)
        if meta.get("build_key") != build_key:
            return False
        for split in ("train", "val"):
            load_split(out_dir, split)
        return True
    except (bpe.UserError, KeyError, TypeError):
        return False


def build(s, log=print, quiet=False):
    """Prepare one data directory according to settings s. Returns meta (dict)."""
    out_dir = resolve_out_dir(s)
    train_paths, val_paths, doc_sep, source_desc = resolve_sources(s, log)
    num_proc = resolve_num_proc(s.num_proc)
    tok_ident = ""
    if s.tokenizer:  # the tokenizer file's identity is part of the key, not just its name
        tok_ident = file_identity(tokenizer_files(s.tokenizer))
    sources = dict(train=file_identity(train_paths), val=file_identity(val_paths))
    setting_values = {k: getattr(s, k) for k in OUTPUT_SETTINGS} | dict(doc_sep=doc_sep)
    build_key = key_of(dict(version=SHARD_VERSION, sources=sources, settings=setting_values, tok=tok_ident))
    tokenizer_key = key_of(dict(sources=sources, tok=tok_ident,
                                settings={k: setting_values[k] for k in TOKENIZER_SETTINGS}))

    if not s.force and existing_is_current(out_dir, build_key):
        log(f"{out_dir} is up to date (same sources and settings): reusing it; --force=True rebuilds")
        return load_meta(out_dir)

    # Bad input fails here, before the directory is touched.
    t0 = time.time()
    scan = scan_corpus(train_paths, doc_sep, s.val_fraction, log)
    val_scan = scan_corpus(val_paths, doc_sep, 0.0, log) if val_paths else None
    is_val = make_is_val(scan, s.val_fraction, bool(val_paths))
    given_tok = None
    if s.tokenizer:
        given_tok = check_tokenizer(load_tokenizer_arg(s.tokenizer), f"--tokenizer={s.tokenizer}")
        choose_dtype(given_tok.vocab_size, s.dtype)
    else:
        choose_dtype(s.vocab_size, s.dtype)

    # Start of modification: remove the commit marker first, so a crash from here on
    # leaves a directory that the reader refuses instead of a mix of old and new.
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, META_NAME)
    old_meta = None
    if os.path.exists(meta_path):
        try:
            old_meta = load_meta(out_dir)
        except bpe.UserError:
            pass
        os.remove(meta_path)
    for name in os.listdir(out_dir):  # leftovers of an interrupted run
        if name.startswith(".") and ".tmp" in name:
            os.remove(os.path.join(out_dir, name))

    tok_path = os.path.join(out_dir, TOKENIZER_NAME)
    if given_tok is not None:
        tok = given_tok
        log(f"using tokenizer {s.tokenizer} (vocab {tok.vocab_size})")
    elif (not s.force and old_meta and old_meta.get("tokenizer_key") == tokenizer_key
          and os.path.exists(tok_path)
          and (tok := bpe.Tokenizer.load(tok_path)).fingerprint == old_meta.get("fingerprint")):
        log(f"reusing {tok_path} (same sources and tokenizer settings)")
    else:
        tok = train_tokenizer(train_paths, doc_sep, is_val, scan, s, num_proc, log, quiet)
    check_tokenizer(tok, "tokenizer")
    dtype = choose_dtype(tok.vocab_size, s.dtype)
    tok.save(tok_path)  # atomic (bpe.atomic_write): a crash never leaves half a tokenizer file

    streams = [(None, iter_documents(train_paths, doc_sep))]
    if val_paths:
        streams.append(("val", iter_documents(val_paths, doc_sep)))
    total_bytes = scan.bytes + (val_scan.bytes if val_scan else 0)
    t1 = time.time()
    stats = tokenize_to_shards(streams, is_val, tok, out_dir, s, dtype, num_proc, total_bytes, quiet)
    t_tok = time.time() - t1

    # Shards of an older, larger build would otherwise linger next to the new ones.
    keep = set(stats["train"]["shards"] + stats["val"]["shards"])
    for name in os.listdir(out_dir):
        if name.endswith(".bin") and name.startswith(("train_", "val_")) and name not in keep:
            os.remove(os.path.join(out_dir, name))

    tr = stats["train"]
    meta = dict(
        format_version=SHARD_VERSION, tokenizer=TOKENIZER_NAME, fingerprint=tok.fingerprint,
        vocab_size=tok.vocab_size, bos_id=tok.eot_id, dtype=dtype.name, splits=stats,
        bytes_per_token=tr["bytes"] / max(1, tr["tokens"]),  # UTF-8 bytes per token, BOS counted as a token
        sources=source_desc, replaced_chars=scan.replaced + (val_scan.replaced if val_scan else 0),
        settings=dataclasses.asdict(s) | dict(out_dir=out_dir, doc_sep=doc_sep),
        build_key=build_key, tokenizer_key=tokenizer_key,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seconds=dict(total=round(time.time() - t0, 2), tokenize=round(t_tok, 2)),
    )
    bpe.atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    for sp in ("train", "val"):
        st = stats[sp]
        log(f"{sp}: {st['docs']:,} docs, {st['bytes'] / MB:.1f} MB, {st['tokens']:,} tokens "
            f"in {len(st['shards'])} shard(s)")
    log(f"wrote {out_dir} in {time.time() - t0:.1f} s ({tr['bytes'] / max(1, tr['tokens']):.2f} bytes/token, "
        f"{total_bytes / MB / max(t_tok, 1e-9):.1f} MB/s tokenize+write with {num_proc} process(es))")
    return meta


# -----------------------------------------------------------------------------
# 9. Benchmark
#
#   python prepare.py --bench=True
# (a) end to end on the default corpus (scan + BPE + tokenize + write), bench_reps // 2
#     times (the slow part); (b) tokenize-and-write throughput with the tokenizer from
#     (a) held fixed, with 1 and 2 processes, alternating so that both see the same
#     machine load; medians are reported, and the ratio.
#   python prepare.py --bench=True --bench_synthetic_mb=1000
# (c) a 1 GB corpus (the default one repeated with variations) with a fixed
#     tokenizer: wall time, MB/s and peak RSS, which must not grow with the corpus.


def cpu_seconds():
    """User + system CPU time of this process and its finished children (workers).
    On a busy shared machine wall-clock MB/s mostly measures the neighbours; MB per
    CPU-second is what the code itself costs, and bounds what an idle core gives."""
    import resource  # POSIX only, so imported where the benchmark needs it
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_bench(s):
    quiet_log = lambda *a, **k: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="nanostack_bench_") as tmp:
        e2e, e2e_cpu = [], []
        out = os.path.join(tmp, "e2e")
        for r in range(max(1, s.bench_reps // 2)):  # the slow part: fewer repetitions
            t0, c0 = time.time(), cpu_seconds()
            build(dataclasses.replace(s, out_dir=out, force=True, bench=False), log=quiet_log, quiet=True)
            e2e.append(time.time() - t0)
            e2e_cpu.append(cpu_seconds() - c0)
            print(f"end-to-end default corpus (vocab {s.vocab_size}): {e2e[-1]:.1f} s wall, "
                  f"{e2e_cpu[-1]:.1f} CPU-s", flush=True)
        meta = load_meta(out)
        fixed = os.path.join(out, meta["tokenizer"])
        mb = (meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]) / MB
        rates, per_cpu = {1: [], 2: []}, {1: [], 2: []}
        for r in range(s.bench_reps):
            for n in (1, 2):  # alternate, so both see the same machine load
                c0 = cpu_seconds()
                build(dataclasses.replace(s, out_dir=os.path.join(tmp, f"p{n}"), tokenizer=fixed, num_proc=n,
                                          force=True, bench=False), log=quiet_log, quiet=True)
                m = load_meta(os.path.join(tmp, f"p{n}"))
                rates[n].append(mb / m["seconds"]["tokenize"])
                per_cpu[n].append(mb / (cpu_seconds() - c0))  # whole build: scan + load + tokenize + write
                print(f"rep {r}: {n} process(es): {rates[n][-1]:.2f} MB/s tokenize+write (wall), "
                      f"{per_cpu[n][-1]:.2f} MB per CPU-s", flush=True)
    med = {n: float(np.median(v)) for n, v in rates.items()}
    med_cpu = {n: float(np.median(v)) for n, v in per_cpu.items()}
    print(f"default corpus {mb:.1f} MB: end-to-end median {np.median(e2e):.1f} s ({np.median(e2e_cpu):.1f} CPU-s); "
          f"tokenize+write median {med[1]:.2f} MB/s (1 proc), {med[2]:.2f} MB/s (2 procs), "
          f"ratio {med[2] / med[1]:.2f}x; {med_cpu[1]:.2f} / {med_cpu[2]:.2f} MB per CPU-s "
          f"(2 idle cores would give about {2 * med_cpu[2]:.1f} MB/s)")


SYNTHETIC_SEP = "<|endoftext|>"      # document separator inside the synthetic files
SYNTHETIC_FILE_MB = 100              # size of each synthetic file


def write_synthetic_corpus(directory, target_mb):
    """The default corpus repeated with variations until target_mb: copy k renames
    every `def f` to `def f_k` and every `self` to `self_k`, so copies are not
    byte-identical (the hash split and the BPE see distinct documents)."""
    _, paths = stdlib_files()
    docs = list(iter_documents(paths))
    written, k, n_file, f = 0, 0, 0, None
    while written < target_mb * MB:
        for doc in docs:
            if f is None or f.tell() > SYNTHETIC_FILE_MB * MB:
                if f:
                    f.close()
                f = open(os.path.join(directory, f"synthetic_{n_file:03d}.txt"), "w", encoding="utf-8")
                n_file += 1
            text = doc.replace("def ", f"def v{k}_").replace("self", f"self_{k % 97}")
            f.write(text + "\n" + SYNTHETIC_SEP + "\n")
            written += len(text.encode("utf-8", errors="surrogatepass"))
            if written >= target_mb * MB:
                break
        k += 1
    f.close()
    return written


def run_bench_synthetic(s):
    """Peak memory on a corpus far larger than the default one: it must stay flat."""
    import resource  # POSIX only
    with tempfile.TemporaryDirectory(prefix="nanostack_synth_") as tmp:
        t0 = time.time()
        mb = write_synthetic_corpus(tmp, s.bench_synthetic_mb) / MB
        print(f"wrote a {mb:.0f} MB synthetic corpus in {time.time() - t0:.0f} s", flush=True)
        tok_spec = s.tokenizer
        if not tok_spec:  # a fixed tokenizer trained on the default corpus
            tok_dir = os.path.join(tmp, "tok")
            build(dataclasses.replace(s, out_dir=tok_dir, force=True, bench=False), log=lambda *a: None, quiet=True)
            tok_spec = os.path.join(tok_dir, TOKENIZER_NAME)
        out = os.path.join(tmp, "out")
        t0, c0 = time.time(), cpu_seconds()
        meta = build(dataclasses.replace(s, input=os.path.join(tmp, "*.txt"), dataset="", doc_sep=SYNTHETIC_SEP,
                                         tokenizer=tok_spec, out_dir=out, force=True, bench=False),
                     log=lambda *a: print(*a, file=sys.stderr, flush=True))
        wall, cpu = time.time() - t0, cpu_seconds() - c0
        rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KB -> MB on Linux
        rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest worker
    print(f"synthetic {mb:.0f} MB: {wall:.0f} s, tokenize+write {mb / meta['seconds']['tokenize']:.2f} MB/s "
          f"({mb / cpu:.2f} MB per CPU-s) with {resolve_num_proc(s.num_proc)} process(es); peak RSS main {rss_self:.0f} MB, largest worker "
          f"{rss_child:.0f} MB (sum {rss_self + resolve_num_proc(s.num_proc) * rss_child:.0f} MB upper bound)")


# -----------------------------------------------------------------------------
# 10. main


def main(argv=None):
    s = bpe.parse_settings(Settings, sys.argv[1:] if argv is None else argv, description=__doc__)
    if s.bench:
        return run_bench_synthetic(s) if s.bench_synthetic_mb else run_bench(s)
    build(s, log=lambda *a: print(*a, file=sys.stderr, flush=True))


if __name__ == "__main__":
    bpe.main_guard(main)
