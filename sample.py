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
    python sample.py --chat=True --ckpt=out/sft/best.pt     # multi-turn chat with a fine-tuned model
    python sample.py --task_eval=add,count --ckpt=out/sft/best.pt --temperature=0   # exact-match accuracy
    python sample.py --prompt="ROMEO:" --token_healing=False  # no healing: continue right after the ':' token
    python sample.py --bench=True --ckpt=random             # speed: cache vs recompute, branching
    python sample.py --bench=True --ckpt=random --bench_context=[512,1024,2048,4096] --compile=true \\
        --arch="[{}, {'attn': 'linear'}, {'layer_pattern': 'LLLG'}]"    # decoding at long contexts
    python sample.py --eval=builtin                         # multiple-choice accuracy on held-out val text
    python sample.py --eval=hellaswag_val.jsonl             # HellaSwag, or any {"context", "choices", "answer"} JSONL
    python sample.py --stress=True                          # past the context, repetition, drift, odd prompts
    python sample.py --show=attention,embeddings,surprise --prompt="def add(a, b):"   # pictures (SVG, HTML)
    python sample.py --ckpt=out/best.pt --export_hf=hf_model   # a Hugging Face folder (transformers loads it)
    python sample.py --ckpt=hf:hf_model --prompt="def add("    # sample from a Llama/Qwen3/Qwen3-MoE folder
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

Beyond generation, the same loaded model answers three questions (sections 12 to 15): how often
does it pick the right continuation among several (--eval: accuracy by log-likelihood, on a
built-in suite cut from held-out data or on HellaSwag-style files), where does it break
(--stress), and what does it look like inside (--show: attention maps, embeddings, surprise).

Sections
  1. Settings
  2. Device and precision (decided once); the compiled decode step
  3. Loading a checkpoint and its tokenizer (ours, or a Hugging Face folder), exporting one
  4. Prompts
  5. Token healing
  6. Choosing the next token: temperature, top-k, top-p, repetition penalty, per-sample randomness
  7. Generation: the plain reference and the KV-cached fast path
  8. Text: streaming UTF-8 decode and stop strings
  9. generate_text: tokens in, text out; many samples in bounded batches
 10. The interactive loop
 11. Chat: a multi-turn conversation with a fine-tuned model
 12. Benchmark
 13. Scoring continuations by log-likelihood
 14. Multiple-choice tasks: the built-in suite (with the synthetic tasks for chat models), file
     loaders, accuracy and its interval
 15. Task accuracy: exact match (pass@1, pass@k) on the synthetic tasks' test split
 16. Stress tests
 17. Pictures: attention maps, the embedding matrix, the surprise page
 18. main
