"""
sample.py -- generate text from a trained nanostack model: fast (KV cache) and clean (streamed UTF-8).

Where it sits:  bpe.py -> prepare.py -> model.py -> train.py -> sample.py (you are here).
train.py leaves a checkpoint in out/; this script loads it together with the exact tokenizer it was
trained with, and continues a prompt one token at a time, printing text as it is generated.

    python sample.py                                        # continue from BOS with out/best.pt
    python sample.py --prompt="def fibonacci(n):" --temperature=0        # greedy: always the argmax
    python sample.py --prompt=@prompt.txt --top_p=0.9 --num_samples=4    # prompt read from a file
    python sample.py --stop=\\n\\n --max_new_tokens=200      # stop at the first blank line
    python sample.py --stop='["\\nclass ", "\\ndef "]'      # several stop strings (a Python list)
    python sample.py --ckpt=out/last.pt --tokenizer=data/stdlib/tokenizer.bpe
    python sample.py --interactive=True                     # prompt, generate, repeat (Ctrl-D exits)
    python sample.py --bench=True --ckpt=random             # speed: cache vs recompute, branching
    python sample.py --help                                 # every setting, with its default

The same command runs on a laptop CPU, on Apple's mps or on a CUDA GPU (bf16 autocast there);
the choice is made once, in section 2. The text goes to stdout (one sample streams as it is
generated; several samples are printed whole, each as soon as it ends) and status lines to stderr,
so `python sample.py > out.txt` keeps only the text.

How generation works, in one paragraph. A causal transformer turns tokens 0..t into a score (logit)
for every possible token t+1. The slow way to generate re-runs the model over the whole text for
every new token: O(T) work per token, O(T^2) for a text. But the keys and values that attention
computed for old tokens never change (each token only looks left), so we keep them in a KV cache:
the prompt is run once ("prefill"), then each step feeds only the newest token and attends over the
cached keys and values ("decode"). Drawing N different continuations of one prompt needs only one
prefill: the cache is copied ("branched") into N rows and the N samples decode together, as one
batch, at nearly the cost of one. Both generators live below, side by side, and the tests prove
that they produce the same tokens.

Sections
  1. Settings
  2. Device and precision (decided once)
  3. Loading a checkpoint and its tokenizer
  4. Prompts
  5. Choosing the next token: temperature, top-k, top-p, repetition penalty
  6. Generation: the plain reference and the KV-cached fast path
  7. Text: streaming UTF-8 decode and stop strings
  8. generate_text: tokens in, text out
  9. The interactive loop
 10. Benchmark
 11. main
"""
import collections
import dataclasses
import math
import os
import statistics
import sys
import time

import torch

import bpe
from model import (DTYPES, GPT, GPTConfig, checkpoint_tokenizer, load_checkpoint,
                   model_from_checkpoint, setup_runtime)

# -----------------------------------------------------------------------------
# 1. Settings
#
# One table of knobs. Each trailing comment is the --help text (bpe.parse_settings reads it back
# from this source), so keep one comment per line.

@dataclasses.dataclass
class SampleConfig:
    out_dir: str = "out"             # directory train.py wrote to; the default checkpoint is <out_dir>/best.pt
    ckpt: str = ""                   # checkpoint path (default <out_dir>/best.pt); 'random' = untrained model for --bench
    tokenizer: str = ""              # tokenizer file (default: the one recorded in the checkpoint)
    prompt: str = ""                 # text to continue (escapes like \n work), or @file.txt; empty = start from BOS
    num_samples: int = 1             # continuations drawn from one prefill (batched by branching the KV cache)
    max_new_tokens: int = 500        # generate at most this many tokens per sample
    temperature: float = 0.8         # divide logits by this; 0 = greedy (always the most likely token)
    top_k: int = 0                   # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0               # nucleus: keep the smallest set of tokens holding this much probability (1 = off)
    repetition_penalty: float = 1.0  # >1 makes tokens already in the text less likely (CTRL-style; 1 = off)
    stop: object = None              # stop string or list of them, cut from the output; escapes like \n work
    seed: int = 1337                 # random seed: the same seed and settings reproduce the same text
    device: str = "auto"             # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"              # auto (bf16 on CUDA and AMX CPUs, as train.py) | float32 | bfloat16 | float16
    threads: int = 0                 # CPU threads for torch (0 = torch's default); 1 is often fastest for small models
    slide_keep: float = 0.5          # past the context: keep this fraction of it and re-prefill, then go on
    rope_scaling: str = ""           # '' = as trained; linear | yarn stretches the context at sample time
    rope_factor: float = 2.0         # with --rope_scaling: context = block_size * rope_factor
    interactive: bool = False        # read a prompt, generate, repeat; Ctrl-C stops a generation, Ctrl-D exits
    bench: bool = False              # measure prefill/decode tokens/s, cache vs recompute, branching; then exit
    bench_tokens: int = 500          # --bench: tokens decoded per run
    bench_samples: int = 8           # --bench: continuations drawn by branching one prefill
    bench_repeats: int = 5           # --bench: timed repeats per measurement (the median is reported)

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"--num_samples={self.num_samples}: must be at least 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        if not 0 < self.slide_keep < 1:
            raise ValueError(f"--slide_keep={self.slide_keep}: must be a fraction in (0, 1), e.g. 0.5")
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"--dtype={self.dtype}: choose auto, {', '.join(DTYPES)}")
        if self.threads < 0:
            raise ValueError(f"--threads={self.threads}: must be >= 0 (0 = torch's default)")
        if min(self.bench_tokens, self.bench_samples, self.bench_repeats) < 1:
            raise ValueError("--bench_tokens, --bench_samples and --bench_repeats must be at least 1")
        self.stop = normalize_stop(self.stop)


