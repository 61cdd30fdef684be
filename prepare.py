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
    python prepare.py --input=a.txt --tokenizer=DIR/tokenizer.json    # a Hugging Face model's (to fine-tune it)
    python prepare.py --chat=tasks:add,sub,count,reverse,sort --tokenizer=data/stdlib/tokenizer.bpe --out_dir=data/sft
    python prepare.py --chat='convs/*.jsonl' --tokenizer=data/stdlib/tokenizer.bpe   # your conversations -> data/sft
    python prepare.py --pairs=tasks:add --tokenizer=data/stdlib/tokenizer.bpe --out_dir=data/dpo   # DPO pairs
    python prepare.py --verify=True                    # check every shard of data/stdlib again, byte by byte
    python prepare.py --bench=True                     # throughput benchmark (1 vs 2 processes) + end-to-end time
    python prepare.py --help                           # every setting with its default

What ends up in the data directory (default data/stdlib/):
    train_0000.bin, train_0001.bin, ...   token shards of the training split
    val_0000.bin, ...                     token shards of the validation split
    tokenizer.bpe                         the tokenizer (bpe.py's own file format)
    meta.json                             sources, counts per split, bytes per token, settings, fingerprint
    verified.json                         shards that passed verification, so it runs once per file
    tokenizer-<fp>.bpe                    a tokenizer that --force=True replaced, kept for older checkpoints
                                          (fp: the first 16 hex digits of its fingerprint)
With --chat or --pairs (fine-tuning data, sections 10-11), the same files: the shards carry a loss
mask beside the tokens, tokenizer.bpe is --tokenizer's plus the chat tokens, meta.json says which
tasks made them (train.py --objective=rl draws its prompts from those tasks).

Nothing is lost. A build goes into a hidden folder beside the data directory
(data/.stdlib.build<pid>), meta.json last, and is read back and verified; only then is
it swapped in by renaming folders. Until that moment the previous dataset is untouched,
so a failed or interrupted build (disk full, Ctrl-C, kill -9) leaves it as it was, and the
next run cleans up what a dead process left. A rebuild that would replace the data
directory's tokenizer with a different one is refused unless --force=True, because
checkpoints trained on it need it. Every shard carries a checksum of its body, verified
(with the token id range) the first time it is read, and again whenever the file changes.

Sections:
    1. Settings and the datasets --dataset can name
    2. Finding the text: the built-in corpus, --input globs, documents
    3. Downloads: resumable, retried, checked (cached files too)
    4. The shard format: header and writer
    5. Reading shards: verification (checksum, id range, cached), then the reader API
       (open_shard, load_split, load_meta, load_tokenizer)
    6. Train/val split by document hash
    7. The tokenizer: train one or load one
    8. Tokenizing in parallel, in bounded memory
    9. The whole build: reuse, build beside, swap in, recover; disk full
   10. The chat template: a conversation -> token ids and a loss mask (render)
   11. Chat data: synthetic tasks with checkers, JSONL conversations and preference pairs,
       chat shards
   12. Benchmark
   13. main
"""
import codecs
import dataclasses
import datetime
import errno
import glob
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from typing import Optional

import numpy as np

import bpe

# -----------------------------------------------------------------------------
# 1. Settings and the datasets --dataset can name
#
# A dataset is one or more files to download (pinned by size and sha256 where we know them)
# and the string that separates its documents.

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
    tokenizer: str = ""          # reuse a tokenizer instead: our .bpe file, GPT-2 encoder.json (vocab.bpe beside it), or a Hugging Face tokenizer.json
    tokenizer_max_mb: float = 64.0  # train the BPE on a hash sample of about this many MB of train text (0 = all)
    max_doc_tokens: int = 0      # truncate documents to this many tokens, BOS included (0 = no limit)
    shard_tokens: int = 50_000_000  # tokens per shard file (documents may continue into the next shard)
    dtype: str = "auto"          # token dtype on disk: auto (uint16 when the vocab fits) | uint16 | uint32
    num_proc: int = 0            # tokenizer worker processes (0 = one per CPU core)
    chunk_mb: float = 1.0        # MB of text per worker task (bounds memory: a few tasks are in flight)
    force: bool = False          # rebuild even if up to date, and let a different tokenizer replace the data dir's
    verify: bool = False         # only check every shard of --out_dir again (checksums, token ids), then exit
    bench: bool = False          # measure tokenize-and-write MB/s (1 vs 2 processes) and end-to-end time
    bench_reps: int = 3          # repetitions per benchmark configuration (medians are reported)
    bench_synthetic_mb: int = 0  # with --bench: instead, build a corpus this big (1000 = 1 GB) and report peak RSS
    chat: str = ""               # SFT conversations: tasks:add,sub,count,reverse,sort (synthetic) or JSONL globs {"messages": [...]}
    pairs: str = ""              # DPO preference pairs: tasks:add,... (right vs wrong answer) or JSONL globs {"prompt", "chosen", "rejected"}
    task_examples: int = 20000   # synthetic tasks: train conversations (or pairs) per task
    task_val_examples: int = 200  # synthetic tasks: val conversations (or pairs) per task
    task_digits: int = 3         # synthetic tasks: digits of each number in add and sub
    task_seed: int = 0           # synthetic tasks: the generator's seed (a question's split depends on the question only)

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
        if self.chat and self.pairs:
            raise ValueError("give either --chat (conversations for SFT) or --pairs (for DPO), not both")
        if (self.chat or self.pairs) and (self.dataset or self.input or self.val_input):
            raise ValueError("--chat and --pairs bring their own data: drop --dataset, --input and --val_input")
        if (self.chat or self.pairs) and not self.tokenizer:
            raise ValueError("--chat and --pairs need --tokenizer=PATH, the tokenizer of the base model to "
                             "fine-tune (e.g. --tokenizer=data/stdlib/tokenizer.bpe): its ids must stay the same")
        if min(self.task_examples, self.task_val_examples, self.task_digits) < 1:
            raise ValueError("--task_examples, --task_val_examples and --task_digits must be at least 1")
        # The command line gives '\n' as two characters; documents are usually separated
        # by real newlines, so the common escapes are turned into the characters they name.
        for escape, char in (("\\n", "\n"), ("\\t", "\t"), ("\\r", "\r")):
            self.doc_sep = self.doc_sep.replace(escape, char)


def resolve_out_dir(s):
    """Where the shards go when --out_dir is not given."""
    if s.out_dir:
        return s.out_dir
    if s.chat or s.pairs:
        return os.path.join("data", "sft" if s.chat else "dpo")
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
# document (at most MAX_DOC_BYTES) is held in memory. The built-in corpus
# (bpe.stdlib_files) is shared with bpe.py's benchmark.

MB = 1e6
BINARY_SNIFF_BYTES = 8192            # like git: a NUL byte in the first 8 KB means "binary"
READ_BLOCK_CHARS = 1 << 20           # characters per read() when splitting a file on --doc_sep
MAX_DOC_BYTES = int(64 * MB)         # bytes of one document (a whole file: its size): it must fit in a worker


def utf8_size(text):
    """Bytes of text in UTF-8 (lone surrogates, which a U+FFFD-replacing read never makes, count as 3)."""
    return len(text.encode("utf-8", errors="surrogatepass"))


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
                size = os.fstat(f.fileno()).st_size  # bytes on disk: decided before reading any
                if size > MAX_DOC_BYTES:
                    raise bpe.UserError(f"{path} is {size / MB:.0f} MB as one document, over the "
                                        f"{MAX_DOC_BYTES / MB:.0f} MB limit; split it into documents with "
                                        f"--doc_sep (e.g. --doc_sep='\\n\\n')")
                text = f.read()
                if text:
                    yield text
                continue
            tail, tail_bytes = "", 0  # the unfinished document and its UTF-8 size
            while True:
                block = f.read(READ_BLOCK_CHARS)
                if not block:
                    break
                # Only the tail (the unfinished document) is carried; search from where
                # a separator could start so a long document is not rescanned per block.
                search_from = max(0, len(tail) - len(doc_sep) + 1)
                tail += block
                if tail.find(doc_sep, search_from) < 0:
                    tail_bytes += utf8_size(block)  # each block is measured once
                    if tail_bytes > MAX_DOC_BYTES:
                        raise bpe.UserError(f"{path}: a document longer than {MAX_DOC_BYTES / MB:.0f} MB "
                                            f"(no --doc_sep={doc_sep!r} found); check --doc_sep")
                    continue
                *pieces, tail = tail.split(doc_sep)
                tail_bytes = utf8_size(tail)
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
# holds a file that looks done but is not; a cached file is checked again on every
# use (a same-size file can still be damaged), and downloaded again if it fails.


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
        progress = bpe.Progress("downloading", length, scale=MB, unit=" MB")
        try:
            with open(part, mode) as f:
                for block in iter(lambda: response.read(DOWNLOAD_BLOCK), b""):
                    f.write(block)
                    progress.add(len(block))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:  # the .part keeps what arrived
            if bpe.is_disk_full(e):
                need = f"about {(length - progress.count) / MB:.1f} MB more are needed, " if length else ""
                raise bpe.UserError(f"disk full while downloading {url} into {os.path.dirname(part)}: {need}"
                                    f"{bpe.free_bytes(part) / MB:.1f} MB are free; free some space and re-run "
                                    f"(the download resumes where it stopped)") from None
            raise TransientError(str(e)) from None
    progress.done()
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
    if os.path.exists(path):
        size = os.path.getsize(path)
        if remote.size and size != remote.size:
            log(f"cached {path} has {size} bytes, not {remote.size}: downloading it again")
        elif remote.sha256 and sha256_file(path) != remote.sha256:
            log(f"cached {path} does not match its pinned sha256 (damaged?): downloading it again")
        else:
            log(f"using cached {path}")
            return path
        os.remove(path)
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
# 4. The shard format: header and writer
#
# One shard file, little-endian throughout:
#
#     offset 0                 256-byte header (struct SHARD_HEADER, zero padded)
#     offset 256               n_tokens token ids, uint16 or uint32
#     then                     n_tokens loss-mask bytes, 0 or 1 (only if flags has HAS_MASK)
#     then                     n_docs int64 document start offsets (the doc index)
#
# The header carries a magic string (so a foreign file is refused), the format
# version, the token width w, the counts, the vocab size, the BOS id, the
# tokenizer fingerprint (so shards made with another tokenizer are refused), a
# CRC-32 of the body (everything after the header: tokens, mask, index), so a changed
# byte is caught (section 5), and flags. The loss mask is what fine-tuning data adds
# (section 10): mask[i] = 1 where token i is one the model should learn to write (an
# assistant's reply), 0 where it only reads (the user's words); pretraining shards
# have none. It sits in its own region after the tokens rather than inside the ids,
# so the tokens stay one plain array that np.memmap maps as it is, and a mask byte
# gets the same checksum and verification as a token. The exact file size follows from the header, so a
# truncated copy is detected without reading it. The document index at the end lets
# train.py know where documents start without scanning tokens; each listed offset
# holds a BOS token. A document may run past the end of a shard and continue at
# offset 0 of the next one (shards are filled to exactly --shard_tokens), in which
# case that shard's index does not list offset 0.
#
# Why CRC-32 (zlib.crc32) and not sha256: the checksum is there to catch accidents
# (a flipped bit, bytes overwritten by a tool, a bad copy), not an attacker (who could
# rewrite the header too). CRC-32 detects every error confined to 32 consecutive
# bits, so every single changed token id, uint16 or uint32, is caught for certain, and
# other random damage with probability 1 - 2^-32; and it is fast on every CPU, while
# sha256 is fast only where the CPU has SHA instructions.

SHARD_MAGIC = b"NANOSTK1"
SHARD_VERSION = 3  # 3: flags and the optional loss mask; 2: the body's CRC-32; readers refuse others
SHARD_HEADER_BYTES = 256
# magic, version, itemsize, n_tokens, n_docs, vocab_size, bos_id, fingerprint (64 hex chars), body crc32,
# flags
SHARD_HEADER = struct.Struct("<8sIIQQII64sII")
HAS_MASK = 1                                            # flags bit: a loss mask follows the tokens
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # itemsize -> on-disk dtype of the token ids
UINT16_VOCAB_LIMIT = 1 << 16                            # ids 0..65535 fit in uint16


class ShardError(bpe.UserError):
    """A shard (or data directory) that cannot be used; the message names the file
    and says to re-run prepare.py."""


@dataclasses.dataclass
class Shard:
    path: str
    tokens: np.ndarray       # (n_tokens,) read-only np.memmap, uint16/uint32
    doc_starts: np.ndarray   # (n_docs,) int64 offsets into tokens where a document's BOS sits
    header: dict             # version, dtype, n_tokens, n_docs, vocab_size, bos_id, fingerprint, checksum, flags
    mask: Optional[np.ndarray] = None  # (n_tokens,) read-only uint8 memmap of 0/1 loss weights, or None


def choose_dtype(vocab_size, requested="auto"):
    """uint16 when every id fits (vocab <= 65536), else uint32; refuse impossible requests."""
    if requested == "uint32" or (requested == "auto" and vocab_size > UINT16_VOCAB_LIMIT):
        return TOKEN_DTYPES[4]
    if vocab_size > UINT16_VOCAB_LIMIT:
        raise bpe.UserError(f"--dtype=uint16 cannot hold a vocab of {vocab_size} (max {UINT16_VOCAB_LIMIT}); "
                            f"use --dtype=uint32 or auto")
    return TOKEN_DTYPES[2]


def pack_header(dtype, n_tokens, n_docs, vocab_size, bos_id, fingerprint, checksum, flags=0):
    fp = fingerprint.encode("ascii")
    assert len(fp) <= 64, "fingerprint must be at most 64 ASCII characters (sha256 hex)"
    raw = SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, n_tokens, n_docs,
                            vocab_size, bos_id, fp, checksum, flags)
    return raw.ljust(SHARD_HEADER_BYTES, b"\0")


class ShardWriter:
    """Appends documents' tokens to <split>_0000.bin, <split>_0001.bin, ... .

    Each shard grows under a hidden temporary name (.train_0000.bin.tmp<pid>) and is
    renamed to its real name only after its header and index are written and
    fsync'ed. The body's CRC-32 is computed on the way, from the bytes as written.
    Use as a context manager: on an exception the temporary file is deleted, so an
    interrupted run leaves no shard that looks valid. With has_mask, every add() brings
    the tokens' loss mask too; a shard's mask is held in memory (one byte a token) and
    written after its tokens."""

    def __init__(self, out_dir, split, dtype, shard_tokens, vocab_size, bos_id, fingerprint, has_mask=False):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.bos_id, self.fingerprint, self.has_mask = bos_id, fingerprint, has_mask
        self.names = []          # finished shard file names
        self.n_tokens = 0        # tokens written so far, all shards
        self._file = None        # current temporary file
        self._tmp = None
        self._n = 0              # tokens in the current shard
        self._starts = []        # doc start offsets in the current shard (arrays)
        self._masks = []         # the current shard's loss mask (uint8 arrays), with has_mask
        self._crc = 0            # CRC-32 of the current shard's body so far

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
        self._n, self._starts, self._masks, self._crc = 0, [], [], 0

    def _write_tokens(self, tokens):
        data = tokens.tobytes()
        self._crc = zlib.crc32(data, self._crc)
        self._file.write(data)

    def _finish(self):
        if self.has_mask:
            self._write_tokens(np.concatenate(self._masks).astype(np.uint8))  # same CRC, after the tokens
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        index = starts.astype("<i8").tobytes()
        self._crc = zlib.crc32(index, self._crc)
        self._file.write(index)
        self._file.seek(0)
        self._file.write(pack_header(self.dtype, self._n, len(starts), self.vocab_size, self.bos_id,
                                     self.fingerprint, self._crc, HAS_MASK if self.has_mask else 0))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = f"{self.split}_{len(self.names):04d}.bin"
        os.replace(self._tmp, os.path.join(self.out_dir, name))
        self.names.append(name)
        self._file = self._tmp = None

    def add(self, tokens, doc_lengths, mask=None):
        """tokens: (N,) ids of whole documents back to back, each starting with BOS;
        doc_lengths: (D,) their lengths (sum = N); mask: (N,) 0/1 loss mask (with has_mask)."""
        if (mask is not None) != self.has_mask or (mask is not None and len(mask) != len(tokens)):
            raise ValueError("ShardWriter.add: give a mask of one byte per token exactly when has_mask")
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)  # (D,) in tokens
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            take = min(self.shard_tokens - self._n, len(tokens) - pos)
            self._write_tokens(tokens[pos:pos + take])
            if mask is not None:
                self._masks.append(np.asarray(mask[pos:pos + take], dtype=np.uint8))
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


# -----------------------------------------------------------------------------
# 5. Reading shards: verification, then the reader API
#
# Opening a shard checks what is cheap at once (header, exact size, fingerprint, the
# document index) and then verifies the body: one pass over the memory-mapped tokens
# in blocks computes the CRC-32 (which must match the header) and the largest token
# id (which must be below the vocab size: an id out of range would otherwise crash
# training far away, in an embedding lookup). The pass reads the whole file, so its
# result is remembered in verified.json beside the shards, keyed by the file's name
# and identity (size, modification and change times, inode) and its checksum: the
# next start skips it, and any write to the file changes the identity and brings the
# check back. (Damage that leaves the identity as it was, a disk going bad under an
# unchanged file, is found only by a new pass: `python prepare.py --verify=True`.)

VERIFY_BLOCK_TOKENS = 1 << 22  # tokens per block of the verification pass (8 or 16 MB)
VERIFIED_NAME = "verified.json"
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.bpe"


def read_header(path):
    """The header of a shard as a dict; ShardError if it is not one of ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(SHARD_HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror}); re-run prepare.py") from None
    if len(raw) < SHARD_HEADER_BYTES or raw[:8] != SHARD_MAGIC:
        raise ShardError(f"{path}: not a nanostack token shard (bad magic); re-run prepare.py")
    version, itemsize = struct.unpack_from("<II", raw, 8)  # the fields every version starts with
    if version != SHARD_VERSION or itemsize not in TOKEN_DTYPES:
        raise ShardError(f"{path}: shard format version {version} / width {itemsize} is not "
                         f"{SHARD_VERSION} / 2 or 4 (made by another prepare.py?); re-run prepare.py")
    magic, version, itemsize, n_tokens, n_docs, vocab_size, bos_id, fp, checksum, flags = \
        SHARD_HEADER.unpack_from(raw)
    return dict(version=version, dtype=TOKEN_DTYPES[itemsize].name, n_tokens=n_tokens, n_docs=n_docs,
                vocab_size=vocab_size, bos_id=bos_id, fingerprint=fp.rstrip(b"\0").decode("ascii"),
                checksum=checksum, flags=flags)