"""
import collections
import dataclasses
import hashlib
import html
import itertools
import math
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

import bpe
import prepare
from model import (DTYPES, GPT, HF_PREFIX, GPTConfig, checkpoint_tokenizer, export_hf,
                   model_from_checkpoint, open_checkpoint, record_attention, setup_runtime)

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
    num_samples: int = 1             # continuations to draw (each batch branches one prefill; see --sample_batch)
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
    compile: str = "false"           # true: torch.compile the one-token decoding step (seconds to compile, then faster tokens; section 2) | false | auto (as train.py)
    slide_keep: float = 0.5          # past the context: keep this fraction of it and re-prefill, then go on
    rope_scaling: str = ""           # '' = as trained; linear | yarn stretches the context at sample time
    rope_factor: float = 2.0         # with --rope_scaling: context = block_size * rope_factor
    token_healing: bool = True       # back up the prompt's last token; the first new token(s) re-spell it (section 5)
    sample_batch: int = 0            # samples decoded at once for --num_samples (0 = as many as fit in ~1 GiB)
    interactive: bool = False        # read a prompt, generate, repeat; Ctrl-C stops a generation, Ctrl-D exits
    bench: bool = False              # measure prefill/decode tokens/s, cache vs recompute, branching; then exit
    bench_tokens: int = 500          # --bench: tokens decoded per run
    bench_samples: int = 8           # --bench: continuations drawn by branching one prefill
    bench_repeats: int = 5           # --bench: timed repeats per measurement (the median is reported)
    bench_context: object = None     # --bench: decoding tokens/s after prefills of these lengths instead, e.g. [512, 1024, 2048, 4096]
    arch: object = None              # --ckpt=random: GPTConfig settings of the model, e.g. {'attn': 'linear'}; a list of them is benched side by side
    eval: str = ""                   # builtin and/or path/to/file.jsonl, comma-separated: multiple-choice accuracy
    eval_examples: int = 200         # --eval: at most this many examples per task (0 = all there are)
    data_dir: str = "data/stdlib"    # prepare.py output whose val split feeds --eval=builtin, --stress and --show
    stress: bool = False             # stress tests: past the context, RoPE scaling, repetition, drift, odd prompts
    show: str = ""                   # attention,embeddings,surprise: draw these next to the checkpoint (of --prompt)
    export_hf: str = ""              # write the model as a Hugging Face folder DIR (config.json, model.safetensors, tokenizer.json, ...)
    export_dtype: str = "float32"    # --export_hf: weights as float32 | bfloat16 | float16
    overwrite: bool = False          # --export_hf: replace the files of a DIR that already holds some
    chat: bool = False               # multi-turn chat with a fine-tuned model: type a message, read the reply; Ctrl-D exits
    task_eval: str = ""              # add,sub,count,reverse,sort: exact-match accuracy on their test split (pass@k: --num_samples)
    task_digits: int = 3             # --task_eval and --eval=builtin: digits of the numbers in add and sub (as in prepare.py)

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
        self.bench_context = [self.bench_context] if isinstance(self.bench_context, int) else self.bench_context or []
        if not (isinstance(self.bench_context, (list, tuple)) and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in self.bench_context)):
            raise ValueError(f"--bench_context={self.bench_context!r}: give context lengths, e.g. [512, 1024, 2048, 4096]")
        self.arch = [self.arch] if isinstance(self.arch, dict) else self.arch or [{}]
        if not (isinstance(self.arch, (list, tuple)) and all(isinstance(a, dict) for a in self.arch)):
            raise ValueError(f"--arch={self.arch!r}: give a dict of model settings, e.g. {{'attn': 'linear'}}, "
                             f"or a list of them")
        if self.bench_context and not self.bench:
            raise ValueError("--bench_context measures decoding speed: add --bench=True")
        if self.sample_batch < 0 or self.eval_examples < 0:
            raise ValueError("--sample_batch and --eval_examples must be >= 0 (0 = automatic / all)")
        if self.task_digits < 1:
            raise ValueError(f"--task_digits={self.task_digits}: must be at least 1")
        if self.task_eval:
            self.task_eval = ",".join(prepare.task_names(self.task_eval, "--task_eval"))
        unknown = [k for k in self.show.split(",") if k.strip() and k.strip() not in SHOW_KINDS]
        if unknown:
            raise ValueError(f"--show={self.show}: unknown {unknown}; choose from {','.join(SHOW_KINDS)}")
        if self.export_dtype not in DTYPES:
            raise ValueError(f"--export_dtype={self.export_dtype}: choose one of {', '.join(DTYPES)}")
        modes = [name for name, on in (("--bench", self.bench), ("--eval", self.eval), ("--stress", self.stress),
                                       ("--show", self.show), ("--interactive", self.interactive),
                                       ("--export_hf", self.export_hf), ("--chat", self.chat),
                                       ("--task_eval", self.task_eval)) if on]
        if len(modes) > 1:
            raise ValueError(f"{' and '.join(modes)}: choose one of them per run")
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
# 2. Device and precision (decided once); the compiled decode step
#
# model.py's Runtime decides, once, for train.py and this script alike: the device, the autocast
# precision (bf16 on CUDA and on CPUs that multiply bf16 in hardware, float32 elsewhere), the
# threads. The rest of this file never asks "am I on CUDA?": it runs every forward inside
# rt.autocast() and gives the model rt.kernels. Generation needs no deterministic kernels (eager
# CPU code is repeatable already).
#
# Compiling the decode step (--compile=true). A decoded token of a small model is a few hundred
# tiny operations (norms, projections, RoPE, the cache write, the attention, the MLP), each a
# Python call and a kernel launch that costs far more than its arithmetic. torch.compile traces one
# step into a graph and inductor fuses it into a few loops (C++ on CPU, Triton on CUDA), so the
# fixed cost of a token shrinks and what is left is the work that grows with the context. That is
# the cost a comparison of attention kinds is about: a linear layer's step has the same shapes at
# every position (its state), a softmax layer's reads one more cached key each time.
# Only the one-token steps are compiled; the prefill (a prompt of any length, once) and the
# re-prefill past the context stay eager. The step is compiled with dynamic shapes: the position
# and the number of cached keys become symbols of one graph instead of constants (a constant would
# mean a new compilation at every token). The graphs still differ per model and between one row
# and several (torch specialises sizes of 1), so a run compiles one or two. Compiling takes
# seconds, so the setting is off by default: it pays for long generations, many samples and --bench.


def runtime_for(cfg):
    """The Runtime of this script. --threads > 0 sets torch's CPU thread count: decoding one token
    of a small model is dozens of tiny ops; spreading each over several threads costs more in
    synchronisation than it saves, and on a busy machine a thread that waits for a descheduled
    sibling stalls every op, so 1 thread can be the fastest choice for small models."""
    return setup_runtime(cfg.device, cfg.dtype, compile=cfg.compile, threads=cfg.threads,
                         deterministic="false")


def decoding(rt):
    """The runtime as the reports name it: 'cpu float32', and whether decode steps are compiled."""
    return f"{rt}{', compiled decode steps' if rt.compile else ''}"


def decode_step(model, rt):
    """What runs generation's one-token steps (model(token, cache=cache)): the model itself, or
    when the runtime compiles, the model compiled for them (see above)."""
    if not rt.compile:
        return model
    return torch.compile(model, dynamic=True, options=rt.compile_options)


# -----------------------------------------------------------------------------
# 3. Loading a checkpoint and its tokenizer (ours, or a Hugging Face folder), exporting one
#
# model.py owns the checkpoint format and its verified loader (shared with train.py's resume and
# --init_from): torch.load(weights_only=True), which cannot run code from a file off the internet;
# the checksum of every tensor; the refusal of nan/inf weights; the model rebuilt from the config
# it was trained with, never from this script's defaults. The tokenizer must be the very one the
# model was trained on: a different merge table maps the same text to different ids and the model
# would read gibberish without any error, so its fingerprint must match the checkpoint's.
# --ckpt=hf:DIR reads a Hugging Face folder (Llama, Qwen3 or Qwen3-MoE: config.json, safetensors,
# tokenizer.json) through the same loader: model.py imports it as a checkpoint of ours. The other
# way, --export_hf=DIR writes a model as such a folder (model.py's export_hf), or says in one line
# which feature of it the Hugging Face architectures lack and the switch to train with instead.

RANDOM_CKPT = "random"  # --ckpt=random: an untrained model of nanoGPT's Shakespeare size, for --bench
# nanoGPT's shakespeare_char model at the width of its CPU recipe (4 layers, 4 heads, 128 wide,
# 65 characters) with the 256-token context of its (GPU) config file: the CPU recipe itself trains
# with block_size 64, but a 256-token context lets --bench decode hundreds of tokens with few window
# jumps, so it measures decoding rather than re-prefills.
NANOGPT_CPU_SHAKESPEARE = dict(vocab_size=65, block_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=128)


def load_model(path, tokenizer_path="", rt=None, overrides=None):
    """(model in eval mode on rt's device, tokenizer, checkpoint dict) from a checkpoint file; any
    problem is one line (bpe.UserError) that says what to do. overrides: model_config fields to
    change at load time (--rope_scaling / --rope_factor)."""
    rt = rt or setup_runtime("cpu", "float32", compile="false", deterministic="false")
    ckpt = open_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, rt.kernels, overrides).to(rt.device).eval()
    tokenizer = checkpoint_tokenizer(ckpt, path, tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise bpe.UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size}; pass --tokenizer=PATH to the tokenizer it was trained with")
    return model, tokenizer, ckpt


def export(model, tokenizer, cfg, out=None):
    """--export_hf: the model and its tokenizer as a Hugging Face folder; one line per file written."""
    out = out or sys.stdout
    paths = export_hf(model.to("cpu"), tokenizer, cfg.export_hf, DTYPES[cfg.export_dtype], cfg.overwrite)
    for p in paths:
        print(f"wrote {p} ({os.path.getsize(p) / 1024:.0f} KB)", file=out)
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({cfg.export_hf!r}), "
          f"AutoTokenizer.from_pretrained({cfg.export_hf!r}); here: --ckpt={HF_PREFIX}{cfg.export_hf}", file=out)



def random_models(cfg, rt):
    """--ckpt=random: [(label, model)], one untrained model per --arch entry, each with the same
    seed. The settings of an entry apply over NANOGPT_CPU_SHAKESPEARE and are checked like typed
    settings (one line for a bad one); with --bench_context the context grows to fit the longest
    prefill plus the decoded tokens, unless the entry sets block_size itself."""
    base = GPTConfig(**NANOGPT_CPU_SHAKESPEARE)
    if cfg.bench_context:
        base = dataclasses.replace(base, block_size=max(cfg.bench_context) + cfg.bench_tokens)
    models = []
    for i, arch in enumerate(cfg.arch):
        where = f"--arch entry {i} ({bpe.settings_label(arch)}): " if len(cfg.arch) > 1 else "--arch: "
        config = bpe.settings_with(GPTConfig, base, arch, where)
        torch.manual_seed(cfg.seed)
        models.append((bpe.settings_label(arch, "softmax (default)"),
                       GPT(config, rt.kernels).to(rt.device).eval()))
    return models


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
# 5. Token healing
#
# BPE spells the same text differently depending on what follows it. With ":\n" in the
# vocabulary, "ROMEO:\nBut" is [..., "EO", ":\n", "But"], but the prompt "ROMEO:" alone ends in
# the lone ":" token. In training, a colon before a newline was always inside the ":\n" token, so
# the lone ":" token mostly appeared where no newline follows: the model's guess after it is
# skewed against the newline that the prompt's author had in mind (a space, a letter, or even
# end-of-text come out first). Token healing removes the prompt's last token and lets the model
# spell it again, together with whatever follows: the first new token(s) must start with the
# removed bytes, and may go on past them.
#
# Worked example (test_sample_token_healing_picks_the_longer_token runs it). Prompt "ROMEO:",
# tokens [BOS, R, O, M, E, O, ":"]; the vocabulary holds ":" and ":\n".
#   1. back up:  the prompt becomes [BOS, R, O, M, E, O]; the removed bytes are b":"
#   2. mask:     token t may come first if its bytes start with b":" (":" and ":\n" do), or if
#                b":" starts with its bytes (a shorter piece: the rest must follow in the next
#                step). Every other token, end-of-text included, gets logit -inf.
#   3. choose:   greedy or sampled as usual, among the allowed tokens; seeing "ROMEO" and knowing
#                the next token starts with ":", the model picks ":\n".
#   4. print:    ":\n" begins with the ":" that was printed as part of the prompt, so only "\n"
#                is new text: the output reads "ROMEO:\n..." with the colon once.
# Whole characters are removed (if the last token starts inside a multi-byte character, the
# token before it goes too), so the removed bytes are text and step 4 can skip them as
# characters. When no longer token starts with the removed bytes, the mask could only pick the
# same token again: then nothing is healed and the prompt stays as it is.


def token_bytes_table(tokenizer, vocab_size):
    """id -> bytes for each of the model's vocab_size ids; None for special tokens (they are not
    text and never continue one) and for ids the tokenizer lacks (a model's vocab may be padded)."""
    specials, vocab = set(tokenizer.special_tokens.values()), tokenizer.vocab
    return [None if i in specials else vocab.get(i) for i in range(vocab_size)]


def is_utf8_continuation(byte):
    """UTF-8 bytes 10xxxxxx continue a character; a character never starts with one."""
    return byte & 0xC0 == 0x80


@dataclasses.dataclass
class Healing:
    """What token healing removed from the end of a prompt (see heal_prompt)."""
    removed: bytes     # the removed tokens' bytes: the new text must start with them
    table: list        # token_bytes_table(tokenizer, vocab_size)

    @property
    def text(self):
        return self.removed.decode("utf-8")


def heal_prompt(tokenizer, ids, vocab_size):
    """Back up the end of a prompt for token healing. Returns (ids to prefill, Healing), or
    (ids, None) when there is nothing to heal: the prompt is only BOS, ends in a special token,
    ends in bytes that are not text, or no longer token starts with its last token's bytes."""
    specials = set(tokenizer.special_tokens.values())
    keep, removed = len(ids), b""
    while keep > 1 and ids[keep - 1] not in specials:
        removed = tokenizer.decode_bytes([ids[keep - 1]]) + removed
        keep -= 1
        if removed and not is_utf8_continuation(removed[0]):
            break                      # a character boundary: the removed bytes are whole characters
    if not removed:
        return ids, None
    try:
        removed.decode("utf-8")
    except UnicodeDecodeError:         # a prompt made of raw bytes: there is no text to re-spell
        return ids, None
    table = token_bytes_table(tokenizer, vocab_size)
    if not any(b is not None and len(b) > len(removed) and b.startswith(removed) for b in table):
        return ids, None
    return list(ids[:keep]), Healing(removed, table)


class Healer:
    """Token healing during generation, for a batch of rows. rest[r] holds the removed bytes that
    row r has not re-spelled yet (b"" once healed: no constraint from then on). Rows can heal at
    different steps: with "本" removed (3 bytes), one row may draw the token "本語" at once, another
    a token holding the first byte of 本 and then one that starts with the other two."""

    def __init__(self, healing, n_rows, device):
        self.table, self.device = healing.table, device
        self.rest = [healing.removed] * n_rows
        self._masks = {}               # rest -> (V,) bool, built once per distinct rest

    @property
    def active(self):
        return any(self.rest)

    def _allowed(self, rest):
        if rest not in self._masks:
            ok = [b is not None and len(b) > 0 and (b.startswith(rest) or rest.startswith(b)) for b in self.table]
            self._masks[rest] = torch.tensor(ok, device=self.device)
        return self._masks[rest]

    def mask(self):
        """(B, V) bool: True where a row may draw the token (every token for a healed row)."""
        everything = torch.ones(len(self.table), dtype=torch.bool, device=self.device)
        return torch.stack([self._allowed(r) if r else everything for r in self.rest])

    def update(self, tokens):
        """Account for the tokens just drawn, (B,) ids."""
        for row, token in enumerate(tokens):
            rest, b = self.rest[row], self.table[token]
            if rest:
                assert b is not None and (b.startswith(rest) or rest.startswith(b)), "a masked token was drawn"
                self.rest[row] = b"" if b.startswith(rest) else rest[len(b):]


# -----------------------------------------------------------------------------
# 6. Choosing the next token
#
# The model gives logits z (one per vocabulary entry); p = softmax(z / temperature). The knobs,
# applied in this order to a (B, vocab) batch of logits:
#   healing mask        first step(s) only, when the prompt was healed (section 5)
#   repetition penalty  tokens already in the text get their logit pushed down (CTRL, Keskar et al.
#                       2019: z/penalty if z > 0 else z*penalty, so it works whatever z's sign)
#   temperature 0       greedy: the argmax, deterministic
#   temperature t       z/t: t < 1 sharpens the distribution, t > 1 flattens it
#   top-k               keep the k largest logits (nanoGPT's knob)
#   top-p (nucleus)     keep the most likely tokens until their probability reaches p (Holtzman et al.
#                       2019): few candidates where the model is sure, many where it is not
# Filtered tokens get logit -inf, i.e. probability exactly 0, so they can never be drawn.
#
# The draw itself: each sample (row) has its own stream of random numbers u in [0, 1), seeded
# by (seed, row number), and takes the token where the cumulative probability first exceeds u
# (inverse-CDF sampling). A row's text therefore depends on its own numbers only: sample 7 is the
# same text whether it was drawn alone, in a batch of 8 or in a batch of 1000, so splitting
# --num_samples into batches (section 9) changes speed and memory, never the text.

@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


GREEDY = Sampling(temperature=0.0)


def row_seed(seed, row):
    """The seed of sample `row` in a run seeded with `seed`: 63 bits of blake2b("seed:row"), so
    nearby seeds and rows give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(seed, first_row, n_rows, n_steps, device="cpu"):
    """(n_rows, n_steps) uniforms in [0, 1): entry (r, t) is the random number of sample
    first_row + r at step t. Drawn on the CPU, so every device draws the same numbers."""
    u = torch.empty(n_rows, n_steps)
    for r in range(n_rows):
        u[r] = torch.rand(n_steps, generator=torch.Generator().manual_seed(row_seed(seed, first_row + r)))
    return u.to(device)


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


def draw(probs, u):
    """Inverse-CDF draw: (B, V) probabilities and (B,) uniforms in [0, 1) -> (B,) token ids: the
    first token whose cumulative probability exceeds u * (total probability).
    Example: probs (0.5, 0.3, 0.2) -> cumulative (0.5, 0.8, 1.0): u = 0.1 -> token 0,
    u = 0.6 -> token 1, u = 0.85 -> token 2. A token of probability 0 adds nothing to the sum,
    so no u can land on it."""
    cdf = probs.cumsum(dim=-1)                                                # (B, V)
    target = u.to(cdf.dtype)[:, None] * cdf[:, -1:]                           # (B, 1)
    token = (cdf <= target).sum(dim=-1)                                       # (B,) = first cdf > target
    # rounding can make u * total equal the total: then take the last token that has probability
    last = probs.size(-1) - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(token, last)


def pick_next(logits, sampling, u=None, seen=None, allowed=None):
    """(B, V) logits -> (B,) token ids, following the order described above. u: (B,) uniforms
    (needed unless greedy); seen: (B, V) bool for the repetition penalty; allowed: (B, V) bool
    healing mask."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return torch.argmax(logits, dim=-1)
    if u is None:
        raise ValueError("sampling with temperature > 0 needs u, one uniform per row (see row_uniforms)")
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    return draw(torch.softmax(logits, dim=-1), u)                             # (B,)


def seen_mask(prompt_ids, batch_size, vocab_size, device):
    """(B, V) bool: which tokens occur in the prompt (the repetition penalty's memory)."""
    seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
    if prompt_ids:
        seen[:, torch.tensor(sorted(set(prompt_ids)), device=device)] = True
    return seen


# -----------------------------------------------------------------------------
# 7. Generation: the plain reference and the KV-cached fast path
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
# Both take the same random numbers (row_uniforms) and the same healing constraint (Healer), so
# row r of the cached batch equals the reference run with row=r, token for token.

def keep_length(context_len, slide_keep):
    return max(1, min(context_len - 1, int(context_len * slide_keep)))


def window_start(n_tokens, start, context_len, keep):
    """The shared rule: the context is tokens[start:n_tokens]; past context_len, jump to the last keep."""
    return n_tokens - keep if n_tokens - start > context_len else start


@torch.inference_mode()
def generate_uncached(model, prompt_ids, max_new_tokens, sampling=GREEDY, seed=0, slide_keep=0.5,
                      stop_id=None, row=0, healing=None):
    """The reference: re-run the model over the whole window for every new token. O(T) per token.
    Returns the new token ids (up to and including stop_id if it is drawn). row: which sample's
    random numbers to use (see row_uniforms)."""
    if len(prompt_ids) == 0:
        raise ValueError("generate_uncached needs at least one prompt token: start from [bos_id]")
    device = next(model.parameters()).device
    context_len = context_length(model.config)
    keep = keep_length(context_len, slide_keep)
    u = row_uniforms(seed, row, 1, max_new_tokens, device) if sampling.temperature > 0 else None
    healer = Healer(healing, 1, device) if healing is not None else None
    ids = list(prompt_ids)
    start = max(0, len(ids) - context_len)
    seen = seen_mask(ids, 1, model.config.vocab_size, device)
    for step in range(max_new_tokens):
        start = window_start(len(ids), start, context_len, keep)
        window = torch.tensor([ids[start:]], dtype=torch.long, device=device)   # (1, T)
        logits = model(window)[:, -1, :]                                         # (1, V)
        allowed = healer.mask() if healer is not None and healer.active else None
        token = int(pick_next(logits, sampling, None if u is None else u[:, step], seen, allowed))
        if healer is not None:
            healer.update([token])
        ids.append(token)
        seen[0, token] = True
        if token == stop_id:
            break
    return ids[len(prompt_ids):]


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, sampling=GREEDY, seed=0, num_samples=1,
             slide_keep=0.5, cache_dtype=None, first_row=0, healing=None, step=None):
    """The fast path. Yields, per step, a (num_samples,) tensor holding each sample's next token.

    Prefill the prompt once (batch 1), branch the cache into num_samples rows, then each step feeds
    only the newest token of every row. The caller decides when to stop (end-of-text, stop strings):
    it simply stops iterating, and no forward pass is wasted on a token nobody asked for.
    Run it inside Runtime.autocast(); cache_dtype is the dtype of the cached keys and values.
    The rows are samples first_row, first_row + 1, ... of the run (their random numbers).
    step: what runs the one-token steps, decode_step(model, rt) (default: the model itself).
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
    u = row_uniforms(seed, first_row, B, max_new_tokens, device) if sampling.temperature > 0 else None
    healer = Healer(healing, B, device) if healing is not None else None
    step_fn = model if step is None else step

    # prefill: one forward over the prompt fills the cache (batch 1: the rows are identical so far)
    cache = model.make_cache(1, context_len, device=device, dtype=cache_dtype)
    logits = model(tokens[:1, :n], cache=cache)[:, -1, :]                           # (1, V)
    if B > 1:
        cache = cache.branch(B)            # B rows, each a copy of the prompt's keys and values
        logits = logits.expand(B, -1)      # (B, V): the same next-token distribution for every row

    for i in range(max_new_tokens):
        allowed = healer.mask() if healer is not None and healer.active else None
        next_tokens = pick_next(logits, sampling, None if u is None else u[:, i], seen, allowed)  # (B,)
        if healer is not None and healer.active:
            healer.update(next_tokens.tolist())
        yield next_tokens
        if i == max_new_tokens - 1:
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
            logits = step_fn(next_tokens[:, None], cache=cache)[:, -1, :]            # (B, V)


# -----------------------------------------------------------------------------
# 8. Text: streaming UTF-8 decode and stop strings
#
# Tokens are bytes, not characters: an emoji or a Chinese character is several UTF-8 bytes that a
# byte-level BPE may split across tokens. Decoding each token on its own would print U+FFFD for the
# halves, so tokens go through bpe's incremental decoder, which hands out only complete characters.
#
# Stop strings are matched on the decoded text, not on token ids, because one stop string can be
# spelled by many token sequences ("\n\n" may be one token, or "\n" + "\n", or end inside ".\n\n").
# To stream and still cut exactly, the stream holds back any tail of the text that could be the
# beginning of a stop string: with stop "END", the text "the EN" prints "the " and waits.
# After token healing, the first characters a row decodes re-spell the end of the prompt, which
# is already printed: the stream swallows them (`skip`), so the text starts where the prompt ends.

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
    cut just before it, and the printed pieces joined equal stream.text. skip: the healed text
    (Healing.text), which the first decoded characters re-spell and which is not handed out again."""

    def __init__(self, tokenizer, stops=(), skip=""):
        self.decoder = tokenizer.stream_decoder()
        self.stops = list(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.skip = skip        # healed characters still to swallow
        self.text = ""          # everything decoded so far (cut at the stop string once found)
        self.printed = 0        # how many characters of self.text have been handed out
        self.stopped = False

    def _advance(self, new_text, final):
        if self.stopped:
            return ""
        if self.skip:
            n = min(len(self.skip), len(new_text))
            assert new_text[:n] == self.skip[:n], "token healing: the new text must re-spell the prompt's end"
            self.skip, new_text = self.skip[n:], new_text[n:]
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
# 9. generate_text: tokens in, text out; many samples in bounded batches
#
# Drives the cached generator and turns each row's tokens into text. A row ends at the
# end-of-text token (not printed), at a stop string (cut exactly), or after max_new_tokens; the
# batch stops stepping as soon as every row has ended.
#
# --num_samples=100000 in one batch would need 100000 rows of KV cache at once (gigabytes even
# for a tiny model). The samples are therefore drawn in batches of at most --sample_batch rows,
# by default as many as fit in SAMPLE_MEMORY_BYTES (rows_per_batch). Each batch prefills the
# prompt once and branches it; since every row has its own random numbers (section 6), sample i
# is the same text whatever the batch size: only the order in which samples finish (and are
# printed) can differ.

SAMPLE_MEMORY_BYTES = 1 << 30   # --sample_batch=0: the rows of one batch may use about 1 GiB
LOGIT_COPIES = 6                # float32 (B, V) tensors alive in one step: logits, penalty, filters, probs, cdf


@dataclasses.dataclass
class Completion:
    text: str             # the generated text (prompt not included), cut before any stop string
    ids: list             # the generated token ids (the end token excluded; with healing, the first
                          # ones re-spell the prompt's end)
    finish: str           # "eot" (an end token: end-of-text, or <|end|> in a chat) | "stop" | "length"


def generate_text(model, tokenizer, prompt_ids, max_new_tokens, sampling=GREEDY, num_samples=1,
                  stops=(), seed=0, slide_keep=0.5, cache_dtype=None,
                  on_text=None, on_end=None, first_row=0, healing=None, end_ids=None, step=None):
    """Generate num_samples continuations of prompt_ids; returns a list of Completion.
    on_text(row, piece) is called with each new piece of text as soon as it is safe to print;
    on_end(row, completion) once per row, when that row ends (row counts from 0 in this batch).
    healing: the Healing of heal_prompt, whose ids prompt_ids must then be. end_ids: the tokens
    that end a row (finish "eot", not part of the text); default end-of-text alone, and a chat
    reply ends at <|end|> (section 10). step: as for generate."""
    end_ids = {tokenizer.eot_id} if end_ids is None else set(end_ids)
    skip = healing.text if healing is not None else ""
    streams = [TextStream(tokenizer, stops, skip) for _ in range(num_samples)]
    ids = [[] for _ in range(num_samples)]
    finish = [None] * num_samples

    def end(row, reason, piece):
        finish[row] = reason
        if piece and on_text:
            on_text(row, piece)
        if on_end:
            on_end(row, Completion(streams[row].text, ids[row], reason))

    steps = generate(model, prompt_ids, max_new_tokens, sampling, seed, num_samples,
                     slide_keep, cache_dtype, first_row, healing, step)
    try:
        for next_tokens in steps:
            for row, token in enumerate(next_tokens.tolist()):
                if finish[row]:
                    continue            # this row ended earlier; its batch slot idles until all end
                if token in end_ids:
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


def rows_per_batch(model, n_prompt, max_new_tokens, cache_dtype=torch.float32, budget=None):
    """How many samples one batch may hold so that their memory stays under budget (default
    SAMPLE_MEMORY_BYTES). Per row:
        KV cache    model.cache_bytes(context)             (keys and values of every layer)
        tokens      8 * (prompt + new tokens)              (int64 ids, kept for re-prefills)
        uniforms    4 * new tokens                         (the row's random numbers)
        one step    LOGIT_COPIES * 4 * vocab + vocab       (float32 logits and their filtered
                                                            copies, the bool seen mask)
    Example: 2 layers, 2 kv heads of 32, float32 cache, context 64, vocab 300, prompt 5, 500 new
    tokens: 2*2*2*32*4*64 + 8*505 + 4*500 + 6*4*300 + 300 = 65536 + 4040 + 2000 + 7500 = 79076 bytes
    a row -> 13578 rows per GiB (the issue's --num_samples=100000 runs as 8 batches). Linear
    attention layers add their fixed-size state instead (model.cache_bytes counts both)."""
    budget = budget or SAMPLE_MEMORY_BYTES
    context_len = context_length(model.config)
    V = model.config.vocab_size
    per_row = (model.cache_bytes(context_len, cache_dtype) + 8 * (n_prompt + max_new_tokens)
               + 4 * max_new_tokens + LOGIT_COPIES * 4 * V + V)
    return max(1, budget // per_row)


def print_completions(model, tokenizer, prompt_text, prompt_ids, cfg, rt, seed, out=None):
    """The CLI's way of showing samples. One sample streams: the prompt, then text as it comes.
    Several samples run as batches, so no single stream reads naturally; each sample is printed
    whole, under a header, the moment it ends (in the order they end). With --token_healing the
    prompt is healed first (section 5); the printed text is the prompt exactly, then the new text."""
    out = sys.stdout if out is None else out   # looked up at call time: sys.stdout may be replaced
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    healing = None
    if cfg.token_healing:
        prompt_ids, healing = heal_prompt(tokenizer, prompt_ids, model.config.vocab_size)
    batch = min(cfg.num_samples, cfg.sample_batch or
                rows_per_batch(model, len(prompt_ids), cfg.max_new_tokens, rt.dtype))
    step = decode_step(model, rt)

    def write(text):
        out.write(text)
        out.flush()

    done = []
    t0 = time.perf_counter()
    for first in range(0, cfg.num_samples, batch):
        if cfg.num_samples == 1:
            write(prompt_text)
            on_text, on_end = (lambda row, piece: write(piece)), (lambda row, c: write("\n"))
        else:
            on_text = None

            def on_end(row, c, first=first):
                write(f"---------- sample {first + row + 1}/{cfg.num_samples} ({c.finish}, {len(c.ids)} tokens)\n")
                write(prompt_text + c.text + "\n")
        with rt.autocast():
            done += generate_text(model, tokenizer, prompt_ids, cfg.max_new_tokens, sampling,
                                  min(batch, cfg.num_samples - first), cfg.stop, seed, cfg.slide_keep,
                                  rt.dtype, on_text, on_end, first, healing, step=step)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(c.ids) for c in done)
    ends = ", ".join(sorted(f"{n} {why}" for why, n in collections.Counter(c.finish for c in done).items()))
    batches = f", {math.ceil(cfg.num_samples / batch)} batches of <= {batch}" if batch < cfg.num_samples else ""
    healed = f"; healed {healing.text!r}" if healing is not None else ""
    print(f"[{n_tokens} tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tokens/s{batches}; "
          f"ended by: {ends}{healed}]", file=sys.stderr)
    return done


# -----------------------------------------------------------------------------
# 10. The interactive loop
#
# For the classroom: type a prompt, watch the continuation appear, type another. Ctrl-C while text
# is streaming stops that generation (the KeyboardInterrupt unwinds out of generate_text, whose
# `finally` closes the generator) and returns to the prompt; Ctrl-D (end of input) exits, and so
# does a stdin that is empty or closed (`< /dev/null`, `0<&-`), with one line saying so.
# An empty line starts from BOS, like an empty --prompt; escapes work as in --prompt ("a\\nb").
# The n-th prompt samples with seed --seed + n, so two prompts do not share random numbers.

def interactive(model, tokenizer, cfg, rt, read=input, out=None):
    out = sys.stdout if out is None else out
    context_len = context_length(model.config)
    print("interactive: type a prompt and press Enter. Ctrl-C stops a generation, Ctrl-D exits.", file=sys.stderr)
    for n in itertools.count():
        try:
            text = read("> ")
        except EOFError:
            out.write("\n")
            out.flush()
            print("interactive: end of input, bye", file=sys.stderr)
            return
        except (RuntimeError, OSError, ValueError):
            # input() raises RuntimeError("lost sys.stdin") when stdin is closed; reading a
            # closed or invalid file raises OSError or ValueError
            raise bpe.UserError("--interactive=True reads prompts from stdin, but stdin is closed; "
                                "run it in a terminal, pipe prompts in, or use --prompt=TEXT") from None
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
            print_completions(model, tokenizer, text, ids, cfg, rt, cfg.seed + n, out)
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
            out.flush()


# -----------------------------------------------------------------------------
# 11. Chat: a multi-turn conversation with a fine-tuned model
#
#     python sample.py --chat=True --ckpt=out/sft/best.pt
# Each line you type is a user message. The whole conversation so far is rendered with prepare.py's
# chat template (render(..., reply=True): BOS, each turn between its role token and <|end|>, and
# <|assistant|> last), the model writes its reply, streamed as it comes, and the reply ends where
# the model draws <|end|> (not printed), or after the reply budget. What you type is encoded as
# text, so typing "<|end|>" or "<|assistant|>" cannot end your turn or speak for the model
# (prepare.py section 10).
#
# The context is finite. The reply budget is --max_new_tokens, at most half the context; when the
# rendered history and that budget no longer fit, the oldest exchanges (a user message and the reply
# to it; a system message would stay) are dropped, one at a time, and a line on stderr says so. A
# message that does not fit even alone is refused with one line. Ctrl-C stops a reply and forgets
# that exchange; an empty line is ignored; Ctrl-D (or a closed stdin) exits. A reply that is empty
# (the model ended its turn at once) is not kept: the template has no empty turns.

def trim_history(messages, tokenizer, budget):
    """Drop the oldest exchanges until the rendered prompt fits budget tokens. Returns (kept
    messages, their prompt ids), or (messages, None) if the last message alone does not fit."""
    first = int(messages[0]["role"] == "system")
    while True:
        ids = prepare.render(messages, tokenizer, reply=True)[0]
        if len(ids) <= budget:
            return messages, ids
        if len(messages) - first <= 1:
            return messages, None
        messages = messages[:first] + messages[first + 2:]


def chat(model, tokenizer, cfg, rt, read=input, out=None):
    out = sys.stdout if out is None else out
    special = prepare.chat_ids(tokenizer)        # one line if this is a base model's tokenizer
    context_len = context_length(model.config)
    room = min(cfg.max_new_tokens, context_len // 2)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    step = decode_step(model, rt)
    history = []

    def write(text):
        out.write(text)
        out.flush()

    print("chat: type a message and press Enter. Ctrl-C stops a reply, Ctrl-D exits.", file=sys.stderr)
    for n in itertools.count():
        try:
            text = read("you> ")
        except EOFError:
            write("\n")
            print("chat: end of input, bye", file=sys.stderr)
            return history
        except (RuntimeError, OSError, ValueError):   # stdin closed (see interactive)
            raise bpe.UserError("--chat=True reads your messages from stdin, but stdin is closed; run it "
                                "in a terminal or pipe the messages in") from None
        except KeyboardInterrupt:
            write("\n")
            continue
        if not text.strip():
            continue
        messages = history + [{"role": "user", "content": text}]
        kept, ids = trim_history(messages, tokenizer, context_len - room)
        if ids is None:
            print(f"chat: that message is longer than the context ({context_len} tokens with {room} kept "
                  f"for the reply); send a shorter one", file=sys.stderr)
            continue
        if len(kept) < len(messages):
            print(f"chat: the context is full: forgot the oldest {(len(messages) - len(kept)) // 2} "
                  f"exchange(s)", file=sys.stderr)
        write("bot> ")
        try:
            with rt.autocast():
                reply = generate_text(model, tokenizer, ids, room, sampling, stops=cfg.stop, seed=cfg.seed + n,
                                      cache_dtype=rt.dtype, on_text=lambda row, piece: write(piece),
                                      end_ids=(special["end"], tokenizer.eot_id), step=step)[0]
        except KeyboardInterrupt:
            write("\n[stopped]\n")
            history = kept[:-1]
            continue
        write("\n")
        history = kept + [{"role": "assistant", "content": reply.text}] if reply.text else kept[:-1]


# -----------------------------------------------------------------------------
# 12. Benchmark
#
# What the KV cache and branching buy, measured on the loaded model (or --ckpt=random, an untrained
# model of nanoGPT's Shakespeare size, see NANOGPT_CPU_SHAKESPEARE; speed does not depend on the
# weights). Each measurement is warmed up once outside the clock, the kinds of runs alternate (so a
# noisy neighbour slows all of them alike), and the median of --bench_repeats is reported.
#   prefill            one forward over a full context into an empty cache
#   decode, cache      a 1-token prompt, then bench_tokens steps of the cached generator
#   decode, recompute  the same with generate_uncached (the whole window re-run every step)
#   branched xN        one prefill, cache branched into N rows, bench_tokens steps: N * tokens total.
#                      N single-sample runs take N times one cached decode, so their total tokens/s
#                      equals the single-run figure, which the ratio compares against.
# End-of-text is not a stop here: every run decodes exactly bench_tokens tokens. What the figures
# were on our machines, and against nanoGPT's generate, is in the README's performance notes.
# --ckpt=random --arch=... benches other architectures (a list of them: one after the other), and
# --bench_context measures decoding at long contexts instead (below).

def sync(rt):
    """Wait for the device, so that a clock read after it times the work, not its launch."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    elif rt.device.type == "mps":
        torch.mps.synchronize()


def bench(model, rt, cfg, bos_id=0, out=None):
    out = sys.stdout if out is None else out
    context_len = context_length(model.config)
    V, T, N = model.config.vocab_size, cfg.bench_tokens, cfg.bench_samples
    sampling = Sampling(temperature=1.0)
    full_prompt = torch.randint(V, (1, context_len), generator=torch.Generator().manual_seed(cfg.seed)).to(rt.device)
    step = decode_step(model, rt)

    @torch.inference_mode()
    def prefill():
        cache = model.make_cache(1, context_len, device=rt.device, dtype=rt.dtype)
        model(full_prompt, cache=cache)

    def cached():
        for _ in generate(model, [bos_id], T, sampling, cfg.seed, 1, cfg.slide_keep, rt.dtype, step=step):
            pass

    def uncached():
        generate_uncached(model, [bos_id], T, sampling, cfg.seed, cfg.slide_keep)

    def branched():
        for _ in generate(model, [bos_id], T, sampling, cfg.seed, N, cfg.slide_keep, rt.dtype, step=step):
            pass

    runs = {"prefill": (prefill, context_len), "cached": (cached, T), "uncached": (uncached, T),
            "branched": (branched, N * T)}
    speeds = {name: [] for name in runs}
    with rt.autocast():
        for rep in range(1 + cfg.bench_repeats):        # rep 0 is the warm-up
            print(f"bench: round {rep}/{cfg.bench_repeats}{' (warm-up)' if rep == 0 else ''}", file=sys.stderr)
            for name, (fn, n_tokens) in runs.items():
                sync(rt)
                t0 = time.perf_counter()
                fn()
                sync(rt)
                if rep > 0:
                    speeds[name].append(n_tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in speeds.items()}
    # ratios are taken within each round (runs seconds apart see the same machine load), then the
    # median over rounds: steadier than a ratio of medians on a shared, noisy machine
    cache_gain = statistics.median(c / u for c, u in zip(speeds["cached"], speeds["uncached"]))
    branch_gain = statistics.median(b / c for b, c in zip(speeds["branched"], speeds["cached"]))
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"bench: {n_params / 1e6:.2f}M params, context {context_len}, {T} new tokens per run, {decoding(rt)}, "
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


# Decoding at long contexts (--bench_context): what a token costs once the context is long. A
# softmax layer reads every cached key and value for every new token, so its cost grows with the
# context; a linear layer updates a state of fixed size, so its cost should not (section 5.5 of
# model.py); MLA reads a smaller cache. For each context c, each model, and 1 or bench_samples
# rows (one prompt branched, as --num_samples decodes): a cache prefilled with c random tokens
# (not timed), then bench_tokens one-token steps, greedy (timed). With one row much of a step is
# the work every model does alike (norms, MLP, head: many small ops); rows share those ops but
# each reads its own cache, which shows what the attention itself costs, and so does
# --compile=true, which fuses the small ops (section 2). Models and contexts
# alternate within each round; ratios to the first model are taken within each round (runs
# seconds apart see the same load), and medians over rounds are reported.

@torch.inference_mode()
def decode_at_context(model, step, rt, context, n_tokens, rows, seed):
    """Tokens/s (all rows) of n_tokens one-token steps (step = decode_step(model, rt)) after a
    prefill of `context` random tokens. The cache holds the model's whole context whatever the
    prefill, as generate's does: the compiled step's graph is then the same for every context."""
    V = model.config.vocab_size
    prompt = torch.randint(V, (1, context), generator=torch.Generator().manual_seed(seed)).to(rt.device)
    cache = model.make_cache(1, context_length(model.config), device=rt.device, dtype=rt.dtype)
    token = model(prompt, cache=cache)[:, -1:].argmax(-1).repeat(rows, 1)      # (rows, 1)
    cache = cache.branch(rows) if rows > 1 else cache
    sync(rt)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = step(token, cache=cache)[:, -1:].argmax(-1)
    sync(rt)
    return rows * n_tokens / (time.perf_counter() - t0)


def bench_contexts(models, rt, cfg, out=None):
    """models: [(label, model)]. Prints tokens/s per context, rows and model, each model's ratio
    to the first one, and how much a token of one row costs at the longest context against the
    shortest (1.0x = flat). Returns {(label, context, rows): median tokens/s}."""
    out = sys.stdout if out is None else out
    contexts, T = sorted(cfg.bench_context), cfg.bench_tokens
    row_counts = sorted({1, cfg.bench_samples})
    for label, model in models:
        if contexts[-1] + T > context_length(model.config):
            raise bpe.UserError(f"--bench_context={contexts[-1]} + {T} new tokens exceed the context of "
                                f"{context_length(model.config)} tokens of {label}; use shorter contexts")
    runs = [(c, rows) for c in contexts for rows in row_counts]
    speed = {(label, c, rows): [] for label, _ in models for c, rows in runs}
    steps = {label: decode_step(model, rt) for label, model in models}
    if rt.compile:
        # each model's step is a graph per row count, sometimes two (torch may add one for the
        # step that fills the cache's last position), and torch keeps 8 graphs of one function by
        # default: past that it would run the remaining models eagerly without saying so
        graphs = 2 * len(models) * len(row_counts)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
    with rt.autocast():
        for rep in range(1 + cfg.bench_repeats):        # rep 0 is the warm-up
            print(f"bench: round {rep}/{cfg.bench_repeats}{' (warm-up)' if rep == 0 else ''}", file=sys.stderr)
            for c, rows in runs:
                for label, model in models:
                    tok_s = decode_at_context(model, steps[label], rt, c, T, rows, cfg.seed)
                    if rep > 0:
                        speed[label, c, rows].append(tok_s)
    first = models[0][0]
    med = {key: statistics.median(v) for key, v in speed.items()}
    width = max(24, *(len(label) + 2 for label, _ in models))
    lines = [f"bench: decoding {T} tokens after a prefill of each context, {decoding(rt)}, {torch.get_num_threads()} "
             f"threads, median of {cfg.bench_repeats} rounds (alternating); tokens/s of all rows, and in "
             f"brackets x the first model (ratios within each round)",
             f"  {'context':<9}{'rows':>5}" + "".join(f"{label:>{width}}" for label, _ in models)]
    for c, rows in runs:
        cells = []
        for label, _ in models:
            ratio = statistics.median(a / b for a, b in zip(speed[label, c, rows], speed[first, c, rows]))
            cells.append(f"{med[label, c, rows]:.1f}" + (f" ({ratio:.2f}x)" if label != first else ""))
        lines.append(f"  {c:<9}{rows:>5}" + "".join(f"{cell:>{width}}" for cell in cells))
    flat = ", ".join(f"{label} {med[label, contexts[0], 1] / med[label, contexts[-1], 1]:.2f}x"
                     for label, _ in models)
    lines.append(f"  cost of a token (1 row) at {contexts[-1]} against {contexts[0]} tokens of context: {flat}")
    out.write("\n".join(lines) + "\n")
    return med


# -----------------------------------------------------------------------------
# 13. Scoring continuations by log-likelihood
#
# A multiple-choice question for a language model: given a context, which of n candidate
# continuations does it find most likely? The score of candidate c = (c_1 .. c_m) is its
# log-likelihood, the sum of the log-probabilities of its tokens, each given everything before it:
#     logL(c) = sum_j log p(c_j | context, c_1 .. c_{j-1})          (natural log, nats)
# A long candidate collects more negative terms than a short one, so the sum favours short
# answers; the length-normalised score divides by the candidate's length in UTF-8 bytes,
# logL(c) / bytes(c) (bytes, not tokens, so that models with different tokenizers are scored
# alike; HellaSwag's usual "acc_norm" divides by the length in characters, the same for ASCII
# text). Both are reported.
#
# Batching: the candidates share the context, so the context is run once (batch 1) into a KV
# cache, the cache is branched into n rows (KVCache.branch, as for --num_samples), and ONE forward
# over the n candidates, padded on the right to the longest, gives every candidate's logits. The
# padding cannot change a real position: attention is causal, so a pad token after a candidate's
# end is seen only by later (pad) positions, whose log-probabilities are dropped. The alternative,
# one padded batch of n full sequences (context + candidate), recomputes the context n times.
# score_choices_reference is that plain way, one full forward per candidate; the tests check that
# both agree and that both equal a sum done by hand.

def crop_context(context_ids, choice_ids, context_len):
    """Keep the end of a long context so that context + the longest candidate fit the model."""
    longest = max(len(c) for c in choice_ids)
    if longest >= context_len:
        raise bpe.UserError(f"a candidate continuation is {longest} tokens but the context is {context_len}; "
                            f"shorten the choices")
    return list(context_ids)[-(context_len - longest):]


@torch.inference_mode()
def score_choices(model, context_ids, choice_ids, cache_dtype=None):
    """Summed log-probability (nats) of each candidate given the context, in one forward over
    the candidates. context_ids: ids (BOS first); choice_ids: list of n non-empty id lists.
    Returns a (n,) float64 tensor. Run it inside Runtime.autocast()."""
    device = next(model.parameters()).device
    ctx = crop_context(context_ids, choice_ids, context_length(model.config))
    n, longest = len(choice_ids), max(len(c) for c in choice_ids)
    cache = model.make_cache(1, len(ctx) + longest, device=device, dtype=cache_dtype)
    first = model(torch.tensor([ctx], device=device), cache=cache)[:, -1:, :]     # (1, 1, V)
    cache = cache.branch(n)
    lengths = torch.tensor([len(c) for c in choice_ids], device=device)            # (n,)
    padded = torch.tensor([c + [c[-1]] * (longest - len(c)) for c in choice_ids], device=device)  # (n, L)
    logits = model(padded, cache=cache)                                            # (n, L, V)
    # position j's logits predict token j + 1; token 0 is predicted by the context's last position
    logits = torch.cat([first.expand(n, -1, -1), logits[:, :-1]], dim=1)          # (n, L, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, padded[..., None])[..., 0]  # (n, L)
    real = torch.arange(longest, device=device)[None, :] < lengths[:, None]        # (n, L)
    return torch.where(real, logp, 0.0).sum(dim=-1).double().cpu()


@torch.inference_mode()
def score_choices_reference(model, context_ids, choice_ids):
    """The plain way, for the tests: per candidate, one forward over context + candidate and the
    sum of its tokens' log-probabilities. Same cropping as score_choices."""
    device = next(model.parameters()).device
    ctx = crop_context(context_ids, choice_ids, context_length(model.config))
    scores = []
    for c in choice_ids:
        seq = torch.tensor([ctx + c], device=device)                               # (1, T)
        logp = torch.log_softmax(model(seq)[0, :-1].float(), dim=-1)               # (T-1, V)
        scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c)))
    return torch.tensor(scores, dtype=torch.float64)