def unescape(text):
    """Decode backslash escapes typed on a command line: 'a\\nb' -> 'a\nb', '\\\\' -> '\\'.
    The encode/decode pair keeps non-ASCII text intact: characters outside latin-1 become \\uXXXX
    escapes first, which unicode_escape turns back into themselves."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:  # a lone trailing backslash, a bad \x escape
        raise ValueError(f"{text!r}: bad backslash escape ({e.reason}); write a backslash as \\\\") from None


def normalize_stop(stop):
    """--stop accepts None, one string, or a list/tuple of strings; returns a list of strings.

    Backslash escapes are decoded (a shell makes typing a real newline awkward, so --stop=\\n\\n
    means a blank line).
        normalize_stop("\\\\n\\\\n") -> ["\\n\\n"]      normalize_stop(["END", "##"]) -> ["END", "##"]
    """
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"--stop={stop!r}: give a string or a list of strings, e.g. --stop='[\"\\n\\n\", \"END\"]'")
    out = [unescape(s) for s in stops]
    if any(s == "" for s in out):
        raise ValueError("--stop: an empty stop string would stop before the first token; remove it")
    return out


# -----------------------------------------------------------------------------
# 2. Device and precision (decided once)
#
# model.py's Runtime decides, once, for train.py and this script alike: the device, the autocast
# precision (bf16 on CUDA and on CPUs that multiply bf16 in hardware, float32 elsewhere), the
# threads. The rest of this file never asks "am I on CUDA?": it runs every forward inside
# rt.autocast() and gives the model rt.kernels. Generation is never compiled (its shapes change at
# every step) and needs no deterministic kernels (eager CPU code is repeatable already).

def runtime_for(cfg):
    return setup_runtime(cfg.device, cfg.dtype, compile="false", threads=cfg.threads,
                         deterministic="false")


# -----------------------------------------------------------------------------
# 3. Loading a checkpoint and its tokenizer
#
# model.py owns the checkpoint format and its verified loader (shared with train.py's resume and
# --init_from): torch.load(weights_only=True), which cannot run code from a file off the internet;
# the checksum of every tensor; the refusal of nan/inf weights; the model rebuilt from the config
# it was trained with, never from this script's defaults. The tokenizer must be the very one the
# model was trained on: a different merge table maps the same text to different ids and the model
# would read gibberish without any error, so its fingerprint must match the checkpoint's.

RANDOM_CKPT = "random"  # --ckpt=random: an untrained model of nanoGPT's CPU Shakespeare size, for --bench
NANOGPT_CPU_SHAKESPEARE = dict(vocab_size=65, block_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=128)


def load_model(path, tokenizer_path="", rt=None, overrides=None):
    """(model in eval mode on rt's device, tokenizer, checkpoint dict) from a checkpoint file; any
    problem is one line (bpe.UserError) that says what to do. overrides: model_config fields to
    change at load time (--rope_scaling / --rope_factor)."""
    rt = rt or setup_runtime("cpu", "float32", compile="false", deterministic="false")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, rt.kernels, overrides).to(rt.device).eval()
    tokenizer = checkpoint_tokenizer(ckpt, path, tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise bpe.UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size}; pass --tokenizer=PATH to the tokenizer it was trained with")
    return model, tokenizer, ckpt


def random_model(device="cpu", seed=0, **overrides):
    """An untrained model of nanoGPT's CPU Shakespeare size, so --bench runs without any training."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**NANOGPT_CPU_SHAKESPEARE, **overrides})).to(device).eval()


# -----------------------------------------------------------------------------
# 4. Prompts
#
# Every training document starts with the BOS token (bpe's <|endoftext|>, which also separates
# documents), so a prompt is the start of a new document: BOS followed by the prompt's tokens. An
# empty prompt is just BOS, and the model writes a document from scratch.

def read_prompt(text):
    """--prompt=@file.txt reads the file (UTF-8) exactly as it is; '@@' at the start escapes a
    literal '@'. A prompt typed inline has its backslash escapes decoded, so --prompt="ROMEO:\\n"
    ends with a newline (write a real backslash as \\\\)."""
    if text.startswith("@") and not text.startswith("@@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise bpe.UserError(f"--prompt=@{path}: cannot read the file ({e.strerror}); check the path") from None
        except UnicodeDecodeError:
            raise bpe.UserError(f"--prompt=@{path}: the file is not UTF-8 text; convert it first") from None
    try:
        return unescape(text[1:] if text.startswith("@@") else text)
    except ValueError as e:
        raise bpe.UserError(f"--prompt={e}") from None


def context_length(config):
    """How many positions the model attends over at once: block_size, the length it was trained on,
    or block_size * rope_factor when the config stretches RoPE (linear or YaRN scaling) past it."""
    return config.max_context


def encode_prompt(tokenizer, text, context_len, warn=None):
    """BOS + the prompt's tokens; a prompt longer than the context keeps its last context_len tokens
    (the end of the prompt is what the next token depends on most) and says so through warn().
    Special tokens written in the prompt (<|endoftext|>) are allowed: the prompt is the user's own."""
    ids = tokenizer.encode(text, allowed_special="all")
    if not ids or ids[0] != tokenizer.eot_id:
        ids = [tokenizer.eot_id] + ids
    if len(ids) > context_len:
        if warn is not None:
            warn(f"warning: the prompt is {len(ids)} tokens but the context is {context_len}; "
                 f"keeping its last {context_len} tokens")
        ids = ids[-context_len:]
    return ids


# -----------------------------------------------------------------------------
# 5. Choosing the next token
#
# The model gives logits z (one per vocabulary entry); p = softmax(z / temperature). The knobs,
# applied in this order to a (B, vocab) batch of logits:
#   repetition penalty  tokens already in the text get their logit pushed down (CTRL, Keskar et al.
#                       2019: z/penalty if z > 0 else z*penalty, so it works whatever z's sign)
#   temperature 0       greedy: the argmax, deterministic
#   temperature t       z/t: t < 1 sharpens the distribution, t > 1 flattens it
#   top-k               keep the k largest logits (nanoGPT's knob)
#   top-p (nucleus)     keep the most likely tokens until their probability reaches p (Holtzman et al.
#                       2019): few candidates where the model is sure, many where it is not
# Filtered tokens get logit -inf, i.e. probability exactly 0, so they can never be drawn.

@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


GREEDY = Sampling(temperature=0.0)


def apply_repetition_penalty(logits, seen, penalty):
    """logits (B, V) float; seen (B, V) bool, True where the token already occurs in that row's text.
    Lowers every seen logit (for penalty > 1), so each seen token loses probability relative to
    every unseen one."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits, k):
    """Keep the k largest logits per row (ties with the k-th are kept too), -inf elsewhere."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits, p):
    """Nucleus filter. Sort tokens by probability; keep a token if the tokens ranked above it hold
    less than p of the mass. The top token is always kept (nothing ranks above it).
    Example: probs (0.5, 0.3, 0.15, 0.05), p = 0.75 -> mass above each = (0, 0.5, 0.8, 0.95)
    -> keep the first two."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)      # (B, V) each
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs                          # exclusive cumsum
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)     # back to vocab order
    return logits.masked_fill(drop, -math.inf)


def pick_next(logits, sampling, generator=None, seen=None):
    """(B, V) logits -> (B,) token ids, following the order described above."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def seen_mask(prompt_ids, batch_size, vocab_size, device):
    """(B, V) bool: which tokens occur in the prompt (the repetition penalty's memory)."""
    seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
    if prompt_ids:
        seen[:, torch.tensor(sorted(set(prompt_ids)), device=device)] = True
    return seen


# -----------------------------------------------------------------------------
# 6. Generation: the plain reference and the KV-cached fast path
#
# Both generators see exactly the same context at every step, by one shared rule for running past
# the context length: when the text outgrows the context, the window jumps forward so that it holds
# the last `keep` tokens (keep = slide_keep * context), and grows again from there. The cached
# generator then re-prefills the cache with those `keep` tokens; the positions restart at 0, which
# is exactly what the model saw in training (a window of real text starting at position 0).
# Jumping by half a context costs one batched prefill per context/2 new tokens, far cheaper than
# nanoGPT's rule of sliding by one token (which forces a full recompute on every step).
# With RoPE scaling in the config (or --rope_scaling=yarn at sample time), the context itself is
# longer (see context_length) and the window jumps only past block_size * rope_factor.

def keep_length(context_len, slide_keep):
    return max(1, min(context_len - 1, int(context_len * slide_keep)))


def window_start(n_tokens, start, context_len, keep):
    """The shared rule: the context is tokens[start:n_tokens]; past context_len, jump to the last keep."""
    return n_tokens - keep if n_tokens - start > context_len else start


@torch.inference_mode()
def generate_uncached(model, prompt_ids, max_new_tokens, sampling=GREEDY, generator=None,
                      slide_keep=0.5, stop_id=None):
    """The reference: re-run the model over the whole window for every new token. O(T) per token.
    Returns the new token ids (up to and including stop_id if it is drawn)."""
    if len(prompt_ids) == 0:
        raise ValueError("generate_uncached needs at least one prompt token: start from [bos_id]")
    device = next(model.parameters()).device
    context_len = context_length(model.config)
    keep = keep_length(context_len, slide_keep)
    ids = list(prompt_ids)
    start = max(0, len(ids) - context_len)
    seen = seen_mask(ids, 1, model.config.vocab_size, device)
    for _ in range(max_new_tokens):
        start = window_start(len(ids), start, context_len, keep)
        window = torch.tensor([ids[start:]], dtype=torch.long, device=device)   # (1, T)
        logits = model(window)[:, -1, :]                                         # (1, V)
        token = int(pick_next(logits, sampling, generator, seen))
        ids.append(token)
        seen[0, token] = True
        if token == stop_id:
            break
    return ids[len(prompt_ids):]


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, sampling=GREEDY, generator=None, num_samples=1,
             slide_keep=0.5, cache_dtype=None):
    """The fast path. Yields, per step, a (num_samples,) tensor holding each sample's next token.

    Prefill the prompt once (batch 1), branch the cache into num_samples rows, then each step feeds
    only the newest token of every row. The caller decides when to stop (end-of-text, stop strings):
    it simply stops iterating, and no forward pass is wasted on a token nobody asked for.
    Run it inside Runtime.autocast(); cache_dtype is the dtype of the cached keys and values.
        for tokens in generate(model, [bos] + ids, 100, Sampling(0.8)): print(tokens.tolist())
    """
    if len(prompt_ids) == 0:
        raise ValueError("generate needs at least one prompt token: start from [bos_id]")
    device = next(model.parameters()).device
    context_len = context_length(model.config)
    keep = keep_length(context_len, slide_keep)
    window = list(prompt_ids)[-context_len:]
    B, n = num_samples, len(window)
    # every token of the run, per row: the window to re-prefill from lives in here
    tokens = torch.empty(B, n + max_new_tokens, dtype=torch.long, device=device)   # (B, n + new)
    tokens[:, :n] = torch.tensor(window, dtype=torch.long, device=device)
    start = 0
    seen = seen_mask(list(prompt_ids), B, model.config.vocab_size, device)

    # prefill: one forward over the prompt fills the cache (batch 1: the rows are identical so far)
    cache = model.make_cache(1, context_len, device=device, dtype=cache_dtype)
    logits = model(tokens[:1, :n], cache=cache)[:, -1, :]                           # (1, V)
    if B > 1:
        cache = cache.branch(B)            # B rows, each a copy of the prompt's keys and values
        logits = logits.expand(B, -1)      # (B, V): the same next-token distribution for every row

    for step in range(max_new_tokens):
        next_tokens = pick_next(logits, sampling, generator, seen)                  # (B,)
        yield next_tokens
        if step == max_new_tokens - 1:
            break
        tokens[:, n] = next_tokens
        n += 1
        if sampling.repetition_penalty != 1.0:
            seen.scatter_(1, next_tokens[:, None], True)
        new_start = window_start(n, start, context_len, keep)
        if new_start != start:
            # the cache is full: keep the last `keep` tokens, re-prefill them at positions 0..keep-1
            start = new_start
            cache.reset()
            logits = model(tokens[:, start:n], cache=cache)[:, -1, :]                # (B, V)
        else:
            logits = model(next_tokens[:, None], cache=cache)[:, -1, :]              # (B, V)


# -----------------------------------------------------------------------------
# 7. Text: streaming UTF-8 decode and stop strings
#
# Tokens are bytes, not characters: an emoji or a Chinese character is several UTF-8 bytes that a
# byte-level BPE may split across tokens. Decoding each token on its own would print U+FFFD for the
# halves, so tokens go through bpe's incremental decoder, which hands out only complete characters.
#
# Stop strings are matched on the decoded text, not on token ids, because one stop string can be
# spelled by many token sequences ("\n\n" may be one token, or "\n" + "\n", or end inside ".\n\n").
# To stream and still cut exactly, the stream holds back any tail of the text that could be the
# beginning of a stop string: with stop "END", the text "the EN" prints "the " and waits.

def held_back(text, stops):
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextStream:
    """Token ids in, printable text out, for one sample.
        stream = TextStream(tokenizer, stops=["\\n\\n"])
        piece = stream.push(token_id)   # new text safe to print now ('' if none yet)
        rest = stream.finish()          # at the end: whatever was still held back
    After push() returns, stream.stopped tells whether a stop string has appeared; the text is then
    cut just before it, and the printed pieces joined equal stream.text."""

    def __init__(self, tokenizer, stops=()):
        self.decoder = tokenizer.stream_decoder()
        self.stops = list(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""          # everything decoded so far (cut at the stop string once found)
        self.printed = 0        # how many characters of self.text have been handed out
        self.stopped = False

    def _advance(self, new_text, final):
        if self.stopped:
            return ""
        # a stop string that was not there before must end inside new_text, so only search from
        # (longest stop - 1) characters before it
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new_text
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            safe = len(self.text)
        else:
            safe = len(self.text) if final else len(self.text) - held_back(self.text, self.stops)
        piece = self.text[self.printed:safe]
        self.printed = max(self.printed, safe)
        return piece

    def push(self, token_id):
        return self._advance(self.decoder.push(token_id), final=False)

    def finish(self):
        return self._advance(self.decoder.flush(), final=True)


# -----------------------------------------------------------------------------
# 8. generate_text: tokens in, text out
#
# Drives the cached generator and turns each row's tokens into text. A row ends at the
# end-of-text token (not printed), at a stop string (cut exactly), or after max_new_tokens; the
# batch stops stepping as soon as every row has ended.

@dataclasses.dataclass
class Completion:
    text: str             # the generated text (prompt not included), cut before any stop string
    ids: list             # the generated token ids (end-of-text excluded)
    finish: str           # "eot" | "stop" | "length"


def generate_text(model, tokenizer, prompt_ids, max_new_tokens, sampling=GREEDY, num_samples=1,
                  stops=(), generator=None, slide_keep=0.5, cache_dtype=None,
                  on_text=None, on_end=None):
    """Generate num_samples continuations of prompt_ids; returns a list of Completion.
    on_text(row, piece) is called with each new piece of text as soon as it is safe to print;
    on_end(row, completion) once per row, when that row ends."""
    streams = [TextStream(tokenizer, stops) for _ in range(num_samples)]
    ids = [[] for _ in range(num_samples)]
    finish = [None] * num_samples

    def end(row, reason, piece):
        finish[row] = reason
        if piece and on_text:
            on_text(row, piece)
        if on_end:
            on_end(row, Completion(streams[row].text, ids[row], reason))

    steps = generate(model, prompt_ids, max_new_tokens, sampling, generator, num_samples,
                     slide_keep, cache_dtype)
    try:
        for next_tokens in steps:
            for row, token in enumerate(next_tokens.tolist()):
                if finish[row]:
                    continue            # this row ended earlier; its batch slot idles until all end
                if token == tokenizer.eot_id:
                    end(row, "eot", streams[row].finish())
                    continue
                ids[row].append(token)
                piece = streams[row].push(token)
                if streams[row].stopped:
                    end(row, "stop", piece)
                elif piece and on_text:
                    on_text(row, piece)
            if all(finish):
                break
    finally:
        steps.close()   # on Ctrl-C too: release the generator (and its cache) right away
    for row in range(num_samples):
        if not finish[row]:
            end(row, "length", streams[row].finish())
    return [Completion(s.text, i, f) for s, i, f in zip(streams, ids, finish)]


def print_completions(model, tokenizer, prompt_text, prompt_ids, cfg, rt, generator, out=sys.stdout):
    """The CLI's way of showing samples. One sample streams: the prompt, then text as it comes.
    Several samples run as one batch, so no single stream reads naturally; each sample is printed
    whole, under a header, the moment it ends (in the order they end)."""
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)

    def write(text):
        out.write(text)
        out.flush()

    if cfg.num_samples == 1:
        write(prompt_text)
        on_text, on_end = (lambda row, piece: write(piece)), (lambda row, c: write("\n"))
    else:
        on_text = None

        def on_end(row, c):
            write(f"---------- sample {row + 1}/{cfg.num_samples} ({c.finish}, {len(c.ids)} tokens)\n")
            write(prompt_text + c.text + "\n")

    t0 = time.perf_counter()
    with rt.autocast():
        done = generate_text(model, tokenizer, prompt_ids, cfg.max_new_tokens, sampling, cfg.num_samples,
                             cfg.stop, generator, cfg.slide_keep, rt.dtype, on_text, on_end)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(c.ids) for c in done)
    ends = ", ".join(sorted(f"{n} {why}" for why, n in collections.Counter(c.finish for c in done).items()))
    print(f"[{n_tokens} tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tokens/s; ended by: {ends}]",
          file=sys.stderr)
    return done


