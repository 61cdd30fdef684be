"""
bpe.py -- a byte-level BPE tokenizer, from scratch: exact, safe and fast enough for a real corpus.

Where it sits:  bpe.py -> prepare.py -> model.py -> train.py -> sample.py
  prepare.py trains a tokenizer here on the corpus and turns documents into token shards,
  train.py reads those shards, and sample.py turns generated ids back into text.

Run it:
  python bpe.py                                    # teaching demo: the first merges, step by step
  python bpe.py --train='data/*.txt' --vocab_size=4096 --out=tok.bpe   # train on your files
  python bpe.py --bench=True                       # time training and encoding (stdlib corpus)
  python bpe.py --help                             # all settings

Use it from Python:
  tok = Tokenizer.train(documents, vocab_size=4096)   # documents: any iterable of str
  ids = tok.encode("hello world")                     # -> [list of ints]
  tok.decode(ids) == "hello world"
  tok.save("tok.bpe"); tok = Tokenizer.load("tok.bpe")
  tok.vocab[ids[0]]                                   # -> the bytes of one token (id -> bytes table)

The idea in one paragraph. A byte-level BPE tokenizer starts from the 256 byte values as its
first 256 tokens, so any text at all can be encoded (there is no "unknown" token). Training then
repeats one step: find the pair of adjacent tokens that occurs most often in the corpus and give
it a new id ("merge" it). After n merges the vocabulary has 256 + n tokens, and frequent words
have become single tokens. Encoding replays the merges, in the order they were learned.

Notable features
  - GPT-4 split pattern by default (GPT-2's selectable): text is first cut into "chunks"
    (words, numbers, punctuation runs, whitespace) and merges never cross a chunk boundary.
  - Training counts each distinct chunk once with its frequency, then updates pair counts
    incrementally (only chunks containing the merged pair are touched) and finds the best
    pair with a heap with lazy invalidation. The slow textbook loop sits beside it; tests
    prove they agree.
  - Deterministic ties: equal counts are broken by the lexicographically greatest
    (bytes_of_left, bytes_of_right), so any number of processes on any platform gives the
    same merges.
  - Encoding applies the merges per chunk in rank order, once per distinct chunk (a chunk -> ids
    cache), in parallel processes for batches, or lazily over a file larger than memory.
  - Special tokens (<|endoftext|>) are never merged, and `encode` treats their text as plain
    bytes unless you allow them (text from the web cannot inject control tokens).
  - Chat tokens (<|user|>, <|assistant|>, <|end|>, ...) added to a trained tokenizer at new
    ids (with_special_tokens), so a base model's ids keep their meaning for fine-tuning.
  - Exact GPT-2 ids from GPT-2's own files; tiktoken rank files in and out; the (vocab, merges)
    tables that other BPE tools exchange, in (from_vocab_merges) and out (vocab, merges);
    Hugging Face's tokenizer.json in and out (byte-level BPE).
  - A human-readable, versioned file format and a sha256 fingerprint that prepare.py stamps
    into every shard, so a model is never fed ids from the wrong tokenizer.

Sections
  1. Errors and settings (this file's command line)
  2. Split patterns, special tokens and byte helpers
  3. Shared helpers: safe file writes, a full disk, progress lines, peak memory, the default corpus
  4. Pre-tokenization: text -> chunks -> chunk counts (serial and parallel)
  5. Training: the textbook merge loop and the incremental one
  6. The Tokenizer: encode, decode, streaming, files; (vocab, merges), GPT-2, tiktoken and
     tokenizer.json interop
  7. Teaching demo and benchmark
  8. Settings from the command line (shared by every nanostack script)
  main()
"""
import array
import ast
import base64
import bisect
import codecs
import collections
import dataclasses
import difflib
import errno
import glob
import hashlib
import heapq
import inspect
import itertools
import json
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import sysconfig
import time
import types
import unicodedata

import numpy as np
import regex

# -----------------------------------------------------------------------------
# 1. Errors and settings (this file's command line)
#
# The error class comes first because everything below raises it.

class UserError(Exception):
    """An error caused by the user's input (a bad setting, a missing file, a corrupt
    shard). main_guard (section 8) prints its message as one line, without a traceback,
    and exits with code 2, so the message itself must say what to do. Anything else is
    a bug and keeps its traceback."""