# -----------------------------------------------------------------------------
# 14. Multiple-choice tasks: the built-in suite, file loaders, accuracy and its interval
#
# An Example is a context, n candidate continuations (each is appended to the context as it is:
# a candidate that should follow a word carries its leading space) and the index of the right one.
# A suite is {task name: [Example, ...]}, built once (load_suite), scored as often as wanted
# (evaluate_suite; run_eval_suite is the one-number-per-task form that train.py logs).
#
# The built-in suite needs no download: it is cut from the held-out val split of the data the
# model was trained on (prepare.py's shards, read through prepare.load_split), so it suits any
# corpus. Every example is drawn with a fixed seed, so the suite is the same on every run.
#   continuation  a val document cut after a line; the true next line against EVAL_CHOICES - 1
#                 lines drawn from OTHER documents (never one with the true line's text)
#   brackets      code cut just before a closing bracket: ")", "]" or "}" followed by the rest of
#                 the real line; the right one closes the innermost open bracket
#   indentation   code cut after a line ending in ":"; the next line at its real indentation, at
#                 the indentation of the ":" line, or indented twice as far
# The last two only find enough examples in code (a task with fewer than EVAL_MIN_EXAMPLES is
# left out, with a note). A chat model (its tokenizer has the chat tokens) also gets the synthetic
# tasks of prepare.py section 11 as multiple choice, one task_<name> each: the question of a test
# split problem rendered as a chat prompt, and as candidates the right reply and up to
# EVAL_CHOICES - 1 plausible wrong ones (a carry slip, a count off by one, ...), each closed by
# <|end|>. Multiple choice rather than exact match, so that one suite scores base and chat models
# alike, by likelihood; section 15's --task_eval scores the replies a chat model writes.
# Files in the two common formats give the real benchmarks:
#   HellaSwag    {"ctx": ..., "endings": [4 strings], "label": i}   (candidate = " " + ending)
#   generic      {"context": ..., "choices": [...], "answer": i}    (candidate = choice as given)
#                {"question": ..., "choices": [...], "answer": i}   (context "Question: ...\nAnswer:",
#                                                                    candidate = " " + choice)
# Accuracy comes with a 95% Wilson interval and the random baseline (the mean of 1 / n_choices).