def shard_identity(path):
    """What changes whenever a shard's bytes change: size, modification and change times
    (ctime cannot be set back by tools that restore mtime), and the inode (a copy is a new
    file). Renaming the folder it is in changes none of them."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class VerifiedCache:
    """verified.json of one folder: shard name -> identity, checksum and largest token id,
    for shards whose body passed the verification pass. Missing, unreadable or stale
    entries just mean "verify again"; a folder we cannot write to is verified every time."""

    def __init__(self, folder):
        self.path, self.changed, self.entries = os.path.join(folder, VERIFIED_NAME), False, {}
        try:
            with open(self.path) as f:
                entries = json.load(f).get("shards")
        except (OSError, ValueError, AttributeError):  # none yet, or damaged: verify again
            return
        if isinstance(entries, dict):
            self.entries = entries

    def max_id(self, name, identity, checksum):
        """The largest token id recorded for this exact file, or None."""
        e = self.entries.get(name)
        if isinstance(e, dict) and e.get("identity") == identity and e.get("checksum") == checksum \
                and isinstance(e.get("max_id"), int):
            return e["max_id"]
        return None

    def record(self, name, identity, checksum, max_id):
        self.entries[name] = dict(identity=identity, checksum=checksum, max_id=max_id)
        self.changed = True

    def save(self):
        if self.changed:
            try:
                bpe.atomic_write_bytes(self.path, json.dumps(dict(shards=self.entries), indent=1).encode())
            except OSError:  # read-only data, or a full disk: only the saving of work is lost
                pass
            self.changed = False


def scan_body(tokens, index_bytes, mask=None):
    """One pass over a shard's body in blocks -> (CRC-32 of tokens, mask, then index, largest
    token id, largest mask byte)."""
    crc, top, top_mask = 0, 0, 0
    for i in range(0, len(tokens), VERIFY_BLOCK_TOKENS):
        block = tokens[i:i + VERIFY_BLOCK_TOKENS]
        crc = zlib.crc32(block, crc)  # the memmap's bytes as they are on disk
        top = max(top, int(block.max()))
    for i in range(0, 0 if mask is None else len(mask), VERIFY_BLOCK_TOKENS):
        block = mask[i:i + VERIFY_BLOCK_TOKENS]
        crc = zlib.crc32(block, crc)
        top_mask = max(top_mask, int(block.max()))
    return zlib.crc32(index_bytes, crc), top, top_mask


def open_shard(path, expected_fingerprint=None, vocab_size=None, cache=None):
    """Map a shard into memory after checking its header, size, fingerprint, document
    index, checksum, token id range (ids < vocab_size, by default the header's) and, if it
    has one, that its loss mask holds only 0 and 1.

    The cheap checks cost O(n_docs); the checksum and range pass reads the file once and
    is then remembered in cache (a VerifiedCache of the shard's folder; by default one is
    opened and saved here). The tokens are memory-mapped: train.py's batches read pages
    as they touch them."""
    h = read_header(path)
    itemsize = np.dtype(h["dtype"]).itemsize
    mask_bytes = h["n_tokens"] if h["flags"] & HAS_MASK else 0
    expected_size = SHARD_HEADER_BYTES + h["n_tokens"] * itemsize + mask_bytes + h["n_docs"] * 8
    size = os.path.getsize(path)
    if size != expected_size:
        raise ShardError(f"{path}: file is {size} bytes but its header says {expected_size} "
                         f"(truncated or corrupt); re-run prepare.py")
    if expected_fingerprint is not None and h["fingerprint"] != expected_fingerprint:
        raise ShardError(f"{path}: made with tokenizer {h['fingerprint'][:12]}, expected "
                         f"{expected_fingerprint[:12]}; re-run prepare.py with this tokenizer")
    if h["n_tokens"] == 0:
        raise ShardError(f"{path}: shard holds no tokens; re-run prepare.py")
    vocab_size = h["vocab_size"] if vocab_size is None else vocab_size
    if h["vocab_size"] != vocab_size:
        raise ShardError(f"{path}: header says vocab_size {h['vocab_size']}, the data directory "
                         f"{vocab_size}; re-run prepare.py")
    tokens = np.memmap(path, dtype=TOKEN_DTYPES[itemsize], mode="r", offset=SHARD_HEADER_BYTES,
                       shape=(h["n_tokens"],))
    mask = None
    if mask_bytes:
        mask = np.memmap(path, dtype=np.uint8, mode="r", offset=SHARD_HEADER_BYTES + h["n_tokens"] * itemsize,
                         shape=(h["n_tokens"],))
    index = np.fromfile(path, dtype="<i8", count=h["n_docs"],
                        offset=SHARD_HEADER_BYTES + h["n_tokens"] * itemsize + mask_bytes)
    doc_starts = index.astype(np.int64)
    # The index is cheap to verify: sorted, in range, and every entry points at a BOS.
    if len(doc_starts) and (np.any(np.diff(doc_starts) <= 0) or doc_starts[0] < 0
                            or doc_starts[-1] >= h["n_tokens"]
                            or np.any(tokens[doc_starts] != h["bos_id"])):
        raise ShardError(f"{path}: document index does not match the tokens (corrupt); re-run prepare.py")
    own_cache = cache is None
    cache = VerifiedCache(os.path.dirname(os.path.abspath(path))) if own_cache else cache
    name, identity = os.path.basename(path), shard_identity(path)
    top = cache.max_id(name, identity, h["checksum"])
    if top is None:
        crc, top, top_mask = scan_body(tokens, index.tobytes(), mask)
        if crc != h["checksum"]:
            raise ShardError(f"{path}: its bytes do not match the checksum in its header (the file was "
                             f"changed or damaged after prepare.py wrote it); re-run prepare.py")
        if top_mask > 1:
            raise ShardError(f"{path}: its loss mask holds the value {top_mask} (only 0 and 1 are "
                             f"allowed); re-run prepare.py")
        cache.record(name, identity, h["checksum"], top)
    if top >= vocab_size:
        raise ShardError(f"{path}: holds token id {top}, but the vocabulary has {vocab_size} ids "
                         f"(damaged, or made for another tokenizer); re-run prepare.py")
    if own_cache:
        cache.save()
    return Shard(path=path, tokens=tokens, doc_starts=doc_starts, header=h, mask=mask)


# meta.json fields that readers rely on, with their types (a damaged meta.json fails here, in one line)
META_FIELDS = dict(format_version=int, tokenizer=str, fingerprint=str, vocab_size=int, bos_id=int, splits=dict)


def _meta_problem(meta):
    """What is wrong with a parsed meta.json, or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"'{key}' is missing or not a{'n' if kind is int else ''} {kind.__name__}"
    for split in ("train", "val"):
        names = meta["splits"].get(split, {}).get("shards") if isinstance(meta["splits"].get(split), dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and n and os.path.basename(n) == n
                                                  for n in names):
            return f"'splits.{split}.shards' is missing or not a list of file names"
    return None


def load_meta(data_dir):
    """meta.json of a prepared data directory (written last, so its presence means
    the build finished), with the fields readers use checked."""
    path = os.path.join(data_dir, META_NAME)
    if not os.path.exists(path):
        raise ShardError(f"{path} not found: the data is missing or its build was interrupted; "
                         f"run prepare.py (its --out_dir must match --data_dir)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} cannot be read ({e}): the data directory is damaged; re-run prepare.py "
                         f"with the settings that made it") from None
    problem = _meta_problem(meta)
    if problem:
        raise ShardError(f"{path} is damaged ({problem}); re-run prepare.py with the settings that made "
                         f"{data_dir}")
    return meta


def load_split(data_dir, split, expected_fingerprint=None):
    """Open every shard of one split ('train' or 'val'), in order, verified (section 5's
    pass runs once per shard file; later calls find it in verified.json).

    The shards must match meta.json's tokenizer fingerprint and, if given,
    expected_fingerprint (e.g. the one stored in a checkpoint being resumed)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    meta = load_meta(data_dir)
    if meta["format_version"] != SHARD_VERSION:
        raise ShardError(f"{data_dir} was made by another version of prepare.py (shard format "
                         f"{meta['format_version']}, this one reads {SHARD_VERSION}); re-run prepare.py")
    names = meta["splits"][split]["shards"]
    if not names:
        raise ShardError(f"{data_dir}: the {split} split has no shards; re-run prepare.py")
    if expected_fingerprint is not None and expected_fingerprint != meta["fingerprint"]:
        raise ShardError(f"{data_dir}: data was tokenized with {meta['fingerprint'][:12]}, expected "
                         f"{expected_fingerprint[:12]}; re-run prepare.py with the matching tokenizer")
    cache = VerifiedCache(data_dir)
    try:
        return [open_shard(os.path.join(data_dir, n), meta["fingerprint"], meta["vocab_size"], cache)
                for n in names]
    finally:
        cache.save()  # what passed is remembered even if a later shard fails


def load_tokenizer(data_dir):
    """The tokenizer the shards were made with (the file named in meta.json)."""
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, meta["tokenizer"])
    tok = bpe.Tokenizer.load(path)
    if tok.fingerprint != meta["fingerprint"]:
        raise ShardError(f"{path}: fingerprint does not match meta.json; re-run prepare.py")
    return tok


# -----------------------------------------------------------------------------
# 6. Train/val split by document hash
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
        scan.bytes += utf8_size(text)
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
# 7. The tokenizer: train one or load one


HF_TOKENIZER = "tokenizer.json"  # Hugging Face's one-file tokenizer (bpe.Tokenizer.from_tokenizer_json)


def tokenizer_files(spec):
    """--tokenizer=PATH -> the file(s) it names: [our .bpe file], [a Hugging Face tokenizer.json],
    or GPT-2's [encoder.json, vocab.bpe] (given as the .json, a directory holding both, or
    'encoder.json,vocab.bpe')."""
    if os.path.basename(spec) == HF_TOKENIZER:
        paths = [spec]
    elif "," in spec:
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
    if os.path.basename(paths[0]) == HF_TOKENIZER:
        return bpe.Tokenizer.from_tokenizer_json(paths[0])  # UserError on what it cannot express
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
    """tok, if it has the <|endoftext|> token that starts every document; else one line saying so."""
    if bpe.EOT not in tok.special_tokens:
        raise bpe.UserError(f"{where}: the tokenizer has no {bpe.EOT} token, which marks document starts; "
                            f"use one trained with it")
    return tok


# -----------------------------------------------------------------------------
# 8. Tokenizing in parallel, in bounded memory
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
            doc_bytes.append(utf8_size(text))
            total += doc_bytes[-1]
            if total >= chunk_bytes:
                yield texts, splits, doc_bytes
                texts, splits, doc_bytes, total = [], [], [], 0
    if texts:
        yield texts, splits, doc_bytes


def new_stats():
    """Per-split counters that tokenize_to_shards fills as it goes."""
    return {sp: dict(docs=0, bytes=0, tokens=0, shards=[]) for sp in ("train", "val")}


def tokenize_to_shards(streams, is_val, tok, out_dir, s, dtype, num_proc, total_bytes, quiet=False, stats=None):
    """Encode every document of streams into <out_dir>/{train,val}_NNNN.bin.
    Returns the per-split stats (filled in place when given: after a failure they say
    how far it got)."""
    stats = new_stats() if stats is None else stats
    truncated = 0
    progress = bpe.Progress("tokenizing", total_bytes, scale=MB, unit=" MB", quiet=quiet)
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
        progress.add(int(doc_bytes.sum()))

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
    progress.done()
    if truncated:
        print(f"truncated {truncated:,} documents to --max_doc_tokens={s.max_doc_tokens}", file=sys.stderr)
    return stats


# -----------------------------------------------------------------------------
# 9. The whole build: reuse, build beside, swap in, recover; disk full
#
# The build key is a hash of everything the output depends on: the source files'
# paths, sizes and modification times (like make), the settings that change the
# tokens, and the format version. A re-run with the same key finds meta.json and
# reuses the directory. The tokenizer has its own, smaller key (it does not depend
# on e.g. --shard_tokens), so changing only how shards are cut skips BPE training.
#
# Replacing a data directory without ever losing it. The new build is written into a
# hidden folder beside it, on the same disk (data/.stdlib.build<pid>): tokenizer,
# shards, meta.json last; then it is read back through load_split, which verifies
# every shard (and leaves verified.json, so train.py's first start skips that pass).
# Only then do two renames swap it in,
#     data/stdlib -> data/.stdlib.old<pid>      data/.stdlib.build<pid> -> data/stdlib
# and the old folder is retired: what prepare.py did not write there (your files) moves
# into the new folder, a tokenizer that was replaced is kept as tokenizer-<fp>.bpe (fp:
# the first 16 hex digits of its fingerprint), and the rest is deleted. A rename is
# atomic, so a reader finds the old dataset or the new one (or, for the instant between
# the two renames, none), never a mix; a training run that has the old shards mapped
# keeps reading them. A failure before the swap (a full disk, Ctrl-C) deletes the build
# folder: nothing was changed.
# A process killed anywhere leaves hidden folders named with its pid, and the next run
# finishes its work: a build folder is deleted; an old folder is put back if the data
# directory is missing (killed between the two renames), else retired.

OUTPUT_SETTINGS = ("doc_sep", "val_fraction", "vocab_size", "tokenizer", "tokenizer_max_mb",
                   "max_doc_tokens", "shard_tokens", "dtype")
TOKENIZER_SETTINGS = ("doc_sep", "val_fraction", "vocab_size", "tokenizer", "tokenizer_max_mb")
SIDE_FOLDER = re.compile(r"\.(?P<name>.+)\.(?P<kind>build|old)(?P<pid>\d+)")  # .stdlib.build1234
# The files prepare.py writes into a data directory (a retired one loses these, and keeps the rest).
OWN_FILES = re.compile(r"meta\.json|verified\.json|tokenizer\.bpe|(train|val)_\d{4,}\.bin|\..+\.tmp\d+")
WRITE_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}  # no permission, read-only file system


def file_identity(paths):
    """[[absolute path, size, mtime], ...] of source files: like make, a change of any of
    them means the build is out of date."""
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
        root, train = bpe.stdlib_files()
        val, doc_sep = [], s.doc_sep
        desc = dict(kind="python-stdlib", root=root, python=sys.version.split()[0])
    if s.val_input:
        val = resolve_globs(s.val_input, "--val_input")
    desc["files"] = len(train)
    desc["val_files"] = len(val)
    return train, val, doc_sep, desc


def existing_is_current(out_dir, build_key):
    """True when out_dir holds a finished build with this key whose shards open (and verify)."""
    try:
        meta = load_meta(out_dir)
        if meta.get("build_key") != build_key:
            return False
        for split in ("train", "val"):
            load_split(out_dir, split)
        return True
    except bpe.UserError:
        return False


def side_folder(target, kind, pid=None):
    """The hidden folder beside target: kind 'build' (a build in progress) or 'old' (being retired)."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.{kind}{os.getpid() if pid is None else pid}")