# -----------------------------------------------------------------------------
# 9. The interactive loop
#
# For the classroom: type a prompt, watch the continuation appear, type another. Ctrl-C while text
# is streaming stops that generation (the KeyboardInterrupt unwinds out of generate_text, whose
# `finally` closes the generator) and returns to the prompt; Ctrl-D (end of input) exits.
# An empty line starts from BOS, like an empty --prompt; escapes work as in --prompt ("a\\nb").

def interactive(model, tokenizer, cfg, rt, generator, read=input, out=sys.stdout):
    context_len = context_length(model.config)
    print("interactive: type a prompt and press Enter. Ctrl-C stops a generation, Ctrl-D exits.", file=sys.stderr)
    while True:
        try:
            text = read("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:   # Ctrl-C at the prompt: discard the line, ask again
            out.write("\n")
            continue
        try:
            text = unescape(text)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        ids = encode_prompt(tokenizer, text, context_len, warn=lambda m: print(m, file=sys.stderr))
        try:
            print_completions(model, tokenizer, text, ids, cfg, rt, generator, out)
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
            out.flush()


# -----------------------------------------------------------------------------
# 10. Benchmark
#
# What the KV cache and branching buy, measured on the loaded model (or --ckpt=random, an untrained
# model of nanoGPT's CPU Shakespeare size; speed does not depend on the weights). Each measurement is
# warmed up once outside the clock, the kinds of runs alternate (so a noisy neighbour slows all of
# them alike), and the median of --bench_repeats is reported.
#   prefill            one forward over a full context into an empty cache
#   decode, cache      a 1-token prompt, then bench_tokens steps of the cached generator
#   decode, recompute  the same with generate_uncached (the whole window re-run every step)
#   branched xN        one prefill, cache branched into N rows, bench_tokens steps: N * tokens total.
#                      N single-sample runs take N times one cached decode, so their total tokens/s
#                      equals the single-run figure, which the ratio compares against.
# End-of-text is not a stop here: every run decodes exactly bench_tokens tokens.
# Measured here (2-core machine shared with other jobs, `--bench=True --ckpt=random --threads=1`):
# cached decoding ~4.6x the tokens/s of full recompute, branching x8 ~4.6x the total tokens/s of
# single runs. Side by side with nanoGPT's generate on the same model size (scratch script, 500
# tokens, medians of 5): cached decoding ~4.8x its tokens/s.

def bench(model, rt, cfg, bos_id=0, out=sys.stdout):
    context_len = context_length(model.config)
    V, T, N = model.config.vocab_size, cfg.bench_tokens, cfg.bench_samples
    sampling = Sampling(temperature=1.0)
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    full_prompt = torch.randint(V, (1, context_len), generator=torch.Generator().manual_seed(cfg.seed)).to(rt.device)

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        elif rt.device.type == "mps":
            torch.mps.synchronize()

    @torch.inference_mode()
    def prefill():
        cache = model.make_cache(1, context_len, device=rt.device, dtype=rt.dtype)
        model(full_prompt, cache=cache)

    def cached():
        for _ in generate(model, [bos_id], T, sampling, gen, 1, cfg.slide_keep, rt.dtype):
            pass

    def uncached():
        generate_uncached(model, [bos_id], T, sampling, gen, cfg.slide_keep)

    def branched():
        for _ in generate(model, [bos_id], T, sampling, gen, N, cfg.slide_keep, rt.dtype):
            pass

    runs = {"prefill": (prefill, context_len), "cached": (cached, T), "uncached": (uncached, T),
            "branched": (branched, N * T)}
    speeds = {name: [] for name in runs}
    with rt.autocast():
        for rep in range(1 + cfg.bench_repeats):        # rep 0 is the warm-up
            print(f"bench: round {rep}/{cfg.bench_repeats}{' (warm-up)' if rep == 0 else ''}", file=sys.stderr)
            for name, (fn, n_tokens) in runs.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if rep > 0:
                    speeds[name].append(n_tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in speeds.items()}
    # ratios are taken within each round (runs seconds apart see the same machine load), then the
    # median over rounds: steadier than a ratio of medians on a shared, noisy machine
    cache_gain = statistics.median(c / u for c, u in zip(speeds["cached"], speeds["uncached"]))
    branch_gain = statistics.median(b / c for b, c in zip(speeds["branched"], speeds["cached"]))
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"bench: {n_params / 1e6:.2f}M params, context {context_len}, {T} new tokens per run, {rt}, "
        f"{torch.get_num_threads()} threads, median of {cfg.bench_repeats} (alternating runs)",
        f"  prefill ({context_len} tokens, batch 1)        {med['prefill']:10.0f} tokens/s",
        f"  decode with KV cache                   {med['cached']:10.1f} tokens/s",
        f"  decode with full recompute (no cache)  {med['uncached']:10.1f} tokens/s",
        f"  {N} samples by branching one prefill     {med['branched']:10.1f} tokens/s total",
        f"  KV cache speed-up over recompute        {cache_gain:9.2f}x",
        f"  branching x{N} over {N} single runs          {branch_gain:9.2f}x",
    ]
    out.write("\n".join(lines) + "\n")
    return {**med, "cache_gain": cache_gain, "branch_gain": branch_gain}