EVAL_CHOICES = 4              # candidates per "continuation" example (as in HellaSwag)
EVAL_CONTEXT_CHARS = 1000     # a context keeps at most this many characters before the cut (whole lines)
EVAL_LINE_CHARS = (8, 160)    # a line may be a candidate when its stripped length is in this range
EVAL_VAL_TOKENS = 2_000_000   # read at most this many val tokens for the built-in suite
EVAL_MIN_EXAMPLES = 10        # a built-in task with fewer examples than this is left out
EVAL_TRIES = 200              # draws allowed to find the distractors of one example
OPENERS, CLOSERS = "([{", ")]}"
WILSON_Z = 1.959964           # standard normal 97.5% quantile: a two-sided 95% interval


@dataclasses.dataclass
class Example:
    context: str          # the text before the cut (chat: the user's question)
    choices: list         # candidate continuations (strings appended to the context; chat: replies)
    answer: int           # index of the right one
    where: str = ""       # where it came from (file:line, val document), for messages
    chat: bool = False    # a chat task: the context is rendered as a chat prompt (see example_ids)


def val_tokens(data_dir, tokenizer, max_tokens=EVAL_VAL_TOKENS):
    """The first max_tokens tokens of a data directory's val split, as one int64 array. The
    directory must have been prepared with this very tokenizer."""
    meta = prepare.load_meta(data_dir)
    if meta.get("fingerprint") != tokenizer.fingerprint:
        raise bpe.UserError(f"{data_dir} was tokenized with another tokenizer than this model's; pass "
                            f"--data_dir=DIR of the data the model was trained on")
    parts, left = [], max_tokens
    for shard in prepare.load_split(data_dir, "val", expected_fingerprint=tokenizer.fingerprint):
        parts.append(np.asarray(shard.tokens[:left], dtype=np.int64))
        left -= len(parts[-1])
        if left <= 0:
            break
    return np.concatenate(parts)