def tokenizer_backup_name(fingerprint):
    return f"tokenizer-{fingerprint[:16]}.bpe"


def _fingerprint_of(path):
    """The fingerprint of the tokenizer file at path, or None if there is none or it is unreadable."""
    try:
        return bpe.Tokenizer.load(path).fingerprint if os.path.exists(path) else None
    except bpe.UserError:
        return None


def retire(old, target, log):
    """Empty a previous data directory (already renamed to `old`) into target, then delete
    it: files prepare.py did not write move across, a tokenizer different from target's is
    kept as tokenizer-<fp>.bpe, everything else of ours goes."""
    current = _fingerprint_of(os.path.join(target, TOKENIZER_NAME))
    for entry in sorted(os.listdir(old)):
        dst = os.path.join(target, entry)
        if entry == TOKENIZER_NAME:
            fp = _fingerprint_of(os.path.join(old, entry))
            dst = os.path.join(target, tokenizer_backup_name(fp)) if fp and fp != current else None
        elif OWN_FILES.fullmatch(entry):
            dst = None
        # the new folder holds only our own files, so a name can only be taken by an
        # identical copy (a tokenizer backup with this fingerprint): then ours is dropped
        if dst and not os.path.lexists(dst):
            os.rename(os.path.join(old, entry), dst)
            if entry == TOKENIZER_NAME:
                log(f"kept the replaced tokenizer as {dst}: checkpoints trained on it need it "
                    f"(sample.py --tokenizer={dst})")
    shutil.rmtree(old)