# -----------------------------------------------------------------------------
# 11. main

def main():
    cfg = bpe.parse_settings(SampleConfig, sys.argv[1:], description=__doc__)
    rt = runtime_for(cfg)
    if cfg.ckpt == RANDOM_CKPT:
        model, tokenizer, bos_id = random_model(rt.device, cfg.seed).use_kernels(rt.kernels), None, 0
    else:
        path = cfg.ckpt or os.path.join(cfg.out_dir, "best.pt")
        factor = 1.0 if cfg.rope_scaling == "none" else cfg.rope_factor
        overrides = dict(rope_scaling=cfg.rope_scaling, rope_factor=factor) if cfg.rope_scaling else None
        model, tokenizer, ckpt = load_model(path, cfg.tokenizer, rt, overrides)
        bos_id = tokenizer.eot_id
        print(f"loaded {path}: step {ckpt.get('step', '?')}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params, context {context_length(model.config)}, {rt}", file=sys.stderr)
    if cfg.bench:
        bench(model, rt, cfg, bos_id)
        return
    if tokenizer is None:
        raise bpe.UserError("--ckpt=random has no tokenizer and only serves --bench=True; pass a trained --ckpt")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?'
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    if cfg.interactive:
        interactive(model, tokenizer, cfg, rt, generator)
        return
    text = read_prompt(cfg.prompt)
    ids = encode_prompt(tokenizer, text, context_length(model.config), warn=lambda m: print(m, file=sys.stderr))
    print_completions(model, tokenizer, text, ids, cfg, rt, generator)


if __name__ == "__main__":
    bpe.main_guard(main)