def val_documents(data_dir, tokenizer, max_tokens=EVAL_VAL_TOKENS):
    """The val split's documents as text. Every document starts with BOS; a document cut by
    max_tokens is dropped."""
    tokens = val_tokens(data_dir, tokenizer, max_tokens)
    starts = np.flatnonzero(tokens == tokenizer.eot_id).tolist() + [len(tokens)]
    if len(tokens) == max_tokens:
        starts = starts[:-1]                   # the last document may go on past the cut
    return [tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:]) if b > a + 1]


def context_before(lines, i):
    """The lines before line i (whole lines, at most EVAL_CONTEXT_CHARS characters, at least one
    line), joined, with the newline that ends line i - 1."""
    start, size = i - 1, len(lines[i - 1]) + 1
    while start > 0 and size + len(lines[start - 1]) + 1 <= EVAL_CONTEXT_CHARS:
        start -= 1
        size += len(lines[start]) + 1
    return "\n".join(lines[start:i]) + "\n"


def line_ok(line):
    return EVAL_LINE_CHARS[0] <= len(line.strip()) <= EVAL_LINE_CHARS[1]


def continuation_examples(docs, n_examples, seed):
    """'Which line comes next?' Example: the document "a = 1\\nb = 2\\n" cut after line 1 has the
    context "a = 1\\n", the true candidate "b = 2\\n" and EVAL_CHOICES - 1 lines of other
    documents, in an order shuffled by the seed."""
    rng = random.Random(seed)
    lines_of = [doc.split("\n") for doc in docs]
    pool = [(d, line) for d, lines in enumerate(lines_of) for line in lines if line_ok(line)]
    cuts = [(d, i) for d, lines in enumerate(lines_of) for i in range(1, len(lines)) if line_ok(lines[i])]
    rng.shuffle(cuts)
    examples = []
    for d, i in cuts:
        if n_examples and len(examples) == n_examples:
            break
        true = lines_of[d][i]
        others = []
        for _ in range(EVAL_TRIES):
            od, line = pool[rng.randrange(len(pool))]
            if od != d and line.strip() != true.strip() and line not in others:
                others.append(line)
                if len(others) == EVAL_CHOICES - 1:
                    break
        if len(others) < EVAL_CHOICES - 1:
            continue                          # too few other documents to draw from
        choices = [true] + others
        rng.shuffle(choices)
        examples.append(Example(context_before(lines_of[d], i), [c + "\n" for c in choices],
                                choices.index(true), f"val document {d}, line {i + 1}"))
    return examples


def bracket_examples(docs, n_examples, seed):
    """'Which bracket closes here?' Example: "print(x[0]" + ")" closes the "(" that is still
    open; the candidates are ")\\n", "]\\n", "}\\n" (each followed by the rest of the real line).
    A closing bracket that does not match the innermost open one (brackets inside strings or
    comments) resets the scan, so only well-nested sites are kept."""
    sites = []
    for d, doc in enumerate(docs):
        stack = []
        for pos, ch in enumerate(doc):
            if ch in OPENERS:
                stack.append(pos)
            elif ch in CLOSERS:
                if not stack or doc[stack[-1]] != OPENERS[CLOSERS.index(ch)]:
                    stack = []
                    continue
                opened = stack.pop()
                line_start = doc.rfind("\n", 0, opened) + 1    # the opener's line must be in the context
                if pos - opened >= 2 and line_start >= pos - EVAL_CONTEXT_CHARS:
                    sites.append((d, pos))
    rng = random.Random(seed)
    rng.shuffle(sites)
    examples = []
    for d, pos in sites[:n_examples or len(sites)]:
        doc = docs[d]
        line_end = doc.find("\n", pos)
        rest = doc[pos + 1:line_end if line_end >= 0 else len(doc)]
        cut = max(0, pos - EVAL_CONTEXT_CHARS)
        start = 0 if cut == 0 else doc.find("\n", cut - 1) + 1     # first line starting at or after cut
        context = doc[start:pos]
        examples.append(Example(context, [c + rest + "\n" for c in CLOSERS], CLOSERS.index(doc[pos]),
                                f"val document {d}, character {pos}"))
    return examples


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def indentation_examples(docs, n_examples, seed):
    """'How far is the next line indented?' Example: after "    if x:\\n" (indent 4) the real next
    line "        y()\\n" (indent 8) competes with the same text at indent 4 and at indent 12."""
    sites = []
    for d, doc in enumerate(docs):
        lines = doc.split("\n")
        for i in range(1, len(lines)):
            opener, line = lines[i - 1], lines[i]
            if (opener.rstrip().endswith(":") and not opener.lstrip().startswith("#") and line.strip()
                    and "\t" not in line[:len(line) - len(line.lstrip())]
                    and indent_of(line) > indent_of(opener)):
                sites.append((d, i))
    rng = random.Random(seed)
    rng.shuffle(sites)
    examples = []
    for d, i in sites[:n_examples or len(sites)]:
        lines = docs[d].split("\n")
        a, b, text = indent_of(lines[i - 1]), indent_of(lines[i]), lines[i].lstrip(" ")
        indents = [b, a, 2 * b - a]
        rng.shuffle(indents)
        examples.append(Example(context_before(lines, i), [" " * k + text + "\n" for k in indents],
                                indents.index(b), f"val document {d}, line {i + 1}"))
    return examples


def chat_task_examples(name, n_examples, seed, digits=3):
    """A synthetic task (prepare.py section 11) as multiple choice: each test-split question, its
    answer and up to EVAL_CHOICES - 1 distinct wrong replies from the task's `wrong`, shuffled."""
    rng = random.Random(f"{seed}:{name}")
    examples = []
    for p in prepare.task_problems(name, "test", n_examples or 200, 0, digits):
        wrong = []
        for _ in range(EVAL_TRIES):
            w = prepare.TASKS[name].wrong(p, rng)
            if w not in wrong:
                wrong.append(w)
                if len(wrong) == EVAL_CHOICES - 1:
                    break
        choices = [p.answer] + wrong
        rng.shuffle(choices)
        examples.append(Example(p.question, choices, choices.index(p.answer), f"{name} test problem", chat=True))
    return examples