def recover(target, log):
    """Finish what a prepare.py that died (kill -9, power loss) left beside target."""
    parent, name = os.path.split(target)
    try:
        entries = sorted(os.listdir(parent))
    except OSError:  # no parent folder yet: nothing was ever built here
        return
    for entry in entries:
        m = SIDE_FOLDER.fullmatch(entry)
        if not m or m["name"] != name or bpe.pid_alive(int(m["pid"])):
            continue
        path = os.path.join(parent, entry)
        if m["kind"] == "build":
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}: the unfinished build of a process that is gone")
        elif not os.path.exists(target):
            os.rename(path, target)
            log(f"restored {target} from {path}: a rebuild was stopped while it swapped folders")
        else:
            retire(path, target, log)
    bpe.remove_stale_temp_files(target)  # e.g. a verified.json whose writer was killed


def swap_in(work, target):
    """Rename the finished build to target; an existing target is renamed aside first and
    returned (to retire), or put back if the second rename fails."""
    old = None
    if os.path.lexists(target):
        old = side_folder(target, "old")
        os.rename(target, old)
    try:
        os.rename(work, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    bpe.fsync_folder(os.path.dirname(target))
    return old


def estimate_bytes(stats, text_bytes, n_docs, itemsize, old_meta):
    """About how many bytes the new shards take: text bytes / bytes per token * itemsize, plus
    the index (8 bytes a document). Bytes per token as measured so far in this build, else
    the previous build's, else 1 (a byte-level BPE never makes more tokens than bytes)."""
    done_bytes = sum(st["bytes"] for st in stats.values())
    done_tokens = sum(st["tokens"] for st in stats.values())
    bpt = (old_meta or {}).get("bytes_per_token")
    bpt = done_bytes / done_tokens if done_tokens else bpt if isinstance(bpt, float) and bpt > 0 else 1.0
    return text_bytes / bpt * itemsize + 8 * n_docs


def load_meta_or_none(data_dir):
    try:
        return load_meta(data_dir)
    except bpe.UserError:
        return None


def pick_tokenizer(s, out_dir, given_tok, tokenizer_key, train, log):
    """The tokenizer of the new build: --tokenizer's, else the data directory's own when the
    sources and tokenizer settings are unchanged, else train() trains one. A different
    tokenizer than the directory's is refused unless --force=True (see the section comment)."""
    old_meta, tok_file = load_meta_or_none(out_dir), os.path.join(out_dir, TOKENIZER_NAME)
    try:
        old_tok = bpe.Tokenizer.load(tok_file) if os.path.exists(tok_file) else None
    except bpe.UserError:
        old_tok = None  # unreadable: no checkpoint can use it either
    if given_tok is not None:
        tok = given_tok
        log(f"using tokenizer {s.tokenizer} (vocab {tok.vocab_size})")
    elif (not s.force and old_meta and old_tok and old_meta.get("tokenizer_key") == tokenizer_key
          and old_tok.fingerprint == old_meta["fingerprint"]):
        tok = old_tok
        log(f"reusing {tok_file} (same sources and tokenizer settings)")
    else:
        tok = train()
    check_tokenizer(tok, "tokenizer")
    if old_tok and old_tok.fingerprint != tok.fingerprint and not s.force:
        raise bpe.UserError(
            f"{tok_file} (fingerprint {old_tok.fingerprint[:16]}) would be replaced by a different tokenizer "
            f"({tok.fingerprint[:16]}), and checkpoints trained on {out_dir} need it (older ones look for it at "
            f"that path); re-run with --force=True to replace it (it is then kept as "
            f"{tokenizer_backup_name(old_tok.fingerprint)}), or choose another --out_dir")
    return tok


def write_failed(e, out_dir, target, need):
    """The one line for a build that could not be written (full disk, no permission); the
    build folder is already gone, and the previous dataset was never touched."""
    parent, had_old = os.path.dirname(target), os.path.exists(target)
    unchanged = f"nothing was changed: {out_dir} is as it was" if had_old else "nothing was written"
    if bpe.is_disk_full(e):
        return bpe.UserError(
            f"disk full while writing the new {out_dir} (in {parent}): it needs about {need / MB:.1f} MB "
            f"there, {bpe.free_bytes(target) / MB:.1f} MB are free"
            + (" (the old dataset stays until the new one is complete)" if had_old else "")
            + f"; free some space and re-run; {unchanged}")
    return bpe.UserError(f"cannot write in {parent} ({e.strerror}); choose a writable --out_dir; {unchanged}")


def publish(out_dir, target, tok, write_shards, make_meta, need_bytes, log):
    """Write a new dataset beside target and swap it in (see the section comment): the tokenizer,
    the shards (write_shards(work folder)), meta.json last (make_meta()), everything read back and
    verified through load_split, then the renames. Any failure before the swap (a full disk,
    Ctrl-C, a bug) deletes the build folder and leaves the previous dataset as it was; a full disk
    or a refused write is one line, with need_bytes() (about what the build needs). Returns meta."""
    work = side_folder(target, "build")
    try:
        os.makedirs(work)
        tok.save(os.path.join(work, TOKENIZER_NAME))
        write_shards(work)
        meta = make_meta()
        bpe.atomic_write_bytes(os.path.join(work, META_NAME), (json.dumps(meta, indent=1) + "\n").encode())
        for split in ("train", "val"):  # read back and verify: a bad build never replaces a good one
            load_split(work, split)
        old = swap_in(work, target)
    except BaseException as e:  # the build folder goes, the old dataset stays
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and (bpe.is_disk_full(e) or e.errno in WRITE_REFUSED):
            raise write_failed(e, out_dir, target, need_bytes()) from None
        raise
    if old is not None:
        try:
            retire(old, target, log)
        except OSError as e:  # the new dataset is in place; the next run finishes the cleanup
            log(f"warning: could not finish removing {old} ({e}); the next run of prepare.py will")
    return meta


def build(s, log=print, quiet=False):
    """Prepare one data directory according to settings s. Returns meta (dict)."""
    out_dir = resolve_out_dir(s)
    target = os.path.realpath(out_dir)  # the folder itself, also when out_dir is a symlink to it
    if os.path.exists(target) and not os.path.isdir(target):
        raise bpe.UserError(f"--out_dir={out_dir} is a file; give a folder")
    recover(target, log)
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

    # Bad input fails here, before anything is written.
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

    tok = pick_tokenizer(s, out_dir, given_tok, tokenizer_key,
                         lambda: train_tokenizer(train_paths, doc_sep, is_val, scan, s, num_proc, log, quiet), log)
    dtype = choose_dtype(tok.vocab_size, s.dtype)

    streams = [(None, iter_documents(train_paths, doc_sep))]
    if val_paths:
        streams.append(("val", iter_documents(val_paths, doc_sep)))
    total_bytes = scan.bytes + (val_scan.bytes if val_scan else 0)
    stats, seconds = new_stats(), {}

    def write_shards(work):
        t1 = time.time()
        tokenize_to_shards(streams, is_val, tok, work, s, dtype, num_proc, total_bytes, quiet, stats)
        seconds["tokenize"] = time.time() - t1

    def make_meta():
        tr = stats["train"]
        return dict(
            format_version=SHARD_VERSION, kind="text", tokenizer=TOKENIZER_NAME, fingerprint=tok.fingerprint,
            vocab_size=tok.vocab_size, bos_id=tok.eot_id, dtype=dtype.name, splits=stats,
            bytes_per_token=tr["bytes"] / max(1, tr["tokens"]),  # UTF-8 bytes per token, BOS counted as a token
            sources=source_desc, replaced_chars=scan.replaced + (val_scan.replaced if val_scan else 0),
            settings=dataclasses.asdict(s) | dict(out_dir=out_dir, doc_sep=doc_sep),
            build_key=build_key, tokenizer_key=tokenizer_key,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            seconds=dict(total=round(time.time() - t0, 2), tokenize=round(seconds["tokenize"], 2)),
        )

    def need():
        n_docs = scan.docs + (val_scan.docs if val_scan else 0)
        return estimate_bytes(stats, total_bytes, n_docs, dtype.itemsize, load_meta_or_none(out_dir))

    meta = publish(out_dir, target, tok, write_shards, make_meta, need, log)
    tr, t_tok = stats["train"], seconds["tokenize"]
    for sp in ("train", "val"):
        st = stats[sp]
        log(f"{sp}: {st['docs']:,} docs, {st['bytes'] / MB:.1f} MB, {st['tokens']:,} tokens "
            f"in {len(st['shards'])} shard(s)")
    log(f"wrote {out_dir} in {time.time() - t0:.1f} s ({tr['bytes'] / max(1, tr['tokens']):.2f} bytes/token, "
        f"{total_bytes / MB / max(t_tok, 1e-9):.1f} MB/s tokenize+write with {num_proc} process(es))")
    return meta


def verify(out_dir, log):
    """--verify=True: run the verification pass over every shard again, ignoring what
    verified.json remembers (for damage that left a file's identity unchanged)."""
    load_meta(out_dir)  # one line if there is no dataset here
    remembered = os.path.join(out_dir, VERIFIED_NAME)
    if os.path.exists(remembered):
        os.remove(remembered)
    t0 = time.time()
    shards = [shard for split in ("train", "val") for shard in load_split(out_dir, split)]
    n_bytes = sum(os.path.getsize(shard.path) for shard in shards)
    log(f"{out_dir}: all {len(shards)} shards verified ({n_bytes / MB:.1f} MB: checksums and token ids) "
        f"in {time.time() - t0:.2f} s")


# -----------------------------------------------------------------------------
# 10. The chat template: a conversation -> token ids and a loss mask
#
# A base model continues text; an assistant answers in turns. Fine-tuning teaches it a format in
# which every turn is marked by special tokens (bpe.CHAT_TOKENS) that no typed text can produce:
#     <|endoftext|> <|user|> question <|end|> <|assistant|> answer <|end|> <|user|> ...
# A conversation is one document, BOS first like every document in the shards. The loss mask says
# which tokens the model is taught to write: 1 on the assistant's tokens and on the <|end|> that
# closes each of its turns (so that it learns to stop), 0 everywhere else: BOS, the role tokens,
# the user's and the system's words, which the model reads but should not learn to produce. The
# <|assistant|> token itself is 0 too: the chat program writes it, to hand the model its turn.
#
# Worked example (test_prepare_chat_render_worked_example checks it), with a tokenizer that has no
# merges (every byte is its own id, BOS = <|endoftext|> = 256) extended with the chat tokens
# (<|system|> 257, <|user|> 258, <|assistant|> 259, <|end|> 260):
#     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
#     ids    256  258  104  105  260  259  121  111  260
#            BOS  user  h    i   end  asst  y    o   end
#     mask    0    0    0    0    0    0    1    1    1
# render(..., reply=True) renders a prompt instead: the ids end with <|assistant|>, and the model
# writes the rest. Training shifts the mask with the tokens: the target of position t is ids[t + 1],
# counted in the loss when mask[t + 1] is 1.
#
# The contents are encoded with encode_ordinary, so special-token text typed by a user stays text:
# "<|end|>" in a message is the bytes "<", "|", "end", ..., never the id 260. Only render puts
# the chat tokens in, and only between the turns.

ROLE_TOKENS = {"system": bpe.SYSTEM, "user": bpe.USER, "assistant": bpe.ASSISTANT}


def chat_ids(tok):
    """{"system" | "user" | "assistant" | "end": id} of tok's chat tokens; one line if it has none."""
    missing = [t for t in bpe.CHAT_TOKENS if t not in tok.special_tokens]
    if missing:
        raise bpe.UserError(f"this tokenizer has no chat tokens ({', '.join(missing)}): it is a base model's; "
                            f"fine-tune it on data made by `prepare.py --chat=...`, which adds them")
    ids = {role: tok.special_tokens[name] for role, name in ROLE_TOKENS.items()}
    ids["end"] = tok.special_tokens[bpe.END_OF_TURN]
    return ids


def conversation_problem(messages, reply=False):
    """What is wrong with a conversation (a list of {"role", "content"} dicts), or None. The shape
    the template expects: an optional system message first, then user and assistant turns
    alternating, the user first; every content a non-empty string. Training data (reply=False)
    ends with the assistant, whose turn is what there is to learn; a prompt (reply=True) ends with
    the user, whom the model is to answer."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of messages"
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{k}] is not an object"
        if m.get("role") not in ROLE_TOKENS:
            return f'messages[{k}]: "role" must be "system", "user" or "assistant", got {m.get("role")!r}'
        if not isinstance(m.get("content"), str) or not m["content"]:
            return f'messages[{k}]: "content" must be a non-empty string'
    roles = [m["role"] for m in messages]
    first = int(roles[0] == "system")
    for k in range(first, len(roles)):
        want = ("user", "assistant")[(k - first) % 2]
        if roles[k] != want:
            return (f'messages[{k}] is a {roles[k]} message where a {want} message belongs (after an '
                    f'optional system message, user and assistant take turns, the user first)')
    if reply and roles[-1] != "user":
        return "the conversation must end with a user message, for the model to answer"
    if not reply and roles[-1] != "assistant":
        return "the conversation must end with an assistant message (the turn the model learns)"
    return None


def render(messages, tok, reply=False):
    """A conversation -> (ids, mask): two lists of equal length (see the worked example above).
    reply=True: a prompt whose ids end with <|assistant|>, for the model to write its turn."""
    problem = conversation_problem(messages, reply)
    if problem:
        raise bpe.UserError(f"bad conversation: {problem}")
    special = chat_ids(tok)
    ids, mask = [tok.eot_id], [0]
    for m in messages:
        learn = int(m["role"] == "assistant")
        content = tok.encode_ordinary(m["content"])
        ids += [special[m["role"]], *content, special["end"]]
        mask += [0] + [learn] * (len(content) + 1)
    if reply:
        ids.append(special["assistant"])
        mask.append(0)
    return ids, mask


def render_reply(prompt_ids, reply, tok):
    """A rendered prompt (render(..., reply=True)) followed by one assistant reply and its <|end|>,
    with the mask on the reply alone: (ids, mask). A preference pair is two of these."""
    reply_ids = tok.encode_ordinary(reply) + [chat_ids(tok)["end"]]
    return list(prompt_ids) + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)


# -----------------------------------------------------------------------------
# 11. Chat data: synthetic tasks with checkers, JSONL conversations and preference pairs, chat shards
#
# Synthetic tasks need no download and have answers a program can check, so a class can watch a
# model learn them, and train.py's RL can compute a reward. Each task makes a Problem from a
# random generator: the question (the user's message), the right answer (the assistant's) and the
# data a checker recomputes the answer from:
#     add      "What is 482 + 317?"                                      -> "799"
#     sub      "What is 731 - 284?"                                      -> "447"  (never negative)
#     count    'How many times does the letter "a" appear in "kalamo"?'  -> "2"
#     reverse  'Reverse the word "kalamo".'                              -> "omalak"
#     sort     "Sort from smallest to largest: 42, 7, 19"                -> "7, 19, 42"
# Numbers have --task_digits digits; words are 2 or 3 syllables of a consonant and a vowel, so
# they look like words to a tokenizer without coming from a word list.
#
# Splits that can never overlap: a problem belongs to train, val or test by a hash of its
# question alone (doc_hash, as documents in section 6): u < TASK_TEST_FRACTION is test, u below
# TASK_TEST_FRACTION + TASK_VAL_FRACTION is val, the rest train. The split is a property of the
# question, not of when or by which seed it was drawn, so nothing can put one question in two
# splits. A split's problems come from a random.Random seeded by (task, split, seed, digits),
# which keeps drawing and keeps those of its split: deterministic. val and test hold distinct
# questions; train may repeat one (a repeat is a second epoch of it).
#
# A checker says whether a reply is right: the reply, whitespace around it ignored, must state the
# answer and nothing else ("799" is right for 482 + 317; "799." and "It is 799" are not; sort
# accepts "7,19,42" too). For DPO the rejected reply is a plausible wrong one: a carry slip (off by
# 1, 10 or 100), a count off by one, two letters or two numbers swapped.
#
# User data is JSONL, one example a line:
#     --chat   {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
#     --pairs  {"prompt": "..." or [messages ending with the user], "chosen": "...", "rejected": "..."}
# Every line is checked before anything is written; the first bad one stops the build with its file,
# its line number and what is wrong. A user conversation goes to val when the hash of its messages
# falls below --val_fraction (a pair: the hash of its prompt, so the pairs of a prompt stay
# together); at least one goes to val.
#
# Chat shards are ordinary shards (section 4) with the loss mask, made with the base model's
# tokenizer extended by the chat tokens. A preference pair is two documents in a row, chosen then
# rejected, each masked on its reply. The build is written beside the data directory and swapped in
# like any other (section 9): nothing is ever written half.

TASK_PREFIX = "tasks:"
TASK_TEST_FRACTION = 0.1      # share of every task's questions that only --task_eval ever sees
TASK_VAL_FRACTION = 0.1       # share held out for val loss, DPO accuracy and RL pass@1 during training
TASK_SPLITS = ("train", "val", "test")
TASK_DRAWS_PER_PROBLEM = 100  # a split gives up after this many draws per problem asked for
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
SORT_SIZES = (3, 5)           # sort: lists of 3 to 5 distinct numbers ...
SORT_MAX = 99                 # ... from 0 to SORT_MAX
CHAT_SETTINGS = ("task_examples", "task_val_examples", "task_digits", "task_seed", "val_fraction",
                 "shard_tokens", "dtype")  # the settings a chat build's output depends on


@dataclasses.dataclass(frozen=True)
class Problem:
    task: str
    question: str   # the user's message
    answer: str     # the right reply
    data: tuple     # what the checker recomputes the answer from: (a, b), (word, letter), (word,), numbers


def syllable_word(rng):
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def task_number(rng, digits):
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def make_add(rng, digits):
    a, b = task_number(rng, digits), task_number(rng, digits)
    return Problem("add", f"What is {a} + {b}?", str(a + b), (a, b))


def make_sub(rng, digits):
    a, b = sorted((task_number(rng, digits), task_number(rng, digits)), reverse=True)
    return Problem("sub", f"What is {a} - {b}?", str(a - b), (a, b))


def make_count(rng, digits):
    word = syllable_word(rng)
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice(CONSONANTS + VOWELS)  # zero counts too
    return Problem("count", f'How many times does the letter "{letter}" appear in "{word}"?',
                   str(word.count(letter)), (word, letter))


def make_reverse(rng, digits):
    word = syllable_word(rng)
    return Problem("reverse", f'Reverse the word "{word}".', word[::-1], (word,))


def make_sort(rng, digits):
    xs = rng.sample(range(SORT_MAX + 1), rng.randint(*SORT_SIZES))
    return Problem("sort", "Sort from smallest to largest: " + ", ".join(map(str, xs)),
                   ", ".join(map(str, sorted(xs))), tuple(xs))


def stated_int(reply):
    """The integer a reply states and nothing else, or None: " 799\n" -> 799; "799.", "+799",
    "7 99", "٧٩٩" -> None."""
    text = reply.strip()
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else None


def stated_ints(reply):
    """The list of integers a reply states, separated by commas: "7, 19,42" -> [7, 19, 42]; or None."""
    parts = [p.strip() for p in reply.strip().split(",")]
    return [int(p) for p in parts] if all(re.fullmatch(r"[0-9]+", p) for p in parts) else None


def check_add(p, reply):
    return stated_int(reply) == p.data[0] + p.data[1]


def check_sub(p, reply):
    return stated_int(reply) == p.data[0] - p.data[1]


def check_count(p, reply):
    return stated_int(reply) == p.data[0].count(p.data[1])


def check_reverse(p, reply):
    return reply.strip() == p.data[0][::-1]


def check_sort(p, reply):
    return stated_ints(reply) == sorted(p.data)


def wrong_number(rng, right, slips=(1, 10, 100)):
    """right off by one of slips, up or down, never negative: a dropped or an extra carry."""
    return str(rng.choice([w for s in slips for w in (right - s, right + s) if w >= 0]))


def wrong_add(p, rng):
    return wrong_number(rng, p.data[0] + p.data[1])


def wrong_sub(p, rng):
    return wrong_number(rng, p.data[0] - p.data[1])


def wrong_count(p, rng):
    return wrong_number(rng, p.data[0].count(p.data[1]), slips=(1,))


def swapped(items, rng):
    """items with two neighbours that differ swapped (a list; items must not all be equal)."""
    items = list(items)
    k = rng.choice([k for k in range(len(items) - 1) if items[k] != items[k + 1]])
    items[k], items[k + 1] = items[k + 1], items[k]
    return items


def wrong_reverse(p, rng):
    return "".join(swapped(p.data[0][::-1], rng))   # a consonant and a vowel always differ


def wrong_sort(p, rng):
    return ", ".join(map(str, swapped(sorted(p.data), rng)))   # the numbers are distinct


@dataclasses.dataclass(frozen=True)
class Task:
    make: object    # (random.Random, digits) -> Problem
    check: object   # (Problem, reply text) -> bool: is the reply right?
    wrong: object   # (Problem, random.Random) -> a plausible wrong reply


TASKS = {"add": Task(make_add, check_add, wrong_add), "sub": Task(make_sub, check_sub, wrong_sub),
         "count": Task(make_count, check_count, wrong_count),
         "reverse": Task(make_reverse, check_reverse, wrong_reverse), "sort": Task(make_sort, check_sort, wrong_sort)}


def task_names(spec, what="--chat"):
    """'tasks:add,count' (or 'add,count') -> ['add', 'count']; one line for an unknown name."""
    names = [n.strip() for n in spec[len(TASK_PREFIX):].split(",") if n.strip()] \
        if spec.startswith(TASK_PREFIX) else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        example = f"{TASK_PREFIX}add,count" if what in ("--chat", "--pairs") else "add,count"
        raise bpe.UserError(f"{what}={spec}: unknown task(s) {unknown}; choose from {', '.join(TASKS)}, "
                            f"e.g. {what}={example}")
    return list(dict.fromkeys(names))


def task_split(question):
    """'train', 'val' or 'test': decided by the question's hash alone (see the section comment)."""
    u, _ = doc_hash(question)
    return "test" if u < TASK_TEST_FRACTION else "val" if u < TASK_TEST_FRACTION + TASK_VAL_FRACTION else "train"


def draw_problem(name, split, rng, digits=3):
    """The next problem of task `name` that rng gives in `split` (one draw in 5 to 10 on average
    for val and test, see TASK_*_FRACTION)."""
    for _ in range(TASK_DRAWS_PER_PROBLEM):
        p = TASKS[name].make(rng, digits)
        if task_split(p.question) == split:
            return p
    raise bpe.UserError(f"task {name} has (almost) no {split} problems with --task_digits={digits}; "
                        f"raise --task_digits")


def task_problems(name, split, n, seed=0, digits=3):
    """n problems of task `name` in `split`, the same for the same (name, split, n, seed, digits);
    distinct questions in val and test. One line if there are not that many of them."""
    rng = random.Random(f"{name}:{split}:{seed}:{digits}")   # a str seed: the same on every platform
    out, seen = [], set()
    for _ in range(TASK_DRAWS_PER_PROBLEM * n):
        if len(out) == n:
            break
        p = draw_problem(name, split, rng, digits)
        if split == "train" or p.question not in seen:
            seen.add(p.question)
            out.append(p)
    if len(out) < n:
        raise bpe.UserError(f"task {name}: only {len(out)} distinct {split} problems found, {n} asked for "
                            f"(--task_digits={digits} leaves few); ask for fewer or raise --task_digits")
    return out


def jsonl_records(path, what):
    """Yield (line number, object) for each non-blank line of a JSONL file, and a function
    bad(message, line) that raises the one-line error naming the file and the line. A line that
    is not UTF-8, not JSON or not a JSON object is one such line too."""
    def bad(message, lineno):
        raise bpe.UserError(f"{path}:{lineno}: {message}")

    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad("not UTF-8 text", lineno)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    bad(f"not valid JSON ({e.msg} at column {e.colno})", lineno)
                if not isinstance(rec, dict):
                    bad(f"expected a JSON object, got {type(rec).__name__}", lineno)
                yield lineno, rec, bad
    except OSError as e:
        raise bpe.UserError(f"{what}={path}: cannot read the file ({e.strerror}); check the path") from None


def conversation_of(rec, bad, lineno):
    """A --chat JSONL record -> its messages (checked)."""
    messages = rec.get("messages")
    problem = 'expected {"messages": [...]}' if "messages" not in rec else conversation_problem(messages)
    if problem:
        bad(problem, lineno)
    return messages


def pair_of(rec, bad, lineno):
    """A --pairs JSONL record -> (prompt messages, chosen, rejected), checked."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
    if missing:
        bad(f'expected {{"prompt", "chosen", "rejected"}}; missing {", ".join(missing)}', lineno)
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    problem = conversation_problem(prompt, reply=True)
    if problem:
        bad(f'"prompt" must be a non-empty string or a list of messages ending with the user\'s: {problem}',
            lineno)
    for key in ("chosen", "rejected"):
        if not isinstance(rec[key], str) or not rec[key]:
            bad(f'"{key}" must be a non-empty string (the assistant\'s reply)', lineno)
    if rec["chosen"] == rec["rejected"]:
        bad('"chosen" and "rejected" are the same reply: a pair must prefer one of two different replies', lineno)
    return prompt, rec["chosen"], rec["rejected"]


def user_split(examples, val_fraction, what):
    """Split (key, example) by the hash of key: val where u < val_fraction, and at least one."""
    if len(examples) < 2:
        raise bpe.UserError(f"{what}: {len(examples)} example(s); at least 2 are needed (one goes to val)")
    u = [doc_hash(key)[0] for key, _ in examples]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[u.index(min(u))] = True
    if all(is_val):
        raise bpe.UserError(f"{what}: every example fell into val; lower --val_fraction={val_fraction}")
    return [("val" if v else "train", ex) for v, (_, ex) in zip(is_val, examples)]


def chat_documents(s, kind, tok):
    """The documents of --chat (kind "chat") or --pairs ("pairs") as [(split, ids, mask)], rendered
    with tok, every example checked first. A pair gives two documents in a row: chosen, rejected."""
    spec = s.chat if kind == "chat" else s.pairs
    docs = []
    if spec.startswith(TASK_PREFIX):
        for name in task_names(spec, f"--{kind}"):
            for split, n in (("train", s.task_examples), ("val", s.task_val_examples)):
                rng = random.Random(f"wrong:{name}:{split}:{s.task_seed}")
                for p in task_problems(name, split, n, s.task_seed, s.task_digits):
                    user = [{"role": "user", "content": p.question}]
                    if kind == "chat":
                        docs.append((split, *render(user + [{"role": "assistant", "content": p.answer}], tok)))
                    else:
                        prompt, _ = render(user, tok, reply=True)
                        docs.append((split, *render_reply(prompt, p.answer, tok)))
                        docs.append((split, *render_reply(prompt, TASKS[name].wrong(p, rng), tok)))
        return docs
    examples = []
    for path in resolve_globs(spec, f"--{kind}"):
        for lineno, rec, bad in jsonl_records(path, f"--{kind}"):
            if kind == "chat":
                messages = conversation_of(rec, bad, lineno)
                examples.append((json.dumps(messages, sort_keys=True), messages))
            else:
                prompt, chosen, rejected = pair_of(rec, bad, lineno)
                examples.append((json.dumps(prompt, sort_keys=True), (prompt, chosen, rejected)))
    for split, ex in user_split(examples, s.val_fraction, f"--{kind}={spec}"):
        if kind == "chat":
            docs.append((split, *render(ex, tok)))
        else:
            prompt, _ = render(ex[0], tok, reply=True)
            docs += [(split, *render_reply(prompt, reply, tok)) for reply in ex[1:]]
    return docs


def build_chat(s, log=print):
    """prepare.py --chat / --pairs: chat shards with loss masks, made with --tokenizer plus the chat
    tokens. Returns meta (dict)."""
    kind, spec = ("chat", s.chat) if s.chat else ("pairs", s.pairs)
    out_dir = resolve_out_dir(s)
    target = os.path.realpath(out_dir)
    if os.path.exists(target) and not os.path.isdir(target):
        raise bpe.UserError(f"--out_dir={out_dir} is a file; give a folder")
    recover(target, log)
    tasks = task_names(spec, f"--{kind}") if spec.startswith(TASK_PREFIX) else []
    paths = [] if tasks else resolve_globs(spec, f"--{kind}")
    base = check_tokenizer(load_tokenizer_arg(s.tokenizer), f"--tokenizer={s.tokenizer}")
    tok = base.with_special_tokens(bpe.CHAT_TOKENS)
    dtype = choose_dtype(tok.vocab_size, s.dtype)
    build_key = key_of(dict(version=SHARD_VERSION, kind=kind, spec=spec, sources=file_identity(paths),
                            tok=file_identity(tokenizer_files(s.tokenizer)),
                            settings={k: getattr(s, k) for k in CHAT_SETTINGS}))
    if not s.force and existing_is_current(out_dir, build_key):
        log(f"{out_dir} is up to date (same sources and settings): reusing it; --force=True rebuilds")
        return load_meta(out_dir)
    t0 = time.time()
    docs = chat_documents(s, kind, tok)             # bad input fails here, before anything is written
    tok = pick_tokenizer(s, out_dir, tok, None, None, log)
    stats = {sp: dict(docs=0, tokens=0, masked=0, shards=[]) for sp in ("train", "val")}

    def write_shards(work):
        for split in ("train", "val"):
            chosen = [(ids, mask) for sp, ids, mask in docs if sp == split]
            with ShardWriter(work, split, dtype, s.shard_tokens, tok.vocab_size, tok.eot_id, tok.fingerprint,
                             has_mask=True) as writer:
                writer.add(np.concatenate([ids for ids, _ in chosen]), [len(ids) for ids, _ in chosen],
                           np.concatenate([mask for _, mask in chosen]))
            stats[split].update(docs=len(chosen), tokens=sum(len(ids) for ids, _ in chosen),
                                masked=sum(sum(mask) for _, mask in chosen), shards=writer.names)

    def make_meta():
        return dict(
            format_version=SHARD_VERSION, kind=kind, tokenizer=TOKENIZER_NAME, fingerprint=tok.fingerprint,
            vocab_size=tok.vocab_size, bos_id=tok.eot_id, dtype=dtype.name, splits=stats,
            sources=dict(kind="tasks" if tasks else "jsonl", spec=spec, files=len(paths)),
            chat=dict(tasks=tasks, task_digits=s.task_digits, task_seed=s.task_seed,
                      base_fingerprint=base.fingerprint),
            settings=dataclasses.asdict(s) | dict(out_dir=out_dir), build_key=build_key,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            seconds=dict(total=round(time.time() - t0, 2)))

    def need():
        return sum(len(ids) * (dtype.itemsize + 1) + 8 for _, ids, _ in docs)

    meta = publish(out_dir, target, tok, write_shards, make_meta, need, log)
    what = "conversations" if kind == "chat" else "documents (pairs x 2)"
    for sp in ("train", "val"):
        st = stats[sp]
        log(f"{sp}: {st['docs']:,} {what}, {st['tokens']:,} tokens ({st['masked']:,} to learn) "
            f"in {len(st['shards'])} shard(s)")
    log(f"wrote {out_dir} in {time.time() - t0:.1f} s (tokenizer {s.tokenizer} + the chat tokens, "
        f"fingerprint {tok.fingerprint[:12]})")
    return meta


# -----------------------------------------------------------------------------
# 12. Benchmark
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
    """The default corpus repeated with variations until target_mb, as files of about
    SYNTHETIC_FILE_MB with documents separated by SYNTHETIC_SEP. Copy k (k = 0, 1, ...)
    turns every "def " into "def v<k>_" and every "self" into "self_<k mod 97>", so copies
    are not byte-identical (the hash split and the BPE see distinct documents):
    copy 3 of "def f(self):" is "def v3_f(self_3):". Returns the UTF-8 bytes written."""
    _, paths = bpe.stdlib_files()
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
            written += utf8_size(text)
            if written >= target_mb * MB:
                break
        k += 1
    f.close()
    return written


def run_bench_synthetic(s):
    """Peak memory on a corpus far larger than the default one: it must stay flat."""
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
        rss_self, rss_child = bpe.peak_rss_mb(), bpe.peak_rss_mb(children=True)  # main, largest worker
    print(f"synthetic {mb:.0f} MB: {wall:.0f} s, tokenize+write {mb / meta['seconds']['tokenize']:.2f} MB/s "
          f"({mb / cpu:.2f} MB per CPU-s) with {resolve_num_proc(s.num_proc)} process(es); peak RSS main {rss_self:.0f} MB, largest worker "
          f"{rss_child:.0f} MB (sum {rss_self + resolve_num_proc(s.num_proc) * rss_child:.0f} MB upper bound)")


# -----------------------------------------------------------------------------
# 13. main


def main(argv=None):
    s = bpe.parse_settings(Settings, sys.argv[1:] if argv is None else argv, description=__doc__)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if s.bench:
        return run_bench_synthetic(s) if s.bench_synthetic_mb else run_bench(s)
    if s.verify:
        return verify(resolve_out_dir(s), log)
    if s.chat or s.pairs:
        return build_chat(s, log=log)
    build(s, log=log)


if __name__ == "__main__":
    bpe.main_guard(main)