def first_line(err):
    """The first line of an exception's message (or its type's name): what a one-line error
    quotes of a library's longer complaint."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class SettingsError(UserError):
    """A bad --key=value."""


@dataclasses.dataclass
class Settings:
    train: str = ""  # files to train on: a glob or comma-separated globs ('' = the teaching demo)
    vocab_size: int = 4096  # 256 bytes + merges + special tokens
    out: str = "tokenizer.bpe"  # where --train writes the tokenizer
    pattern: str = "gpt4"  # split pattern: gpt4 | gpt2 | any regex (the `regex` package syntax)
    special_tokens: str = "<|endoftext|>"  # comma-separated special tokens ('' = none)
    num_proc: int = 0  # worker processes for pre-tokenization (0 = all cores)
    quiet: bool = False  # no progress lines on stderr
    bench: bool = False  # time training and encoding on the stdlib corpus, print medians
    bench_repeats: int = 3  # runs per measurement in --bench (the median is reported)
    bench_big: bool = True  # --bench also times training at vocab 32768 (one run each)

    def __post_init__(self):
        if self.vocab_size < 256:
            raise ValueError(f"--vocab_size={self.vocab_size}: must be at least 256 (the byte tokens)")
        if self.num_proc < 0:
            raise ValueError(f"--num_proc={self.num_proc}: use 0 for all cores or a positive count")
        if self.bench_repeats < 1:
            raise ValueError(f"--bench_repeats={self.bench_repeats}: must be at least 1")


# -----------------------------------------------------------------------------
# 2. Split patterns, special tokens and byte helpers
#
# The split pattern cuts text into chunks before BPE sees it. Without it, frequent merges
# would glue words to the punctuation after them ("dog." "dog!" "dog?" as three tokens).
# GPT-4's pattern (tiktoken's cl100k_base), alternative by alternative:
#   '(?i:[sdmt]|ll|ve|re)           English contractions: 's 't 'm 'd 'll 've 're, any case
#   [^\r\n\p{L}\p{N}]?+\p{L}+       a run of letters with at most one leading non-letter
#                                   (usually the space: " hello" is one chunk)
#   \p{N}{1,3}                      numbers in groups of at most 3 digits ("12345" -> "123","45")
#    ?[^\s\p{L}\p{N}]++[\r\n]*      a punctuation run, optional leading space, trailing newlines
#   \s*[\r\n]                       whitespace ending in a newline
#   \s+(?!\S)                       whitespace, leaving its last space to the next word
#   \s+                             any remaining whitespace
# Every character is a letter, a number, whitespace or "other" (the punctuation alternative), so
# the chunks always join back to the text. `?+` and `++` are possessive quantifiers (they never
# give back what they matched), as in tiktoken's published pattern.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
# GPT-2's pattern: lowercase contractions, optional space before letters/numbers/punctuation,
# numbers of any length.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

EOT = "<|endoftext|>"  # marks document boundaries; prepare.py puts it at the start of every document
# The chat tokens: who speaks (system, user, assistant) and where a turn ends. A base tokenizer
# gains them for fine-tuning (Tokenizer.with_special_tokens) and prepare.py's chat template
# (render) writes them between the turns. Like EOT they are never produced by encoding text unless
# allowed, so a user who types "<|assistant|>" cannot forge a turn: that is 13 bytes of text.
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END_OF_TURN)
N_BYTES = 256  # ids 0..255 are the raw byte values (for tokenizers we train)
FORMAT_NAME = "nanostack-bpe"  # first word of a saved tokenizer file
FORMAT_VERSION = 1  # bump when the file layout changes; load() refuses other versions
CHUNK_CACHE_MAX = 1 << 20  # encode's chunk -> ids cache is cleared when it grows past this
# Text (strings) round-trips through bytes with "surrogateescape": a str made from arbitrary bytes
# by bytes.decode("utf-8", "surrogateescape") encodes back to exactly those bytes.
UTF8_ERRORS = "surrogateescape"
# A tokenizer may rewrite text into one Unicode normal form before splitting it. NFC composes what
# can be composed: "e" + U+0301 (combining acute) becomes the single character "é", so both
# spellings get the same ids. Our own tokenizers do not normalize (the bytes are the text); some
# imported ones do (Hugging Face's Qwen files declare NFC), and then encode must too.
NORMALIZERS = ("NFC",)


def resolve_pattern(pattern):
    """'gpt4' / 'gpt2' -> the pattern text; anything else is a regex of its own."""
    return PATTERNS.get(pattern, pattern)


def compile_pattern(pattern):
    """The compiled split pattern, or a one-line UserError for a bad regex."""
    try:
        return regex.compile(resolve_pattern(pattern))
    except (regex.error, TypeError) as e:
        raise UserError(f"bad split pattern {pattern!r}: {e}; use 'gpt4', 'gpt2' or a valid regex") from None


# A fast path for ASCII text. The `regex` module is needed for \p{L} and \p{N} (Unicode letters
# and numbers), but on pure-ASCII text (most source code, most English) the standard library's
# `re` runs an equivalent pattern markedly faster (the README's performance notes give the
# figure), and splitting is most of the cost of encoding. In ASCII the classes are small:
# \p{L} is [A-Za-z], \p{N} is [0-9], and \s is [\t\n\v\f\r ], spelled out because `re`'s \s
# also matches \x1c-\x1f (str.isspace() calls them spaces) while `regex` follows Unicode
# White_Space.
# The possessive quantifiers (?+, ++) become greedy ones (`re` has them only from Python 3.11).
# Backtracking cannot change a match here: in [^\r\n\p{L}\p{N}]?+\p{L}+ the optional character
# is not a letter, so giving it back leaves a non-letter where a letter must start; in
# [^\s\p{L}\p{N}]++[\r\n]* the tail matches anything, even nothing. Tests compare twin and
# original on random ASCII strings and on the test corpora (and both gave the same chunks on every
# file of the default corpus when this was written).
_WS, _NOT_WS = r"[\t\n\v\f\r ]", r"[^\t\n\v\f\r ]"
ASCII_TWINS = {
    GPT4_PATTERN: (r"'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}|"
                   r" ?[^\t\n\v\f\r A-Za-z0-9]+[\r\n]*|" + _WS + r"*[\r\n]|"
                   + _WS + r"+(?!" + _NOT_WS + r")|" + _WS + r"+"),
    GPT2_PATTERN: (r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\v\f\r A-Za-z0-9]+|"
                   + _WS + r"+(?!" + _NOT_WS + r")|" + _WS + r"+"),
}


def chunk_splitter(pattern):
    """text -> list of chunks (the pattern's findall). For the built-in patterns, pure-ASCII
    texts (str.isascii() is a flag lookup, free) take the `re` twin; custom patterns always
    use `regex`."""
    findall = compile_pattern(pattern).findall
    twin = ASCII_TWINS.get(resolve_pattern(pattern))
    if twin is None:
        return findall
    ascii_findall = re.compile(twin).findall

    def split(text):
        return ascii_findall(text) if text.isascii() else findall(text)
    return split


def escape_token(b):
    """Token bytes -> a printable ASCII word without spaces, for the human-readable file:
    printable ASCII stays as is, backslash becomes \\\\, every other byte becomes \\xNN.
    escape_token(b" the") == "\\x20the";  escape_token("é".encode()) == "\\xc3\\xa9"."""
    out = []
    for x in b:
        if x == 0x5C:
            out.append("\\\\")
        elif 0x21 <= x <= 0x7E:
            out.append(chr(x))
        else:
            out.append(f"\\x{x:02x}")
    return "".join(out)


_ESCAPE_RE = regex.compile(r"\\\\|\\x([0-9a-f]{2})|[\x21-\x5b\x5d-\x7e]")


def unescape_token(s):
    """Inverse of escape_token; raises ValueError on anything escape_token cannot produce."""
    out, pos = bytearray(), 0
    for m in _ESCAPE_RE.finditer(s):
        if m.start() != pos:
            break
        out.append(int(m.group(1), 16) if m.group(1) else ord("\\") if m.group(0) == "\\\\" else ord(m.group(0)))
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"bad token text {s!r}")
    return bytes(out)


def gpt2_bytes_to_unicode():
    """GPT-2's table byte -> printable unicode character, used in its encoder.json/vocab.bpe.

    GPT-2 stores tokens as text, so each byte needs a visible, non-space character. The 188
    bytes that are already printable Latin-1 (! to ~, ¡ to ¬, ® to ÿ) stand for themselves; the
    other 68 (controls, space, DEL, NBSP, soft hyphen...) are shifted to U+0100, U+0101, ... in
    byte order. So the space 0x20 becomes 'Ġ' (U+0120) and the newline 0x0A becomes 'Ċ'.
    The order of this table is also the order of GPT-2's first 256 ids: id 0 is '!'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table  # dict insertion order == GPT-2 id order of the byte tokens


# -----------------------------------------------------------------------------
# 3. Shared helpers: safe file writes, a full disk, progress lines, peak memory, the default corpus
#
# Small tools that prepare.py and train.py use too; they live here, in the lowest file, so each
# has one home.

def fsync_folder(folder):
    """Make the renames in folder durable (POSIX: fsync of the folder itself; a no-op on
    Windows, which cannot open a folder for this)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write):
    """Write a file so that `path` is either the old file or the complete new one, never half.

    write(f) fills an open binary temp file in the same folder; then fsync (the bytes are on
    disk), os.replace (atomic on POSIX and Windows), and fsync of the folder (the rename is
    on disk too). If anything fails, the temp file is removed and `path` is untouched; only a
    process killed mid-write leaves its temp file, which remove_stale_temp_files (below) deletes.
    prepare.py (meta.json) and train.py (checkpoints, logs) write through this too."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)


def atomic_write_bytes(path, data):
    """atomic_write for bytes already in memory (tokenizer files, meta.json)."""
    atomic_write(path, lambda f: f.write(data))


def pid_alive(pid):
    """True if a process with this id runs on this machine (or if we cannot tell: then nothing
    of its may be deleted). On Windows os.kill(pid, 0) would terminate the process, so there
    every pid counts as alive."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to another user
        return True
    return True


_TEMP_NAME = re.compile(r"\..+\.tmp(\d+)")  # atomic_write's temp files: .NAME.tmpPID


def remove_stale_temp_files(folder):
    """Delete the temp files that atomic_write left in folder when its process died mid-write
    (kill -9, power loss): .NAME.tmpPID whose PID no longer runs. A live writer's file is kept.
    Returns the names removed."""
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no such folder yet: nothing to clean
        return removed
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:  # gone already, or a folder: not ours to remove
                pass
    return removed


# The errno a write gets when the disk is full (ENOSPC) or the user's disk quota is (EDQUOT).
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(error):
    """True for the OSError of a write that found no space left (scripts turn it into one line)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def free_bytes(path):
    """Free space, in bytes, on the disk that holds path (or the nearest folder above it that exists)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


PROGRESS_SECONDS = 2.0  # on a terminal, a progress line is rewritten in place at most this often
PROGRESS_LOG_SECONDS = 10.0  # when stderr is a file, a new line at most this often (logs stay short)


class Progress:
    """A progress line on stderr for a long loop (BPE training, tokenizing, downloads).
        p = Progress("bpe: merges", total=3840)
        p.update(1200)      # the count so far; prints when it is time:
                            # 'bpe: merges 1200/3840 | 2300/s | ETA 1s'
        p.done()            # the final line, always printed (unless quiet)
    scale and unit show large counts readably: Progress("tokenizing", n_bytes, scale=1e6,
    unit=" MB") prints '12.0/50.3 MB'. total=0 means unknown: no ETA. note= adds a last field."""

    def __init__(self, label, total=0, scale=1, unit="", quiet=False):
        self.label, self.total, self.scale, self.unit, self.quiet = label, total, scale, unit, quiet
        self.count = 0
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = False  # a line was printed
        self.width = 0  # length of the line on screen, so a shorter one can blank it out

    def update(self, count, note=""):
        self.count = count
        now = time.perf_counter()
        if self.quiet or now - self.last < (PROGRESS_SECONDS if self.tty else PROGRESS_LOG_SECONDS):
            return
        self.last = now
        self._show(note, final=False)

    def add(self, n, note=""):
        self.update(self.count + n, note)

    def done(self, note=""):
        if not self.quiet:
            self._show(note, final=True)

    def _show(self, note, final):
        def amount(x):
            return f"{x / self.scale:.1f}" if self.scale != 1 else f"{x:.0f}"
        rate = self.count / max(time.perf_counter() - self.t0, 1e-9)
        line = f"{self.label} {amount(self.count)}" + (f"/{amount(self.total)}" if self.total else "")
        line += f"{self.unit} | {amount(rate)}{self.unit}/s"
        if self.total and rate > 0:
            line += f" | ETA {max(0.0, self.total - self.count) / rate:.0f}s"
        if note:
            line += f" | {note}"
        if self.tty:  # rewrite in place; the newline comes with the final line
            line, self.width = "\r" + line.ljust(self.width), len(line)
        print(line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)
        self.shown = True


def peak_rss_mb(children=False):
    """Peak resident memory in MB: of this process, or (children=True) of the largest child
    process that has finished (a worker). For this process Linux's VmHWM is read first: unlike
    ru_maxrss it is reset by exec, so a spawned child does not report its parent's peak."""
    if not children:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
    import resource  # POSIX only, so imported where it is needed
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


STDLIB_SKIP_DIRS = {"test", "tests", "site-packages", "__pycache__"}  # tests are huge and repetitive


def stdlib_files():
    """The default corpus of bpe.py and prepare.py: the Python standard library's own .py files,
    read from the running interpreter (no download). Test folders and site-packages are left
    out; paths are sorted, so every machine with the same Python version reads the same ~13 MB
    in the same order. Returns (root, [paths])."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_SKIP_DIRS)
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return root, sorted(paths)


def stdlib_documents():
    """The text of stdlib_files(), one document per file (undecodable bytes become U+FFFD)."""
    for path in stdlib_files()[1]:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


# -----------------------------------------------------------------------------
# 4. Pre-tokenization: text -> chunks -> chunk counts (serial and parallel)
#
# Training never looks at the corpus as one long string. It only needs how often each distinct
# chunk occurs: 13 MB of Python source has ~2.9M chunks but only ~66k distinct ones. So we stream
# over the documents, count chunks in a Counter, and memory grows with the number of distinct
# chunks, not with the corpus size. Special tokens are cut out first, so that no chunk (and so no
# merge) ever contains a piece of "<|endoftext|>".

def special_splitter(special_tokens):
    """A compiled regex matching any of the special tokens (longest first), or None.
    Longest first matters when one special is a prefix of another."""
    if not special_tokens:
        return None
    alternatives = sorted(special_tokens, key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")


def count_chunks_serial(texts, pattern, special_tokens=()):
    """Counter of chunk -> occurrences over an iterable of documents."""
    findall = chunk_splitter(pattern)
    cut = special_splitter(special_tokens)
    counts = collections.Counter()
    for text in texts:
        # [::2] drops the specials themselves; the `in` test (fast C search) skips the split
        # for the usual document that contains no special token
        has_special = cut is not None and any(s in text for s in special_tokens)
        pieces = cut.split(text)[::2] if has_special else (text,)
        for piece in pieces:
            counts.update(findall(piece))  # Counter.update on an iterable counts in C
    return counts


def _count_chunks_worker(job):
    pattern, special_tokens, texts = job
    return count_chunks_serial(texts, pattern, special_tokens)


BATCH_CHARS = 1 << 20  # documents are sent to worker processes in batches of about 1M characters
PARALLEL_MIN_CHARS = 1 << 18  # encode_batch below this many characters stays in one process


def _batches(texts, batch_chars=BATCH_CHARS):
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _use_fork():
    """Fork worker processes on Linux (they start fast and share the parent's memory), spawn
    elsewhere: on macOS fork is unsafe once system libraries have started threads (Python's
    docs; spawn is the default there), and Windows has no fork."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _context():
    return multiprocessing.get_context("fork" if _use_fork() else "spawn")


def _pool(num_proc, **kwargs):
    """A process pool, forked where _use_fork() says so (kwargs: Pool's, e.g. an initializer)."""
    return _context().Pool(num_proc, **kwargs)


def _reading_progress(texts):
    """Pass the documents through, with a progress line on stderr (see Progress)."""
    progress, docs = Progress("bpe: counting chunks", scale=1e6, unit="M characters"), 0
    for text in texts:
        yield text
        docs += 1
        progress.add(len(text), note=f"{docs:,} documents")
    if progress.shown:  # a long read: end its line (a short one printed nothing)
        progress.done(note=f"{docs:,} documents")


def count_chunks(texts, pattern=GPT4_PATTERN, special_tokens=(), num_proc=1, batch_chars=BATCH_CHARS,
                 quiet=True):
    """Count chunks, in `num_proc` processes for large inputs. The result is identical to the serial
    one: counting is a sum, and sums do not depend on which process added what. At most
    2 * num_proc batches are in flight, so a huge corpus is never held in memory at once."""
    if isinstance(texts, str):
        texts = [texts]
    if not quiet:
        texts = _reading_progress(texts)
    num_proc = num_proc or os.cpu_count() or 1
    if num_proc == 1:
        return count_chunks_serial(texts, pattern, special_tokens)
    counts = collections.Counter()
    with _pool(num_proc) as pool:
        pending = collections.deque()
        for batch in _batches(texts, batch_chars):
            pending.append(pool.apply_async(_count_chunks_worker, ((pattern, tuple(special_tokens), batch),)))
            if len(pending) >= 2 * num_proc:
                counts.update(pending.popleft().get())
        while pending:
            counts.update(pending.popleft().get())
    return counts


def chunks_to_words(chunk_counts):
    """{chunk str: count} -> (words, counts): each word is a list of byte values, sorted by bytes
    so that everything downstream runs in the same order in every process and on every platform.
    Single-byte chunks are dropped: they contain no pair, so they can never take part in a merge."""
    pairs = {}
    for chunk, n in chunk_counts.items():
        try:
            b = chunk.encode("utf-8", UTF8_ERRORS)
        except UnicodeEncodeError as e:
            raise UserError(f"cannot train on {chunk!r}: the text contains a lone surrogate ({e.reason}); "
                            f"read your files with errors='replace' or 'surrogateescape'") from None
        if len(b) >= 2:
            pairs[b] = pairs.get(b, 0) + n
    ordered = sorted(pairs)
    return [list(b) for b in ordered], [pairs[b] for b in ordered]


# -----------------------------------------------------------------------------
# 5. Training: the textbook merge loop and the incremental one
#
# Both take the distinct chunks as lists of byte values ("words") with their counts, and return
# the merges in the order they were learned, as (left_id, right_id, count); merge number i
# creates token id 256 + i.
#
# Which pair wins. The most frequent pair; among pairs with equal counts, the lexicographically
# greatest (bytes_of_left, bytes_of_right). Any fixed rule would do; what matters is that it
# depends only on the pair itself, never on dict or process order, so every run agrees.

def _merge_word(word, a, b, new_id):
    """Replace every non-overlapping occurrence of the pair (a, b), left to right, by new_id.
    _merge_word([1, 2, 1, 2, 2], 1, 2, 9) == [9, 9, 2]"""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges_reference(words, counts, n_merges):
    """The textbook loop (as in minbpe): recount every pair of the corpus for every merge.
    O(n_merges * corpus) -- only for tiny inputs and for testing the fast loop against."""
    words = [list(w) for w in words]
    vocab = [bytes([i]) for i in range(N_BYTES)]
    merges = []
    for _ in range(n_merges):
        stats = collections.Counter()
        for w, c in zip(words, counts):
            for pair in zip(w, w[1:]):
                stats[pair] += c
        if not stats:
            break  # every chunk is a single token: nothing left to merge
        (a, b), best = max(stats.items(), key=lambda kv: (kv[1], vocab[kv[0][0]], vocab[kv[0][1]]))
        new_id = N_BYTES + len(merges)
        merges.append((a, b, best))
        vocab.append(vocab[a] + vocab[b])
        words = [_merge_word(w, a, b, new_id) for w in words]
    return merges


def _descending(token):
    """A sort key that orders byte strings in REVERSE lexicographic order, so a min-heap pops the
    greatest first: negate each byte (255 - x) and end with 256, which sorts after every negated
    byte, so that a prefix ("ab") comes after its extensions ("abc"), the reverse of bytes order."""
    return (*[255 - x for x in token], 256)


def _initial_pairs(words, counts):
    """Count every adjacent pair of byte values and list the words containing it, with numpy
    (one sort instead of a Python loop over the ~0.5M pair positions of a 13 MB corpus).
    Returns pair_count {2-char str: weighted count} and where {2-char str: [word indices]}."""
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    flat = np.frombuffer(b"".join(map(bytes, words)), dtype=np.uint8).astype(np.int64)  # all words, end to end
    word_of = np.repeat(np.arange(len(words)), lengths)  # word index of every position
    is_start = np.ones(len(flat), dtype=bool)
    is_start[np.cumsum(lengths) - 1] = False  # a pair starts at every position but a word's last
    starts = np.flatnonzero(is_start)
    code = flat[starts] * N_BYTES + flat[starts + 1]  # pair (x, y) -> 256 x + y
    order = np.argsort(code, kind="stable")
    code, word_idx = code[order], word_of[starts][order]  # grouped by pair
    weight = np.asarray(counts, dtype=np.int64)[word_idx]  # each occurrence counts its word's frequency
    pairs, first = np.unique(code, return_index=True)
    totals = np.add.reduceat(weight, first).tolist() if len(code) else []
    bounds, word_idx = [*first.tolist(), len(code)], word_idx.tolist()
    pair_count = collections.defaultdict(int)
    where = collections.defaultdict(list)  # a list, not a set: a repeated index is harmless
    for k, c in enumerate(pairs.tolist()):
        pair = chr(c // N_BYTES) + chr(c % N_BYTES)
        pair_count[pair] = totals[k]
        where[pair] = word_idx[bounds[k]:bounds[k + 1]]
    return pair_count, where


def train_merges(words, counts, n_merges, quiet=True, final_words=None):
    """The incremental loop: same merges as train_merges_reference, without recounting.
    words: the distinct chunks as lists of byte values, counts: their frequencies (both from
    chunks_to_words). If final_words is a list, it receives every word's ids after the last merge.

    Representation. Each distinct chunk ("word") is a Python str with ONE CHARACTER PER TOKEN:
    token id t is chr(t). Then the slow parts run inside CPython's C string code: finding a pair
    is word.find(P), and merging all its occurrences left to right is word.replace(P, Z), exactly
    the semantics of _merge_word. A pair is the 2-character string P = chr(a) + chr(b).
      pair_count[P]  total occurrences of the pair, weighted by how often each word occurs
      where[P]       indices of the words that contain (or once contained) the pair
      heap           (-count, descending bytes key, P) entries, possibly stale

    One merge P = A+B -> Z visits only the words in where[P], and in each word only the
    neighbours of each occurrence change. For an occurrence at j, with left neighbour L and
    right neighbour R:   ... L A B R ...  ->  ... L Z R ...
        pair_count[L+A] -= n, pair_count[L+Z] += n     (n = occurrences of this word)
        pair_count[B+R] -= n, pair_count[Z+R] += n
    where two occurrences touch (A B A B -> Z Z) the boundary pair B+A becomes Z+Z, counted once.
    pair_count[P] itself drops to zero: replace() leaves no occurrence of P behind.

    Lazy invalidation, and why it is exact: a pair's count never grows after the merge that
    created it (a merge only removes occurrences of existing pairs; every pair it adds contains
    the brand-new token). So when the popped entry's count is out of date, the true count is
    lower: push it back with the true count and pop again. An up-to-date entry on top of the
    heap is therefore the true best pair, with the tie-break built into the heap key."""
    pair_count, where = _initial_pairs(words, counts)
    words = ["".join(map(chr, w)) for w in words]  # token ids -> one character each
    key = {chr(i): _descending(bytes([i])) for i in range(N_BYTES)}  # per token, see _descending
    vocab = {chr(i): bytes([i]) for i in range(N_BYTES)}
    heap = [(-c, (key[p[0]], key[p[1]]), p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges, progress = [], Progress("bpe: merges", n_merges, quiet=quiet)
    while len(merges) < n_merges and heap:
        neg, _, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c != -neg:  # stale entry: the true count is lower (see docstring)
            if c > 0:
                heapq.heappush(heap, (-c, (key[pair[0]], key[pair[1]]), pair))
            continue
        a, b = pair
        z = chr(N_BYTES + len(merges))
        merges.append((ord(a), ord(b), c))
        vocab[z] = vocab[a] + vocab[b]
        key[z] = _descending(vocab[z])
        born = {}  # new pair (it contains z) -> [its count, index of a word, index, ...]
        for i in where.pop(pair):
            w = words[i]
            j = w.find(pair)
            if j < 0:
                continue  # this word lost the pair in an earlier merge, or was already visited
            n, last, prev_end = counts[i], len(w) - 2, -1
            while j >= 0:
                nxt = w.find(pair, j + 2)
                if j > 0:  # left neighbour: L A -> L Z  (or, right after an occurrence, B A -> Z Z)
                    left = w[j - 1]
                    pair_count[left + a] -= n
                    p = z + z if j == prev_end else left + z
                    entry = born.get(p)
                    if entry is None:
                        born[p] = [n, i]
                    else:
                        entry[0] += n
                        entry.append(i)
                if j < last and nxt != j + 2:  # right neighbour: B R -> Z R (unless R starts the next one)
                    right = w[j + 2]
                    pair_count[b + right] -= n
                    p = z + right
                    entry = born.get(p)
                    if entry is None:
                        born[p] = [n, i]
                    else:
                        entry[0] += n
                        entry.append(i)
                prev_end, j = j + 2, nxt
            words[i] = w.replace(pair, z)
        del pair_count[pair]
        for p, entry in born.items():
            pair_count[p] = entry[0]
            where[p] = entry[1:]
            heapq.heappush(heap, (-entry[0], (key[p[0]], key[p[1]]), p))
        progress.update(len(merges))
    if merges:
        progress.done()
    if final_words is not None:
        final_words.extend([list(map(ord, w)) for w in words])
    return merges


# -----------------------------------------------------------------------------
# 6. The Tokenizer: encode, decode, streaming, files; (vocab, merges), GPT-2, tiktoken and
#    tokenizer.json interop
#
# A tokenizer is fully described by:
#   pattern         the split regex
#   byte_ids[b]     the id of the single byte b (b for ours; GPT-2 and tiktoken shuffle them)
#   merges          (left_id, right_id, new_id) in rank order: rank 0 is applied first
#   special_tokens  {"<|endoftext|>": id}
# Everything else (the bytes of each id, the pair -> rank table, the caches) is derived.


class StreamDecoder:
    """Turns ids into text one at a time for streaming generation, emitting only complete UTF-8
    characters: an emoji split over two tokens prints once, whole, when its last byte arrives.
    Invalid bytes still become U+FFFD (as in decode), but never because a character is unfinished.
        d = tok.stream_decoder(); pieces = [d.push(i) for i in ids] + [d.flush()]
        "".join(pieces) == tok.decode(ids)"""

    def __init__(self, vocab):
        self._vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # buffers unfinished chars

    def push(self, token_id) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < len(self._vocab) or self._vocab[token_id] is None:
            raise UserError(f"token id {token_id} is not in this tokenizer (vocab_size {len(self._vocab)})")
        return self._utf8.decode(self._vocab[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)  # an unfinished char at the very end -> U+FFFD


_WORKER = None  # inside encode_batch's worker processes: (tokenizer, texts, shared job counter)


def _encode_batch_init(tokenizer, texts, next_job):
    global _WORKER
    _WORKER = tokenizer, texts, next_job


def _claim_jobs(tokenizer, texts, bounds, next_job, allowed_special, as_arrays):
    """Encode jobs until none is left: job k is texts[bounds[k]:bounds[k + 1]], and the next
    free k comes from a counter shared by all processes (the parent of encode_batch too), so
    a process that started late or got short documents simply takes more jobs.
    Returns {k: [ids of each text]}; with as_arrays the ids are compact uint16/uint32 arrays,
    which cross the process boundary as raw bytes instead of one pickled int per id."""
    typecode = "H" if tokenizer.vocab_size <= 1 << 16 else "I"  # 2 bytes per id if they fit
    done = {}
    while True:
        with next_job.get_lock():
            k = next_job.value
            next_job.value = k + 1
        if k >= len(bounds) - 1:
            return done
        part = [tokenizer.encode(t, allowed_special) for t in texts[bounds[k]:bounds[k + 1]]]
        done[k] = [array.array(typecode, ids) for ids in part] if as_arrays else part


def _encode_batch_worker(bounds, allowed_special):
    tokenizer, texts, next_job = _WORKER
    return _claim_jobs(tokenizer, texts, bounds, next_job, allowed_special, as_arrays=True)


class Tokenizer:
    """A byte-level BPE tokenizer. Build one with Tokenizer.train / load / from_vocab_merges /
    from_gpt2 / from_tiktoken."""

    def __init__(self, pattern, merges, special_tokens=None, byte_ids=None, normalizer=""):
        if normalizer and normalizer not in NORMALIZERS:
            raise UserError(f"normalizer {normalizer!r}: this tokenizer knows {', '.join(NORMALIZERS)} (or none)")
        self.normalizer = normalizer or ""
        self.pattern = resolve_pattern(pattern)
        self._findall = chunk_splitter(self.pattern)
        self.byte_ids = list(range(N_BYTES)) if byte_ids is None else [int(i) for i in byte_ids]
        self.merges = [(int(a), int(b), int(z)) for a, b, z in merges]
        self.special_tokens = dict(special_tokens or {})
        ids = [*self.byte_ids, *(z for _, _, z in self.merges), *self.special_tokens.values()]
        if len(set(ids)) != len(ids) or min(ids) < 0 or len(self.byte_ids) != N_BYTES:
            raise UserError("inconsistent tokenizer: the 256 byte tokens, the merges and the special tokens "
                            "must all have distinct, non-negative ids")
        # derived tables
        self.vocab_size = 1 + max(ids)
        vocab = [None] * self.vocab_size  # id -> bytes
        for b, i in enumerate(self.byte_ids):
            vocab[i] = bytes([b])
        for a, b, z in self.merges:
            vocab[z] = vocab[a] + vocab[b]
        for s, i in self.special_tokens.items():
            vocab[i] = s.encode("utf-8")
        self._vocab = vocab
        self._rank = {(a, b): r for r, (a, b, _) in enumerate(self.merges)}  # pair -> rank
        self._merged = [z for _, _, z in self.merges]  # rank -> new id
        self._bytes_are_ids = self.byte_ids == list(range(N_BYTES))  # true for tokenizers we train
        self._cache = {}  # chunk str -> tuple of ids
        self._special_re = {}  # frozenset of allowed specials -> compiled splitter
        self._fingerprint = None
        self._vocab_dict = None  # built on first use of .vocab

    # --- training ---------------------------------------------------------------------------

    @classmethod
    def train(cls, texts, vocab_size, pattern=GPT4_PATTERN, special_tokens=(EOT,), num_proc=1, quiet=False):
        """Learn vocab_size - 256 - len(special_tokens) merges from an iterable of documents.

        Worked example (tests check it): the documents ["aaab", "aaab", "ab"] split into the chunks
        "aaab" x2 and "ab" x1. Pair counts: (a,a)=4, (a,b)=3 -> merge 1 is a+a -> "aa" (id 256);
        the words become [aa, a, b] x2 and [a, b]: (a,b)=3, (aa,a)=2 -> merge 2 is a+b -> "ab"
        (id 257); words [aa, ab] x2 and [ab]: merge 3 is aa+ab -> "aaab" (id 258)."""
        pattern = compile_pattern(pattern).pattern  # fail fast on a bad regex, before reading the corpus
        special_tokens = tuple(special_tokens or ())
        if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
            raise UserError(f"special tokens must be distinct and non-empty, got {list(special_tokens)}")
        n_merges = vocab_size - N_BYTES - len(special_tokens)
        if n_merges < 0:
            raise UserError(f"vocab_size={vocab_size} is too small: it needs at least {N_BYTES} bytes + "
                            f"{len(special_tokens)} special tokens = {N_BYTES + len(special_tokens)}")
        t0 = time.perf_counter()
        counts = count_chunks(texts, pattern, special_tokens, num_proc, quiet=quiet)
        if not counts:
            raise UserError("the training corpus is empty: give it at least one non-empty document")
        words, word_counts = chunks_to_words(counts)
        if not quiet:
            print(f"bpe: {sum(counts.values()):,} chunks, {len(counts):,} distinct, counted in "
                  f"{time.perf_counter() - t0:.1f}s; learning {n_merges} merges", file=sys.stderr)
        final_words = []
        merges = train_merges(words, word_counts, n_merges, quiet=quiet, final_words=final_words)
        if len(merges) < n_merges:
            print(f"bpe: stopped early after {len(merges)} of {n_merges} merges: every chunk of the "
                  f"corpus is already a single token (vocab_size {N_BYTES + len(merges) + len(special_tokens)}"
                  f" instead of {vocab_size}); use a bigger corpus for a bigger vocabulary", file=sys.stderr)
        merges = [(a, b, N_BYTES + r) for r, (a, b, _) in enumerate(merges)]
        first_special = N_BYTES + len(merges)  # specials take the ids right after the last merge
        specials = {s: first_special + k for k, s in enumerate(special_tokens)}
        tok = cls(pattern, merges, specials)
        # The trainer has already merged every distinct chunk of the corpus, and encoding a chunk
        # gives exactly the trainer's result (see _bpe; a test checks it). So the encode cache
        # starts warm: prepare.py, which encodes the corpus it just trained on, skips all BPE work.
        if len(words) <= CHUNK_CACHE_MAX:
            for raw, ids in zip(words, final_words):
                tok._cache[bytes(raw).decode("utf-8", UTF8_ERRORS)] = tuple(ids)
        return tok

    # --- properties ---------------------------------------------------------------------------

    @property
    def eot_id(self) -> int:
        """Id of <|endoftext|>, the token that starts every document in prepare.py's shards."""
        if EOT not in self.special_tokens:
            raise UserError(f"this tokenizer has no {EOT} special token; train it with special_tokens=({EOT!r},)")
        return self.special_tokens[EOT]

    # --- special tokens added later -------------------------------------------------------------

    def with_special_tokens(self, names):
        """This tokenizer plus those of the special tokens `names` that it lacks, at new ids after
        its last one. Every existing id keeps its meaning, so a model trained with this tokenizer
        still reads the new one's ids correctly and needs only embedding rows for the new ids
        (model.grow_vocab adds them). The result is a different tokenizer: its file lists more
        special tokens, so it has its own fingerprint, and a shard or checkpoint made with one is
        never taken for the other. Worked example: a tokenizer with ids 0..4095 (<|endoftext|> =
        4095) extended with bpe.CHAT_TOKENS gets <|system|> = 4096, <|user|> = 4097,
        <|assistant|> = 4098, <|end|> = 4099, vocab_size 4100; tok.extends(base) is then True."""
        new = [s for s in dict.fromkeys(names) if s not in self.special_tokens]
        if any(not isinstance(s, str) or not s for s in new):
            raise UserError(f"special tokens must be non-empty strings, got {list(names)}")
        specials = dict(self.special_tokens)
        specials.update({s: self.vocab_size + k for k, s in enumerate(new)})
        return type(self)(self.pattern, self.merges, specials, self.byte_ids)

    def extends(self, base) -> bool:
        """Whether this tokenizer is `base` plus special tokens at ids base never used (what
        with_special_tokens makes): the same split pattern, bytes and merges, and every special
        token of base at its old id. Such a tokenizer encodes any text to the ids base gives it."""
        return (self.pattern == base.pattern and self.byte_ids == base.byte_ids and self.merges == base.merges
                and all(self.special_tokens.get(s) == i for s, i in base.special_tokens.items())
                and all(i >= base.vocab_size for s, i in self.special_tokens.items()
                        if s not in base.special_tokens))

    @property
    def vocab(self):
        """The id -> bytes table, read-only: every id of the tokenizer, the special tokens as the
        UTF-8 bytes of their text. tok.vocab[i] is what decode_bytes([i]) gives, without building
        a list per id. With the merges as byte pairs, [(tok.vocab[a], tok.vocab[b]) for a, b, _ in
        tok.merges], it is the (vocab, merges) form of from_vocab_merges."""
        if self._vocab_dict is None:
            self._vocab_dict = {i: v for i, v in enumerate(self._vocab) if v is not None}
        return types.MappingProxyType(self._vocab_dict)

    def token_bytes(self):
        """Byte length of every id (0 for special tokens and unused ids). bits-per-byte divides the
        summed loss by the bytes of the targets, which makes models with different vocabularies
        comparable; specials are not text, so they count as 0 bytes."""
        lengths = [len(v) if v is not None else 0 for v in self._vocab]
        for i in self.special_tokens.values():
            lengths[i] = 0
        return lengths

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens}, fingerprint={self.fingerprint[:12]}...)")

    def __getstate__(self):  # for worker processes: the caches travel empty, compiled regexes not at all
        state = dict(self.__dict__)
        state.update(_cache={}, _special_re={}, _findall=None, _vocab_dict=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._findall = chunk_splitter(self.pattern)

    # --- encoding -----------------------------------------------------------------------------

    def _bpe(self, ids):
        """Apply the merges to one chunk (a list of ids): repeatedly merge the leftmost pair of
        lowest rank, until no pair of the chunk was ever merged.

        Why this equals replaying all merges in training order: a pair created by merge r contains
        the token made by merge r, so its rank is above r; ranks only go up as we merge, and the
        other occurrences of the pair just merged (rank r) are merged next, left to right, exactly
        as training merged them. ranks[k] is the rank of the pair (ids[k], ids[k+1]); a merge only
        changes the ranks of its two neighbours, and min() / index() scan the list in C.
            merges a+a -> 256 (rank 0), 256+b -> 257 (rank 1):  [a, a, a, b] -> [256, a, b] -> done
            (the pair (a, b) was never merged and (256, a) neither; 256+b does not occur)"""
        rank, merged = self._rank, self._merged
        never = len(merged)  # the "rank" of a pair that was never merged
        ranks = [rank.get(pair, never) for pair in zip(ids, ids[1:])]
        while ranks:
            r = min(ranks)
            if r == never:
                break
            i = ranks.index(r)  # leftmost occurrence
            ids[i:i + 2] = [merged[r]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank.get((ids[i - 1], ids[i]), never)
            if i < len(ranks):
                ranks[i] = rank.get((ids[i], ids[i + 1]), never)
        return ids

    def _encode_chunk(self, chunk):
        try:
            raw = chunk.encode("utf-8", UTF8_ERRORS)
        except UnicodeEncodeError as e:
            raise UserError(f"cannot encode {chunk!r}: the text contains a lone surrogate ({e.reason}); "
                            f"decode your bytes with errors='surrogateescape' or 'replace'") from None
        ids = list(raw) if self._bytes_are_ids else [self.byte_ids[b] for b in raw]
        return tuple(self._bpe(ids))

    def normalize(self, text) -> str:
        """text in the tokenizer's normal form (section 2's NORMALIZERS); unchanged without one.
        ASCII text is in every normal form already, and str.isascii() is free."""
        if not self.normalizer or text.isascii():
            return text
        return unicodedata.normalize(self.normalizer, text)

    def encode_ordinary(self, text) -> list:
        """Encode text with no special-token handling at all ("<|endoftext|>" is just 13 bytes)."""
        return self._encode_chunks(self._findall(self.normalize(text)))

    def _encode_chunks(self, chunks):
        """Chunks -> ids, through the chunk -> ids cache: real text repeats its chunks (the stdlib
        corpus has ~2.9M chunks but ~66k distinct), so _bpe runs once per distinct chunk and the
        rest is one dict lookup per chunk. (C-level map/chain variants were no faster than this
        plain loop with list.extend.)"""
        cache = self._cache
        if len(cache) > CHUNK_CACHE_MAX:
            cache.clear()  # bound memory on endless input; the common chunks come back at once
        get = cache.get
        ids = []
        extend = ids.extend
        for chunk in chunks:
            chunk_ids = get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self._encode_chunk(chunk)
            extend(chunk_ids)
        return ids

    def _allowed_specials(self, allowed_special):
        if allowed_special == "none" or allowed_special is None:
            return frozenset()
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):  # a single name: surely a mistake for {name}
            raise UserError(f"allowed_special={allowed_special!r}: use 'none', 'all' or a set of token "
                            f"strings such as {{{EOT!r}}}")
        allowed = frozenset(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise UserError(f"allowed_special has unknown tokens {sorted(unknown)}; "
                            f"this tokenizer has {sorted(self.special_tokens)}")
        return allowed

    def _special_splitter(self, allowed):
        """special_splitter(allowed), compiled once per set of allowed specials."""
        splitter = self._special_re.get(allowed)
        if splitter is None:
            splitter = self._special_re[allowed] = special_splitter(allowed)
        return splitter

    def encode(self, text, allowed_special="none") -> list:
        """Text -> ids.

        Special tokens are safe by default: with allowed_special="none" the text "<|endoftext|>"
        inside a document is encoded as ordinary bytes, so data cannot inject a document
        boundary. Pass "all" (or a set of token strings) to turn those strings into their ids.
            tok.encode("a<|endoftext|>")                         -> [ids of a, <|, endoftext, |>]
            tok.encode("a<|endoftext|>", allowed_special="all")  -> [id of a, tok.eot_id]"""
        allowed = self._allowed_specials(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        splitter = self._special_splitter(allowed)
        ids = []
        for k, piece in enumerate(splitter.split(text)):  # [text, special, text, special, ...]
            if k % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts, num_proc=None, allowed_special="none") -> list:
        """Encode many documents, in num_proc processes (None = all cores). Same ids as encode."""
        texts = list(texts)
        num_proc = min(num_proc or os.cpu_count() or 1, max(1, len(texts)))
        self._allowed_specials(allowed_special)  # validate here, not in every worker
        total = sum(map(len, texts))
        if num_proc == 1 or total < PARALLEL_MIN_CHARS:  # small jobs: processes cost more than they save
            return [self.encode(t, allowed_special) for t in texts]
        # Contiguous slices with about equal numbers of CHARACTERS (not of texts: one file of
        # the stdlib corpus is 60x the median), a few per process so that the work evens out.
        # Boundary k is the first text at which the running total of characters reaches
        # k/n_jobs of all of them.
        n_jobs = min(len(texts), num_proc * 4)
        ends = list(itertools.accumulate(map(len, texts)))
        bounds = sorted({0, len(texts), *(bisect.bisect_left(ends, total * k / n_jobs)
                                          for k in range(1, n_jobs))})
        # num_proc - 1 worker processes, and this process is the last one: it encodes jobs
        # too instead of waiting, its ids need no transfer, and its cache gets warm. (With
        # num_proc workers this process would idle while they ran, then convert all their ids
        # alone.) With fork the workers inherit the tokenizer, its cache and the texts from
        # this process's memory; with spawn they are pickled to each worker.
        next_job = _context().Value("q", 0)
        with _pool(num_proc - 1, initializer=_encode_batch_init, initargs=(self, texts, next_job)) as pool:
            workers = [pool.apply_async(_encode_batch_worker, (bounds, allowed_special))
                       for _ in range(num_proc - 1)]
            done = _claim_jobs(self, texts, bounds, next_job, allowed_special, as_arrays=False)
            for worker in workers:
                done.update((k, [a.tolist() for a in part]) for k, part in worker.get().items())
        return [ids for k in range(len(bounds) - 1) for ids in done[k]]

    # The regex decides chunk boundaries by looking ahead: "  x" splits as " ", " x", but "  " at
    # the end of the text stays one chunk. So encode_iterable holds back the last chunks of what it
    # has read (the ones more text could still change) and only emits the ones before them.
    # Two is enough for our patterns: a whitespace run ending the text splits into at most two
    # chunks once more text arrives; tests check random line splits against encode.
    # Allowed special tokens add one more thing that more text can change: which special token
    # (if any) starts at position p depends on the L characters from p on, L = the longest
    # allowed special. So a special token is taken only where p + L <= len(text), text is
    # committed only up to there, and a special token cut across two pieces is found whole on
    # a later pass.
    STREAM_HOLD_BACK = 2
    STREAM_BLOCK = 1 << 16  # characters read before each regex pass

    def encode_iterable(self, pieces, allowed_special="none"):
        """Lazy encode of an iterable of strings (e.g. an open file): yields exactly the ids of
        encode("".join(pieces), allowed_special), however the text is cut into pieces, holding
        only about STREAM_BLOCK characters in memory."""
        allowed = self._allowed_specials(allowed_special)
        splitter = self._special_splitter(allowed) if allowed else None
        longest = max(map(len, allowed), default=0)
        buffer, size = [], 0
        for piece in pieces:
            buffer.append(piece)
            size += len(piece)
            if size < self.STREAM_BLOCK:
                continue
            # normalizing the held-back rest again with the new text is exact: NFC(NFC(a) + b) =
            # NFC(a + b), and what more text can change (the last characters) is held back
            text = self.normalize("".join(buffer))
            start, decided = 0, len(text) - longest  # a special at p <= decided is certain
            if splitter is not None:
                for m in splitter.finditer(text):
                    if m.start() > decided:
                        break
                    yield from self.encode_ordinary(text[start:m.start()])  # complete: a special ends it
                    yield self.special_tokens[m.group()]
                    start = m.end()
            # No special starts in text[start:decided + 1]; one may still start after it.
            chunks = self._findall(text[start:max(start, decided + 1)])
            done = chunks[:-self.STREAM_HOLD_BACK]
            yield from self._encode_chunks(done)  # not encode("".join(done)): that would re-split
            rest = text[start + sum(map(len, done)):]
            buffer, size = [rest], len(rest)
        if buffer:
            yield from self.encode("".join(buffer), allowed_special)

    # --- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """Ids -> the exact bytes (special tokens as their text)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(self._vocab.__getitem__, ids))
        except (IndexError, TypeError):
            bad = [i for i in ids if not (0 <= i < self.vocab_size and self._vocab[i] is not None)]
            raise UserError(f"token id {bad[0]} is not in this tokenizer (vocab_size {self.vocab_size}); "
                            f"was it made with a different tokenizer?") from None

    def decode(self, ids) -> str:
        """Ids -> text. A cut in the middle of a multi-byte character (or bytes that are not
        UTF-8 at all) decodes to U+FFFD rather than failing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self._vocab)

    # --- files ----------------------------------------------------------------------------------
    #
    # The file is plain text, one fact per line, diffable and readable:
    #     nanostack-bpe 1
    #     pattern "'(?i:[sdmt]|ll|ve|re)|..."            (JSON string)
    #     byte_ids identity                            (or the 256 ids of bytes 0..255)
    #     merges 3839
    #     256 32 116 \x20 t                            (new_id left_id right_id left right)
    #     ...
    #     specials 1
    #     4095 "<|endoftext|>"                         (id, JSON string)
    # The ids make the file exact; the escaped bytes make it readable, and load() checks they agree.
    # Lines starting with '#' are comments. fingerprint = sha256 of this text without comments.

    def _serialize(self) -> str:
        lines = [f"{FORMAT_NAME} {FORMAT_VERSION}", f"pattern {json.dumps(self.pattern)}"]
        if self.normalizer:  # only then: the files (and fingerprints) of tokenizers without one stay as they were
            lines.append(f"normalizer {self.normalizer}")
        identity = self.byte_ids == list(range(N_BYTES))
        lines.append("byte_ids identity" if identity else "byte_ids " + " ".join(map(str, self.byte_ids)))
        lines.append(f"merges {len(self.merges)}")
        vocab = self._vocab
        lines += [f"{z} {a} {b} {escape_token(vocab[a])} {escape_token(vocab[b])}" for a, b, z in self.merges]
        lines.append(f"specials {len(self.special_tokens)}")
        lines += [f"{i} {json.dumps(s)}" for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])]
        return "\n".join(lines) + "\n"

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical serialization: equal fingerprints <=> identical tokenizers."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self._serialize().encode("utf-8")).hexdigest()
        return self._fingerprint

    def save(self, path):
        header = (f"# byte-level BPE tokenizer written by nanostack bpe.py; vocab_size {self.vocab_size}\n"
                  f"# merge lines: new_id left_id right_id left_bytes right_bytes "
                  f"(bytes escaped: \\xNN, \\\\)\n# fingerprint {self.fingerprint}\n")
        atomic_write_bytes(path, (header + self._serialize()).encode("utf-8"))

    @classmethod
    def load(cls, path):
        """Read a file written by save(); any problem is a UserError naming the file and line."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise UserError(f"tokenizer file {path} not found: train one with `python bpe.py --train=...` "
                            f"or run prepare.py") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read tokenizer file {path} ({e}); "
                            f"re-create it with bpe.py or prepare.py") from None
        lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line and not line.startswith("#")]
        pos = 0

        def take(what):
            nonlocal pos
            if pos >= len(lines):
                raise ValueError(f"file ends where {what} was expected")
            n, line = lines[pos]
            pos += 1
            return n, line

        try:
            n, line = take("the header")
            if line.split(" ")[0] != FORMAT_NAME:
                raise ValueError(f"line {n}: not a nanostack tokenizer file (no '{FORMAT_NAME}' header)")
            if line != f"{FORMAT_NAME} {FORMAT_VERSION}":
                raise ValueError(f"line {n}: format {line!r}, this bpe.py reads version {FORMAT_VERSION}")
            n, line = take("pattern")
            if not line.startswith("pattern "):
                raise ValueError(f"line {n}: expected 'pattern \"...\"'")
            pattern = json.loads(line[len("pattern "):])
            n, line = take("byte_ids")
            normalizer = ""
            if line.startswith("normalizer "):
                normalizer = line[len("normalizer "):]
                n, line = take("byte_ids")
            fields = line.split(" ")
            if fields[0] != "byte_ids":
                raise ValueError(f"line {n}: expected 'byte_ids'")
            byte_ids = None if fields[1:] == ["identity"] else [int(x) for x in fields[1:]]
            if byte_ids is not None and len(byte_ids) != N_BYTES:
                raise ValueError(f"line {n}: byte_ids needs {N_BYTES} ids")
            n, line = take("merges")
            if not line.startswith("merges "):
                raise ValueError(f"line {n}: expected 'merges N'")
            vocab = {i: bytes([b]) for b, i in enumerate(byte_ids or range(N_BYTES))}
            merges = []
            for _ in range(int(line.split(" ")[1])):
                n, line = take("a merge line")
                fields = line.split(" ")
                if len(fields) != 5:
                    raise ValueError(f"line {n}: expected a merge 'new_id left_id right_id left right'")
                z, a, b, left, right = fields
                z, a, b = int(z), int(a), int(b)
                if a not in vocab or b not in vocab or z in vocab:
                    raise ValueError(f"line {n}: merge {z} = {a} + {b} uses an unknown id or reuses one")
                if unescape_token(left) != vocab[a] or unescape_token(right) != vocab[b]:
                    raise ValueError(f"line {n}: the bytes do not match ids {a} and {b}")
                vocab[z] = vocab[a] + vocab[b]
                merges.append((a, b, z))
            n, line = take("specials")
            if not line.startswith("specials "):
                raise ValueError(f"line {n}: expected 'specials N'")
            specials = {}
            for _ in range(int(line.split(" ")[1])):
                n, line = take("a special token line")
                fields = line.split(" ", 1)
                if len(fields) != 2:
                    raise ValueError(f"line {n}: expected a special token 'id \"text\"'")
                specials[json.loads(fields[1])] = int(fields[0])
            if pos != len(lines):
                raise ValueError(f"line {lines[pos][0]}: unexpected text after the special tokens")
            return cls(pattern, merges, specials, byte_ids, normalizer)
        except (ValueError, IndexError, TypeError, regex.error) as e:
            raise UserError(f"bad tokenizer file {path}: {e}; re-create it with bpe.py or prepare.py") from None

    # --- interop: (vocab, merges), GPT-2 and tiktoken ---------------------------------------------

    def as_vocab_merges(self):
        """This tokenizer in the (vocab, merges) form, as keyword arguments of from_vocab_merges:
        plain dicts, lists, bytes and strings (train.py stores it inside every checkpoint, so a
        checkpoint carries its own tokenizer). from_vocab_merges(**tok.as_vocab_merges()) has
        tok's fingerprint."""
        out = {"vocab": dict(self.vocab), "merges": [(self.vocab[a], self.vocab[b]) for a, b, _ in self.merges],
               "special_tokens": dict(self.special_tokens), "pattern": self.pattern}
        if self.normalizer:
            out["normalizer"] = self.normalizer
        return out

    @classmethod
    def from_vocab_merges(cls, vocab, merges, special_tokens=None, pattern=GPT4_PATTERN, normalizer=""):
        """A tokenizer from the (vocab, merges) form that other BPE tools exchange:
            vocab           {id: token bytes}, the 256 single bytes included (at any ids)
            merges          [(left bytes, right bytes), ...] in rank order (applied first to last)
            special_tokens  {text: id}; their ids may appear in vocab (with the text's UTF-8 bytes)
            normalizer      "" (none) or "NFC": the text is put into that normal form first
        Every id of vocab must be one of the 256 bytes, the result of a merge, or a special
        token: anything else would be an id that encoding can never produce. Each merge must
        join two tokens that exist before it and make a token that did not. Any problem is one
        UserError line. Worked example: vocab {0..255: the bytes, 256: b"ab"}, merges
        [(b"a", b"b")] gives encode("abc") == [256, ord("c")]. from_gpt2 is built on this."""
        special_tokens = dict(special_tokens or {})
        special_ids = {i: s for s, i in special_tokens.items()}
        id_of = {}  # token bytes -> id, specials excluded
        for i, token in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0 or not isinstance(token, (bytes, bytearray)):
                raise UserError(f"bad vocab entry {i!r}: {token!r}; vocab maps ids (int >= 0) to token bytes")
            if i in special_ids:
                if token != special_ids[i].encode("utf-8"):
                    raise UserError(f"vocab id {i} is the special token {special_ids[i]!r} but holds {token!r}")
                continue
            if bytes(token) in id_of:
                raise UserError(f"vocab ids {id_of[bytes(token)]} and {i} are both {bytes(token)!r}; "
                                f"each token must have one id")
            id_of[bytes(token)] = i
        missing = [b for b in range(N_BYTES) if bytes([b]) not in id_of]
        if missing:
            raise UserError(f"vocab has no token for byte 0x{missing[0]:02x} ({len(missing)} bytes missing); "
                            f"a byte-level BPE needs all {N_BYTES} single bytes")
        byte_ids = [id_of[bytes([b])] for b in range(N_BYTES)]
        made = set(byte_ids)  # ids that exist so far: the bytes, then each merge's result
        triples = []
        for rank, pair in enumerate(merges):
            if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                    or not all(isinstance(p, (bytes, bytearray)) for p in pair)):
                raise UserError(f"merge {rank} is {pair!r}; each merge is a pair (left bytes, right bytes)")
            left, right = bytes(pair[0]), bytes(pair[1])
            for part in (left, right):
                if id_of.get(part) not in made:
                    raise UserError(f"merge {rank} ({left!r}, {right!r}): {part!r} is not a token made "
                                    f"before it (not in vocab, or made by a later merge)")
            z = id_of.get(left + right)
            if z is None or z in made:
                raise UserError(f"merge {rank} ({left!r}, {right!r}): its result {left + right!r} is "
                                + ("not in vocab" if z is None else "already made (a byte or an earlier merge)"))
            made.add(z)
            triples.append((id_of[left], id_of[right], z))
        unmade = sorted(set(id_of.values()) - made)
        if unmade:
            i = unmade[0]
            raise UserError(f"vocab id {i} ({vocab[i]!r}) is neither a byte, nor made by a merge, nor a "
                            f"special token ({len(unmade)} such ids); if it is a special token, "
                            f"pass it in special_tokens")
        return cls(pattern, triples, special_tokens, byte_ids, normalizer)

    @classmethod
    def from_gpt2(cls, encoder_json, vocab_bpe):
        """Load GPT-2's published files so that encode() returns GPT-2's exact ids.

        encoder.json maps token text -> id and vocab.bpe lists the merges in rank order, one
        "left right" per line, both written with gpt2_bytes_to_unicode() (a space is 'Ġ').
        Tokens that are neither a byte nor a merge result (<|endoftext|>) are special tokens.
        The texts are turned back into bytes, and from_vocab_merges does the rest."""
        try:
            with open(encoder_json, encoding="utf-8") as f:
                encoder = json.load(f)
            with open(vocab_bpe, encoding="utf-8") as f:
                merge_lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read GPT-2 tokenizer files {encoder_json}, {vocab_bpe}: {e}") from None
        from_unicode = {c: b for b, c in gpt2_bytes_to_unicode().items()}

        def special_name(s):  # GPT-2 writes "<|endoftext|>" in printable ASCII, which maps to itself
            try:
                return bytes(from_unicode[c] for c in s).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                return s

        try:
            merges = [tuple(line.split(" ")) for line in merge_lines]
            made = {a + b for a, b in merges}
            vocab, specials = {}, {}
            for text, i in encoder.items():
                if len(text) > 1 and text not in made:
                    specials[special_name(text)] = i
                else:
                    vocab[i] = bytes(from_unicode[c] for c in text)
            byte_merges = [(bytes(from_unicode[c] for c in a), bytes(from_unicode[c] for c in b))
                           for a, b in merges]
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{vocab_bpe} does not match {encoder_json} (problem at {e}); use the pair "
                            f"published together") from None
        try:
            return cls.from_vocab_merges(vocab, byte_merges, specials, pattern=GPT2_PATTERN)
        except UserError as e:
            raise UserError(f"{vocab_bpe} does not match {encoder_json} ({e}); use the pair published "
                            f"together") from None

    def save_tiktoken(self, path):
        """tiktoken's rank file: 'base64(token bytes) rank' per line, rank = our id; specials are not
        in it (tiktoken takes them as a separate argument)."""
        specials = set(self.special_tokens.values())
        lines = [f"{base64.b64encode(v).decode('ascii')} {i}" for i, v in enumerate(self._vocab)
                 if v is not None and i not in specials]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("ascii"))

    @classmethod
    def from_tiktoken(cls, path, pattern=GPT4_PATTERN, special_tokens=(EOT,)):
        """Read a tiktoken rank file. It lists tokens, not merges, so each merge is recovered by
        encoding the token's bytes with the merges of lower rank: what is left are the two halves
        that merge into it. special_tokens: names (ids after the last rank) or a dict name -> id."""
        ranks = {}
        try:
            with open(path, encoding="ascii") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read tiktoken file {path}: {e}") from None
        singles = {t[0]: r for t, r in ranks.items() if len(t) == 1}
        if len(singles) != N_BYTES:
            raise UserError(f"{path}: a byte-level rank file needs all {N_BYTES} single bytes, found {len(singles)}")
        tok = cls(pattern, [], {}, [singles[b] for b in range(N_BYTES)])
        for token, rank in sorted(((t, r) for t, r in ranks.items() if len(t) > 1), key=lambda tr: tr[1]):
            parts = tok._bpe([tok.byte_ids[b] for b in token])
            if len(parts) != 2:
                raise UserError(f"{path}: token {token!r} (rank {rank}) is not the merge of two earlier tokens")
            tok._rank[tuple(parts)] = len(tok._merged)
            tok._merged.append(rank)
            tok.merges.append((parts[0], parts[1], rank))
        if not isinstance(special_tokens, dict):
            top = max(ranks.values()) + 1
            special_tokens = {s: top + k for k, s in enumerate(special_tokens or ())}
        return cls(pattern, tok.merges, special_tokens, tok.byte_ids)


    # --- interop: Hugging Face's tokenizer.json ---------------------------------------------------
    #
    # Hugging Face's `tokenizers` library (behind transformers' fast tokenizers) keeps a whole
    # tokenizer in one JSON file. For a byte-level BPE these parts decide the ids:
    #   model          {"type": "BPE", "vocab": {token text: id}, "merges": ["Ġ t", ...] (or
    #                  [["Ġ", "t"], ...]) in rank order}. Token texts are bytes written with
    #                  gpt2_bytes_to_unicode, so a space is "Ġ" and no text holds a real space.
    #   pre_tokenizer  how text is cut into chunks before BPE: a Split by a regex (behavior
    #                  "Isolated": each match is a chunk), then ByteLevel (bytes -> those printable
    #                  characters) with its own regex off; or ByteLevel alone with its regex on,
    #                  which is GPT-2's pattern.
    #   added_tokens   [{"id", "content", "special", ...}]: cut out of the text before anything else,
    #                  as our allowed special tokens are (encode(..., allowed_special="all")).
    #   normalizer     a rewrite of the text first: NFC (Qwen's files) is ours too (NORMALIZERS);
    #                  any other (lowercasing, NFKC, ...) is refused.
    # Our file also says what to put around the ids (post_processor: <|endoftext|> in front, the BOS
    # every training document starts with, as sample.py's prompts) and how to decode (ByteLevel).
    # Tokenizers that are not byte-level BPE (SentencePiece-style: Unigram, or BPE over characters
    # with byte fallback and a Metaspace pre-tokenizer; WordPiece) cannot be expressed here: one line.

    def to_tokenizer_json(self):
        """This tokenizer as a tokenizer.json dict (see above). Built on as_vocab_merges; our
        pattern goes into the Split as it is (the `regex` syntax of our patterns, possessive
        quantifiers included, is also Oniguruma's, the engine of `tokenizers`)."""
        text = gpt2_bytes_to_unicode()
        vm = self.as_vocab_merges()

        def as_text(token):
            return "".join(text[b] for b in token)
        specials = sorted(vm["special_tokens"].items(), key=lambda kv: kv[1])
        special_ids = {i for _, i in specials}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for s, i in specials]
        post = None
        if EOT in vm["special_tokens"]:
            bos = {"SpecialToken": {"id": EOT, "type_id": 0}}
            post = {"type": "TemplateProcessing",
                    "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": EOT, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {EOT: {"id": EOT, "ids": [self.eot_id], "tokens": [EOT]}}}
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": self.normalizer} if self.normalizer else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": vm["pattern"]}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False,
                      "vocab": {as_text(b): i for i, b in sorted(vm["vocab"].items()) if i not in special_ids},
                      "merges": [f"{as_text(a)} {as_text(b)}" for a, b in vm["merges"]]}}

    def save_tokenizer_json(self, path):
        atomic_write_bytes(path, json.dumps(self.to_tokenizer_json(), ensure_ascii=False, indent=1).encode("utf-8"))

    @staticmethod
    def _tokenizer_json_pattern(pre, refuse):
        """The split pattern a tokenizer.json pre_tokenizer stands for (see the comment above)."""
        steps = (pre.get("pretokenizers") or []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
        if not all(isinstance(p, dict) for p in steps):
            refuse("has no pre_tokenizer (a byte-level BPE has a ByteLevel one)")
        kinds = [p.get("type") for p in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            pattern = GPT2_PATTERN  # ByteLevel's built-in regex is GPT-2's, alternative for alternative
        elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            split = steps[0]
            if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in (split.get("pattern") or {}):
                refuse(f"its Split is {split.get('behavior')} by {split.get('pattern')} (invert "
                       f"{split.get('invert')}); nanostack cuts text into the matches of a regex (Isolated)")
            pattern = split["pattern"]["Regex"]
        else:
            refuse(f"its pre-tokenizer is {' + '.join(map(str, kinds))}; nanostack expresses a Split by a "
                   f"regex followed by ByteLevel, or ByteLevel alone (SentencePiece-style tokenizers are not byte-level)")
        if steps[-1].get("add_prefix_space"):
            refuse("its ByteLevel step adds a space in front of the text (add_prefix_space), which nanostack does not")
        return pattern

    @classmethod
    def from_tokenizer_json(cls, path):
        """Read a Hugging Face tokenizer.json holding a byte-level BPE (see the comment above):
        vocab and merges become the (vocab, merges) form of from_vocab_merges, the pre-tokenizer
        becomes the split pattern, an NFC normalizer is kept, and every added token becomes a
        special token. What this Tokenizer cannot express (another model type, another
        normalizer, a pre-tokenizer other than Split + ByteLevel or ByteLevel) is refused with one
        line naming it."""
        def refuse(what):
            raise UserError(f"{path}: {what}; nanostack reads byte-level BPE tokenizers only")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"tokenizer file {path} not found") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({first_line(e)}); it is not a tokenizer.json") from None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
            kind = model.get("type") if isinstance(model, dict) else None
            refuse(f"its model is {kind or 'not BPE'} (SentencePiece/Unigram or WordPiece, not BPE)")
        for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                refuse(f"its BPE has {key}={model[key]!r}, a feature of BPE over characters, not bytes")
        normalizer = data.get("normalizer") or {}
        if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
            steps = normalizer.get("normalizers") or []
            normalizer = steps[0] if len(steps) == 1 else normalizer  # a Sequence of one is that one
        if normalizer and (not isinstance(normalizer, dict) or normalizer.get("type") not in NORMALIZERS):
            kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
            refuse(f"it normalizes text first with {kind}, which nanostack does not (it knows {', '.join(NORMALIZERS)})")
        pattern = cls._tokenizer_json_pattern(data.get("pre_tokenizer"), refuse)
        decoder = data.get("decoder")
        if decoder and decoder.get("type") != "ByteLevel":
            refuse(f"its decoder is {decoder.get('type')}, not ByteLevel")
        from_text = {c: b for b, c in gpt2_bytes_to_unicode().items()}

        def as_bytes(token):
            try:
                return bytes(from_text[c] for c in token)
            except (KeyError, TypeError):
                refuse(f"token {token!r} is not written in the byte-level alphabet")
        specials = {}
        try:
            for t in data.get("added_tokens") or []:
                if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                    refuse(f"added token {t['content']!r} strips spaces or matches whole words only")
                specials[str(t["content"])] = int(t["id"])
            vocab = {int(i): as_bytes(token) for token, i in model["vocab"].items() if int(i) not in specials.values()}
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: its vocab, merges or added_tokens are malformed ({first_line(e)})") from None
        if any(len(m) != 2 for m in merges):
            refuse(f"merge {next(m for m in merges if len(m) != 2)!r} is not a pair of tokens")
        try:
            tok = cls.from_vocab_merges(vocab, [(as_bytes(a), as_bytes(b)) for a, b in merges], specials, pattern,
                                        normalizer.get("type", ""))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        if model.get("ignore_merges"):
            # `tokenizers` then takes a chunk that is a whole vocab token as that token, without
            # merging. Our merges give the same ids exactly when each token, merged from its
            # bytes, comes out as itself; check every one (tiktoken-made vocabularies pass).
            for a, b, z in tok.merges:
                if tok._bpe([tok.byte_ids[x] for x in tok._vocab[z]]) != [z]:
                    refuse(f"ignore_merges is on and token {tok._vocab[z]!r} is not what its merges make")
        return tok


# -----------------------------------------------------------------------------
# 7. Teaching demo and benchmark

DEMO_TEXT = """\
The cat sat on the mat. The cat ate the rat, and then the other cat sat on the hat.
A tokenizer that has seen "the cat" many times learns " the" and " cat" as single tokens,
while rare words like "anthropomorphic" stay split into smaller pieces."""
DEMO_MERGES = 20  # merges printed by the demo
DEMO_SENTENCE = "The other cat sat on the anthropomorphic hat."


def demo():
    """Train on DEMO_TEXT, printing each merge with its count, then split a sentence."""
    print(f"Training text ({len(DEMO_TEXT)} characters):\n{DEMO_TEXT}\n")
    counts = count_chunks_serial([DEMO_TEXT], GPT4_PATTERN)
    print(f"The GPT-4 pattern cuts it into {sum(counts.values())} chunks, {len(counts)} distinct, e.g. "
          f"{list(counts)[:8]}\n")
    words, word_counts = chunks_to_words(counts)
    merges = train_merges(words, word_counts, DEMO_MERGES)
    vocab = [bytes([i]) for i in range(N_BYTES)]
    print("Each step merges the most frequent adjacent pair (ties: greatest bytes) into a new token:")
    for a, b, count in merges:
        vocab.append(vocab[a] + vocab[b])
        print(f"  merge {len(vocab) - N_BYTES:2d}: {vocab[a]!r:>8} + {vocab[b]!r:<8} -> id {len(vocab) - 1}"
              f" {vocab[-1]!r:<12} (seen {count} times)")
    tok = Tokenizer(GPT4_PATTERN, [(a, b, N_BYTES + r) for r, (a, b, _) in enumerate(merges)], {EOT: len(vocab)})
    ids = tok.encode(DEMO_SENTENCE)
    pieces = [tok.decode([i]) for i in ids]
    print(f"\n{DEMO_SENTENCE!r}\n  -> {len(DEMO_SENTENCE.encode())} bytes, {len(ids)} tokens: {pieces}")
    print(f"  ids: {ids}\n  decode(ids) == text: {tok.decode(ids) == DEMO_SENTENCE}")


def _train_in_child(vocab_size, num_proc, queue):
    docs = list(stdlib_documents())
    base = peak_rss_mb()
    t0 = time.perf_counter()
    Tokenizer.train(docs, vocab_size, num_proc=num_proc, quiet=True)
    queue.put((time.perf_counter() - t0, base, peak_rss_mb()))


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


BENCH_VOCAB = 4096  # the issue's target size for the stdlib corpus
BENCH_BIG_VOCAB = 32768  # a GPT-2-like size, timed once per trainer


def bench(settings):
    """Side by side in one process, alternating, medians. Reference libraries are optional;
    HF `tokenizers` trains with all cores (its default), tiktoken encodes with 1 and all threads."""
    docs = list(stdlib_documents())
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    cores = os.cpu_count() or 1
    reps = settings.bench_repeats
    print(f"bench: stdlib corpus {len(docs)} files, {mb:.1f} MB; {cores} cores; medians of {reps}")
    try:
        import tokenizers as hf
    except ImportError:
        hf = None
        print("bench: Hugging Face `tokenizers` not installed (pip install tokenizers): no training reference")

    def hf_train(vocab_size):
        t = hf.Tokenizer(hf.models.BPE())
        t.pre_tokenizer = hf.pre_tokenizers.Sequence([
            hf.pre_tokenizers.Split(hf.Regex(GPT4_PATTERN), behavior="isolated"),
            hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                         initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
        t.train_from_iterator(docs, trainer)

    sizes = [BENCH_VOCAB, BENCH_BIG_VOCAB] if settings.bench_big else [BENCH_VOCAB]
    for vocab_size in sizes:
        r = reps if vocab_size == BENCH_VOCAB else 1
        ours, ours_par, ref = [], [], []
        for _ in range(r):  # alternate so that load from other users hits both alike
            t0 = time.perf_counter()
            Tokenizer.train(docs, vocab_size, quiet=True)
            ours.append(time.perf_counter() - t0)
            if cores > 1:
                t0 = time.perf_counter()
                Tokenizer.train(docs, vocab_size, num_proc=cores, quiet=True)
                ours_par.append(time.perf_counter() - t0)
            if hf is not None:
                t0 = time.perf_counter()
                hf_train(vocab_size)
                ref.append(time.perf_counter() - t0)
        line = f"train vocab {vocab_size}: ours {statistics.median(ours):.2f}s (1 proc)"
        if ours_par:
            line += f", {statistics.median(ours_par):.2f}s ({cores} procs)"
        if ref:
            best = min(statistics.median(ours), statistics.median(ours_par or ours))
            hf_median = statistics.median(ref)
            line += f" | HF tokenizers {hf_median:.2f}s | ratio ours/HF {best / hf_median:.2f}"
        print(line)
    # peak memory of one training run in a fresh process (our parent holds HF and the corpus)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_in_child, args=(BENCH_VOCAB, 1, queue))
    child.start()
    seconds, base, peak = queue.get()
    child.join()
    print(f"train vocab {BENCH_VOCAB} in a fresh process: {seconds:.2f}s, peak RSS {peak:.0f} MB "
          f"({base:.0f} MB of it is the interpreter and the corpus as str)")

    tok = Tokenizer.train(docs, BENCH_VOCAB, quiet=True)

    # Everything encodes document by document, as prepare.py does (and as encode_batch hands
    # documents to its workers); a document is split as one string (the ASCII fast path
    # applies to each all-ASCII document).
    def ours_single():
        tok._cache.clear()  # cold cache each run: honest, every distinct chunk pays its BPE once
        for d in docs:
            tok.encode_ordinary(d)

    def ours_warm():
        for d in docs:  # what a long run sees once the common chunks are cached
            tok.encode_ordinary(d)

    def ours_multi():
        tok._cache.clear()  # cold here too (this process works too, and forked workers inherit its cache)
        tok.encode_batch(docs, num_proc=cores)

    def ours_multi_warm():  # the workers inherit the cache that ours_warm left full (fork)
        tok.encode_batch(docs, num_proc=cores)

    enc = None
    try:
        import tiktoken
        ranks = {v: i for i, v in tok.vocab.items() if i not in tok.special_tokens.values()}
        enc = tiktoken.Encoding("nanostack-bench", pat_str=GPT4_PATTERN, mergeable_ranks=ranks,
                                special_tokens=dict(tok.special_tokens))
        same = all(enc.encode_ordinary(d) == tok.encode_ordinary(d) for d in docs)
        print(f"tiktoken with our merges gives the same ids on every document: {same}")
    except ImportError:
        print("bench: tiktoken not installed (pip install tiktoken): no encoding reference")
    timings = collections.defaultdict(list)
    for _ in range(reps):
        timings["ours 1 proc"].append(_median_time(ours_single, 1))
        timings["ours 1 proc warm cache"].append(_median_time(ours_warm, 1))
        if _use_fork():
            timings[f"ours {cores} procs warm cache"].append(_median_time(ours_multi_warm, 1))
        timings[f"ours {cores} procs"].append(_median_time(ours_multi, 1))
        if enc is not None:
            # tiktoken's single-thread figure: a plain loop of encode_ordinary. (Its
            # encode_ordinary_batch with num_threads=1 goes through a thread pool, which costs
            # more than it saves on one thread: the loop is the fair reference.)
            timings["tiktoken 1 thread"].append(
                _median_time(lambda: [enc.encode_ordinary(d) for d in docs], 1))
            timings[f"tiktoken {cores} threads"].append(
                _median_time(lambda: enc.encode_ordinary_batch(docs, num_threads=cores), 1))
    speed = {name: mb / statistics.median(ts) for name, ts in timings.items()}
    print("encode MB/s: " + ", ".join(f"{name} {s:.1f}" for name, s in speed.items()))
    if enc is not None:
        tt = speed["tiktoken 1 thread"]
        multi_warm = speed.get(f"ours {cores} procs warm cache")
        print(f"encode ratio ours/tiktoken, 1 thread: {speed['ours 1 proc'] / tt:.2f} (cold cache), "
              f"{speed['ours 1 proc warm cache'] / tt:.2f} (warm); ours {cores} procs / tiktoken 1 thread: "
              f"{speed[f'ours {cores} procs'] / tt:.2f} (cold)"
              + (f", {multi_warm / tt:.2f} (warm)" if multi_warm else ""))
    findall, split = compile_pattern(GPT4_PATTERN).findall, chunk_splitter(GPT4_PATTERN)
    slow = _median_time(lambda: [findall(d) for d in docs], reps)
    fast = _median_time(lambda: [split(d) for d in docs], reps)
    n_ascii = sum(d.isascii() for d in docs)
    print(f"limit: splitting alone runs at {mb / slow:.1f} MB/s with `regex`, {mb / fast:.1f} MB/s with "
          f"the ASCII fast path ({n_ascii} of {len(docs)} documents are ASCII), on one core")


# -----------------------------------------------------------------------------
# 8. Settings from the command line (shared by every nanostack script)
#
# Every script keeps its knobs in one dataclass whose fields read like a table:
#     max_steps: int = 1200        # optimizer steps in the run      (train.py)
# and calls parse_settings(ThatClass, sys.argv[1:]). The trailing comment of each
# field IS its --help text (read back from the source with inspect), so the table
# and the help can never drift apart. This lives in bpe.py only because bpe.py is
# the one file that every other script already imports.

def _field_comments(cls):
    """Map field name -> its trailing '# comment' in the class source ('' if none). A settings
    class may extend another (train.py's TrainConfig extends model.py's GPTConfig): the base
    classes are read first, so a field redefined in the subclass takes the subclass's comment."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source available (frozen app, REPL)
            continue
        for line in source.splitlines():
            m = re.match(r"\s+(\w+)\s*:\s*[^=]+=.*?#\s?(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def settings_help(cls, description=""):
    """The --help text: one line per setting with its default and comment."""
    comments = _field_comments(cls)
    lines = [description.strip(), ""] if description else []
    lines.append("settings (override with --key=value):")
    for f in dataclasses.fields(cls):
        key = f"--{f.name}={_default(f)!r}"
        lines.append(f"  {key:<36} {comments.get(f.name, '')}")
    return "\n".join(lines)


def _coerce(name, text, default):
    """Parse one value against the type of its default.

    ast.literal_eval gives Python literals (3, 3e-4, True, None, [1, 2], (0, 64));
    anything it cannot parse stays a plain string, so --input=data/*.txt needs no
    quotes. Ints are accepted where floats are expected (--matrix_lr=1 means 1.0), and a
    None default accepts anything (it has no type to check against)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text
    if default is None:
        return value
    want = type(default)
    if want is str:
        return text  # --prompt=123 is the string "123", quotes are not needed
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if want in (list, tuple) and isinstance(value, (list, tuple)):
        return want(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise SettingsError(f"--{name}={text}: expected {want.__name__} like {default!r}, "
                            f"got {type(value).__name__}")
    return value


def _check_known(key, fields, where=""):
    """One line for an unknown setting: a near spelling first (--max_step -> --max_steps), else
    keys containing what was typed (--lr -> --matrix_lr, --embed_lr, ...), else no guess."""
    if key not in fields:
        close = (difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                 or [name for name in fields if key in name][:3])
        hint = f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""
        raise SettingsError(f"{where}unknown setting --{key}{hint}; see --help for the list")


def parse_settings(cls, argv, description=""):
    """Build cls() from ['--key=value', ...]; --help prints the table and exits.

    Unknown keys fail with the closest valid key suggested, e.g.
    --max_step=3 -> "unknown setting --max_step (did you mean --max_steps?); see --help for the list"
    (train.py's settings; a test runs this example).
    Validation errors raised (as ValueError) by cls.__post_init__ become
    SettingsError, so main_guard prints them as one line."""
    if any(a in ("-h", "--help") for a in argv):
        print(settings_help(cls, description))
        sys.exit(0)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SettingsError(f"bad argument {arg!r}: write settings as --key=value (see --help)")
        key, text = arg[2:].split("=", 1)  # split once: values may contain '='
        _check_known(key, fields)
        values[key] = _coerce(key, text, _default(fields[key]))
    try:
        return cls(**values)
    except ValueError as e:  # __post_init__ validation
        raise SettingsError(str(e)) from None


def settings_label(changes, default="defaults"):
    """A dict of setting changes as a short label, in its own order: {'attn': 'mla',
    'kv_lora_rank': 64} -> "attn=mla,kv_lora_rank=64"; {} -> "defaults"."""
    return ",".join(f"{k}={v}" for k, v in changes.items()) or default


def settings_with(cls, base, changes, where=""):
    """cls with the dict `changes` ({setting: value}) applied over `base` (an instance of cls,
    or None for the defaults), each value checked as if it had been typed on the command line
    after base's: unknown keys (with a guess), types, cls's own validation. `where` starts the
    error's one line, e.g. "--sweep entry 2: ". For train.py's --sweep and sample.py's --arch.
        settings_with(TrainConfig, cfg, {"n_layer": 6}) == dataclasses.replace(cfg, n_layer=6)"""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {} if base is None else {name: getattr(base, name) for name in fields}
    for key, value in changes.items():
        _check_known(key, fields, where)
        try:
            values[key] = _coerce(key, value if isinstance(value, str) else repr(value), _default(fields[key]))
        except SettingsError as e:
            raise SettingsError(f"{where}{e}") from None
    try:
        return cls(**values)
    except (ValueError, UserError) as e:  # __post_init__ validation
        raise SettingsError(f"{where}{e}") from None


def main_guard(fn):
    """Run fn() and turn a UserError into one line on stderr and exit code 2.
    Anything else is a bug and keeps its traceback."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main():
    s = parse_settings(Settings, sys.argv[1:], description=__doc__)
    if s.bench:
        return bench(s)
    if not s.train:
        return demo()
    paths = sorted({p for g in s.train.split(",") if g for p in glob.glob(g, recursive=True) if os.path.isfile(p)})
    if not paths:
        raise UserError(f"--train={s.train}: no file matches; give a glob such as --train='data/*.txt'")

    def documents():  # one document per file, read lazily
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()

    specials = tuple(x for x in s.special_tokens.split(",") if x)
    t0 = time.perf_counter()
    tok = Tokenizer.train(documents(), s.vocab_size, pattern=s.pattern, special_tokens=specials,
                          num_proc=s.num_proc or os.cpu_count() or 1, quiet=s.quiet)
    tok.save(s.out)
    print(f"trained on {len(paths)} files in {time.perf_counter() - t0:.1f}s: vocab_size {tok.vocab_size}, "
          f"wrote {s.out} (fingerprint {tok.fingerprint[:16]})")


if __name__ == "__main__":
    main_guard(main)