def builtin_suite(data_dir, tokenizer, n_examples=200, seed=1337, log=None, digits=3):
    """{task: examples} of the built-in tasks, from data_dir's val split (see the table above), and
    for a chat model the synthetic tasks. A chat model whose data_dir was made with another
    tokenizer gets the synthetic tasks alone, with a note."""
    suite = {}
    if all(t in tokenizer.special_tokens for t in bpe.CHAT_TOKENS):
        suite = {f"task_{name}": chat_task_examples(name, n_examples, seed, digits) for name in prepare.TASKS}
        try:
            docs = val_documents(data_dir, tokenizer)
        except bpe.UserError as e:
            if log is not None:
                log(f"eval: the text tasks are left out ({e})")
            return suite
    else:
        docs = val_documents(data_dir, tokenizer)
    for name, make in (("continuation", continuation_examples), ("brackets", bracket_examples),
                       ("indentation", indentation_examples)):
        examples = make(docs, n_examples, seed)
        if len(examples) >= EVAL_MIN_EXAMPLES:
            suite[name] = examples
        elif log is not None:
            log(f"eval: {name}: only {len(examples)} examples in {data_dir}'s val split "
                f"(at least {EVAL_MIN_EXAMPLES} needed); left out")
    if not suite:
        raise bpe.UserError(f"{data_dir}'s val split is too small for the built-in tasks "
                            f"({len(docs)} documents); prepare more data or a larger --val_fraction")
    return suite


def parse_example(rec, bad):
    """One JSONL record (a dict) -> Example; bad(message) raises the error that names the line."""
    def strings(value, what):
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(s, str) and s for s in value):
            bad(f'"{what}" must be a list of at least 2 non-empty strings')
        return value

    def index(value, what, n):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            bad(f'"{what}" must be an index into the {n} choices (0..{n - 1}), got {value!r}')
        return value

    if "endings" in rec:                                            # HellaSwag
        if not isinstance(rec.get("ctx"), str):
            bad('a HellaSwag line needs "ctx" (a string)')
        endings = strings(rec["endings"], "endings")
        return Example(rec["ctx"], [" " + e for e in endings], index(rec.get("label"), "label", len(endings)))
    if "choices" in rec:
        choices = strings(rec["choices"], "choices")
        answer = index(rec.get("answer"), "answer", len(choices))
        if isinstance(rec.get("context"), str):
            return Example(rec["context"], choices, answer)
        if isinstance(rec.get("question"), str):
            return Example(f"Question: {rec['question']}\nAnswer:", [" " + c for c in choices], answer)
        bad('a line with "choices" needs "context" or "question" (a string)')
    bad('expected HellaSwag {"ctx", "endings", "label"} or {"context"|"question", "choices", "answer"}')


def load_jsonl_task(path, n_examples=0):
    """Examples from a JSONL file (see the formats above); at most n_examples (0 = all). Every
    problem is a one-line UserError that names the file and the line (prepare.jsonl_records reads
    the lines, as it does for the chat data)."""
    examples = []
    for lineno, rec, bad in prepare.jsonl_records(path, "--eval"):
        example = parse_example(rec, lambda message: bad(message, lineno))
        examples.append(dataclasses.replace(example, where=f"{path}:{lineno}"))
        if n_examples and len(examples) == n_examples:
            break
    if not examples:
        raise bpe.UserError(f"{path}: no examples in the file")
    return examples


def load_suite(spec, tokenizer, data_dir="data/stdlib", n_examples=200, seed=1337, log=None, digits=3):
    """Build a suite from a spec: 'builtin' and/or JSONL paths, comma-separated. A file's task is
    named after the file ('hellaswag_val.jsonl' -> 'hellaswag_val'). digits: of the synthetic
    tasks' numbers (chat models)."""
    suite = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "builtin":
            suite.update(builtin_suite(data_dir, tokenizer, n_examples, seed, log, digits))
        else:
            name = os.path.splitext(os.path.basename(item))[0]
            while name in suite:
                name += "'"
            suite[name] = load_jsonl_task(item, n_examples)
    if not suite:
        raise bpe.UserError(f"--eval={spec!r}: name 'builtin' or JSONL files, comma-separated")
    return suite


def wilson_interval(k, n, z=WILSON_Z):
    """95% confidence interval of a success rate k/n (Wilson, 1927). The textbook p +- z s.e.
    collapses to [0, 0] at k = 0 and spills past [0, 1] near the ends; Wilson's interval solves
    |p - phat| = z sqrt(p (1 - p) / n) for p instead, which stays inside [0, 1] and keeps close to
    95% coverage even for small n:
        center = (phat + z^2/2n) / (1 + z^2/n),   half = z / (1 + z^2/n) * sqrt(phat (1 - phat) / n + z^2/4n^2)
    Example: 5 right of 10 -> (0.2366, 0.7634); 0 of 10 -> (0, 0.2775)."""
    if n == 0:
        return 0.0, 1.0
    phat, z2 = k / n, z * z
    center = (phat + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(phat * (1 - phat) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclasses.dataclass
class TaskResult:
    n: int                # examples
    correct: int          # right by the summed log-probability
    correct_norm: int     # right by the log-probability per byte
    baseline: float       # expected accuracy of guessing: mean of 1 / n_choices

    @property
    def acc(self):
        return self.correct / self.n

    @property
    def acc_norm(self):
        return self.correct_norm / self.n


def example_ids(tokenizer, ex):
    """(context ids, [choice ids]) of an Example: its text after a BOS; for a chat task the question
    rendered as a chat prompt, and each reply closed by <|end|> (ending the turn is part of it)."""
    if not ex.chat:
        return [tokenizer.eot_id] + tokenizer.encode(ex.context), [tokenizer.encode(c) for c in ex.choices]
    prompt = prepare.render([{"role": "user", "content": ex.context}], tokenizer, reply=True)[0]
    end = prepare.chat_ids(tokenizer)["end"]
    return prompt, [tokenizer.encode_ordinary(c) + [end] for c in ex.choices]


@torch.inference_mode()
def evaluate_suite(model, tokenizer, suite, rt):
    """Score every example of every task; returns {task: TaskResult}. The model is put in eval
    mode for the call (and back in train mode if it was)."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name, examples in suite.items():
            r = TaskResult(len(examples), 0, 0, sum(1 / len(ex.choices) for ex in examples) / len(examples))
            for ex in examples:
                context_ids, choice_ids = example_ids(tokenizer, ex)
                with rt.autocast():
                    scores = score_choices(model, context_ids, choice_ids, rt.dtype)
                per_byte = scores / torch.tensor([len(c.encode("utf-8")) for c in ex.choices], dtype=torch.float64)
                r.correct += int(scores.argmax()) == ex.answer
                r.correct_norm += int(per_byte.argmax()) == ex.answer
            results[name] = r
    finally:
        model.train(was_training)
    return results


def run_eval_suite(model, tokenizer, suite, rt):
    """{task: accuracy}, the accuracy by the length-normalised score (acc_norm): one number per
    task for a training log. suite comes from load_suite (build it once); rt is the Runtime."""
    return {name: r.acc_norm for name, r in evaluate_suite(model, tokenizer, suite, rt).items()}


def eval_report(results):
    """The table --eval prints, one line per task."""
    lines = [f"{'task':<16}{'examples':>9}  {'acc (sum)':<22}{'acc_norm (per byte)':<22}random"]
    for name, r in results.items():
        lo, hi = wilson_interval(r.correct, r.n)
        lo_n, hi_n = wilson_interval(r.correct_norm, r.n)
        lines.append(f"{name:<16}{r.n:>9}  {r.acc:.3f} [{lo:.3f}, {hi:.3f}]  {r.acc_norm:.3f} [{lo_n:.3f}, {hi_n:.3f}]  "
                     f"{r.baseline:.3f}")
    lines.append("[lo, hi]: 95% Wilson interval; random: the accuracy of guessing (mean of 1 / choices)")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# 15. Task accuracy: exact match on the synthetic tasks' test split
#
#     python sample.py --task_eval=add,sub,count,reverse,sort --ckpt=out/sft/best.pt --temperature=0
# Multiple choice (section 14) asks which of given replies the model finds likeliest; this asks it
# to write the reply. For each task, --eval_examples problems of its test split (prepare.py section
# 11: questions that no train or val split can hold) are asked as one-turn chats; a reply ends at
# <|end|> (at most TASK_REPLY_TOKENS) and is right when the task's checker says so (an exact match
# of the answer, whitespace aside). With --num_samples=n every problem gets n replies (drawn with
# --temperature etc., each with its own seed), c of them right, and
#     pass@1 = mean over problems of c / n
#     pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)       (k = n here)
# pass@k is the chance that at least one of k replies drawn from the n is right, the unbiased
# estimator of Chen et al. (2021, Codex); C(n - c, k) / C(n, k) is the chance that k drawn without
# replacement are all wrong. With n = 1 (and --temperature=0: greedy) both are the plain accuracy.
# The 95% interval is Wilson's (section 14) with the problems as the trials and each problem's
# score (c / n, or its pass@k) as its success, so n replies to one problem never count as n
# independent trials.

TASK_REPLY_TOKENS = 32       # a reply longer than this is wrong for every task (the longest answer is ~20 tokens)


def pass_at_k(n, c, k):
    """The chance that at least one of k of n replies (c of them right) is right, drawn without
    replacement: 1 - C(n - c, k) / C(n, k). Example: n = 5, c = 2, k = 2 -> 1 - 3/10 = 0.7."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclasses.dataclass
class TaskScore:
    n: int                  # problems
    pass1: float            # sum over problems of c / n_samples
    passk: float            # sum over problems of pass_at_k(n_samples, c, n_samples)
    wrong: list             # (question, reply) of the first wrong replies, for the report


@torch.inference_mode()
def task_accuracy(model, tokenizer, names, cfg, rt, log=None):
    """{task: TaskScore} on the test split of each task in names (see above)."""
    end = prepare.chat_ids(tokenizer)["end"]
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    k, budget = cfg.num_samples, min(cfg.max_new_tokens, TASK_REPLY_TOKENS)
    model.eval()
    step = decode_step(model, rt)
    scores = {}
    for name in names:
        score = TaskScore(0, 0.0, 0.0, [])
        for i, p in enumerate(prepare.task_problems(name, "test", cfg.eval_examples or 200, 0, cfg.task_digits)):
            ids = prepare.render([{"role": "user", "content": p.question}], tokenizer, reply=True)[0]
            with rt.autocast():
                done = generate_text(model, tokenizer, ids, budget, sampling, k, seed=cfg.seed + i,
                                     cache_dtype=rt.dtype, end_ids=(end, tokenizer.eot_id), step=step)
            right = [c.finish == "eot" and prepare.TASKS[name].check(p, c.text) for c in done]
            score.n += 1
            score.pass1 += sum(right) / k
            score.passk += pass_at_k(k, sum(right), k)
            if not all(right) and len(score.wrong) < 3:
                score.wrong.append((p.question, done[right.index(False)].text))
        scores[name] = score
        if log is not None:
            log(f"task_eval: {name} done ({score.n} problems)")
    return scores


def task_report(scores, k, temperature):
    lines = [f"{'task':<10}{'problems':>9}  {'pass@1 [95% interval]':<26}" + (f"pass@{k} [95% interval]" if k > 1 else "")]
    for name, s in scores.items():
        cells = []
        for total in (s.pass1, s.passk)[:1 + (k > 1)]:
            lo, hi = wilson_interval(total, s.n)
            cells.append(f"{total / s.n:.3f} [{lo:.3f}, {hi:.3f}]".ljust(26))
        lines.append(f"{name:<10}{s.n:>9}  " + "".join(cells).rstrip())
        lines += [f"    wrong: {q!r} -> {r!r}" for q, r in s.wrong]
    how = "greedy replies" if temperature == 0 else f"{k} sampled replies per problem at temperature {temperature}"
    lines.append(f"exact match on each task's test split ({how}); [lo, hi]: 95% Wilson interval over problems")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# 16. Stress tests
#
# Where does a small model break? Each check prints a number and what it means:
#   overflow     generate STRESS_OVERFLOW contexts' worth of tokens: the window jumps (section 7)
#                keep the cached generator going, and it must still equal the full recompute
#   length       mean loss per token on val text twice the training length, before and after
#                position block_size: with plain RoPE (past block_size the rotation angles were
#                never seen in training), with linear interpolation and with YaRN (model.py, 3)
#   repetition   a long greedy sample: distinct-n (distinct n-grams / all n-grams; 1 = nothing
#                repeats) and the longest token run that occurs twice, without and with the
#                repetition penalty
#   drift        bits per byte of the model's own samples, scored by the model at temperature 1,
#                against the sampling temperature: cold samples are text the model finds easy
#                (often repetitive), hot ones drift into text it finds ever more surprising
#   prompts      odd prompts must still generate: empty, only special-token text, raw bytes that
#                are not UTF-8, a prompt three times the context

STRESS_OVERFLOW = 2.5                         # the overflow run is this many contexts long
STRESS_LONG_TOKENS = 512                      # length of the greedy samples for repetition
STRESS_PENALTY = 1.3                          # the repetition penalty compared with none
STRESS_TEMPERATURES = (0.5, 0.8, 1.0, 1.2, 1.5)
STRESS_DRIFT_ROWS = 4                         # samples per temperature
STRESS_DRIFT_TOKENS = 128                     # tokens per sample (at most the context - 1)
STRESS_LENGTH_WINDOWS = 4                     # val windows of 2 x block_size tokens for the length check
STRESS_PROMPT_TOKENS = 32                     # tokens generated per odd prompt


def distinct_n(ids, n):
    """Distinct n-grams / all n-grams of a token list (1.0 = no n-gram repeats).
    Example: [1, 2, 1, 2] has bigrams (1,2), (2,1), (1,2): 2 distinct of 3 -> 0.667."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeat(ids):
    """Length of the longest token run that occurs at least twice (the two may overlap).
    Example: [5, 1, 2, 3, 1, 2, 3, 1] -> 4: (1, 2, 3, 1) starts at 1 and at 4. When a run of
    length m repeats, so do its prefixes, so a binary search over m finds the longest."""
    def repeats(m):
        seen = set()
        for i in range(len(ids) - m + 1):
            gram = tuple(ids[i:i + m])
            if gram in seen:
                return True
            seen.add(gram)
        return False
    lo, hi = 0, max(0, len(ids) - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if repeats(mid) else (lo, mid - 1)
    return lo


def window_jumps(n_prompt, n_new, context_len, keep):
    """How often generate re-prefills while n_new tokens follow an n_prompt-token window:
    window_start's rule replayed for every token that is fed back."""
    start, jumps = 0, 0
    for n in range(n_prompt + 1, n_prompt + n_new):
        new_start = window_start(n, start, context_len, keep)
        jumps += new_start != start
        start = new_start
    return jumps


def token_byte_lengths(tokenizer, vocab_size):
    """(vocab_size,) UTF-8 bytes of each id (0 for special tokens and ids past the tokenizer)."""
    lengths = tokenizer.token_bytes()
    return torch.tensor(lengths + [0] * (vocab_size - len(lengths)))


@torch.inference_mode()
def bits_per_byte(model, tokenizer, rows, rt):
    """Bits per byte of token rows (B, T) under the model, each token given the ones before it:
        bpb = sum of -log2 p(token) / sum of the tokens' UTF-8 bytes      (the first token is given)"""
    x = torch.tensor(rows, device=rt.device)
    with rt.autocast():
        loss, _ = model(x[:, :-1], x[:, 1:], reduction="none")                # (B, T-1) nats
    n_bytes = token_byte_lengths(tokenizer, model.config.vocab_size)[x[:, 1:].cpu()].sum()
    return float(loss.float().sum()) / math.log(2) / max(1, int(n_bytes))


@torch.inference_mode()
def loss_by_position(model, windows, rt):
    """Mean loss (nats) at each position over (N, T + 1) token windows -> (T,)."""
    x = torch.as_tensor(windows, device=rt.device)
    with rt.autocast():
        loss, _ = model(x[:, :-1], x[:, 1:], reduction="none")                # (N, T)
    return loss.float().mean(dim=0).cpu()


def twice_the_context(model):
    """The model rebuilt for 2 x block_size positions, three ways: {name: model}."""
    cfg, L = model.config, model.config.block_size
    device = next(model.parameters()).device
    configs = {"plain RoPE": dataclasses.replace(cfg, rope_scaling="none", rope_factor=1.0, block_size=2 * L),
               "linear x2": dataclasses.replace(cfg, rope_scaling="linear", rope_factor=2.0),
               "yarn x2": dataclasses.replace(cfg, rope_scaling="yarn", rope_factor=2.0)}
    models = {}
    for name, c in configs.items():
        m = GPT(c)
        m.load_state_dict(model.state_dict())        # RoPE tables are not weights: they follow c
        models[name] = m.to(device).eval()
    return models


def stress_tests(model, tokenizer, cfg, rt, out=None):
    """Run the checks of the table above; print them and return {check: numbers}. A check that
    raises is reported as FAILED with its error (and counted in results["failed"])."""
    out = sys.stdout if out is None else out
    ctx, V, eot = context_length(model.config), model.config.vocab_size, tokenizer.eot_id
    L = model.config.block_size
    keep = keep_length(ctx, cfg.slide_keep)
    results = {"failed": 0}
    step = decode_step(model, rt)

    def say(line):
        out.write(line + "\n")
        out.flush()

    def tokens_of(prompt, n, sampling, rows=1):
        with rt.autocast():
            steps = list(generate(model, prompt, n, sampling, cfg.seed, rows, cfg.slide_keep, rt.dtype, step=step))
        return torch.stack(steps, dim=1).tolist()                                 # (rows, n)

    say(f"stress: context {ctx} tokens (trained on {L}), {decoding(rt)}, seed {cfg.seed}")
    # overflow: far past the context, cached == recomputed
    n_new = int(STRESS_OVERFLOW * ctx)
    cached = tokens_of([eot], n_new, GREEDY)[0]
    with rt.autocast():
        same = cached == generate_uncached(model, [eot], n_new, GREEDY, cfg.seed, cfg.slide_keep)
    results["overflow"] = dict(tokens=n_new, jumps=window_jumps(1, n_new, ctx, keep), same=same)
    say(f"[overflow]   {n_new} greedy tokens in a {ctx}-token context: {results['overflow']['jumps']} "
        f"re-prefills; cached == full recompute: {'yes' if same else 'NO'}")
    results["failed"] += not same

    # length: loss before and after the training length
    try:
        toks = val_tokens(cfg.data_dir, tokenizer, STRESS_LENGTH_WINDOWS * (2 * L + 1))
    except bpe.UserError as e:
        toks = np.zeros(0, dtype=np.int64)
        say(f"[length]     skipped: {e}")
    n_windows = len(toks) // (2 * L + 1)
    if n_windows:
        windows = toks[:n_windows * (2 * L + 1)].reshape(n_windows, 2 * L + 1)
        say(f"[length]     mean loss per token (nats) on {n_windows} val window(s) of {2 * L} tokens, "
            f"positions < {L} | >= {L} (past the training length):")
        results["length"] = {}
        for name, m in twice_the_context(model).items():
            loss = loss_by_position(m, windows, rt)
            before, after = float(loss[:L].mean()), float(loss[L:].mean())
            results["length"][name] = (before, after)
            say(f"               {name:<12} {before:6.3f} | {after:6.3f}")
    elif len(toks):
        say(f"[length]     skipped: {cfg.data_dir}'s val split has fewer than {2 * L + 1} tokens")

    # repetition of long greedy samples, without and with the penalty
    say(f"[repetition] greedy {STRESS_LONG_TOKENS} tokens from BOS: distinct-1/2/4 (1 = no repeats), "
        f"longest run seen twice:")
    results["repetition"] = {}
    for penalty in (1.0, STRESS_PENALTY):
        ids = tokens_of([eot], STRESS_LONG_TOKENS, Sampling(0.0, repetition_penalty=penalty))[0]
        d = [distinct_n(ids, n) for n in (1, 2, 4)]
        results["repetition"][penalty] = dict(distinct=d, longest=longest_repeat(ids))
        say(f"               penalty {penalty:<4g} {d[0]:.3f} / {d[1]:.3f} / {d[2]:.3f}, "
            f"longest {results['repetition'][penalty]['longest']} tokens")

    # drift: bits per byte of the model's own samples against temperature
    n = min(STRESS_DRIFT_TOKENS, ctx - 1)
    results["drift"] = {}
    for t in STRESS_TEMPERATURES:
        rows = [[eot] + r for r in tokens_of([eot], n, Sampling(t), STRESS_DRIFT_ROWS)]
        results["drift"][t] = bits_per_byte(model, tokenizer, rows, rt)
    say(f"[drift]      bits per byte of its own samples ({STRESS_DRIFT_ROWS} x {n} tokens), scored at "
        f"temperature 1: " + ", ".join(f"T={t:g}: {b:.2f}" for t, b in results["drift"].items()))

    # odd prompts
    specials = "".join(tokenizer.special_tokens) * 2
    cases = {"empty": encode_prompt(tokenizer, "", ctx),
             "special tokens only": encode_prompt(tokenizer, specials, ctx),
             "invalid UTF-8 bytes": [eot] + [tokenizer.byte_ids[b] for b in b"\xff\xfe\xc3(\x80"],
             "3x the context": encode_prompt(tokenizer, " ".join(map(str, range(3 * ctx))), ctx)}
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    results["prompts"] = {}
    for name, ids in cases.items():
        healing = None
        if cfg.token_healing:
            ids, healing = heal_prompt(tokenizer, ids, V)
        try:
            with rt.autocast():
                c = generate_text(model, tokenizer, ids, STRESS_PROMPT_TOKENS, sampling, 1, (), cfg.seed,
                                  cfg.slide_keep, rt.dtype, healing=healing, step=step)[0]
            results["prompts"][name] = f"ok, {len(c.ids)} tokens ({c.finish})"
        except Exception as e:    # the point of a stress test: report what broke, check the rest
            results["prompts"][name] = f"FAILED: {bpe.first_line(e)}"
            results["failed"] += 1
    say("[prompts]    " + "; ".join(f"{k} ({len(cases[k])} prompt tokens): {v}" for k, v in results["prompts"].items()))
    return results


# -----------------------------------------------------------------------------
# 17. Pictures: attention maps, the embedding matrix, the surprise page
#
# Drawn by hand, like train.py's loss.svg: every shape is one element whose coordinates are
# computed here, so a reader sees exactly how numbers become pixels. Written next to the checkpoint.
#   attention.svg    one heatmap per (layer, head), layers down, heads across: cell (i, j) shows
#                    how much prompt token i reads from token j (white 0, dark blue 1); only
#                    j <= i exists (causal); token labels down the left and along the bottom
#   embeddings.svg   every token's embedding (a row of wte) on the two directions along which the
#                    embeddings vary most (principal components), the most frequent tokens of the
#                    val split labelled
#   surprise.html    the prompt's text, each token's background as red as its loss is high
#                    (white 0 nats, full red ln(vocab), the loss of a uniform guess)
# PCA in three lines: centre the rows of X; the SVD X = U S V^T gives the principal axes as the
# rows of V^T, ordered by S; token i sits at U[i, k] S[k] on axis k, which explains
# S[k]^2 / sum(S^2) of the variance.

SHOW_KINDS = ("attention", "embeddings", "surprise")
SHOW_MAX_TOKENS = 32      # attention.svg shows at most the prompt's last 32 tokens
ATTN_PANEL = 224          # pixels per heatmap side (cells shrink as the prompt grows)
EMBED_LABELS = 40         # this many of the most frequent tokens are labelled


def xml_text(text):
    """Text safe inside an SVG/XHTML element or attribute: &, <, >, quotes escaped, and control
    characters (not allowed in XML at all) written as \\xNN."""
    text = "".join(ch if ch in "\n\t" or 32 <= ord(ch) != 127 else f"\\x{ord(ch):02x}" for ch in text)
    return html.escape(text, quote=True)


def token_label(text):
    """A token's text for an axis label: spaces as '·', newlines and tabs as \\n and \\t."""
    return xml_text(text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t"))


def svg_open(width, height, title):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2}" y="18" text-anchor="middle">{xml_text(title)}</text>']


def blue(p):
    """White (p = 0) to dark blue (p = 1), linear in each RGB channel."""
    p = min(1.0, max(0.0, p))
    r, g, b = (round(255 + (c - 255) * p) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def attention_svg(labels, probs, title):
    """labels: T token texts; probs: (n_layer, n_head, T, T) array. One panel per (layer, head)
    with one <rect class="cell"> per pair j <= i, so n_layer * n_head * T (T + 1) / 2 cells;
    <text class="label">: T per layer row (queries, left) and T per head column (keys, bottom)."""
    L, H, T, _ = probs.shape
    cell = max(2, ATTN_PANEL // T)
    side, gap, left, top, bottom = cell * T, 18, 110, 46, 100
    W, Hpx = left + H * (side + gap), top + L * (side + gap) + bottom
    font = min(10, max(4, cell - 1))
    out = svg_open(W, Hpx, title)
    for l in range(L):
        y0 = top + l * (side + gap)
        for h in range(H):
            x0 = left + h * (side + gap)
            out.append(f'<g class="panel" data-layer="{l}" data-head="{h}">')
            out.append(f'<text x="{x0}" y="{y0 - 4}" font-size="10">layer {l}, head {h}</text>')
            for i in range(T):
                for j in range(i + 1):
                    out.append(f'<rect class="cell" x="{x0 + j * cell}" y="{y0 + i * cell}" width="{cell}" '
                               f'height="{cell}" fill="{blue(float(probs[l, h, i, j]))}"/>')
            out.append(f'<rect x="{x0}" y="{y0}" width="{side}" height="{side}" fill="none" stroke="#999"/>')
            out.append('</g>')
        for i in range(T):
            out.append(f'<text class="label" x="{left - 4}" y="{y0 + i * cell + cell * 0.8:.1f}" '
                       f'text-anchor="end" font-size="{font}">{token_label(labels[i])}</text>')
    y_keys = top + L * (side + gap) - gap + 4
    for h in range(H):
        x0 = left + h * (side + gap)
        for j in range(T):
            x = x0 + j * cell + cell * 0.8
            out.append(f'<text class="label" transform="translate({x:.1f},{y_keys}) rotate(-90)" '
                       f'text-anchor="end" font-size="{font}">{token_label(labels[j])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def principal_components(x, k=2):
    """Top-k principal components of the rows of x (N, C), by numpy's SVD (see the comment above).
    Returns (coords (N, k), axes (k, C) unit vectors, explained (k,) fractions of the variance)."""
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    return u[:, :k] * s[:k], vt[:k], s[:k] ** 2 / (s ** 2).sum()


def embeddings_svg(coords, labels, explained, title, caption=""):
    """coords (N, 2): one <circle class="token"> each; labels {row: text}: one <text class="label">
    each, next to its (red) dot. caption: a second, smaller title line."""
    W = Hpx = 640
    m = 50
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    px = lambda v: m + (v[0] - lo[0]) / span[0] * (W - 2 * m)
    py = lambda v: Hpx - m - (v[1] - lo[1]) / span[1] * (Hpx - 2 * m)     # SVG's y axis points down
    out = svg_open(W, Hpx, title)
    out.append(f'<text x="{W / 2}" y="34" text-anchor="middle" font-size="10">{xml_text(caption)}</text>')
    out.append(f'<text x="{W / 2}" y="{Hpx - 12}" text-anchor="middle">PC1 ({100 * explained[0]:.1f}% of the variance)</text>')
    out.append(f'<text transform="translate(16,{Hpx / 2}) rotate(-90)" text-anchor="middle">'
               f'PC2 ({100 * explained[1]:.1f}%)</text>')
    for i, v in enumerate(coords):
        colour = "#d62728" if i in labels else "#1f77b4"
        out.append(f'<circle class="token" cx="{px(v):.1f}" cy="{py(v):.1f}" r="2" fill="{colour}" fill-opacity="0.6"/>')
    for i, text in labels.items():
        out.append(f'<text class="label" x="{px(coords[i]) + 3:.1f}" y="{py(coords[i]) - 3:.1f}" '
                   f'font-size="10">{token_label(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def surprise_html(pieces, losses, max_loss, title):
    """pieces: the text each token adds (joined they are the prompt); losses: its loss in nats.
    One <span> per token; its background goes from white (0) to red (max_loss or more); its title
    (shown on hover) gives the loss. Everything is escaped, so the page shows the prompt's text
    as text, whatever it holds."""
    spans = []
    for piece, loss in zip(pieces, losses):
        g = round(255 * (1 - min(1.0, loss / max_loss)))
        spans.append(f'<span title="{loss:.2f} nats" style="background:#ff{g:02x}{g:02x}">{xml_text(piece)}</span>')
    n_bytes = sum(len(p.encode("utf-8")) for p in pieces)
    mean = sum(losses) / max(1, len(losses))
    bpb = sum(losses) / math.log(2) / max(1, n_bytes)
    return ("<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\"><head><meta charset=\"utf-8\"/>"
            f"<title>{xml_text(title)}</title><style>body {{ font-family: sans-serif; }} "
            "pre { white-space: pre-wrap; font-family: monospace; line-height: 1.5; }</style></head>\n<body>"
            f"<h1>{xml_text(title)}</h1>\n<p>{len(losses)} tokens, mean loss {mean:.3f} nats per token, "
            f"{bpb:.3f} bits per byte. Background: white = 0 nats, full red = {max_loss:.2f} nats "
            "(ln of the vocabulary size, the loss of a uniform guess); hover a token for its loss.</p>\n"
            f"<pre>{''.join(spans)}</pre>\n</body></html>\n")


def token_pieces(tokenizer, ids):
    """The text each token adds when ids are decoded as a stream (a character split over tokens
    belongs to the token that completes it), so "".join(pieces) == tokenizer.decode(ids)."""
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


@torch.inference_mode()
def draw_pictures(model, tokenizer, cfg, rt, folder, prompt, log=None):
    """Write the --show pictures into folder; returns their paths."""
    kinds = [k.strip() for k in cfg.show.split(",") if k.strip()]
    if not prompt and ("attention" in kinds or "surprise" in kinds):
        raise bpe.UserError("--show=attention and --show=surprise look at a text: give it with --prompt=TEXT")
    ctx = context_length(model.config)
    paths = []
    say = log or (lambda line: None)
    was_training = model.training
    model.eval()
    ids = encode_prompt(tokenizer, prompt, ctx, warn=say)
    if "attention" in kinds:
        shown = ids[-SHOW_MAX_TOKENS:]
        if len(shown) < len(ids):
            say(f"attention: showing the prompt's last {SHOW_MAX_TOKENS} of {len(ids)} tokens")
        with record_attention(model) as recorded, rt.autocast():
            model(torch.tensor([shown], device=rt.device))
        probs = torch.stack([p[0] for p in recorded]).float().cpu().numpy()     # (n_layer, n_head, T, T)
        labels = [tokenizer.decode([i]) for i in shown]
        paths.append(os.path.join(folder, "attention.svg"))
        bpe.atomic_write_bytes(paths[-1], attention_svg(labels, probs, f"attention of {len(shown)} prompt tokens "
                                                        "(row: query token, column: key token)").encode("utf-8"))
    if "embeddings" in kinds:
        specials = set(tokenizer.special_tokens.values())
        rows = [i for i in range(min(tokenizer.vocab_size, model.config.vocab_size)) if i not in specials]
        wte = model.transformer.wte.weight.detach().float().cpu().numpy()[rows].astype(np.float64)
        coords, _, explained = principal_components(wte)
        try:
            counts = np.bincount(val_tokens(cfg.data_dir, tokenizer), minlength=model.config.vocab_size)[rows]
            order, how = np.argsort(-counts, kind="stable"), "the most frequent tokens of the val split"
        except bpe.UserError as e:
            say(f"embeddings: no token counts ({e}); labelling the first-merged tokens instead")
            order = np.argsort([-(i >= 256) * (model.config.vocab_size - i) for i in rows], kind="stable")
            how = "the first-merged tokens (no val data to count)"
        labels = {int(r): tokenizer.decode([rows[r]]) for r in order[:EMBED_LABELS]}
        paths.append(os.path.join(folder, "embeddings.svg"))
        bpe.atomic_write_bytes(paths[-1], embeddings_svg(
            coords, labels, explained, "token embeddings (wte) on their top two principal components",
            f"red and labelled: {how}").encode("utf-8"))
    if "surprise" in kinds:
        with rt.autocast():
            logits = model(torch.tensor([ids], device=rt.device))[0].float()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        losses = [-float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
        pieces = token_pieces(tokenizer, ids[1:])
        paths.append(os.path.join(folder, "surprise.html"))
        bpe.atomic_write_bytes(paths[-1], surprise_html(pieces, losses, math.log(model.config.vocab_size),
                                                        "surprise: each token coloured by its loss").encode("utf-8"))
    model.train(was_training)
    return paths


# -----------------------------------------------------------------------------
# 18. main

def main():
    cfg = bpe.parse_settings(SampleConfig, sys.argv[1:], description=__doc__)
    rt = runtime_for(cfg)
    if cfg.ckpt == RANDOM_CKPT:
        if not cfg.bench:
            raise bpe.UserError("--ckpt=random is an untrained model without a tokenizer: it only serves "
                                "--bench=True; pass a trained --ckpt=PATH")
        models = random_models(cfg, rt)
        if cfg.bench_context:
            bench_contexts(models, rt, cfg)
        for label, model in ([] if cfg.bench_context else models):
            if len(models) > 1:
                print(f"--- {label}")
            bench(model, rt, cfg, 0)
        return
    if cfg.arch != [{}]:
        raise bpe.UserError("--arch describes the untrained model of --ckpt=random; a checkpoint brings its "
                            "own architecture")
    path = cfg.ckpt or os.path.join(cfg.out_dir, "best.pt")
    factor = 1.0 if cfg.rope_scaling == "none" else cfg.rope_factor
    overrides = dict(rope_scaling=cfg.rope_scaling, rope_factor=factor) if cfg.rope_scaling else None
    if overrides and cfg.export_hf:
        overrides["yarn_ramp"] = "index"  # the YaRN a Hugging Face config can declare (model.py section 3)
    model, tokenizer, ckpt = load_model(path, cfg.tokenizer, rt, overrides)
    print(f"loaded {path}: step {ckpt.get('step', '?')}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, context {context_length(model.config)}, {rt}", file=sys.stderr)
    log = lambda line: print(line, file=sys.stderr)
    if cfg.export_hf:
        export(model, tokenizer, cfg)
        return
    if bpe.EOT not in tokenizer.special_tokens:
        raise bpe.UserError(f"{path}: its tokenizer has no {bpe.EOT} token, which sample.py puts in front of "
                            f"every prompt (nanostack's documents start with it); a tokenizer whose documents "
                            f"start with another token (Llama 3's <|begin_of_text|>) is not supported")
    if cfg.bench:
        if cfg.bench_context:
            bench_contexts([(os.path.basename(path), model)], rt, cfg)
        else:
            bench(model, rt, cfg, tokenizer.eot_id)
        return
    if cfg.eval:
        suite = load_suite(cfg.eval, tokenizer, cfg.data_dir, cfg.eval_examples, cfg.seed, log, cfg.task_digits)
        sys.stdout.write(eval_report(evaluate_suite(model, tokenizer, suite, rt)))
        return
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?'
    if cfg.stress:
        if stress_tests(model, tokenizer, cfg, rt)["failed"]:
            raise bpe.UserError("stress: some checks failed (marked NO or FAILED above)")
        return
    if cfg.show:
        for p in draw_pictures(model, tokenizer, cfg, rt, os.path.dirname(os.path.abspath(path)),
                               read_prompt(cfg.prompt), log):
            print(f"wrote {p} ({os.path.getsize(p) / 1024:.0f} KB)")
        return
    if cfg.interactive:
        interactive(model, tokenizer, cfg, rt)
        return
    if cfg.chat:
        chat(model, tokenizer, cfg, rt)
        return
    if cfg.task_eval:
        scores = task_accuracy(model, tokenizer, cfg.task_eval.split(","), cfg, rt, log)
        sys.stdout.write(task_report(scores, cfg.num_samples, cfg.temperature))
        return
    text = read_prompt(cfg.prompt)
    ids = encode_prompt(tokenizer, text, context_length(model.config), warn=log)
    print_completions(model, tokenizer, text, ids, cfg, rt, cfg.seed)


if __name__ == "__main__":
    bpe.main_guard(main)
