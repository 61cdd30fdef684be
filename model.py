"""
model.py -- a modern decoder-only transformer (GPT), written out, with a KV cache.

Where it sits: bpe.py (tokenizer) -> prepare.py (token shards) -> model.py (this file)
-> train.py (optimises it) -> sample.py (generates with its KV cache).

Every modern choice is a switch in GPTConfig, so a reader can turn it off and see what it did:
  - RMSNorm, with or without a learnable gain (norm_gain), epsilon norm_eps
  - rotary position embeddings (RoPE) with base rope_theta, and context extension at inference
    by linear position interpolation or YaRN (rope_scaling, rope_factor; yarn_ramp: the paper's
    blend or Hugging Face's)
  - attention with one merged QKV projection, grouped-query attention (n_kv_head: 1 = multi-query,
    n_head = multi-head), QK-norm, an attention-logit softcap
  - three attention paths with the same result: F.scaled_dot_product_attention (fast), a
    hand-written one (scores, mask, softmax, weighted sum) that you can read line by line, and a
    flash-attention kernel written in Triton (FlashAttention-2: tiles, online softmax, the
    recomputing backward; optional, needs triton)
  - masks: causal, sliding window (changeable at run time), global prefix tokens that are always
    visible, document masking for packed sequences
  - the attention family (attn, layer_pattern): block-sparse softmax, multi-head latent attention
    (MLA: a compressed KV cache, plain and absorbed decoding), linear attention (kernel and
    decayed forms: a constant-size state, chunked training), an output gate for every kind
    (attn_gate), and hybrids mixing them layer by layer (layer_pattern=LLLG)
  - MLP: ReLU^2, SwiGLU or GELU, hidden size configurable
  - pre-norm residual blocks, zero-initialised output projections, tied or untied embeddings,
    final norm, final-logit softcap
  - multi-token prediction (mtp): an extra head that predicts token t+2
  - mixture of experts (n_experts > 0): token-choice top-k routing, shared experts, capacity
    with token dropping, load-balancing loss, router z-loss, aux-loss-free bias balancing
  - hyper-connections (hc_streams > 1): n residual streams that every sublayer reads and writes
    with learned weights, static or dynamic, optionally kept doubly stochastic by Sinkhorn-Knopp (mHC)
  - Engram memory (engram_layers): hashed n-gram embedding tables looked up per token, gated by
    the hidden state; the tables are "memory" in the accounting, trained as embeddings
  - a KV cache: preallocated, prefill + one-token decode, branching one prompt into N samples;
    for linear layers a fixed-size state behind the same interface
  - accounting: parameters per component, FLOPs per token, KV-cache bytes per token, and the
    optimizer parameter groups (Muon for hidden matrices, AdamW for the rest)
  - the runtime that train.py and sample.py share: device, precision, compile, threads and
    determinism decided once (the model gets the hardware choices as a Kernels setting), and the
    one checkpoint format (atomic save with a checksum; verified load)
  - the Hugging Face format: safetensors written and read by hand (memory-mapped, sharded), and
    Llama / Qwen3 / Qwen3-MoE folders exported and imported (hf:DIR) with their tokenizer.json

Run it:
  python model.py                                  # default architecture: table + one fwd/bwd
  python model.py --n_layer=12 --n_embd=768 --n_head=6 --n_kv_head=2 --block_size=1024
  python model.py --n_experts=8 --top_k=2 --moe_hidden=256      # MoE: total vs active params
  python model.py --hc_streams=4 --hc_dynamic=True --hc_sinkhorn=True   # 4 residual streams (mHC)
  python model.py --engram_layers=1 --engram_rows=20480         # n-gram memory: dense vs memory params
  python model.py --attn=mla --kv_lora_rank=64     # MLA: its KV bytes per token against the default
  python model.py --layer_pattern=LLLG --attn_gate=output       # hybrid: 3 linear layers, 1 softmax
  python model.py --bench=True                     # time SDPA vs hand-written attention
  python model.py --bench_attention=True           # Triton kernel vs SDPA vs hand-written, fwd+bwd,
                                                   # bf16, T = 512..4096 (a GPU; on CPU it needs
                                                   # TRITON_INTERPRET=1 and runs tiny sizes)
  python model.py --help                           # every GPTConfig field with its meaning

Use it (train.py and sample.py do this):
  model = GPT(GPTConfig(n_layer=4))                # or GPT(config, rt.kernels) for a Runtime rt
  loss, aux = model(idx, targets)                  # aux: unweighted auxiliary losses ("mtp", ...)
  logits = model(idx)                              # (B, T, vocab_size) float32
  cache = model.make_cache(batch_size=1, max_len=512)
  logits = model(prompt, cache=cache)              # prefill; then one token at a time
  ckpt = open_checkpoint("out/best.pt")            # or "hf:DIR", a Hugging Face folder (section 15)
  export_hf(model, tokenizer, "DIR")               # config.json, model.safetensors, tokenizer.json, ...

Sections:
  1. Configuration (GPTConfig: what the model computes; Kernels: how, on this hardware)
  2. RMSNorm
  3. Rotary position embeddings (RoPE, linear interpolation, YaRN)
  4. Attention masks (causal, sliding window, global prefix, documents, sparse blocks)
  5. Attention, the shared pieces (GQA, softcap, SDPA and hand-written paths)
     5.1 Block-sparse attention: computing only the visible blocks
     5.2 The output gate (attn_gate), and what every attention layer shares
     5.3 Softmax attention layers: global, sliding window, block-sparse (merged QKV, QK-norm)
     5.4 Multi-head latent attention (MLA): latent cache, plain and absorbed decoding
     5.5 Linear attention: kernel and decayed forms; parallel, recurrent and chunked
     5.6 Layer patterns, and recording the attention probabilities
  5b. A flash-attention kernel in Triton (FlashAttention-2 forward and backward, attn_impl=triton)
  6. MLP (ReLU^2, SwiGLU, GELU)
  7. Mixture of experts (routing, capacity, balancing, statistics)
  7b. Hyper-connections: n residual streams, static / dynamic, Sinkhorn-Knopp (mHC)
  7c. Engram: hashed n-gram memory (the hash, the lookup, the gate)
  8. Transformer block
  9. KV cache (keys and values, MLA latents, linear-attention states)
 10. The GPT model (init, forward, loss, multi-token prediction)
 11. Accounting (parameters, FLOPs, KV bytes) and optimizer groups
 12. Runtime: device, precision, compile, threads, determinism (decided once)
 13. Checkpoints: the file format, atomic save with a checksum, verified load, growing the
     vocabulary of a base model for new special tokens (grow_vocab)
 14. safetensors: the format, a writer, a memory-mapped reader, sharded folders
 15. The Hugging Face format: config and weights by name, export, import (hf:DIR)
 16. main: print the architecture, run a forward/backward, optional benchmarks
"""
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import mmap
import os
import re
import sys
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bpe

# -----------------------------------------------------------------------------
# 1. Configuration
#
# One dataclass holds every architectural choice. Its trailing comments are the --help text of
# `python model.py`, and train.py stores dataclasses.asdict(config) in each checkpoint, so a model
# can always be rebuilt from its checkpoint alone.

MLP_KINDS = ("relu2", "swiglu", "gelu")
ROPE_SCALINGS = ("none", "linear", "yarn")
YARN_RAMPS = ("turns", "index")
ATTN_IMPLS = ("sdpa", "manual", "triton")
ATTN_KINDS = ("softmax", "mla", "linear")
ATTN_GATES = ("none", "output", "output_head")
LINEAR_KINDS = ("kernel", "decay")
# The letters of layer_pattern: which attention each layer computes (sections 5.3 to 5.6).
LAYER_KINDS = {"G": "global softmax", "W": "sliding-window softmax", "S": "block-sparse softmax",
               "M": "multi-head latent attention", "L": "linear attention"}
SOFTMAX_LETTERS = "GWSM"   # the kinds that compute softmax(q k^T) over cached keys
SWIGLU_ROUND = 64  # hidden sizes that are multiples of 64 map well onto matmul tiles
FLASH_MAX_HEAD_DIM = 128  # largest head_dim the Triton kernel's tiles are sized for (section 5b)
ENGRAM_MAX_ORDER = 8      # longest n-gram the memory hashes (section 7c numbers its multipliers by it)
ENGRAM_MAX_ROWS = 2 ** 31 - 1  # the hash maps to rows with 64-bit integer products (section 7c)


def int_list(name, text):
    """"1,3" -> (1, 3): the comma-separated integers of a setting (engram_layers, engram_ngram).
    "" -> (). A single int (a --sweep entry may write {'engram_layers': 1}) is a list of one."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name}={text!r}: write comma-separated integers, e.g. {name}=1,3") from None


def dense_hidden(config):
    """Hidden width of the dense MLP: config.mlp_hidden if set, else 4*n_embd; for swiglu
    8/3*n_embd rounded up to a multiple of SWIGLU_ROUND. SwiGLU has three matrices instead
    of two, so 2/3 of the width keeps its parameter count close to the two-matrix MLPs.
    Example: n_embd=48 -> relu2 192, swiglu 128 (8/3*48 = 128 is already a multiple of 64)."""
    if config.mlp_hidden:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return SWIGLU_ROUND * math.ceil(8 * config.n_embd / 3 / SWIGLU_ROUND)
    return 4 * config.n_embd


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 4096          # number of token ids (tokenizer vocab incl. special tokens)
    block_size: int = 256           # training context length in tokens (RoPE tables cover this)
    n_layer: int = 4                # number of transformer blocks
    n_head: int = 4                 # query heads per attention layer
    n_kv_head: int = 4              # key/value heads: n_head = multi-head, 1 = multi-query, between = GQA
    n_embd: int = 256               # width of the residual stream
    head_size: int = 0              # channels per attention head; 0 = n_embd / n_head (Qwen3 sets it apart)
    mlp: str = "relu2"              # MLP activation: relu2 (ReLU squared) | swiglu | gelu
    mlp_hidden: int = 0             # MLP hidden size; 0 = 4*n_embd (relu2, gelu) or ~8/3*n_embd (swiglu)
    rope_theta: float = 10000.0     # RoPE base: the slowest rotation has wavelength ~2*pi*theta tokens
    rope_scaling: str = "none"      # context extension at inference: none | linear | yarn
    rope_factor: float = 1.0        # extension factor s: usable context = block_size * s (needs scaling)
    yarn_ramp: str = "turns"        # YaRN's blend: turns (linear in a pair's turns) | index (linear in its index, as Hugging Face)
    qk_norm: bool = True            # RMSNorm queries and keys per head before RoPE (stabilises logits)
    attn_softcap: float = 0.0       # cap*tanh(score/cap) on attention scores; 0 = off (off keeps SDPA)
    logit_softcap: float = 15.0     # cap*tanh(logit/cap) on output logits; 0 = off
    norm_gain: bool = False         # RMSNorm has a learnable per-channel gain (False = parameter-free)
    norm_eps: float = 1e-6          # RMSNorm's eps in x / sqrt(mean(x^2) + eps) (Llama checkpoints use 1e-5, Qwen3 1e-6)
    tie_embeddings: bool = False    # share the token embedding matrix with the output head
    window: int = 0                 # sliding attention window in tokens; 0 = full causal attention
    n_global: int = 0               # first n_global positions stay visible to every query (with a window)
    mtp: bool = False               # multi-token prediction head: extra loss predicting token t+2
    attn_impl: str = "sdpa"         # sdpa = F.scaled_dot_product_attention where it applies | manual | triton (5b; G and W layers)
    # The attention family (sections 5.1 to 5.6); the defaults keep every layer softmax as above.
    attn: str = "softmax"           # attention of every layer: softmax | mla (latent KV cache) | linear (constant-size state)
    layer_pattern: str = ""         # one letter per layer, repeated to n_layer: G global, W window, S block-sparse, M MLA, L linear; '' = all as attn
    attn_gate: str = "none"         # sigmoid gate on the attention output: none | output (per channel) | output_head (per head)
    kv_lora_rank: int = 0           # MLA: width of the cached key/value latent c_kv; 0 = n_embd/2
    q_lora_rank: int = 0            # MLA: width of the query latent c_q; 0 = full-rank queries
    qk_rope_head_dim: int = 0       # MLA: rotated part of each query/key head (one rope key shared by all heads); 0 = head_dim/2
    qk_nope_head_dim: int = 0       # MLA: part of each query/key head without RoPE; 0 = head_dim
    v_head_dim: int = 0             # MLA: width of each value head; 0 = head_dim
    linear_kind: str = "kernel"     # linear attention: kernel (elu+1 features, normalised) | decay (learned per-head decay)
    linear_chunk: int = 64          # linear attention: training chunk in tokens (quadratic inside, a state carried between)
    sparse_block: int = 0           # block-sparse attention: block size in tokens (S layers); 0 = off
    sparse_local: int = 1           # block-sparse: how many previous blocks each block sees (besides its own)
    sparse_global: int = 1          # block-sparse: the first blocks, seen by every block
    # Mixture of experts (section 7); n_experts = 0 keeps every MLP dense.
    n_experts: int = 0              # routed experts per MoE layer; 0 = dense model
    moe_every: int = 1              # every k-th block uses MoE (blocks with index % k == k-1)
    top_k: int = 2                  # experts chosen per token
    n_shared_experts: int = 0       # experts every token always uses, on top of the routed ones
    capacity_factor: float = 0.0    # tokens per expert <= factor*tokens*top_k/n_experts; 0 = no dropping
    moe_hidden: int = 0             # hidden size of each expert; 0 = the dense MLP hidden size
    moe_aux_coef: float = 0.01      # weight of the load-balancing loss aux["moe_aux"] (used by train.py)
    moe_z_coef: float = 0.001       # weight of the router z-loss aux["moe_z"] (used by train.py)
    moe_bias_rate: float = 0.0      # step size of aux-loss-free bias balancing; 0 = off
    # Hyper-connections (section 7b); hc_streams = 1 keeps the single residual stream.
    hc_streams: int = 1             # residual streams: 1 = the plain residual, n > 1 = n streams mixed by learned weights
    hc_dynamic: bool = False        # hyper-connection weights also depend on the hidden state (dynamic HC); False = static
    hc_sinkhorn: bool = False       # keep the stream-to-stream matrix doubly stochastic by Sinkhorn-Knopp (mHC)
    hc_sinkhorn_iters: int = 20     # Sinkhorn-Knopp rounds (each divides columns, then rows, by their sums)
    # Engram memory (section 7c); engram_layers = "" keeps it off.
    engram_layers: str = ""         # blocks that add hashed n-gram memory, e.g. "1" or "1,3"; "" = none
    engram_ngram: str = "2,3"       # n-gram orders looked up, e.g. "2,3" (each from 2 to 8)
    engram_heads: int = 4           # hash functions (each with its own table) per n-gram order
    engram_rows: int = 16384        # rows per hash table
    engram_dim: int = 32            # width of one retrieved row; a position reads orders*heads of them

    def __post_init__(self):
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.head_size < 0:
            raise ValueError(f"head_size={self.head_size} must be >= 0 (0 = n_embd / n_head)")
        if not self.head_size and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             "(or set head_size)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                             "(each key/value head serves a whole group of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim} must be even (RoPE rotates pairs of channels)")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={self.mlp!r}: choose one of {', '.join(MLP_KINDS)}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r}: choose one of {', '.join(ROPE_SCALINGS)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}: choose one of {', '.join(ATTN_IMPLS)}")
        if self.attn_impl == "triton" and self.attn_softcap != 0:
            raise ValueError(f"attn_impl=triton has no attention softcap (attn_softcap="
                             f"{self.attn_softcap}); use attn_impl=manual, or attn_softcap=0")
        if self.attn_impl == "triton" and self.head_dim > FLASH_MAX_HEAD_DIM:
            raise ValueError(f"attn_impl=triton supports head_dim = n_embd/n_head up to "
                             f"{FLASH_MAX_HEAD_DIM}, not {self.head_dim}; use attn_impl=sdpa, "
                             "or more heads")
        if not self.rope_factor >= 1.0:
            raise ValueError(f"rope_factor={self.rope_factor} must be >= 1 (it stretches the context)")
        if self.rope_scaling == "none" and self.rope_factor != 1.0:
            raise ValueError(f"rope_factor={self.rope_factor} needs rope_scaling=linear or yarn")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        if self.yarn_ramp not in YARN_RAMPS:
            raise ValueError(f"yarn_ramp={self.yarn_ramp!r}: choose one of {', '.join(YARN_RAMPS)}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be positive (it keeps RMSNorm from dividing by 0)")
        for name in ("mlp_hidden", "window", "n_global", "n_experts", "n_shared_experts", "moe_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("attn_softcap", "logit_softcap", "capacity_factor", "moe_aux_coef",
                     "moe_z_coef", "moe_bias_rate"):
            if not getattr(self, name) >= 0:  # `not >=` also rejects NaN
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.n_global > self.block_size:
            raise ValueError(f"n_global={self.n_global} must not exceed block_size={self.block_size}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be at least 1")
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.n_experts > 0 and self.moe_every > self.n_layer:
            raise ValueError(f"moe_every={self.moe_every} > n_layer={self.n_layer}: no block would "
                             "use the experts; lower moe_every")
        self._check_attention()
        self._check_hc_and_engram()

    def _check_attention(self):
        """The attention family's settings: each bad combination is one line that names the
        setting and a valid choice (test_model_attention_settings_rejected_with_one_line)."""
        for name, kinds in (("attn", ATTN_KINDS), ("attn_gate", ATTN_GATES), ("linear_kind", LINEAR_KINDS)):
            if getattr(self, name) not in kinds:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(kinds)}")
        for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                     "v_head_dim", "sparse_block", "sparse_local", "sparse_global"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.linear_chunk < 1:
            raise ValueError(f"linear_chunk={self.linear_chunk} must be at least 1 (64 is typical)")
        pattern = self.layer_pattern
        if pattern:
            bad = [c for c in pattern if c not in LAYER_KINDS]
            if bad:
                raise ValueError(f"layer_pattern={pattern!r}: {bad[0]!r} is not a layer kind; use the "
                                 f"letters {' '.join(LAYER_KINDS)}, e.g. LLLG")
            if len(pattern) > self.n_layer:
                raise ValueError(f"layer_pattern={pattern!r} has more letters than n_layer={self.n_layer}; "
                                 f"shorten it (it is repeated to fill n_layer)")
            if self.attn != "softmax":
                raise ValueError(f"attn={self.attn}: layer_pattern={pattern!r} chooses every layer's "
                                 f"attention; leave attn=softmax (M and L are the letters of mla and linear)")
        kinds = self.layer_kinds
        if "W" in kinds and pattern and self.window == 0:
            raise ValueError(f"layer_pattern={pattern!r} has W layers: set window > 0 (their window in tokens)")
        if not pattern and self.window > 0 and self.sparse_block > 0:
            raise ValueError(f"window={self.window} and sparse_block={self.sparse_block}: choose one of "
                             f"them, or mix W and S layers with layer_pattern")
        if self.window > 0 and not self.has_window_layers:
            where = ("add W to layer_pattern" if pattern else "use attn=softmax or a layer_pattern with W layers")
            raise ValueError(f"window={self.window} applies to sliding-window softmax layers, and this "
                             f"model has none: set window=0, or {where}")
        if "S" in kinds and self.sparse_block == 0:
            raise ValueError(f"layer_pattern={pattern!r} has S layers: set sparse_block > 0 (block size in tokens, e.g. 64)")
        if self.sparse_block > 0 and "S" not in kinds:
            why = "add S to layer_pattern" if pattern else "use attn=softmax for block-sparse layers"
            raise ValueError(f"sparse_block={self.sparse_block} is used by block-sparse layers only: set "
                             f"sparse_block=0, or {why}")
        if self.attn_impl == "triton" and not any(c in "GW" for c in kinds):
            raise ValueError(f"attn_impl=triton runs the full and sliding-window softmax layers (G, W), and "
                             f"this model has none (layers {kinds}): use attn_impl=sdpa")
        if self.attn_softcap > 0 and not any(c in SOFTMAX_LETTERS for c in kinds):
            raise ValueError(f"attn_softcap={self.attn_softcap} caps softmax scores and every layer is "
                             f"linear: set attn_softcap=0")
        mla_set = [n for n in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                               "v_head_dim") if getattr(self, n)]
        if mla_set and "M" not in kinds:
            raise ValueError(f"{mla_set[0]}={getattr(self, mla_set[0])} is an MLA setting and no layer is "
                             f"MLA: set attn=mla (or M letters in layer_pattern), or {mla_set[0]}=0")
        if "M" in kinds:
            q_lora, kv_lora, nope, rope, v = self.mla_dims
            if rope < 2 or rope % 2:
                raise ValueError(f"qk_rope_head_dim={rope} must be even and at least 2 (RoPE rotates "
                                 f"pairs of channels){'; set it, as head_dim/2 is odd' if not self.qk_rope_head_dim else ''}")
            if kv_lora > self.n_head * (nope + v):
                raise ValueError(f"kv_lora_rank={kv_lora} is wider than the keys and values it compresses "
                                 f"(n_head*(qk_nope_head_dim+v_head_dim) = {self.n_head * (nope + v)}); "
                                 f"choose kv_lora_rank <= {self.n_head * (nope + v)}")
            if q_lora > self.n_head * (nope + rope):
                raise ValueError(f"q_lora_rank={q_lora} is wider than the queries it compresses "
                                 f"(n_head*(qk_nope_head_dim+qk_rope_head_dim) = {self.n_head * (nope + rope)}); "
                                 f"choose q_lora_rank <= {self.n_head * (nope + rope)} (0 = full rank)")

    @property
    def layer_kinds(self):
        """One letter per layer (LAYER_KINDS): layer_pattern repeated to n_layer, or, without a
        pattern, every layer as attn says (softmax layers are S with sparse_block, W with a
        window, else G). Example: layer_pattern='LLLG', n_layer=6 -> 'LLLGLL'."""
        if self.layer_pattern:
            repeats = -(-self.n_layer // len(self.layer_pattern))
            return (self.layer_pattern * repeats)[:self.n_layer]
        letter = {"mla": "M", "linear": "L"}.get(self.attn)
        if letter is None:
            letter = "S" if self.sparse_block else "W" if self.window else "G"
        return letter * self.n_layer

    @property
    def has_window_layers(self):
        """Whether some layer follows the window setting (and forward's window= override): every
        softmax layer of a model without a pattern and sparse_block, or the W layers of one."""
        if self.layer_pattern:
            return "W" in self.layer_pattern
        return self.attn == "softmax" and not self.sparse_block

    @property
    def mla_dims(self):
        """MLA's widths with the defaults filled in: (q_lora_rank, kv_lora_rank, qk_nope_head_dim,
        qk_rope_head_dim, v_head_dim); a 0 in q_lora_rank stays 0 (full-rank queries)."""
        D = self.head_dim
        return (self.q_lora_rank, self.kv_lora_rank or self.n_embd // 2, self.qk_nope_head_dim or D,
                self.qk_rope_head_dim or D // 2, self.v_head_dim or D)

    def _check_hc_and_engram(self):
        """Sections 7b and 7c: one line naming the setting and what would be valid."""
        if self.hc_streams < 1:
            raise ValueError(f"hc_streams={self.hc_streams} must be at least 1 (1 = the plain residual)")
        if self.hc_streams == 1 and (self.hc_dynamic or self.hc_sinkhorn):
            raise ValueError("hc_dynamic and hc_sinkhorn shape how several residual streams mix; "
                             "set hc_streams to 2 or more, or leave them False")
        if self.hc_sinkhorn_iters < 1:
            raise ValueError(f"hc_sinkhorn_iters={self.hc_sinkhorn_iters} must be at least 1")
        layers, orders = self.engram_layer_ids, self.engram_orders
        for i in layers:
            if not 0 <= i < self.n_layer:
                raise ValueError(f"engram_layers={self.engram_layers!r}: layer {i} is out of range; "
                                 f"blocks are numbered 0..{self.n_layer - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"engram_layers={self.engram_layers!r} names a layer twice")
        if layers and not orders:
            raise ValueError("engram_ngram is empty: give the n-gram orders to look up, e.g. engram_ngram=2,3")
        for n in orders:
            if not 2 <= n <= ENGRAM_MAX_ORDER:
                raise ValueError(f"engram_ngram={self.engram_ngram!r}: order {n} must be from 2 "
                                 f"(a pair of tokens) to {ENGRAM_MAX_ORDER}")
        if len(set(orders)) != len(orders):
            raise ValueError(f"engram_ngram={self.engram_ngram!r} names an order twice")
        for name in ("engram_heads", "engram_rows", "engram_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.engram_rows > ENGRAM_MAX_ROWS:
            raise ValueError(f"engram_rows={self.engram_rows} must be at most {ENGRAM_MAX_ROWS} "
                             "(the hash computes in 64-bit integers)")
        if layers and self.vocab_size >= ENGRAM_MAX_ROWS:
            raise ValueError(f"vocab_size={self.vocab_size} is too large for the n-gram hash "
                             f"(at most {ENGRAM_MAX_ROWS - 1} with engram_layers)")

    @property
    def head_dim(self):
        return self.head_size or self.n_embd // self.n_head

    @property
    def max_context(self):
        """Longest sequence the RoPE tables cover: block_size, stretched by rope_factor."""
        return int(math.ceil(self.block_size * self.rope_factor))

    @property
    def hidden_size(self):
        return dense_hidden(self)

    @property
    def expert_hidden(self):
        return self.moe_hidden or dense_hidden(self)

    def is_moe_layer(self, layer_index):
        return self.n_experts > 0 and layer_index % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self):
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    @property
    def engram_layer_ids(self):
        return int_list("engram_layers", self.engram_layers)

    @property
    def engram_orders(self):
        return int_list("engram_ngram", self.engram_ngram)

    @property
    def engram_memory_params(self):
        """Parameters of the Engram tables (section 7c): per memory layer, orders x heads tables
        of engram_rows x engram_dim; 0 without memory. Example: "1,3", "2,3", 4 heads, 10240 rows,
        32 wide: 2 * 2 * 4 * 10240 * 32 = 5,242,880."""
        return (len(self.engram_layer_ids) * len(self.engram_orders) * self.engram_heads
                * self.engram_rows * self.engram_dim)

    @property
    def engram_span(self):
        """Tokens an n-gram reaches back, the current one included: the largest order (0 = off)."""
        return max(self.engram_orders) if self.engram_layer_ids else 0

    def is_engram_layer(self, layer_index):
        return layer_index in self.engram_layer_ids


@dataclasses.dataclass(frozen=True)
class Kernels:
    """HOW the model computes, where GPTConfig says WHAT it computes. These are decisions about
    the hardware, made once by the Runtime (section 12) and handed to GPT(config, kernels); the
    model never looks at a tensor's device to decide. Every choice gives the same function (up
    to float rounding), so they are never saved in checkpoints: the same weights run anywhere.
    The defaults are the plain forms, the ones the parity tests read."""
    sdpa_fp32: bool = False        # run SDPA in float32 inside bf16 autocast (CPU: its bf16 attention kernels are slow)
    softcap_sigmoid: bool = False  # write cap*tanh(x/cap) as 2*cap*sigmoid(2x/cap) - cap (inductor's CPU tanh is slow)
    moe_padded: bool = False       # MoE experts as padded batched matmuls when a capacity fixes the shapes (CUDA: static shapes)

# -----------------------------------------------------------------------------
# 2. RMSNorm
#
# RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g         (Zhang & Sennrich, 2019)
# LayerNorm without the mean subtraction and the bias: cheaper, and works as well in transformers.
# With gain=False the norm has no parameters at all (g = 1), as in modded-nanogpt / nanochat.
# eps only keeps an all-zero x from dividing by 0, but it is part of the function: a checkpoint
# trained with one eps computes slightly different numbers with another, so it is a GPTConfig
# setting (norm_eps) that every norm of the model reads, and the Hugging Face folders of section
# 15 carry it (rms_norm_eps).
# (F.rms_norm computes the same thing in one fused kernel; the formula is written out to be read.)


class RMSNorm(nn.Module):
    def __init__(self, dim, gain=True, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x):
        xf = x.float()  # the mean of squares in float32 even when x is bfloat16
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x)
        return y * self.weight if self.weight is not None else y

# -----------------------------------------------------------------------------
# 3. Rotary position embeddings (Su et al., 2021)
#
# Split each head's channels into pairs (x1[i], x2[i]) = (x[i], x[i + D/2]) and rotate pair i by
# the angle p * w_i, where p is the token's position and w_i = theta^(-2i/D) its frequency:
#     y1 = x1 cos(p w) - x2 sin(p w)
#     y2 = x1 sin(p w) + x2 cos(p w)
# A rotation by angle a of q and by angle b of k changes their dot product into one that depends
# on a - b only, so q_m . k_n is a function of the relative offset m - n: attention sees relative
# positions without any learned position table (test_model_rope_relative checks it).
#
# Context extension at inference (the model was trained on block_size tokens, we want s times more):
#   linear: w_i -> w_i / s. Positions are squeezed so that s*block_size fits into the angles seen
#           in training (Chen et al., 2023, "position interpolation").
#   yarn:   squeeze only the slow pairs (Peng et al., 2023). A pair that completes r = L / lambda_i
#           turns in the training length L (lambda_i = 2 pi / w_i is its wavelength) is left alone
#           when r > YARN_BETA (fast pairs encode local order, which must not change), fully
#           interpolated when r < YARN_ALPHA (slow pairs never saw the new angles), and blended
#           linearly in between. YaRN also sharpens attention with a temperature: q and k are both
#           multiplied by 0.1 ln(s) + 1, so scores grow by its square.
# At s = 1 both reduce to plain RoPE exactly (test_model_rope_scaling_identity_and_yarn_ramp).
#
# Where YaRN's blend is linear (yarn_ramp). The paper blends linearly in the number of turns r,
# which is what yarn_ramp="turns" does. Hugging Face's YaRN (the one every exported or imported
# Llama/Qwen3 config declares) blends linearly in the pair INDEX i instead. Pair i turns
# r_i = L theta^(-2i/D) / (2 pi) times, so the pair that turns exactly r times sits at
#     i(r) = D ln(L / (2 pi r)) / (2 ln theta)        (a real number; fast pairs have small i)
# and the blend runs from i(YARN_BETA), rounded down, to i(YARN_ALPHA), rounded up (the upper
# end capped at D - 1, as Hugging Face writes it): keep = 1 below the first, 0 above the second,
# linear between. Since r falls exponentially with i, the two forms keep different amounts of
# the pairs in between; both agree at the ends. Worked example (D=16, theta=1e4, L=1024):
# i(32) = 1.41 -> 1 and i(1) = 4.42 -> 5, so keep = [1, 1, 0.75, 0.5, 0.25, 0, 0, 0]
# (test_model_yarn_index_ramp_by_hand).

YARN_ALPHA = 1.0   # below this many turns in the training context: full interpolation (YaRN paper)
YARN_BETA = 32.0   # above this many turns: no interpolation (YaRN paper's value for LLaMA)


def yarn_keep(w, train_len, theta, ramp="turns"):
    """How much of each pair's own frequency YaRN keeps (1 = all, 0 = fully interpolated), for
    the frequencies w (D/2,) of a model trained on train_len tokens; see the section comment."""
    if ramp == "turns":
        turns = train_len * w / (2 * math.pi)                         # r_i = L / lambda_i
        return ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
    D = 2 * len(w)

    def index_of(turns):                                              # i(r) of the comment
        return D * math.log(train_len / (2 * math.pi * turns)) / (2 * math.log(theta))
    low = max(math.floor(index_of(YARN_BETA)), 0)
    high = min(math.ceil(index_of(YARN_ALPHA)), D - 1)
    if high == low:
        high += 0.001                                                 # a step instead of 0/0
    i = torch.arange(len(w), dtype=w.dtype)
    return 1.0 - ((i - low) / (high - low)).clamp(0.0, 1.0)


def rope_frequencies(head_dim, theta, scaling="none", factor=1.0, train_len=None, ramp="turns"):
    """Angular frequency of each channel pair, shape (head_dim/2,), and the attention scale that
    q and k are multiplied by (1.0 except for YaRN)."""
    w = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling == "linear":
        return w / factor, 1.0
    if scaling == "yarn":
        keep = yarn_keep(w, train_len, theta, ramp)
        w = keep * w + (1.0 - keep) * w / factor
        return w, 0.1 * math.log(factor) + 1.0
    return w, 1.0


def rope_tables(config, head_dim=None):
    """cos and sin of p * w_i for every position p < config.max_context: two (max_context, D/2)
    float32 tensors, already multiplied by the YaRN attention scale. head_dim: the rotated width
    (default config.head_dim; MLA rotates its qk_rope_head_dim channels)."""
    w, scale = rope_frequencies(head_dim or config.head_dim, config.rope_theta, config.rope_scaling,
                                config.rope_factor, train_len=config.block_size, ramp=config.yarn_ramp)
    angles = torch.outer(torch.arange(config.max_context, dtype=torch.float64), w)  # (L, D/2)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (T, D/2). Rotates channel pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)                              # each (B, H, T, D/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

# -----------------------------------------------------------------------------
# 4. Attention masks
#
# A query at absolute position i may look at a key at position j when all of these hold:
#   causal:    j <= i                                   (never the future)
#   window:    i - j < window, or j < n_global          (window = 0: no limit; the window counts
#              the query itself, so window = 1 sees only itself; the first n_global positions
#              stay visible, an "attention sink" that keeps long sliding-window runs stable)
#   documents: doc[i] == doc[j]                         (packed sequences: never attend across a
#              document start; this holds for the global prefix too)
#   blocks:    i//b - j//b <= local, or j//b < global   (block-sparse layers, section 5.1: the
#              sequence is cut into blocks of b = sparse_block tokens; a query sees its own block
#              (causally), the `local` = sparse_local blocks before it, and the first `global` =
#              sparse_global blocks)
# Every query can at least see itself, so no row of the mask is empty (an empty row would make
# softmax divide 0 by 0).

VISIBLE_ROWS = 512  # mean_visible_keys builds the mask this many query rows at a time


def attention_mask(q_pos, k_pos, window=0, n_global=0, q_doc=None, k_doc=None, sparse=None):
    """Boolean mask, True where the query may attend the key.
    q_pos: (Tq,) and k_pos: (Tk,) absolute positions; q_doc: (B, Tq), k_doc: (B, Tk) doc ids;
    sparse: (sparse_block, sparse_local, sparse_global) for a block-sparse layer, or None.
    Returns (1, 1, Tq, Tk), or (B, 1, Tq, Tk) with documents; broadcasts over heads.

    Example: positions 0..3, window=2 -> [[1,0,0,0],[1,1,0,0],[0,1,1,0],[0,0,1,1]].
    Example: positions 0..5, sparse=(2, 0, 1) (blocks {0,1} {2,3} {4,5}; each sees itself and
    block 0) -> row 5 is [1,1,0,0,1,1], row 3 is [1,1,1,1,0,0]."""
    qp, kp = q_pos[:, None], k_pos[None, :]                   # (Tq, 1), (1, Tk)
    allowed = kp <= qp
    if window > 0:
        near = (qp - kp) < window
        if n_global > 0:
            near = near | (kp < n_global)
        allowed = allowed & near
    if sparse is not None:
        block, local, n_global_blocks = sparse
        qb, kb = qp // block, kp // block                     # block index of every position
        allowed = allowed & ((qb - kb <= local) | (kb < n_global_blocks))
    allowed = allowed[None, None]                             # (1, 1, Tq, Tk)
    if q_doc is not None:
        same_doc = q_doc[:, :, None] == k_doc[:, None, :]     # (B, Tq, Tk)
        allowed = allowed & same_doc[:, None]                 # (B, 1, Tq, Tk)
    return allowed


@functools.lru_cache(maxsize=64)
def mean_visible_keys(T, window=0, n_global=0, sparse=None):
    """How many keys a query sees on average in a sequence of T tokens under attention_mask's rule
    (no documents): the ctx of the attention FLOPs (section 11). Counted from the mask itself, a
    few hundred rows at a time, so the accounting can never disagree with what attention does.
    Example: T=4, no window -> (1+2+3+4)/4 = 2.5; window=2 -> (1+2+2+2)/4 = 1.75."""
    pos, total = torch.arange(T), 0
    for start in range(0, T, VISIBLE_ROWS):
        total += int(attention_mask(pos[start:start + VISIBLE_ROWS], pos, window, n_global,
                                    sparse=sparse).sum())
    return total / T


def doc_ids_from_bos(idx, bos_id):
    """Document id of every token in a packed batch: the number of BOS tokens at or before it.
    idx: (B, T) token ids -> (B, T) int64.
    Example (bos_id=0): [[5, 0, 7, 8, 0, 9]] -> [[0, 1, 1, 1, 2, 2]]
    (tokens before the first BOS form document 0, the tail of a document cut by the crop)."""
    return (idx == bos_id).long().cumsum(dim=1)


class Visibility(NamedTuple):
    """Which keys the new tokens see, for one kind of softmax layer (built once per forward)."""
    k_start: int                 # first cached position the new tokens can see (sliding window)
    mask: Optional[torch.Tensor]  # bool (1|B, 1, T, Tk); None = every key visible
    is_causal: bool              # mask is exactly the square causal mask: SDPA's is_causal flag
    # the Triton kernel (section 5b) builds its mask from pos, k_start, n_global and these two:
    window: int = 0              # sliding window of this call (0 = none, also when it spans everything)
    docs: Optional[tuple] = None  # (q_doc (B, T), k_doc (B, Tk)) document ids; None = no documents


class AttnLayout(NamedTuple):
    """What every attention layer of one forward call shares (built once in GPT.forward)."""
    cos: torch.Tensor            # (T, D/2) RoPE table rows for the new tokens (softmax layers)
    sin: torch.Tensor
    pos: int                     # absolute position of the first new token (cache.pos or 0)
    views: dict                  # "full" / "window" -> Visibility of the layers of that kind
    doc: Optional[torch.Tensor] = None       # (B, T) document ids of the new tokens, or None
    k_doc: Optional[torch.Tensor] = None     # (B, pos + T) document ids of every position so far
    prev_doc: Optional[torch.Tensor] = None  # (B, 1) document of the token before pos (linear layers)
    mla_cos: Optional[torch.Tensor] = None   # (T, d_r/2) RoPE rows of MLA's rotary channels
    mla_sin: Optional[torch.Tensor] = None

# -----------------------------------------------------------------------------
# 5. Attention: the shared pieces
#
# softmax(q k^T / sqrt(D) + mask) v, with n_head query heads and n_kv_head key/value heads.
# Grouped-query attention (Ainslie et al., 2023): query head h reads key/value head
# h // (n_head / n_kv_head). Fewer kv heads shrink the KV cache (and its memory traffic while
# decoding) by n_head / n_kv_head, at little cost in quality.
# This section holds what every softmax layer (G, W, S and M) computes with: the soft cap, the
# hand-written path (scores, mask, softmax, weighted sum, which can hand out its probabilities)
# and the call of F.scaled_dot_product_attention (SDPA: the same result, fused). Sections 5.1 to
# 5.5 build the kinds of layers from them, and 5.6 chooses one per layer.


def tanh_softcap(x, cap, sigmoid=False):
    """cap * tanh(x / cap): close to x for |x| << cap, smoothly bounded by +-cap (Gemma 2's soft cap).

    sigmoid=True (Kernels.softcap_sigmoid) writes the same function as 2 cap sigmoid(2 x / cap) - cap,
    using tanh(z) = 2 sigmoid(2z) - 1: the code inductor generates for tanh on CPU is slow, for
    sigmoid it is not (README, performance notes). Eager PyTorch is faster with tanh itself.
    test_model_softcap_forms_agree checks that both forms give the same numbers."""
    if sigmoid:
        return (2.0 * cap) * torch.sigmoid(x * (2.0 / cap)) - cap
    return cap * torch.tanh(x / cap)


def attention_probs(q, k, mask=None, softcap=0.0, softcap_sigmoid=False, scale=None):
    """softmax(q k^T * scale) over the visible keys, in float32; scale defaults to 1/sqrt(D).
    q: (B, H, Tq, D); k: (B, Hkv, Tk, D); mask: bool, broadcastable to (B, H, Tq, Tk), True =
    visible (None = all visible). Returns (B, H, Tq, Tk): row i holds how much query i reads from
    each key (the row sums to 1)."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)                     # (B, H, Tk, D): head h -> kv h//group
    scale = q.size(-1) ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                # (B, H, Tq, Tk)
    if softcap > 0:
        # Gemma 2's softcap: scores stay in (-cap, cap), smoothly, so no single logit can blow up.
        scores = tanh_softcap(scores, softcap, softcap_sigmoid)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores.float(), dim=-1)


def manual_attention(q, k, v, mask=None, softcap=0.0, record=None, softcap_sigmoid=False, scale=None):
    """The hand-written path: attention_probs, then the probability-weighted sum of the values.
    q: (B, H, Tq, D); k: (B, Hkv, Tk, D); v: (B, Hkv, Tk, Dv). Returns (B, H, Tq, Dv). record: a
    list that receives the (B, H, Tq, Tk) probabilities (see record_attention)."""
    probs = attention_probs(q, k, mask, softcap, softcap_sigmoid, scale)
    if record is not None:
        record.append(probs.detach())
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)    # (B, H, Tk, Dv)
    return probs.type_as(v) @ v                               # (B, H, Tq, Dv)


def sdpa_attention(q, k, v, mask, is_causal, kernels, scale=None):
    """The same as manual_attention (without softcap or recording) through SDPA's fused kernels.
    q: (B, H, Tq, D); k: (B, Hkv, Tk, D); v: (B, Hkv, Tk, Dv); mask as in attention_probs."""
    H, Hkv = q.size(1), k.size(1)
    gqa = H != Hkv
    if gqa and mask is not None:
        # SDPA runs GQA only in its flash and math kernels (torch docs), and flash takes no mask:
        # a masked GQA call would fall back to the slow math kernel on GPUs. Repeating the kv
        # heads lets the masked kernels run. One shared head (MQA, MLA's latent) is a broadcast
        # view instead: no copy of K and V at all.
        if Hkv == 1:
            k, v = k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)
        else:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        gqa = False
    dtype, upcast = q.dtype, kernels.sdpa_fp32 and q.dtype != torch.float32
    if upcast:
        # Kernels.sdpa_fp32 (the CPU with bf16 autocast): PyTorch's CPU flash kernel is much
        # slower backward in bf16 than in float32, and attention is a small share of the FLOPs,
        # so it runs in float32 (autocast would cast the inputs back to bf16: it is switched off
        # around the call).
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast(q.device.type, enabled=False) if upcast else contextlib.nullcontext():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal, enable_gqa=gqa,
            scale=scale).to(dtype)

# -----------------------------------------------------------------------------
# 5.1 Block-sparse attention: computing only the blocks a query may see
#
# A block-sparse layer (letter S) cuts the sequence into blocks of b = sparse_block tokens. Block
# i sees itself (causally), the sparse_local blocks before it and the first sparse_global blocks
# (section 4's rule). With b = 64, local = 1, global = 1, the query at position 4000 reads at most
# 3 blocks = 192 keys instead of 4001: the cost per token stays flat as the context grows, and the
# global blocks keep a short path from every token to the start (like n_global's sink).
#
# That rule as a dense (T, T) mask into SDPA gives the right numbers but computes every score and
# throws most away. The fast form gathers, for each block of queries, the K = global + local + 1
# blocks of keys it may see and attends within those only:
#   q: (B, H, T, D)   -> (B, H, nq, b, D)                  nq blocks of b queries
#   k: (B, Hkv, Tk, D) -> (B, Hkv, nk, b, D) -> [:, :, ids] -> (B, Hkv, nq, K b, D)
#   each query block: (b, D) x (K b, D) scores, masked by: a real block, causal, same document
# ids (nq, K) lists the key blocks of each query block: 0 .. global-1, then i-local .. i. A local
# block below `global` is already in the global list (or below 0, before the start), so it is
# marked invalid instead of read twice (a key counted twice would get twice its softmax weight).
# Worked example (b=2, local=1, global=1): query block 3 reads ids [0, 2, 3], all valid; query
# block 1 reads [0, 0, 1] and the middle one is invalid (block 0 is already there as global).
# Cost: nq * b * K * b scores, linear in T. Queries that do not start or end on a block boundary
# (a cached prefill, one-token decoding) are padded to whole blocks and the padding is dropped.
# Documents mask as everywhere (doc[i] == doc[j]); the blocks themselves are counted from the
# row's position 0, so in a packed row a document's blocks depend on where it starts (like
# n_global's prefix, and unlike a window, which only looks at offsets).
# block_sparse_reference is the same pattern as a dense mask (section 4's attention_mask);
# test_model_block_sparse_equals_dense_mask checks that the two agree.


def sparse_block_table(first, last, local, n_global, device=None):
    """The key blocks read by query blocks first..last: ids (nq, K) and valid (nq, K) bools,
    K = n_global + local + 1 (see the worked example above)."""
    qb = torch.arange(first, last + 1, device=device)[:, None]                  # (nq, 1)
    glob = torch.arange(n_global, device=device)[None, :].expand(qb.size(0), -1)  # (nq, global)
    loc = qb - torch.arange(local, -1, -1, device=device)[None, :]            # (nq, local+1): i-local..i
    ids = torch.cat([glob, loc], dim=1)
    valid = torch.cat([glob <= qb, loc >= n_global], dim=1)
    return ids.clamp(min=0), valid


def block_sparse_attention(q, k, v, pos, sparse, k_doc=None, softcap=0.0, manual=False,
                           kernels=Kernels()):
    """q: (B, H, T, D), the new tokens at positions pos..pos+T-1; k, v: (B, Hkv, Tk, D) hold every
    key 0..Tk-1 (Tk = pos + T); sparse = (sparse_block, sparse_local, sparse_global); k_doc (B, Tk)
    document ids or None. Returns (B, H, T, D): attention under attention_mask(..., sparse=sparse),
    computed on the visible blocks only."""
    block, local, n_global = sparse
    B, H, T, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    first, last = pos // block, (pos + T - 1) // block
    nq, nk = last - first + 1, -(-Tk // block)
    lead, tail = pos - first * block, (last + 1) * block - (pos + T)   # pad queries to whole blocks
    q = F.pad(q, (0, 0, lead, tail)).view(B, H, nq, block, D)
    # k and v made contiguous first: F.pad keeps a transposed input's layout, and torch 2.5's
    # inductor then lowers the reshape of the gathered blocks to a view those strides cannot take
    k = F.pad(k.contiguous(), (0, 0, 0, nk * block - Tk)).view(B, Hkv, nk, block, D)
    v = F.pad(v.contiguous(), (0, 0, 0, nk * block - Tk)).view(B, Hkv, nk, block, v.size(-1))
    ids, valid = sparse_block_table(first, last, local, n_global, q.device)   # (nq, K)
    K = ids.size(1)
    kg = k[:, :, ids].reshape(B, Hkv, nq, K * block, D)                       # gathered key blocks
    vg = v[:, :, ids].reshape(B, Hkv, nq, K * block, v.size(-1))
    q_pos = first * block + torch.arange(nq * block, device=q.device).view(nq, block)
    k_pos = (ids[:, :, None] * block + torch.arange(block, device=q.device)).view(nq, K * block)
    mask = (valid.repeat_interleave(block, dim=1)[:, None, :]                 # (nq, b, K b)
            & (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] < Tk))
    mask = mask[None].expand(B, -1, -1, -1)                                   # (B, nq, b, K b)
    if k_doc is not None:
        # padded query rows take real document ids (the lead rows are cached tokens: their own;
        # the tail rows the last token's), so every row keeps a visible key and softmax stays finite
        q_doc = torch.cat([k_doc[:, first * block:], k_doc[:, -1:].expand(B, tail)], 1).view(B, nq, block)
        k_doc = torch.cat([k_doc, k_doc[:, -1:].expand(B, nk * block - Tk)], 1).view(B, nk, block)
        k_doc = k_doc[:, ids].reshape(B, nq, K * block)
        mask = mask & (q_doc[..., None] == k_doc[:, :, None, :])
    # the query blocks become batch rows: (B, H, nq, ...) -> (B * nq, H, ...)
    q = q.transpose(1, 2).reshape(B * nq, H, block, D)
    kg = kg.transpose(1, 2).reshape(B * nq, Hkv, K * block, D)
    vg = vg.transpose(1, 2).reshape(B * nq, Hkv, K * block, vg.size(-1))
    mask = mask.reshape(B * nq, 1, block, K * block)
    if manual:
        y = manual_attention(q, kg, vg, mask, softcap, None, kernels.softcap_sigmoid)
    else:
        y = sdpa_attention(q, kg, vg, mask, False, kernels)
    y = y.view(B, nq, H, block, -1).transpose(1, 2).reshape(B, H, nq * block, -1)
    return y[:, :, lead:lead + T]                                              # (B, H, T, Dv)


def block_sparse_reference(q, k, v, pos, sparse, q_doc=None, k_doc=None, softcap=0.0, record=None,
                           softcap_sigmoid=False):
    """The same attention with the pattern written as a dense (T, Tk) mask: every score computed,
    the invisible ones masked. For the tests, and for record_attention (which needs every
    probability)."""
    T, Tk = q.size(2), k.size(2)
    mask = attention_mask(torch.arange(pos, pos + T, device=q.device), torch.arange(Tk, device=q.device),
                          q_doc=q_doc, k_doc=k_doc, sparse=sparse)
    return manual_attention(q, k, v, mask, softcap, record, softcap_sigmoid)

# -----------------------------------------------------------------------------
# 5.2 The output gate (attn_gate), and what every attention layer shares
#
# Gated attention (Qwen3-Next; Qiu et al., 2025, "Gated Attention for Large Language Models"):
# before the output projection, the attention output is multiplied elementwise by a sigmoid gate
# computed from the layer's own input x (the normed residual stream):
#     y = c_proj(attn(x) * sigmoid(x W_g))
#   output:       W_g is (C, H*Dv): one gate per channel of every head
#   output_head:  W_g is (C, H): one gate per head, shared by the head's Dv channels
# Why it helps: softmax weights sum to 1, so a head with nothing to add must still put its weight
# somewhere (often on the first token, an "attention sink"); the gate lets it say (nearly)
# nothing instead. It also puts a nonlinearity between the value and output projections, which
# are otherwise one low-rank linear map. It works alike on every kind (softmax, MLA, linear).
# Initialisation: W_g = 0, so every gate starts at exactly sigmoid(0) = 0.5, for every input. Why
# 0.5 and not near 1: the gate starts neutral (no channel or head preferred, none shut) where the
# sigmoid is steepest (slope 1/4), so it learns to open or close fastest; near 1 it would sit on
# the flat end and learn slowly. The start of training is the same as without a gate: c_proj
# starts at zero, so the block is the identity either way, and 0.5 only scales what c_proj's
# updates write. test_model_gate_starts_at_one_half checks that a fresh gate is exactly the
# ungated layer with c_proj halved, and that gradients reach W_g.


class AttentionLayer(nn.Module):
    """What every attention kind shares: the output gate, the output projection c_proj (zero at
    init), the hand-written-path switch and record_attention's hook. Subclasses compute the heads'
    outputs y (B, T, H * Dv) and call self.output(x, y)."""

    def __init__(self, config, kernels, n_head, head_out):
        super().__init__()
        self.kernels = kernels
        self.gate = None
        if config.attn_gate != "none":
            width = n_head * head_out if config.attn_gate == "output" else n_head
            self.gate = nn.Linear(config.n_embd, width, bias=False)
        self.c_proj = nn.Linear(n_head * head_out, config.n_embd, bias=False)
        self.softcap = config.attn_softcap
        # SDPA cannot express a softcap (it is applied between q k^T and softmax), so softcapped
        # attention always takes the hand-written path.
        self.manual = config.attn_impl == "manual" or config.attn_softcap > 0
        self.record = None   # a list while record_attention is on (the probabilities go there)
        self.triton = config.attn_impl == "triton"   # GPTConfig rejects triton with a softcap
        self.n_global = config.n_global
        if self.triton:
            # Under torch.compile (train.py compiles the model) the kernel call is a graph break
            # and runs as it is: its kernels are fused already, and Dynamo cannot trace a launch
            # run by Triton's CPU interpreter. Wrapped here, only for this impl, because
            # torch.compiler.disable imports torch._dynamo, which takes seconds.
            self.flash_attention = torch.compiler.disable(flash_attention)

    def make_qkv(self, config):
        """The merged projection c_attn (q, k and v in one matmul) and the QK-norms, for the
        layers that compute per-head queries, keys and values (softmax and linear)."""
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=False)
        # QK-norm (Dehghani et al., 2023): normalise every query and key vector, so the attention
        # logits stay bounded by ~sqrt(D) no matter how large the weights grow.
        norm = config.qk_norm
        self.q_norm = RMSNorm(config.head_dim, config.norm_gain, config.norm_eps) if norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_gain, config.norm_eps) if norm else None

    def output(self, x, y):
        """x (B, T, C) the layer input, y (B, T, H * Dv) the heads side by side -> (B, T, C)."""
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x))                   # (B, T, H * Dv) or (B, T, H)
            if g.size(-1) != y.size(-1):
                g = g.repeat_interleave(y.size(-1) // g.size(-1), dim=-1)  # a head's channels share it
            y = y * g
        return self.c_proj(y)

# -----------------------------------------------------------------------------
# 5.3 Softmax attention layers: global (G), sliding window (W), block-sparse (S)
#
# One merged projection c_attn computes q, k and v in a single matmul (one kernel launch, one read
# of x), then the columns are split. The three kinds differ only in which keys a query sees
# (self.view): "full" (G: every earlier token), "window" (W: config.window, or forward's window=
# override; every softmax layer of a model without layer_pattern follows it, 0 = full) or
# "sparse" (S: section 5.1's blocks).


class CausalSelfAttention(AttentionLayer):
    def __init__(self, config, kernels=Kernels(), view="window"):
        super().__init__(config, kernels, config.n_head, config.head_dim)
        self.make_qkv(config)
        self.view = view
        self.sparse = (config.sparse_block, config.sparse_local, config.sparse_global) if view == "sparse" else None

    def cache_spec(self):
        """What the KV cache keeps for this layer (section 9): keys and values per kv head."""
        return ("seq", [(self.n_kv_head, self.head_dim), (self.n_kv_head, self.head_dim)])

    def forward(self, x, layout, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)                # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)              # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)              # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, layout.cos, layout.sin), apply_rope(k, layout.cos, layout.sin)
        seen = layout.views.get(self.view)                    # None for the sparse view
        if cache is not None:
            # keys and values are stored after RoPE, so cached ones never need rotating again
            k, v = cache.layers[layer].update([k, v], layout.pos, seen.k_start if seen else 0)
        if self.sparse is not None:
            if self.record is not None:   # a picture needs every probability: the dense form
                y = block_sparse_reference(q, k, v, layout.pos, self.sparse, layout.doc, layout.k_doc,
                                           self.softcap, self.record, self.kernels.softcap_sigmoid)
            else:
                y = block_sparse_attention(q, k, v, layout.pos, self.sparse, layout.k_doc,
                                           self.softcap, self.manual, self.kernels)
        elif self.triton and self.record is None:
            # the kernel of section 5b builds the mask itself from positions (and skips the key
            # blocks it hides entirely), so it reads the view's parts, not seen.mask
            q_doc, k_doc = seen.docs if seen.docs is not None else (None, None)
            y = self.flash_attention(q, k, v, layout.pos, seen.k_start, seen.window,
                                     self.n_global, q_doc, k_doc)
        elif self.manual or self.record is not None:
            mask = seen.mask
            if seen.is_causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = manual_attention(q, k, v, mask, self.softcap, self.record, self.kernels.softcap_sigmoid)
        else:
            y = sdpa_attention(q, k, v, seen.mask, seen.is_causal, self.kernels)
        y = y.transpose(1, 2).reshape(B, T, H * D)            # (B, T, C) heads side by side
        return self.output(x, y)

# -----------------------------------------------------------------------------
# 5.4 Multi-head latent attention (MLA, letter M): a compressed KV cache
#
# DeepSeek-V2 (2024) and V3. GQA shrinks the KV cache by sharing key/value heads; MLA instead
# caches, per token, ONE latent vector c_kv (kv_lora_rank wide) from which every head's key and
# value are rebuilt by up-projections, plus one small rotary key shared by all heads. In the
# papers' names (C = n_embd, H heads, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim,
# d_v = v_head_dim, r = kv_lora_rank):
#
#   queries  c_q = RMSNorm(x W^DQ)           q_lora_rank wide (q_lora_rank = 0: no c_q, q = x W^Q)
#            [q_n,h , q_r,h] = c_q W^UQ      per head h: d_n channels, then d_r channels
#            q_r,h = RoPE(q_r,h)
#   latent   c_kv = RMSNorm(x W^DKV)         r wide                 } the cache holds these two:
#            k_r = RoPE(x W^KR)              d_r wide, ONE head      } r + d_r numbers per token
#   keys     k_h = [c_kv W^UK_h , k_r]       d_n + d_r per head
#   values   v_h = c_kv W^UV_h               d_v per head
#   output   o_h = softmax(q_h . k_h / sqrt(d_n + d_r)) v_h,    y = [o_1 .. o_H] W^O
#
# Why a separate rotary part ("decoupled RoPE"): RoPE multiplies each key by a rotation that
# depends on its position, so a rotated key could not be rebuilt from a position-free latent by
# one fixed matrix, and the absorbed form below would break. Position reaches the scores only
# through the d_r extra channels, computed apart and shared by every head.
# The latents are RMSNorm-ed as in the papers (their scale then does not drift with the weights).
# MLA layers ignore qk_norm: a per-head norm of c_kv W^UK is not linear in c_kv and could not be
# folded into the query; n_kv_head does not apply either (every head has its own key from c_kv).
#
# Decoding: two forms of the same numbers (test_model_mla_plain_absorbed_and_reference_agree).
#   plain     rebuild k_h and v_h of every cached token from c_kv, then ordinary attention:
#             per new token O(context * r * H (d_n + d_v)) for the rebuild alone.
#   absorbed  q_h . (c_kv W^UK_h) = (q_n,h W^UK_h^T) . c_kv: fold W^UK into the query, once per
#             new token; and sum_s p_s (c_kv,s W^UV_h) = (sum_s p_s c_kv,s) W^UV_h: apply W^UV
#             after the weighted sum. Attention then runs on the cached latents directly: it is
#             multi-query attention with ONE key head [c_kv, k_r] (r + d_r wide) and one value
#             head c_kv. Per new token O(context * H * r): nothing rebuilt.
# Which form runs follows from the shapes of the call, by counting multiply-adds for T new queries
# against Tk cached tokens: absorbed ~ T Tk H 2 (r + d_r) (scores against [c_kv, k_r] and the
# weighted sum of them), plain ~ Tk H r (d_n + d_v) (the rebuild) + T Tk H (d_n + d_r + d_v).
# Decoding (T = 1) and short chunks take the absorbed form, a long prefill and training (no
# cache) the plain one (self.absorb = False forces plain: the tests run both).
# mla_reference below is the table above line by line.
# The cache keeps [c_kv, k_r] side by side in one (B, 1, max_len, r + d_r) tensor: the absorbed
# form's keys as they are, its values a slice of them (c_kv), nothing concatenated per step. And as
# all H heads read the same single key head, SDPA gets them stacked as H * T query rows of one head
# (the same numbers as broadcasting the keys to H heads, without a copy of the cache per head).
# Weights are nn.Linear (out, in), named as in DeepSeek-V3's code: wq_a = W^DQ, q_norm,
# wq_b = W^UQ (or wq = W^Q), wkv_a = [W^DKV; W^KR] (one matmul), kv_norm, wkv_b = [W^UK_h; W^UV_h]
# head by head, and c_proj = W^O.
# With YaRN the rope tables carry its attention scale s (section 3), so the rotary part of each
# score grows by s^2; q_n is multiplied by s^2 too, so that the whole score does (as DeepSeek does).


class MultiHeadLatentAttention(AttentionLayer):
    def __init__(self, config, kernels=Kernels()):
        q_lora, r, dn, dr, dv = config.mla_dims
        super().__init__(config, kernels, config.n_head, dv)
        C, H = config.n_embd, config.n_head
        self.n_head, self.q_lora_rank, self.kv_lora_rank = H, q_lora, r
        self.nope_dim, self.rope_dim, self.v_dim = dn, dr, dv
        if q_lora:
            self.wq_a = nn.Linear(C, q_lora, bias=False)                      # W^DQ
            self.q_norm = RMSNorm(q_lora, config.norm_gain, config.norm_eps)
            self.wq_b = nn.Linear(q_lora, H * (dn + dr), bias=False)          # W^UQ
        else:
            self.wq = nn.Linear(C, H * (dn + dr), bias=False)                 # W^Q
        self.wkv_a = nn.Linear(C, r + dr, bias=False)                         # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(r, config.norm_gain, config.norm_eps)
        self.wkv_b = nn.Linear(r, H * (dn + dv), bias=False)                  # [W^UK_h; W^UV_h]
        _, yarn = rope_frequencies(dr, config.rope_theta, config.rope_scaling, config.rope_factor,
                                   train_len=config.block_size)
        self.nope_scale = yarn ** 2
        self.absorb = True

    def cache_spec(self):
        """What the KV cache keeps for this layer (section 9): [c_kv, k_r] per token."""
        return ("seq", [(1, self.kv_lora_rank + self.rope_dim)])

    def queries(self, x, layout):
        """x (B, T, C) -> q_n (B, H, T, d_n) and the rotated q_r (B, H, T, d_r)."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.view(B, T, self.n_head, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if self.nope_scale != 1.0:
            q_nope = q_nope * self.nope_scale
        return q_nope, apply_rope(q_rope, layout.mla_cos, layout.mla_sin)

    def latents(self, x, layout):
        """x (B, T, C) -> [c_kv, k_r] (B, 1, T, r + d_r): the normed latent and the rotated rope
        key side by side, one "head" (what the cache keeps)."""
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope[:, None], layout.mla_cos, layout.mla_sin)
        return torch.cat([self.kv_norm(c_kv)[:, None], k_rope], dim=-1)

    def forward(self, x, layout, cache=None, layer=0):
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x, layout)
        latents = self.latents(x, layout)                                     # (B, 1, T, r + d_r)
        if cache is not None:
            (latents,) = cache.layers[layer].update([latents], layout.pos, 0)  # (B, 1, Tk, r + d_r)
        absorb = cache is not None and self.absorb and self.absorbed_is_cheaper(T, layout.pos + T)
        form = self.absorbed if absorb else self.plain
        y = form(q_nope, q_rope, latents, layout.views["full"])               # (B, H, T, d_v)
        return self.output(x, y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))

    def absorbed_is_cheaper(self, T, Tk):
        """Whether T new queries against Tk cached tokens cost fewer multiply-adds absorbed than
        plain (the counts above). Example, r = 128, d_n = d_v = 64, d_r = 32: T = 1 -> yes,
        T = Tk = 4096 -> no (the crossing is near T = 100)."""
        r, dn, dr, dv = self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim
        return T * 2 * (r + dr) < r * (dn + dv) + T * (dn + dr + dv)

    def plain(self, q_nope, q_rope, latents, seen):
        """Rebuild every head's keys and values from the latents, then ordinary attention."""
        B, H, T, _ = q_nope.shape
        Tk = latents.size(2)
        c_kv, k_rope = latents.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(c_kv[:, 0]).view(B, Tk, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)              # (B, H, Tk, d_n), (.., d_v)
        q = torch.cat([q_nope, q_rope], dim=-1)                                # (B, H, T, d_n + d_r)
        k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)          # (B, H, Tk, d_n + d_r)
        if self.manual or self.record is not None:
            return self.attend_manual(q, k, v, seen, None)
        return sdpa_attention(q, k, v, seen.mask, seen.is_causal, self.kernels)

    def absorbed(self, q_nope, q_rope, latents, seen):
        """W^UK folded into the queries, W^UV applied after the weighted sum of latents."""
        B, H, T, _ = q_nope.shape
        r, Tk = self.kv_lora_rank, latents.size(2)
        w_uk, w_uv = self.wkv_b.weight.view(H, self.nope_dim + self.v_dim, r).split(
            [self.nope_dim, self.v_dim], dim=1)                                # (H, d_n, r), (H, d_v, r)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)                   # (B, H, T, r)
        q = torch.cat([q_lat, q_rope], dim=-1)                                 # (B, H, T, r + d_r)
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        if self.manual or self.record is not None:
            o = self.attend_manual(q, latents, latents[..., :r], seen, scale)  # values c_kv: (B, H, T, r)
        else:
            mask = seen.mask
            if seen.is_causal:
                mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril()[None, None]
            if mask is not None:                                               # the rows of every head
                mask = mask[:, :, None].expand(-1, -1, H, -1, -1).reshape(mask.size(0), 1, H * T, Tk)
            # values = the whole latents: keys and values of one width let SDPA take its fused
            # kernel; the last d_r output columns (a weighted sum of rope keys) are dropped
            o = sdpa_attention(q.reshape(B, 1, H * T, r + self.rope_dim), latents, latents, mask, False,
                               self.kernels, scale)[..., :r].view(B, H, T, r)  # heads stacked as rows
        return torch.einsum("bhtr,hvr->bhtv", o, w_uv)                         # (B, H, T, d_v)

    def attend_manual(self, q, k, v, seen, scale):
        mask = seen.mask
        if seen.is_causal:
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        return manual_attention(q, k, v, mask, self.softcap, self.record,
                                self.kernels.softcap_sigmoid, scale)


def mla_reference(attn, x, cos, sin):
    """MLA as the table above writes it, one head at a time, with every head's full keys and
    values materialised; causal, no cache. The slow reference of the tests.
    x: (B, T, C) layer input; cos, sin: (T, d_r/2) rope rows. Returns (B, T, C)."""
    B, T, _ = x.shape
    H, r, dn, dr, dv = attn.n_head, attn.kv_lora_rank, attn.nope_dim, attn.rope_dim, attn.v_dim
    if attn.q_lora_rank:
        q_all = attn.q_norm(x @ attn.wq_a.weight.T) @ attn.wq_b.weight.T    # c_q W^UQ
    else:
        q_all = x @ attn.wq.weight.T                                          # x W^Q
    down = x @ attn.wkv_a.weight.T
    c_kv = attn.kv_norm(down[..., :r])                                        # (B, T, r)
    k_rope = apply_rope(down[..., None, :, r:], cos, sin)[:, 0]               # (B, T, d_r)
    w_b = attn.wkv_b.weight                                                   # (H (d_n + d_v), r)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    heads = []
    for h in range(H):
        q_h = q_all[..., h * (dn + dr):(h + 1) * (dn + dr)]
        q_h = torch.cat([q_h[..., :dn] * attn.nope_scale,
                         apply_rope(q_h[..., None, :, dn:], cos, sin)[:, 0]], dim=-1)  # (B, T, d_n + d_r)
        rows = w_b[h * (dn + dv):(h + 1) * (dn + dv)]
        k_h = torch.cat([c_kv @ rows[:dn].T, k_rope], dim=-1)                # (B, T, d_n + d_r)
        v_h = c_kv @ rows[dn:].T                                              # (B, T, d_v)
        scores = (q_h @ k_h.transpose(-2, -1)) / math.sqrt(dn + dr)
        if attn.softcap > 0:
            scores = tanh_softcap(scores, attn.softcap)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v_h)
    return attn.output(x, torch.cat(heads, dim=-1))

# -----------------------------------------------------------------------------
# 5.5 Linear attention (letter L): a constant-size state instead of a growing cache
#
# Softmax's weight exp(q . k) does not split into a part of q times a part of k, so every new
# token is compared with every old key: O(context) work and memory per token. Replace it by a
# product of features, phi(q) . phi(k) (Katharopoulos et al., 2020, "Transformers are RNNs"),
# and the sum over the past regroups:
#     y_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s = phi(q_t) S_t,     S_t = sum_{s<=t} phi(k_s) v_s^T
# S_t is a (D, Dv) matrix per head that takes in each token as it comes: the whole past, in a
# fixed size. Two forms (linear_kind):
#   kernel  phi(x) = elu(x) + 1 > 0, so every weight is positive, and they are normalised to sum
#           to 1 like softmax's:  y_t = phi(q_t) S_t / (phi(q_t) . z_t),  z_t = sum_{s<=t} phi(k_s).
#           The normaliser rides along as an extra value column of ones: with v' = [v, 1] the
#           state holds [S, z], and one matmul gives numerator and denominator.
#   decay   no feature map; each head forgets at its own learned rate gamma_h in (0, 1):
#               S_t = gamma_h S_{t-1} + k_t v_t^T,     y_t = q_t S_t / sqrt(D)
#           so token s counts gamma^(t-s) (q_t . k_s): recent tokens weigh more (RetNet, Sun et al.,
#           2023; GLA makes the decay depend on the input). gamma_h = sigmoid(decay_h), learned,
#           initialised at RetNet's 1 - 2^(-5-h): memories of about 32, 64, 128, ... tokens.
#           The weights are signed and not normalised, so each head's output is RMSNorm-ed
#           (RetNet's group norm).
# Neither form uses RoPE: causality (and the decay) carry the order, and rotating q or k would
# make the kernel form's weights negative. qk_norm applies before phi (or the 1/sqrt(D) scale).
#
# Three ways to the same y (test_model_linear_chunked_parallel_recurrent_agree):
#   parallel   (reference) W = (q k^T) * gamma^(t-s) * [s <= t], y = W v: O(T^2), like softmax
#   recurrent  (reference) the S_t recursion, one token at a time: O(T), in T tiny steps
#   chunked    (training, prefill and decoding) cut T into chunks of c = linear_chunk tokens; the
#              parallel form inside a chunk (c x c matmuls), the state between chunks:
#                y[i]   = sum_{j<=i} gamma^(i-j) (q_i . k_j) v_j  +  gamma^(i+1) q_i S_before
#                S_after = gamma^c S_before + sum_j gamma^(c-1-j) k_j v_j^T
#              (i, j: positions inside the chunk). O(T c D) + O(T D Dv) work in big matmuls.
# Decoding one token is one step of the recurrence (linear_attention_step): the state is updated
# in place of a cache that grows, so the cost per token is the same at any context length.
# Documents: a document start resets the state, so no token reads another document (the same as
# the mask doc[i] == doc[j] as long as document ids never return to an earlier value, which
# doc_ids_from_bos guarantees). Inside a chunk that is the same-document mask; a query reads
# S_before only if its document began before the chunk, and only the chunk's last document is
# carried on. Windows do not apply: the state holds the whole past (GPTConfig refuses a window
# for linear layers). The state is float32 under any autocast: it is a running sum over the whole
# context, and bf16's 8-bit mantissa would lose the small terms added to a large sum.


def linear_feature(x):
    """phi(x) = elu(x) + 1: x + 1 for x > 0, e^x below: positive, and smooth at 0 (value 1,
    slope 1). test_model_linear_chunked_parallel_recurrent_agree checks it against those two
    pieces."""
    return F.elu(x) + 1.0


def decay_matrix(log_decay, n, device=None):
    """(H, n, n): gamma_h^(i-j) where j <= i, else 0; without decay (log_decay None) the causal
    0/1 matrix (1, n, n). log_decay: (H,) log gamma_h (negative). Example, gamma = 0.5, n = 3:
    [[1, 0, 0], [0.5, 1, 0], [0.25, 0.5, 1]]."""
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]                                            # i - j
    causal = diff >= 0
    if log_decay is None:
        return causal.float()[None]
    return torch.exp(diff.clamp(min=0) * log_decay[:, None, None]) * causal


def linear_attention_parallel(q, k, v, log_decay=None, doc=None):
    """The O(T^2) reference. q, k: (B, H, T, D) features; v: (B, H, T, E); doc: (B, T) or None.
    Returns y (B, H, T, E) and the weights W (B, H, T, T)."""
    w = (q @ k.transpose(-2, -1)) * decay_matrix(log_decay, q.size(2), q.device)
    if doc is not None:
        w = w * (doc[:, :, None] == doc[:, None, :])[:, None]
    return w @ v, w


def linear_attention_step(q, k, v, state=None, carry=1.0):
    """One token of the recurrence: S = carry * S + k v^T, y = q S. q, k: (B, H, 1, D);
    v: (B, H, 1, E); state (B, H, D, E) or None (nothing before); carry: gamma, times 0 where
    a new document starts, broadcastable to the state. Returns y (B, H, 1, E) and the new S.
    Decoding runs this (a few small ops per layer and token, at any context), and so does the
    recurrent reference below."""
    new = k.transpose(-2, -1) @ v                                             # outer(k, v): (B, H, D, E)
    if state is not None:
        new = new + (state if isinstance(carry, float) and carry == 1.0 else carry * state)
    return q @ new, new


def linear_attention_recurrent(q, k, v, log_decay=None, doc=None):
    """The token-by-token reference: S_t = gamma [same doc] S_{t-1} + k_t v_t^T, y_t = q_t S_t."""
    B, H, T, D = q.shape
    keep = torch.exp(log_decay)[:, None, None] if log_decay is not None else 1.0
    S, ys = None, []
    for t in range(T):
        carry = keep
        if doc is not None and t > 0:
            carry = carry * (doc[:, t] == doc[:, t - 1]).view(B, 1, 1, 1)
        y, S = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], S, carry)
        ys.append(y)
    return torch.cat(ys, dim=2)


def linear_attention_chunked(q, k, v, log_decay=None, chunk=64, state=None, doc=None,
                             prev_doc=None, need_state=False):
    """The chunked form. q, k: (B, H, T, D); v: (B, H, T, E); state: (B, H, D, E) carried in from
    the tokens before (None = nothing before); doc (B, T) and prev_doc (B, 1), the document of the
    token before, or None. Returns y (B, H, T, E) and the state after the last token (None unless
    need_state: without a cache the last chunk's state is not needed, nor computed)."""
    B, H, T, D = q.shape
    ys = []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        n = b - a
        qc, kc, vc = q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]
        dc = doc[:, a:b] if doc is not None else None
        w = (qc @ kc.transpose(-2, -1)) * decay_matrix(log_decay, n, q.device)   # (B, H, n, n)
        if dc is not None:
            w = w * (dc[:, :, None] == dc[:, None, :])[:, None]
        y = w @ vc                                                            # inside the chunk
        i = torch.arange(n, device=q.device, dtype=q.dtype)[:, None]          # (n, 1)
        if state is not None:
            qw = qc if log_decay is None else qc * torch.exp((i + 1) * log_decay[:, None, None])
            if dc is not None and prev_doc is not None:
                qw = qw * (dc == prev_doc)[:, None, :, None]                  # its document goes on
            y = y + qw @ state                                                # from the chunks before
        ys.append(y)
        if b < T or need_state:
            kw = kc if log_decay is None else kc * torch.exp((n - 1 - i) * log_decay[:, None, None])
            if dc is not None:
                kw = kw * (dc == dc[:, -1:])[:, None, :, None]                # the last document only
            new_state = kw.transpose(-2, -1) @ vc                            # (B, H, D, E)
            if state is not None:
                carry = 1.0 if log_decay is None else torch.exp(n * log_decay)[:, None, None]
                if dc is not None and prev_doc is not None:
                    carry = carry * (dc[:, -1:] == prev_doc).view(B, 1, 1, 1)
                new_state = new_state + carry * state
            state = new_state
            if dc is not None:
                prev_doc = dc[:, -1:]
    return torch.cat(ys, dim=2), state


LINEAR_DECAY_BASE = 5.0   # RetNet's decays 1 - 2^-(5 + h): head h remembers ~2^(5+h) tokens


class LinearAttention(AttentionLayer):
    def __init__(self, config, kernels=Kernels()):
        super().__init__(config, kernels, config.n_head, config.head_dim)
        self.make_qkv(config)
        self.kind, self.chunk = config.linear_kind, config.linear_chunk
        decay = self.kind == "decay"
        self.decay = nn.Parameter(torch.empty(config.n_head)) if decay else None   # logit of gamma_h
        self.out_norm = RMSNorm(config.head_dim, config.norm_gain, config.norm_eps) if decay else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """decay_h = logit(1 - 2^-(5+h)), so gamma_h = sigmoid(decay_h) is RetNet's decay.
        GPT.init_weights calls this after its own pass (which sets every 1-D parameter to 1)."""
        if self.decay is not None:
            gamma = 1.0 - 2.0 ** (-LINEAR_DECAY_BASE - torch.arange(self.n_head, dtype=torch.float64))
            self.decay.copy_(torch.log(gamma / (1.0 - gamma)))

    def cache_spec(self):
        """What the cache keeps for this layer (section 9): the state, (n_head, D, E) per row."""
        extra = 1 if self.kind == "kernel" else 0             # the normaliser's column
        return ("state", (self.n_head, self.head_dim, self.head_dim + extra))

    def features(self, x):
        """x (B, T, C) -> q, k (B, H, T, D) and v (B, H, T, E), ready for the three forms.
        The norms and phi act on each head's vector, so they run before the heads are moved
        forward (one transpose each): decoding pays for every small op, once per layer and token."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).view(B, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)  # (B, T, heads, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "kernel":
            q, k = linear_feature(q), linear_feature(k)
        else:
            q = q * D ** -0.5
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # (B, heads, T, D)
        if Hkv != H:
            # the state is per query head (each head has its own decay), so shared kv heads are
            # repeated: GQA saves parameters here, not state
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        if self.kind == "kernel":
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)   # (B, H, T, D + 1): [v, 1]
        return q, k, v

    def forward(self, x, layout, cache=None, layer=0):
        B, T, _ = x.shape
        q, k, v = self.features(x)
        log_decay = F.logsigmoid(self.decay.float()) if self.decay is not None else None
        store = cache.layers[layer] if cache is not None else None
        state = store.state if store is not None and layout.pos > 0 else None
        with torch.autocast(x.device.type, enabled=False):     # float32: see the section's end
            q, k, v = q.float(), k.float(), v.float()
            if self.record is not None:
                if cache is not None:
                    raise ValueError("record_attention runs without a KV cache for linear layers")
                y, w = linear_attention_parallel(q, k, v, log_decay, layout.doc)
                w = w.abs()   # decay weights are signed: the picture shows their share of the row
                self.record.append((w / w.sum(-1, keepdim=True)).detach())
            elif T == 1 and store is not None:    # decoding: one step of the recurrence
                carry = 1.0 if log_decay is None else torch.exp(log_decay)[:, None, None]
                if state is not None and layout.prev_doc is not None:
                    carry = carry * (layout.doc == layout.prev_doc).view(B, 1, 1, 1)
                y, state = linear_attention_step(q, k, v, state, carry)
            else:
                y, state = linear_attention_chunked(q, k, v, log_decay, self.chunk, state, layout.doc,
                                                    layout.prev_doc, need_state=store is not None)
            if self.kind == "kernel":
                y = y[..., :-1] / y[..., -1:]                 # numerator / normaliser
            else:
                y = self.out_norm(y)
        if store is not None:
            store.state = state
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.output(x, y.to(x.dtype))

# -----------------------------------------------------------------------------
# 5.6 Layer patterns, and recording the attention
#
# layer_pattern gives each layer its kind, one letter per layer, repeated to n_layer: "LLLG"
# with 8 layers is L L L G L L L G (three linear layers, then a global one, twice). Hybrids like
# it keep a few softmax layers for exact recall over the context while most layers carry a
# constant-size state. Without a pattern every layer is what attn says. MoE's moe_every counts
# layers the same way whatever their attention (section 8).


def make_attention(config, kind, kernels=Kernels()):
    """The attention module of one layer of kind `kind` (a letter of LAYER_KINDS)."""
    if kind == "M":
        return MultiHeadLatentAttention(config, kernels)
    if kind == "L":
        return LinearAttention(config, kernels)
    # without a pattern, every softmax layer follows the window setting (0 = full), so that
    # forward's window= override reaches it; in a pattern G is always global
    view = {"G": "full" if config.layer_pattern else "window", "W": "window", "S": "sparse"}[kind]
    return CausalSelfAttention(config, kernels, view)


@contextlib.contextmanager
def record_attention(model):
    """Inside `with record_attention(model) as probs:` every attention layer takes the
    hand-written path and appends its attention weights, (B, n_head, Tq, Tk) float32, to the list
    `probs`: one entry per layer per forward call, in the order the layers ran. It is how
    sample.py draws attention maps. Softmax layers (G W S M) hand out their probabilities;
    linear layers (no cache) their weights of the parallel form, normalised per row (for the
    kernel form exactly its attention; decay weights are signed: their magnitudes). SDPA never
    materialises the probabilities (that is why it is fast), so recording needs the manual path;
    outside the context nothing changes."""
    layers = [m for m in model.modules() if isinstance(m, AttentionLayer)]
    probs = []
    for layer in layers:
        layer.record = probs
    try:
        yield probs
    finally:
        for layer in layers:
            layer.record = None


# -----------------------------------------------------------------------------
# 5b. A flash-attention kernel in Triton (FlashAttention-2, forward and backward)
#
# Why a kernel. manual_attention materialises the (T, T) score matrix of every head: q k^T writes
# it to memory, the mask and the softmax read and write it again, probs @ v reads it once more,
# and the backward stores and re-reads it too. At T = 4096 that is 4096^2 = 16.8M scores per head
# (64 MiB in float32), against 4 T D = 1M numbers for q, k, v and the output at D = 64. A GPU
# does far more arithmetic per second than it moves bytes, so this path is limited by memory
# traffic, not by FLOPs. FlashAttention (Dao et al., 2022; FlashAttention-2, Dao, 2023) never
# writes the scores: it computes the output tile by tile in on-chip memory, reading each block of
# queries once and k, v once per block of queries. SDPA's flash backend does the same; this kernel
# is written out so that a reader can see how.
#
# The forward, for one block of BLOCK_M query rows (one program of the kernel). Per row it keeps
#     m   the largest score seen so far,
#     l   the sum of exp(score - m) over the keys seen so far,
#     acc the sum of exp(score - m) * v over the keys seen so far            (BLOCK_M, D)
# and for each block j of BLOCK_N keys that the mask does not hide entirely:
#     S   = Q_i K_j^T / sqrt(D)                 (BLOCK_M, BLOCK_N), lives on chip only
#     m'  = max(m, rowmax(S))
#     P   = exp(S - m')                         (masked scores are -inf, so P = 0 there)
#     l   = l * exp(m - m') + rowsum(P)
#     acc = acc * exp(m - m') + P V_j
#     m   = m'
# and at the end O_i = acc / l and LSE_i = m + log(l), the log of the softmax denominator, which
# is all the backward needs to rebuild P (below).
#
# Why the rescaling is exact (the online softmax, Milakov & Gimelshein, 2018). Softmax does not
# change when a constant c is subtracted from a row, softmax(s)_j = exp(s_j - c) / sum_k exp(s_k - c),
# and c = the row maximum keeps every exp <= 1 (no overflow). When a new block raises the maximum
# from m to m', each term summed so far was exp(s - m) and should be exp(s - m'); since
# exp(s - m') = exp(s - m) * exp(m - m'), multiplying l and acc by alpha = exp(m - m') corrects all
# of them at once. After the last block, acc / l = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)
# = softmax(s) V: the same numbers as manual_attention, up to rounding.
# Worked example (one row, D = 1, two blocks of two keys): scores [1, 2 | 4, 3], values [1, 1 | 0, 0].
#   block 1: m = 2, l = e^-1 + e^0 = 1.3679, acc = 1.3679 * 1 = 1.3679
#   block 2: m' = 4, alpha = e^(2-4) = 0.1353; l = 1.3679 * 0.1353 + e^0 + e^-1 = 1.5530,
#            acc = 1.3679 * 0.1353 + 0 = 0.1851
#   O = acc / l = 0.1192 = (e^1 + e^2) / (e^1 + e^2 + e^4 + e^3), the direct softmax average.
#
# exp as exp2. exp(x) = 2^(x log2(e)), and 2^x is the GPU's native exponential, so log2(e) is
# folded into the score scale once (scale2 = log2(e) / sqrt(D)) and the kernel works in base 2:
# m and the saved LSE2 are base-2 logarithms (LSE = LSE2 * ln 2).
#
# Skipping blocks. Under the causal mask, a key block that starts after the block's last query is
# entirely in the future: all its scores are -inf and P = 0, so loading it would only cost time.
# The loop stops at the diagonal, which halves the work of a long sequence (T^2/2 scores instead
# of T^2). A sliding window also hides every key block that ends before the window of the block's
# first query begins; the loop starts there. With n_global the first keys stay visible to every
# query, so the loop first visits those blocks, then the window's. Blocks that an edge crosses
# (the diagonal, the window's start, the ragged end of a sequence that is not a multiple of the
# block size) are loaded and masked element by element. Document masks are only applied element
# by element (no blocks are skipped for them).
#
# The backward (FlashAttention-2). With S = Q K^T / sqrt(D), P = softmax(S), O = P V and dO the
# gradient of the loss with respect to O:
#     dV = P^T dO
#     dP = dO V^T
#     dS = P * (dP - Delta),   Delta_i = sum_j P_ij dP_ij = dO_i . O_i
#     dQ = dS K / sqrt(D),     dK = dS^T Q / sqrt(D)
# The softmax's Jacobian for one row is diag(p) - p p^T, so dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik);
# that sum is Delta_i, and since sum_k P_ik (dO_i . V_k) = dO_i . (sum_k P_ik V_k) = dO_i . O_i it
# costs one dot product per row, computed before the main loops (T numbers per head).
# P itself is never stored. The forward saved only LSE (one number per row), and the backward
# recomputes P_ij = exp(S_ij - LSE_i) tile by tile from Q and K: one more Q K^T product, but
# storing P would take T^2 numbers per head and layer (64 MiB per head at T = 4096 in float32)
# where LSE and Delta take 2 T (32 KiB), and reading a stored P back from memory is the very
# traffic the forward avoided (the FlashAttention paper finds the recomputing backward faster for
# that reason, despite its extra FLOPs).
# Two kernels share the work so that every gradient is written by exactly one program, without
# atomic additions:
#     dK, dV: one program per block of keys of one kv head. It loops over the query blocks that
#             can see those keys (from the diagonal to the end of the window) and, with GQA, over
#             every query head of the group, summing their contributions on chip.
#     dQ:     one program per block of queries; it loops over the same key blocks as the forward.
#
# Triton. A @triton.jit function is one program of a grid; it loads tiles with tl.load (pointer
# arithmetic plus a mask for the ragged edges), multiplies them with tl.dot and stores the result.
# Triton compiles it for the GPU; with TRITON_INTERPRET=1 it runs the same code on CPU tensors in
# numpy, which is how test_all.py checks it without a GPU (correct, but far too slow to train).
# The kernels are defined on first use, in _flash_define_kernels: importing model.py never imports
# triton (it is optional). Triton reads TRITON_INTERPRET when it is imported and when a kernel is
# defined, so the variable must be set before the process starts (test_all.py sets it first thing).

# 64 x 64 tiles fit in a GPU's shared memory up to head_dim 128 (checked by compiling for sm_80 and
# sm_90). Not tuned on a GPU yet: python model.py --bench_attention=True is where to try others.
FLASH_BLOCK_M = 64       # query rows per tile (one program of the forward and of the dQ kernel)
FLASH_BLOCK_N = 64       # key rows per tile (one program of the dK, dV kernel)
FLASH_MIN_DOT = 16       # tl.dot needs every tile side >= 16, so small head dims are padded to it
FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: gradcheck
LOG2E = math.log2(math.e)

_flash_defined_for = None  # the TRITON_INTERPRET setting the kernels were defined under, if any


def _flash_define_kernels():
    """Import triton and define the kernels as module globals (Triton resolves the names a
    kernel uses, tl and the helper kernels, through the module's globals, not closures)."""
    global triton, tl, _flash_dot, _flash_visible, _flash_query_block_start, _flash_key_blocks
    global _flash_key_tile, _flash_fwd_tile, _flash_fwd_kernel
    global _flash_dkdv_tile, _flash_bwd_dkdv_kernel, _flash_dq_tile, _flash_bwd_dq_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _flash_dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr):
        """a @ b accumulated in ACC. WIDEN (set only under the interpreter, for bfloat16): Triton's
        interpreter multiplies bfloat16 tiles as if their bits were integers, so they are widened
        to float32 first; a product of two bfloat16 numbers is exact in float32, so the result is
        what a GPU's bfloat16 tl.dot with float32 accumulation computes."""
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, out_dtype=ACC, input_precision=PREC)

    @triton.jit
    def _flash_visible(q_idx, k_idx, Tq, Tk, q_off, k_off, window, n_global, q_doc, k_doc,
                       HAS_DOC: tl.constexpr):
        """The mask of section 4 for a tile, from indices into q and k (any broadcastable
        shapes): absolute positions are q_off + q_idx and k_off + k_idx. Indices past the end
        of q or k (the ragged last block) are never visible."""
        q_pos = q_off + q_idx
        k_pos = k_off + k_idx
        ok = (k_pos <= q_pos) & (q_idx < Tq) & (k_idx < Tk)
        ok = ok & ((window == 0) | (q_pos - k_pos < window) | (k_pos < n_global))
        if HAS_DOC:
            ok = ok & (q_doc == k_doc)
        return ok

    @triton.jit
    def _flash_query_block_start(K, V, KDOC, QDOC, b, kvh, offs_m, Tq, Tk, skb, skh, svb, svh,
                                 HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr):
        """A query block's start: K and V moved to its batch row and kv head, KDOC to its row,
        and the block's document ids (zeros without documents)."""
        K += b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
        q_doc = tl.full([BLOCK_M], 0, tl.int32)
        if HAS_DOC:
            q_doc = tl.load(QDOC + b.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=-1)
            KDOC += b.to(tl.int64) * Tk
        return K, V, KDOC, q_doc

    @triton.jit
    def _flash_key_blocks(pid_m, Tq, Tk, q_off, k_off, window, n_global,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Which key blocks the query block pid_m can see, as indices into K: (glob_end, lo, hi).
        Causal stops at the last query's position (hi); a window starts at the first query's
        window start, rounded down to a block (lo); the global prefix [0, n_global) is visited
        first, in [0, glob_end), up to where the window's range starts. Without a window lo = 0
        and glob_end = 0: one range [0, hi)."""
        q_first = q_off + pid_m * BLOCK_M
        q_last = q_off + tl.minimum((pid_m + 1) * BLOCK_M, Tq) - 1
        hi = tl.minimum(Tk, q_last - k_off + 1)
        lo = tl.where(window > 0, tl.maximum(q_first - window + 1 - k_off, 0) // BLOCK_N * BLOCK_N, 0)
        n_glob = tl.maximum(n_global - k_off, 0)
        glob_end = tl.minimum((n_glob + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
        return glob_end, lo, hi

    @triton.jit
    def _flash_key_tile(q, K, V, KDOC, q_doc, offs_m, start_n, skt, svt, Tq, Tk, D, q_off, k_off,
                        window, n_global, scale2, HAS_DOC: tl.constexpr, ACC: tl.constexpr,
                        PREC: tl.constexpr, WIDEN: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        """Load the key block at start_n and score the query block against it: (s, k, v), with
        s = q k^T * scale2 (BM, BN), -inf where the key is hidden, and k, v (BN, BD)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        k_doc = tl.full([BLOCK_N], 0, tl.int32)
        if HAS_DOC:
            k_doc = tl.load(KDOC + offs_n, mask=offs_n < Tk, other=-1)
        s = _flash_dot(q, tl.trans(k), ACC, PREC, WIDEN) * scale2        # (BM, BN)
        visible = _flash_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, q_off, k_off, window,
                                 n_global, q_doc[:, None], k_doc[None, :], HAS_DOC)
        s = tl.where(visible, s, float("-inf"))
        return s, k, v

    @triton.jit
    def _flash_fwd_tile(acc, m_i, l_i, q, K, V, KDOC, q_doc, offs_m, start_n, skt, svt, Tq, Tk, D,
                        q_off, k_off, window, n_global, scale2, HAS_DOC: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One step of the online softmax: fold the key block at start_n into (acc, m, l)."""
        s, k, v = _flash_key_tile(q, K, V, KDOC, q_doc, offs_m, start_n, skt, svt, Tq, Tk, D, q_off,
                                  k_off, window, n_global, scale2, HAS_DOC, ACC, PREC, WIDEN,
                                  BLOCK_N, BLOCK_D)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row can have no visible key in this block yet (m_new = -inf, e.g. the first block of
        # a window that only its earlier rows reach): subtract 0 instead, so exp2(-inf) = 0
        # rather than exp2(-inf - -inf) = NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)                                     # rescales the old sums
        p = tl.exp2(s - m_sub[:, None])                                  # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _flash_dot(p.to(v.dtype), v, ACC, PREC, WIDEN)
        return acc, m_new, l_i

    @triton.jit(do_not_specialize=["Tq", "Tk", "q_off", "k_off", "window", "n_global"])
    def _flash_fwd_kernel(Q, K, V, O, LSE2, QDOC, KDOC,
                          sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                          H, group, Tq, Tk, D, q_off, k_off, window, n_global, scale2,
                          HAS_DOC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Grid (cdiv(Tq, BLOCK_M), B * H): one program per block of queries of one head."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // group                                          # GQA: the kv head it reads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        q = tl.load(Q + q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
        K, V, KDOC, q_doc = _flash_query_block_start(K, V, KDOC, QDOC, b, kvh, offs_m, Tq, Tk,
                                                     skb, skh, svb, svh, HAS_DOC, BLOCK_M)
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.full([BLOCK_M], 0.0, ACC)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC)

        glob_end, lo, hi = _flash_key_blocks(pid_m, Tq, Tk, q_off, k_off, window, n_global,
                                             BLOCK_M, BLOCK_N)
        for start_n in range(0, glob_end, BLOCK_N):
            acc, m_i, l_i = _flash_fwd_tile(acc, m_i, l_i, q, K, V, KDOC, q_doc, offs_m, start_n,
                                            skt, svt, Tq, Tk, D, q_off, k_off, window, n_global,
                                            scale2, HAS_DOC, ACC, PREC, WIDEN, BLOCK_N, BLOCK_D)
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _flash_fwd_tile(acc, m_i, l_i, q, K, V, KDOC, q_doc, offs_m, start_n,
                                            skt, svt, Tq, Tk, D, q_off, k_off, window, n_global,
                                            scale2, HAS_DOC, ACC, PREC, WIDEN, BLOCK_N, BLOCK_D)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)      # only rows past Tq (never stored) have l = 0
        o = acc / l_safe[:, None]
        o_base = b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(O + o_base + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=q_mask)
        tl.store(LSE2 + bh.to(tl.int64) * Tq + offs_m, m_i + tl.log2(l_safe), mask=offs_m < Tq)

    @triton.jit
    def _flash_dkdv_tile(dk, dv, k, v, k_doc, Q, DO, LSE2, DELTA, QDOC, offs_n, start_m, sqt, sdot,
                         Tq, Tk, D, q_off, k_off, window, n_global, scale2, HAS_DOC: tl.constexpr,
                         ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        """Add one query block's contribution to dK and dV of a key block. Works with the
        transposed tile S^T (keys along rows), so that dV += P^T dO and dK += dS^T Q need no
        transpose of a computed tile."""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)     # (BM, BD)
        do = tl.load(DO + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)  # (BM, BD)
        lse2 = tl.load(LSE2 + offs_m, mask=offs_m < Tq, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=offs_m < Tq, other=0.0)
        q_doc = tl.full([BLOCK_M], 0, tl.int32)
        if HAS_DOC:
            q_doc = tl.load(QDOC + offs_m, mask=offs_m < Tq, other=-1)
        s_t = _flash_dot(k, tl.trans(q), ACC, PREC, WIDEN) * scale2          # (BN, BM)
        visible = _flash_visible(offs_m[None, :], offs_n[:, None], Tq, Tk, q_off, k_off, window,
                                 n_global, q_doc[None, :], k_doc[:, None], HAS_DOC)
        p_t = tl.exp2(tl.where(visible, s_t, float("-inf")) - lse2[None, :])  # P^T, recomputed
        dv += _flash_dot(p_t.to(do.dtype), do, ACC, PREC, WIDEN)              # (BN, BD)
        dp_t = _flash_dot(v, tl.trans(do), ACC, PREC, WIDEN)                  # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _flash_dot(ds_t.to(q.dtype), q, ACC, PREC, WIDEN)               # (BN, BD)
        return dk, dv

    @triton.jit(do_not_specialize=["Tq", "Tk", "q_off", "k_off", "window", "n_global"])
    def _flash_bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, QDOC, KDOC,
                               sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                               H, Hkv, group, Tq, Tk, D, q_off, k_off, window, n_global, scale2,
                               sm_scale, HAS_DOC: tl.constexpr, ACC: tl.constexpr,
                               PREC: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Grid (cdiv(Tk, BLOCK_N), B * Hkv): one program per block of keys of one kv head.
        DK and DV are contiguous (B, Hkv, Tk, D)."""
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1)
        b = bkv // Hkv
        kvh = bkv % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + offs_n[:, None] * skt
                    + offs_d[None, :], mask=kv_mask, other=0.0)                              # (BN, BD)
        v = tl.load(V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh + offs_n[:, None] * svt
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        k_doc = tl.full([BLOCK_N], 0, tl.int32)
        if HAS_DOC:
            k_doc = tl.load(KDOC + b.to(tl.int64) * Tk + offs_n, mask=offs_n < Tk, other=-1)
            QDOC += b.to(tl.int64) * Tq
        dk = tl.full([BLOCK_N, BLOCK_D], 0.0, ACC)
        dv = tl.full([BLOCK_N, BLOCK_D], 0.0, ACC)

        # Which query blocks can see these keys: causal starts at the first key's position; a
        # window ends window - 1 positions after the last key, unless the block holds a global key.
        k_first = k_off + pid_n * BLOCK_N
        k_last = k_off + tl.minimum((pid_n + 1) * BLOCK_N, Tk) - 1
        lo = tl.maximum(k_first - q_off, 0) // BLOCK_M * BLOCK_M
        bounded = (window > 0) & (k_first >= n_global)
        hi = tl.where(bounded, tl.minimum(Tq, k_last + window - q_off), Tq)
        for g in range(0, group):                         # the query heads that share this kv head
            h = kvh * group + g
            bh = b.to(tl.int64) * H + h
            Qh = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            DOh = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
            for start_m in range(lo, hi, BLOCK_M):
                dk, dv = _flash_dkdv_tile(dk, dv, k, v, k_doc, Qh, DOh, LSE2 + bh * Tq,
                                          DELTA + bh * Tq, QDOC, offs_n, start_m, sqt, sdot, Tq, Tk,
                                          D, q_off, k_off, window, n_global, scale2, HAS_DOC, ACC,
                                          PREC, WIDEN, BLOCK_M, BLOCK_D)
        out = bkv.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _flash_dq_tile(dq, q, do, lse2, delta, q_doc, K, V, KDOC, offs_m, start_n, skt, svt, Tq, Tk,
                       D, q_off, k_off, window, n_global, scale2, HAS_DOC: tl.constexpr,
                       ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """Add one key block's contribution to dQ of a query block."""
        s, k, v = _flash_key_tile(q, K, V, KDOC, q_doc, offs_m, start_n, skt, svt, Tq, Tk, D, q_off,
                                  k_off, window, n_global, scale2, HAS_DOC, ACC, PREC, WIDEN,
                                  BLOCK_N, BLOCK_D)
        p = tl.exp2(s - lse2[:, None])                                       # P, recomputed
        dp = _flash_dot(do, tl.trans(v), ACC, PREC, WIDEN)                   # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq += _flash_dot(ds.to(k.dtype), k, ACC, PREC, WIDEN)                # (BM, BD)
        return dq

    @triton.jit(do_not_specialize=["Tq", "Tk", "q_off", "k_off", "window", "n_global"])
    def _flash_bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, QDOC, KDOC,
                             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                             H, group, Tq, Tk, D, q_off, k_off, window, n_global, scale2, sm_scale,
                             HAS_DOC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                             WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        """Grid (cdiv(Tq, BLOCK_M), B * H): one program per block of queries of one head.
        DQ is contiguous (B, H, Tq, D)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // group
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt
                    + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None] * sdot
                     + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE2 + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
        K, V, KDOC, q_doc = _flash_query_block_start(K, V, KDOC, QDOC, b, kvh, offs_m, Tq, Tk,
                                                     skb, skh, svb, svh, HAS_DOC, BLOCK_M)
        dq = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC)
        # the same key blocks as the forward visits
        glob_end, lo, hi = _flash_key_blocks(pid_m, Tq, Tk, q_off, k_off, window, n_global,
                                             BLOCK_M, BLOCK_N)
        for start_n in range(0, glob_end, BLOCK_N):
            dq = _flash_dq_tile(dq, q, do, lse2, delta, q_doc, K, V, KDOC, offs_m, start_n, skt, svt,
                                Tq, Tk, D, q_off, k_off, window, n_global, scale2, HAS_DOC, ACC,
                                PREC, WIDEN, BLOCK_N, BLOCK_D)
        for start_n in range(lo, hi, BLOCK_N):
            dq = _flash_dq_tile(dq, q, do, lse2, delta, q_doc, K, V, KDOC, offs_m, start_n, skt, svt,
                                Tq, Tk, D, q_off, k_off, window, n_global, scale2, HAS_DOC, ACC,
                                PREC, WIDEN, BLOCK_N, BLOCK_D)
        out = bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
        tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _flash_interpret():
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _flash_ready(device):
    """Define the kernels for this device on first use, or stop with one line saying why they
    cannot run here and what to use instead."""
    global _flash_defined_for
    if device.type not in ("cuda", "cpu"):
        raise bpe.UserError(f"attn_impl=triton runs on CUDA GPUs (or CPU for tests), not {device.type}; "
                            "use attn_impl=sdpa")
    interpret = _flash_interpret()
    if device.type == "cpu" and not interpret:
        raise bpe.UserError("attn_impl=triton on CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                            "(correct but slow, for tests), or use attn_impl=sdpa")
    if _flash_defined_for != interpret:
        try:
            _flash_define_kernels()
        except ImportError as e:
            raise bpe.UserError(f"attn_impl=triton needs the triton package ({e}): pip install triton, "
                                "or use attn_impl=sdpa") from None
        if interpret and isinstance(tl.zeros, triton.runtime.JITFunction):
            # Triton's own library (tl.zeros, ...) was compiled for the GPU when triton was
            # first imported, and the interpreter cannot call it.
            raise bpe.UserError("TRITON_INTERPRET=1 was set after triton was imported; set it "
                                "before the process starts (TRITON_INTERPRET=1 python ...)")
        _flash_defined_for = interpret


def _flash_launch_settings(x):
    """Constants shared by the three kernels: accumulator dtype, dot precision, tile sizes."""
    D = x.size(-1)
    # fp32 accumulation for 16-bit inputs; float64 stays float64 (gradcheck needs it).
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    # float32 products follow torch's own switch for matmuls (train.py turns TF32 on for CUDA):
    # "tf32" runs on the tensor cores with a 10-bit mantissa, "ieee" is exact float32 (and
    # slow: no tensor cores). Half-precision inputs need neither.
    tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    prec = {torch.float32: "tf32" if tf32 else "ieee", torch.float64: "ieee"}.get(x.dtype)
    block_d = max(FLASH_MIN_DOT, triton.next_power_of_2(D))
    widen = x.dtype == torch.bfloat16 and _flash_interpret()
    # Triton prefetches the next tiles into shared memory while it computes on the current ones
    # (num_stages copies); float32 tiles are twice as large, so one copy fewer keeps head_dim 128
    # within an A100's shared memory.
    stages = 2 if x.element_size() >= 4 else 3
    return dict(ACC=acc, PREC=prec, WIDEN=widen, BLOCK_D=block_d,
                num_warps=4 if block_d <= 64 else 8, num_stages=stages)


def _flash_forward(q, k, v, where, q_doc, k_doc):
    """O (B, H, Tq, D) in q's dtype and LSE2 (B, H, Tq) (base-2 log-sum-exp of each row's
    scaled scores, float32, or float64 for float64 inputs). where = (q_off, k_off, window, n_global)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    launch = _flash_launch_settings(q)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty(B, H, Tq, device=q.device,
                       dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    has_doc = q_doc is not None
    grid = (triton.cdiv(Tq, FLASH_BLOCK_M), B * H)
    _flash_fwd_kernel[grid](
        q, k, v, o, lse2, q_doc if has_doc else q, k_doc if has_doc else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, H // Hkv, Tq, Tk, D, *where, D ** -0.5 * LOG2E,
        HAS_DOC=has_doc, BLOCK_M=FLASH_BLOCK_M, BLOCK_N=FLASH_BLOCK_N, **launch)
    return o, lse2


def _flash_backward(do, q, k, v, o, lse2, where, q_doc, k_doc):
    """dQ, dK, dV (the shapes and dtypes of q, k, v) from dO and the saved forward tensors."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    launch = _flash_launch_settings(q)
    if do.stride(-1) != 1:
        do = do.contiguous()
    # Delta_i = dO_i . O_i (see the derivation above): (B, H, Tq), in the accumulator's dtype
    delta = (do.to(lse2.dtype) * o.to(lse2.dtype)).sum(-1)
    dq = torch.empty(B, H, Tq, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Hkv, Tk, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hkv, Tk, D, device=q.device, dtype=v.dtype)
    has_doc = q_doc is not None
    docs = (q_doc if has_doc else q, k_doc if has_doc else q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scales = (D ** -0.5 * LOG2E, D ** -0.5)
    blocks = dict(HAS_DOC=has_doc, BLOCK_M=FLASH_BLOCK_M, BLOCK_N=FLASH_BLOCK_N, **launch)
    _flash_bwd_dkdv_kernel[(triton.cdiv(Tk, FLASH_BLOCK_N), B * Hkv)](
        q, k, v, do, lse2, delta, dk, dv, *docs, *strides, H, Hkv, H // Hkv, Tq, Tk, D, *where,
        *scales, **blocks)
    _flash_bwd_dq_kernel[(triton.cdiv(Tq, FLASH_BLOCK_M), B * H)](
        q, k, v, do, lse2, delta, dq, *docs, *strides, H, H // Hkv, Tq, Tk, D, *where, *scales,
        **blocks)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """The kernels as an autograd operation: forward saves q, k, v, O and LSE2 (not P), backward
    runs the two backward kernels. Use it through flash_attention()."""

    @staticmethod
    def forward(ctx, q, k, v, where, q_doc, k_doc):
        o, lse2 = _flash_forward(q, k, v, where, q_doc, k_doc)
        ctx.save_for_backward(q, k, v, o, lse2, q_doc, k_doc)
        ctx.where = where
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse2, ctx.where, q_doc, k_doc)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, q_offset=0, k_offset=0, window=0, n_global=0, q_doc=None, k_doc=None):
    """softmax(q k^T / sqrt(D) + mask) v with the Triton kernels, differentiable.
    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), H a multiple of Hkv (GQA); float32, bfloat16,
    float16 or float64, all the same. Query row i sits at absolute position q_offset + i and key
    row j at k_offset + j (a KV-cached call: q_offset = cache position, k_offset = first cached
    key kept); the mask is section 4's: causal, window / n_global, and documents when q_doc
    (B, Tq) and k_doc (B, Tk) are given. Returns (B, H, Tq, D) in q's dtype. Equals
    manual_attention(q, k, v, attention_mask(...)) (test_model_flash_attention_equals_manual)."""
    _flash_ready(q.device)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[::3] != k.shape[::3]:
        raise ValueError(f"flash_attention: q (B, H, Tq, D) and k, v (B, Hkv, Tk, D) do not match: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.size(1) % k.size(1):
        raise ValueError(f"flash_attention: {q.size(1)} query heads are not a multiple of "
                         f"{k.size(1)} kv heads")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in FLASH_DTYPES):
        raise ValueError(f"flash_attention: q, k, v must share one dtype of {FLASH_DTYPES}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.size(-1) > FLASH_MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim {q.size(-1)} > {FLASH_MAX_HEAD_DIM}; "
                         "use attn_impl=sdpa")
    if (q_doc is None) != (k_doc is None):
        raise ValueError("flash_attention: give both q_doc and k_doc, or neither")
    # the kernels step through the head dimension with stride 1 and the doc ids with stride 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if q_doc is not None:
        q_doc, k_doc = q_doc.contiguous(), k_doc.contiguous()
    where = (int(q_offset), int(k_offset), int(window), int(n_global))
    return FlashAttention.apply(q, k, v, where, q_doc, k_doc)

# -----------------------------------------------------------------------------
# 6. MLP
#
#   relu2:  c_proj(relu(c_fc x)^2)                  (So et al., 2021, "Primer"; sparse, cheap)
#   gelu:   c_proj(gelu(c_fc x))                    (GPT-2)
#   swiglu: c_proj(silu(x W_gate) * (x W_up))       (Shazeer, 2020); W_gate and W_up are one
#           merged matrix c_fc of width 2*hidden, split after the matmul.


def mlp_activation(kind, h, gate=None):
    """The elementwise nonlinearity shared by the dense MLP and the experts of section 7.
    h: pre-activation (..., hidden); gate: x W_gate for swiglu (None otherwise)."""
    if kind == "relu2":
        return F.relu(h).square()
    if kind == "gelu":
        return F.gelu(h)
    return F.silu(gate) * h


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.kind = config.mlp
        fc_out = 2 * hidden if self.kind == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, h = h.chunk(2, dim=-1)                      # (B, T, hidden) each
            return self.c_proj(mlp_activation("swiglu", h, gate))
        return self.c_proj(mlp_activation(self.kind, h))

# -----------------------------------------------------------------------------
# 7. Mixture of experts: a feed-forward layer with many MLPs, each token using a few
#
# A dense MLP spends the same FLOPs on every token. An MoE layer holds n_experts MLPs ("experts")
# plus a small linear "router"; each token is sent to only top_k of them, so parameters grow with
# n_experts while FLOPs per token grow only with top_k. It replaces the MLP in every moe_every-th
# block. One forward, for N = B*T tokens and E = n_experts:
#
#   1. route    logits = x @ W_router                       (N, E)
#               choose top_k experts per token by logits + expert_bias
#               gates  = softmax over the chosen experts' logits (bias NOT included)
#   2. dispatch sort the N*top_k (token, expert) choices by expert, so each expert's tokens sit
#               in one contiguous run; drop the ones past the expert's capacity (training only)
#   3. experts  run every expert's MLP on its run of tokens
#   4. combine  y[token] = sum over its kept choices of gate * expert_out
#               (+ the shared experts, which every token always uses)
#
# Balancing. A router left alone tends to collapse onto a few experts (they get more gradient,
# get better, get chosen more). Three switchable remedies:
#   - moe_aux: Switch-Transformer load-balancing loss, E * sum_i f_i * P_i   (moe_aux_coef)
#   - moe_z:   router z-loss, mean(logsumexp(logits)^2), keeps logits small  (moe_z_coef)
#   - expert_bias: "auxiliary-loss-free" balancing (DeepSeek-V3): a per-expert bias added to
#     the scores used for CHOOSING only, nudged after every optimizer step toward equal load
#     (moe_bias_rate); it never touches the gradients.
#
# Worked example (E=4, top_k=2, one token): logits = [2.0, 0.0, 1.0, -1.0]
#   chosen experts = {0, 2}; gates = softmax([2.0, 1.0]) = [0.731, 0.269]
#   y = 0.731 * expert0(x) + 0.269 * expert2(x)
# With expert_bias = [0, 0, 0, 1.5] the scores are [2.0, 0.0, 1.0, 0.5], so the choice is still
# {0, 2}; with expert_bias = [0, 0, 0, 3.5] the scores are [2.0, 0.0, 1.0, 2.5], the choice
# becomes {3, 0}, and the gates are the softmax of the UNbiased logits [-1.0, 2.0] = [0.047, 0.953].

CAPACITY_EPS = 1e-9  # keeps float noise (1.1 * 10 = 11.000000000000002) from rounding up


def moe_capacity(capacity_factor, n_tokens, top_k, n_experts):
    """Max tokens one expert may take: ceil(capacity_factor * n_tokens * top_k / n_experts).
    Perfect balance needs capacity_factor = 1; 1.25 leaves 25% slack. 0 or inf -> None
    (no limit). Example: factor 1.0, 8 tokens, top_k 1, 4 experts -> 2."""
    if capacity_factor == 0 or math.isinf(capacity_factor):
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts - CAPACITY_EPS))


class MoE(nn.Module):
    """Token-choice mixture-of-experts feed-forward layer: (B, T, C) -> (B, T, C).

    After each forward:
      self.aux   = {"moe_aux": scalar, "moe_z": scalar}, UNWEIGHTED (GPT.forward sums them over
                   layers into its aux dict; the trainer multiplies by moe_aux_coef, moe_z_coef)
      self.stats = {"counts": (E,) float, tokens kept per expert (after capacity),
                    "dropped": int tensor, choices dropped by capacity,
                    "routed": int tensor, choices made (= N * top_k)}
    The stats are detached tensors (no host sync in forward); the trainer sums "counts" over
    micro-steps and ranks and hands them to update_bias.

    Parameters (E experts of hidden width H, S shared experts), stored (in, out) so that the
    forward reads x @ W:
      router.weight (E, C)   router (a Linear, no bias)
      c_fc   (E, C, H)       expert input projections
      c_gate (E, C, H)       swiglu only: the gate projections
      c_proj (E, H, C)       expert output projections, zero at init like the dense MLP's,
                             so a fresh layer adds nothing to the residual stream
      shared_fc/shared_gate (C, S*H), shared_proj (S*H, C)   the shared experts
      expert_bias (E,)       a buffer (saved in checkpoints, no gradient)
    Keeping all experts in ONE 3-D tensor per matrix also suits DDP: an expert that got no token
    this micro-batch just has a zero slice in a gradient that exists, so no parameter is ever
    "unused" (no find_unused_parameters needed).
    """

    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.kernels = kernels
        C, E, k = config.n_embd, config.n_experts, config.top_k
        # GPTConfig validates all of this already; MoE also accepts any object with these
        # fields (the MoE tests build the layer alone), so it checks again.
        if config.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={config.mlp!r}: choose one of {', '.join(MLP_KINDS)}")
        if E < 1:
            raise ValueError(f"n_experts={E}: an MoE layer needs n_experts >= 1 (0 means a dense MLP)")
        if not 1 <= k <= E:
            raise ValueError(f"top_k={k}: must be between 1 and n_experts={E}")
        if config.n_shared_experts < 0 or not config.capacity_factor >= 0:
            raise ValueError("n_shared_experts and capacity_factor must be >= 0 (0 capacity = no dropping)")
        self.n_embd, self.n_experts, self.top_k = C, E, k
        self.n_shared = config.n_shared_experts
        self.capacity_factor = float(config.capacity_factor)
        self.bias_rate = float(config.moe_bias_rate)
        self.mlp = config.mlp
        self.hidden = H = config.moe_hidden or dense_hidden(config)
        gated = self.mlp == "swiglu"

        self.router = nn.Linear(C, E, bias=False)
        self.c_fc = nn.Parameter(torch.empty(E, C, H))
        self.c_gate = nn.Parameter(torch.empty(E, C, H)) if gated else None
        self.c_proj = nn.Parameter(torch.empty(E, H, C))
        # S shared experts of width H are, summed, exactly ONE MLP of width S*H (the activation
        # is elementwise per hidden unit, so concatenating the hidden units of S MLPs and
        # summing their outputs is the same computation). So we store them as one wider MLP
        # and run it with two plain matmuls.
        SH = self.n_shared * H
        self.shared_fc = nn.Parameter(torch.empty(C, SH)) if SH else None
        self.shared_gate = nn.Parameter(torch.empty(C, SH)) if SH and gated else None
        self.shared_proj = nn.Parameter(torch.empty(SH, C)) if SH else None
        # Persistent buffer: it is part of the model (it changes which expert a token gets),
        # so it is saved in the state_dict and restored on resume.
        self.register_buffer("expert_bias", torch.zeros(E))
        self.aux, self.stats = {}, {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Init: input projections and router ~ N(0, 1/C), so on a unit-RMS input their outputs
        have unit variance (router logits ~ N(0, 1): distinct, no ties); output projections
        zero, so the layer starts as the identity on the residual stream. GPT.init_weights
        calls this after its own pass (the (in, out) layout has its fan-in on dim -2)."""
        std = self.n_embd ** -0.5
        self.router.weight.normal_(0.0, std)
        for w in (self.c_fc, self.c_gate, self.shared_fc, self.shared_gate):
            if w is not None:
                w.normal_(0.0, std)
        for w in (self.c_proj, self.shared_proj):
            if w is not None:
                w.zero_()
        self.expert_bias.zero_()

    # -- the pieces of one forward ------------------------------------------------------------

    def route(self, xf):
        """xf (N, C) -> logits (N, E) float32, chosen (N, k) expert ids, gates (N, k).

        The router runs in float32 even under bf16 autocast: top-k is a hard decision, and
        bf16 logits (8 bits of mantissa) tie and flip between experts."""
        with torch.autocast(device_type=xf.device.type, enabled=False):
            logits = F.linear(xf.float(), self.router.weight.float())   # (N, E)
        # The bias shifts which experts are CHOSEN, never how much they are trusted: it is
        # excluded from the gates, so balancing does not distort the output.
        chosen = torch.topk(logits + self.expert_bias, self.top_k, dim=-1).indices  # (N, k)
        chosen_logits = logits.gather(1, chosen)                        # (N, k)
        if self.top_k == 1:
            # Routing weight = the expert's probability under the softmax over ALL experts
            # (Switch Transformer). The softmax over the single chosen expert would be exactly
            # 1, and the router would get no gradient from the language-model loss at all,
            # only from the auxiliary losses.
            gates = torch.softmax(logits, dim=-1).gather(1, chosen)     # (N, 1)
        else:
            # Routing weights = softmax over the chosen experts' logits (Mixtral): the k
            # weights of a token sum to 1, whatever the other experts scored.
            gates = torch.softmax(chosen_logits, dim=-1)                # (N, k)
        return logits, chosen, gates

    def dispatch(self, chosen, capacity):
        """Group the N*k choices by expert and apply the capacity limit.

        Choices are numbered slot-major: choice a = s*N + n is token n's s-th pick (s = 0 its
        best expert). A stable sort by expert id keeps that order inside each expert's group,
        so PRIORITY under capacity is: all first choices before any second choice, then
        earlier token (flattened B*T position) first. A token thus loses its backup expert
        before anyone loses their favourite.

        Returns expert (N*k,) expert of each choice, rank (N*k,) its place in that expert's
        queue, keep (N*k,) bool, counts (E,) choices per expert (before capacity), and order
        (N*k,) the choices sorted by expert."""
        E = self.n_experts
        expert = chosen.t().reshape(-1)                     # (k*N,) slot-major
        order = torch.argsort(expert, stable=True)          # choices grouped by expert
        counts = torch.zeros(E, dtype=torch.long, device=expert.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert))  # (E,) static shape, unlike bincount
        starts = torch.cumsum(counts, 0) - counts           # (E,) where each group begins in `order`
        rank_sorted = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # back to choice order
        keep = rank < capacity if capacity is not None else torch.ones_like(expert, dtype=torch.bool)
        return expert, rank, keep, counts, order

    def expert_weights(self):
        """Per-expert views of the 3-D weights: lists of E tensors (C, H) / (H, C).
        unbind() once rather than indexing c_fc[e] inside the loop: the backward of each
        c_fc[e] would allocate and zero a full (E, C, H) gradient per expert (E times the
        work of the gradient itself); unbind's backward stacks once."""
        gate = self.c_gate.unbind(0) if self.c_gate is not None else [None] * self.n_experts
        return self.c_fc.unbind(0), gate, self.c_proj.unbind(0)

    def expert_mlp(self, xe, w_fc, w_gate, w_proj):
        """One expert on its tokens (n, C) with (C, H) weights, or all experts at once on
        (E, cap, C) buffers with the (E, C, H) weights (then @ is a batched matmul)."""
        g = xe @ w_gate if w_gate is not None else None
        return mlp_activation(self.mlp, xe @ w_fc, g) @ w_proj

    def run_experts_padded(self, xf, expert, rank, keep, capacity):
        """All experts at once with two batched matmuls over (E, capacity, C) buffers. Static
        shapes and no host sync, so torch.compile and CUDA graphs like it; the cost is
        capacity*E rows whether or not they are full. Returns (k*N, C)."""
        N, C = xf.shape
        E = self.n_experts
        pad = E * capacity  # index of an all-zero row appended below
        # slot of each choice in the flattened (E*capacity) buffer; dropped -> pad row
        slot = torch.where(keep, expert * capacity + rank, torch.full_like(rank, pad))
        token = torch.arange(expert.numel(), device=xf.device) % N  # choice a = s*N + n -> token n
        token_of_slot = torch.full((pad + 1,), N, dtype=torch.long, device=xf.device)
        token_of_slot[slot] = token  # kept slots point to their token; others to row N (zeros)
        x_pad = torch.cat([xf, xf.new_zeros(1, C)])                   # (N+1, C)
        xe = x_pad[token_of_slot[:pad]].view(E, capacity, C)          # (E, cap, C)
        ye = self.expert_mlp(xe, self.c_fc, self.c_gate, self.c_proj)  # (E, cap, C) via bmm
        ye = torch.cat([ye.reshape(pad, C), ye.new_zeros(1, C)])      # (E*cap+1, C)
        return ye[slot]  # (k*N, C): each choice's expert output, zeros where dropped

    def run_experts_grouped(self, xf, expert, keep, counts_kept, order):
        """One matmul pair per expert on exactly its tokens: no padding waste, but a Python
        loop over experts and one host sync (the group sizes). Returns (k*N, C)."""
        N, C = xf.shape
        kept = order[keep[order]]            # kept choices, grouped by expert
        sizes = counts_kept.tolist()         # host sync: the group sizes drive the split
        xs = xf[kept % N]                    # (n_kept, C) tokens in expert order
        weights = zip(xs.split(sizes), *self.expert_weights())
        outs = [self.expert_mlp(*chunk_and_w) for chunk_and_w in weights if len(chunk_and_w[0])]
        y = xf.new_zeros(expert.numel(), C, dtype=outs[0].dtype if outs else xf.dtype)
        if outs:
            y = y.index_copy(0, kept, torch.cat(outs))  # unique indices: deterministic
        return y

    def shared_mlp(self, xf):
        g = xf @ self.shared_gate if self.shared_gate is not None else None
        return mlp_activation(self.mlp, xf @ self.shared_fc, g) @ self.shared_proj

    def forward(self, x, impl="auto"):
        """x (B, T, C) -> (B, T, C). impl: "grouped", "padded" (the tests run both and check
        they agree) or "auto": padded when Kernels.moe_padded is set (the Runtime sets it on
        CUDA) and a capacity fixes the buffer size (static shapes, no host sync: what
        torch.compile and CUDA graphs need), grouped otherwise. On CPU grouped is faster:
        CPU batched matmuls are slower than plain ones, and padded also computes the padding."""
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        xf = x.reshape(B * T, C)                                        # (N, C)
        N = xf.shape[0]
        logits, chosen, gates = self.route(xf)
        # Capacity only while training: at inference every token keeps all its experts, so a
        # token's output never depends on the rest of the batch, and a KV-cached decode (one
        # token at a time) equals the full forward (test_model_moe_cached_decode_equals_full_forward).
        capacity = moe_capacity(self.capacity_factor, N, k, E) if self.training else None
        expert, rank, keep, counts, order = self.dispatch(chosen, capacity)
        counts_kept = counts.clamp(max=capacity) if capacity is not None else counts

        if impl == "auto":
            impl = "padded" if capacity is not None and self.kernels.moe_padded else "grouped"
        if impl == "padded":
            cap = capacity if capacity is not None else max(1, int(counts.max()))  # host sync
            out = self.run_experts_padded(xf, expert, rank, keep, cap)
        else:
            out = self.run_experts_grouped(xf, expert, keep, counts_kept, order)
        # combine: y[n] = sum_s gates[n, s] * out[s*N + n]; dropped choices are zero rows, so
        # a token that lost all its experts passes through on the residual stream alone
        out = out.view(k, N, C)
        y = (out * gates.t().unsqueeze(-1).to(out.dtype)).sum(0)       # (N, C)
        if self.shared_fc is not None:
            y = y + self.shared_mlp(xf)

        # Balancing losses (float32 scalars, UNWEIGHTED).
        # Switch aux loss = E * sum_i f_i * P_i with
        #   f_i = fraction of the N*k choices that picked expert i (before capacity; a count,
        #         so no gradient flows through it)
        #   P_i = mean over tokens of softmax(logits)_i (differentiable)
        # Both sum to 1, so under UNIFORM routing (f_i = P_i = 1/E) it equals exactly 1.0 for
        # every top_k. At the other extreme every token picks the same k experts, f_i = 1/k on
        # those k, and the router's probability sits on them: the loss approaches E * (1/k) * 1
        # = E / top_k (E for top-1). (Normalising f per token instead of per choice would give
        # top_k at balance; dividing by N*k lets one moe_aux_coef fit every top_k.)
        probs = torch.softmax(logits, dim=-1)                           # (N, E)
        f = counts.float() / (N * k)
        aux = E * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()            # router z-loss (ST-MoE)
        self.aux = {"moe_aux": aux, "moe_z": z}
        kept_total = counts_kept.sum()
        self.stats = {"counts": counts_kept.detach().float(),
                      "dropped": (N * k - kept_total).detach(),
                      "routed": torch.tensor(N * k, device=x.device)}
        return y.view(B, T, C).to(x.dtype)

    # -- balancing without a loss -------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, counts):
        """Nudge expert_bias toward equal load: b_i += moe_bias_rate * sign(mean - count_i).

        counts: (E,) tokens per expert summed over the micro-steps of one optimizer step AND
        over all ranks (the trainer all-reduces first), so every rank applies the same update
        and the biases stay identical without being broadcast. An overloaded expert's bias
        goes down, an idle one's goes up; sign() makes the step size independent of batch
        size. The biases are re-centred (a shift common to all experts changes no choice) so
        their values stay readable in logs."""
        if self.bias_rate == 0:
            return
        counts = counts.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(self.bias_rate * torch.sign(counts.mean() - counts))
        self.expert_bias.sub_(self.expert_bias.mean())

    @staticmethod
    def load_stats(counts):
        """Summary of a load vector (E,): {"min_share", "max_share", "load_entropy"}.
        share_i = count_i / sum(counts) (1/E each when balanced); load_entropy =
        -sum share_i log share_i / log E, 1.0 when balanced, 0.0 when one expert takes
        everything. Example: counts [3, 1, 0, 0] -> min 0.0, max 0.75,
        entropy (0.75 ln(1/0.75) + 0.25 ln 4) / ln 4 = 0.406."""
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        total = counts.sum()
        if total <= 0:
            return {"min_share": 0.0, "max_share": 0.0, "load_entropy": 0.0}
        share = counts / total
        nz = share[share > 0]
        ent = -(nz * nz.log()).sum() / math.log(len(counts)) if len(counts) > 1 else torch.tensor(1.0)
        return {"min_share": share.min().item(), "max_share": share.max().item(),
                "load_entropy": ent.item()}

    # -- accounting ---------------------------------------------------------------------------

    def param_counts(self):
        """{"total": every parameter of the layer, "active": those one token uses}.
        active = router + top_k experts + shared experts (the bias is a buffer)."""
        per_expert = sum(p[0].numel() for p in (self.c_fc, self.c_gate, self.c_proj) if p is not None)
        always = self.router.weight.numel() + sum(
            p.numel() for p in (self.shared_fc, self.shared_gate, self.shared_proj) if p is not None)
        return {"total": always + self.n_experts * per_expert,
                "active": always + self.top_k * per_expert}

    def flops_per_token(self, backward=True):
        """Matmul FLOPs per token counting only ACTIVE experts: 2 per active weight forward,
        6 with the backward pass (the 6N rule of GPT.flops_per_token). An upper bound while
        training with capacity (dropped choices cost nothing); padding in the padded path is
        wasted work not counted here."""
        return (6 if backward else 2) * self.param_counts()["active"]


def moe_reference(moe, x):
    """The slow, obvious MoE forward the fast one must equal (no capacity): for each token,
    for each of its top-k experts, run that expert on that token alone. Reads moe's weights
    and bias; used by the tests and as a reading aid."""
    B, T, C = x.shape
    xf = x.reshape(-1, C)
    y = torch.zeros_like(xf)
    for n in range(xf.shape[0]):
        logits = xf[n] @ moe.router.weight.t()                          # (E,)
        chosen = torch.topk(logits + moe.expert_bias, moe.top_k).indices.tolist()
        if moe.top_k == 1:
            weights = torch.softmax(logits, 0)[chosen]
        else:
            weights = torch.softmax(logits[chosen], 0)
        for w, e in zip(weights, chosen):
            g = xf[n] @ moe.c_gate[e] if moe.c_gate is not None else None
            y[n] = y[n] + w * (mlp_activation(moe.mlp, xf[n] @ moe.c_fc[e], g) @ moe.c_proj[e])
        for s in range(moe.n_shared):  # shared experts one by one, from the concatenated weights
            cols = slice(s * moe.hidden, (s + 1) * moe.hidden)
            g = xf[n] @ moe.shared_gate[:, cols] if moe.shared_gate is not None else None
            y[n] = y[n] + mlp_activation(moe.mlp, xf[n] @ moe.shared_fc[:, cols], g) @ moe.shared_proj[cols]
    return y.view(B, T, C)

# -----------------------------------------------------------------------------
# 7b. Hyper-connections: n residual streams instead of one (hc_streams)
#
# The residual stream is what every sublayer (attention, MLP, the memory of 7c) reads, through its
# norm, and adds its output to: x <- x + f(norm(x)). Hyper-connections (Zhu et al., 2024,
# "Hyper-Connections") widen it into n streams H_1 .. H_n, each C wide, and give every sublayer
# learned weights for what it reads and where it writes:
#
#     read    x    = sum_j a_j H_j                  a (n,):   the sublayer's input, C wide
#     layer   y    = f(norm(x))                     attention, MLP or memory, unchanged
#     write   H'_i = sum_j M_ij H_j  +  b_i y       M (n, n): stream to stream; b (n,): the write
#
# With n = 1 and a = b = M = 1 this is the plain residual step. With n > 1 the streams can hold
# different things, and M can move or fade what an earlier layer wrote, which a single stream that
# only ever adds cannot. The embedding starts every stream; before the final norm the streams are
# averaged into one (the paper sums them: the final RMSNorm makes sum and average the same function
# up to its eps, and the average makes the start below exact).
#
# Static form: a, b and M are parameters of the sublayer. Dynamic form (hc_dynamic): each also
# moves with the token, through a projection w of the normalised streams (the paper's dynamic HC):
#     a_j  += s_a tanh(norm(H_j) . w_a)          b_j += s_b tanh(norm(H_j) . w_b)
#     M_ij += s_m tanh(norm(H_j) . w_m,i)        (column j of M comes from stream j)
# w starts at 0, so a dynamic model starts as the static one; the scales s start small
# (HC_DYNAMIC_SCALE) so that the token-dependent terms grow in without jolting the streams.
#
# Initialisation (the paper's): a = e_(k mod n), one stream read (block i's attention reads stream
# 2i mod n, its MLP stream 2i+1 mod n, its memory the attention's), b = 1 (the output goes to every
# stream), M = I. Then the n streams stay equal to the single-stream x: they all start as the
# embedding; reading one of n equal streams gives x; each becomes x + y. Their average is x. So at
# step 0 the n-stream model computes what the single-stream model with the same other weights
# computes (test_model_hc_starts_as_single_stream), bitwise when n is a power of two; for other n
# the average of n equal floats (n x / n) can be off in the last bit.
# Training breaks the symmetry: the sublayers read different streams, so the streams' write
# weights get different gradients.
#
# mHC (hc_sinkhorn; DeepSeek-AI, 2025, "mHC: Manifold-Constrained Hyper-Connections").
# Left free, M drifts away from I, and what the residual path does over L layers is the product
# M_L ... M_1. If each factor stretches some direction by 1 + eps, the product can stretch it by
# (1 + eps)^L; factors of 1 - eps shrink it like (1 - eps)^L: with depth the signal (and, through
# M^T, the gradient) explodes or vanishes, the instability mHC reports for HC in large models. mHC
# keeps every M doubly stochastic: entries >= 0, every row and every column summing to 1. Then
#   - rows: each new stream is a weighted average of the old ones, so none outgrows the largest;
#   - columns: sum_i H'_i = sum_j H_j + (sum_i b_i) y, so what the streams hold together is passed
#     on whole: the identity path of the plain residual, kept for the sum of the streams;
#   - a doubly stochastic matrix is an average of permutation matrices (Birkhoff), each of norm 1,
#     so its largest singular value is 1 (reached on the all-ones direction), and a product of
#     doubly stochastic matrices is doubly stochastic again. The residual path through ANY number of
#     layers therefore has norm exactly 1: the signal is neither amplified nor lost with depth, and
#     neither is the gradient going back through the M^T (doubly stochastic too).
# The projection is Sinkhorn-Knopp: take exp(logits) (every entry positive), divide every row by its
# sum, then every column by its sum, and repeat; the matrix converges to the doubly stochastic
# diag(r) exp(logits) diag(c). Here: rows first (a softmax per row), then hc_sinkhorn_iters rounds of
# (columns, rows), so rows end summing to 1 to float rounding and columns to within the
# convergence (1e-5 after the default 20 rounds on logits of size ~1: test_model_sinkhorn_*).
# Worked example (test_model_sinkhorn_worked_example): exp(logits) = [[4, 1], [1, 1]]
#     rows:     [[0.8, 0.2], [0.5, 0.5]]
#     columns:  sums 1.3 and 0.7      -> [[8/13, 2/7], [5/13, 5/7]]
#     rows:     sums 82/91 and 100/91 -> [[28/41, 13/41], [0.35, 0.65]]      (after one round)
# and in the limit [[2/3, 1/3], [1/3, 2/3]]: scaling rows and columns never changes the ratio
# M_11 M_22 / (M_12 M_21) = 4, and a doubly stochastic 2 x 2 matrix is [[p, 1-p], [1-p, p]], so
# p^2 / (1-p)^2 = 4: p = 2/3.
# With hc_sinkhorn the logits start at 0, so M = 1/n everywhere: the centre of the doubly stochastic
# matrices, where the projection has a gradient (I is a corner, reached only by infinite logits,
# where the gradient through Sinkhorn is 0). The average of equal streams is the stream, so this
# start too is the single-stream model. (mHC also keeps a and b non-negative with sigmoids; here
# only M is constrained: it is the factor that compounds with depth.)
#
# The streams ARE the residual, so they stay float32 under bf16 autocast (the read and the mix are
# matmuls, which autocast would otherwise round to bf16 at every sublayer).
# Cost per token and sublayer: the read n*C and the mix n*n*C multiply-adds, the dynamic projection
# n*C*(n+2); flops_per_token counts them (section 11). The write and the final average are
# elementwise, like the residual add they replace, and like it are not counted.

HC_DYNAMIC_SCALE = 0.01  # s_a, s_b, s_m at init (the HC paper's initial value)
SINKHORN_EPS = 1e-12     # added to every row/column sum: a sum that underflowed to 0 gives no 0/0;
                         # far below float32's resolution of a sum near 1, so it changes nothing else


def sinkhorn(logits, iters):
    """Sinkhorn-Knopp on exp(logits), (..., n, n) -> (..., n, n) float32, batched over the leading
    dims: rows normalised (a softmax per row, which subtracts the row's max first, so exp cannot
    overflow), then `iters` rounds of (columns, rows). See the worked example above."""
    m = torch.softmax(logits.float(), dim=-1)
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + SINKHORN_EPS)   # every column sums to 1
        m = m / (m.sum(dim=-1, keepdim=True) + SINKHORN_EPS)   # every row sums to 1
    return m


def sinkhorn_reference(logits, iters):
    """The same for one (n, n) matrix, in plain Python floats and loops (the tests' reference)."""
    K = [[math.exp(v) for v in row] for row in logits.tolist()]

    def rows(K):
        return [[v / sum(row) for v in row] for row in K]

    def columns(K):
        sums = [sum(col) for col in zip(*K)]
        return [[v / s for v, s in zip(row, sums)] for row in K]
    K = rows(K)
    for _ in range(iters):
        K = rows(columns(K))
    return torch.tensor(K, dtype=torch.float64)


class HyperConnection(nn.Module):
    """How one sublayer (number `sublayer_index` in the model) reads and writes the n streams.
    forward(H, f): H (B, T, n, C) float32 -> H' (B, T, n, C), where f maps the read x (B, T, C)
    to the sublayer's output y (B, T, C), e.g. lambda x: attn(ln_1(x)).

    Parameters: read a (n,), write b (n,), mix M (n, n) (its logits with hc_sinkhorn); with
    hc_dynamic also norm (RMSNorm(C)), dyn (Linear C -> n + 2: per stream [a, b, M's column]) and
    dyn_scale (s_a, s_b, s_m)."""

    def __init__(self, config, sublayer_index=0):
        super().__init__()
        n, C = config.hc_streams, config.n_embd
        self.n, self.first_read = n, sublayer_index % n
        self.sinkhorn_iters = config.hc_sinkhorn_iters if config.hc_sinkhorn else 0
        self.read = nn.Parameter(torch.empty(n))
        self.write = nn.Parameter(torch.empty(n))
        self.mix = nn.Parameter(torch.empty(n, n))
        self.norm = self.dyn = self.dyn_scale = None
        if config.hc_dynamic:
            self.norm = RMSNorm(C, config.norm_gain, config.norm_eps)
            self.dyn = nn.Linear(C, n + 2, bias=False)
            self.dyn_scale = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The initialisation that makes n streams start as one (see above). GPT.init_weights calls
        it after its own pass, which would set every 1-D parameter to 1."""
        self.read.zero_()
        self.read[self.first_read] = 1.0
        self.write.fill_(1.0)
        if self.sinkhorn_iters:
            self.mix.zero_()                        # logits 0: M = 1/n everywhere after Sinkhorn
        else:
            self.mix.copy_(torch.eye(self.n))
        if self.dyn is not None:
            self.dyn.weight.zero_()
            self.dyn_scale.fill_(HC_DYNAMIC_SCALE)
            if self.norm.weight is not None:
                self.norm.weight.fill_(1.0)

    def coefficients(self, H):
        """(a, b, M) for the streams H: (n,), (n,), (n, n) in the static form; (B, T, n),
        (B, T, n), (B, T, n, n) in the dynamic form. M is doubly stochastic with hc_sinkhorn."""
        a, b, m = self.read, self.write, self.mix
        if self.dyn is not None:
            f = torch.tanh(self.dyn(self.norm(H)))                 # (B, T, n, n + 2): row j from stream j
            s_a, s_b, s_m = self.dyn_scale.unbind()
            a = a + s_a * f[..., 0]                                # (B, T, n)
            b = b + s_b * f[..., 1]                                # (B, T, n)
            m = m + s_m * f[..., 2:].transpose(-1, -2)             # (B, T, n, n): column j from stream j
        if self.sinkhorn_iters:
            m = sinkhorn(m, self.sinkhorn_iters)
        return a, b, m

    def forward(self, H, f):
        with torch.autocast(H.device.type, enabled=False):        # the streams stay float32
            a, b, m = self.coefficients(H)
            x = torch.einsum("...j,...jc->...c", a, H)             # (B, T, C): read
        y = f(x)                                                   # the sublayer, under autocast if on
        with torch.autocast(H.device.type, enabled=False):
            mixed = torch.einsum("...ij,...jc->...ic", m, H)       # (B, T, n, C): stream to stream
            return mixed + b[..., None] * y.float()[..., None, :]  # + write b_i y to stream i


def hc_reference(hc, H, f):
    """HyperConnection.forward written one stream at a time, with Python loops (the tests'
    reference for the einsums)."""
    a, b, m = hc.coefficients(H)
    a, b, m = a.expand(*H.shape[:-1]), b.expand(*H.shape[:-1]), m.expand(*H.shape[:-1], hc.n)
    x = sum(a[..., j, None] * H[..., j, :] for j in range(hc.n))
    y = f(x).float()
    out = [sum(m[..., i, j, None] * H[..., j, :] for j in range(hc.n)) + b[..., i, None] * y
           for i in range(hc.n)]
    return torch.stack(out, dim=-2)

# -----------------------------------------------------------------------------
# 7c. Engram: hashed n-gram memory (engram_layers)
#
# Much of what a language model knows is local and static: "New York" goes on with "City", and
# "def __init__(self" with ",". Attention and MLPs rebuild such facts by computation at every
# position. Engram (DeepSeek-AI, 2026, "Conditional Memory via Scalable Lookup") looks
# them up instead: the last few tokens at each position index large embedding tables, one O(1)
# lookup per token whose cost does not grow with the table. It is a second axis of sparsity next to
# MoE: the tables can be very large, and each token touches a handful of rows.
#
# At position t, for every n-gram order n (engram_ngram) and every head k (engram_heads):
#     g     = (x_t, x_(t-1), .., x_(t-n+1))             the last n tokens, newest first
#     row   = hash_(n,k)(g), in [0, engram_rows)        a fixed hash, a different one per head
#     e_nk  = E_nk[row]                                 (engram_dim,): one row of table E_nk
#     e     = the e_nk side by side                     (orders * heads * engram_dim,)
# and a gate, as in the Engram paper, decides from the hidden state h_t how much of it to use:
#     k_t = W_k e,  v_t = W_v e                         (C,) each: a key and a value
#     g_t = sigmoid(norm(h_t) . norm(k_t) / sqrt(C))    near 1 when the memory fits the context
#     h_t <- h_t + g_t v_t                              added to the residual, before attention
# Collisions put different n-grams on one row. With several heads, an n-gram that shares its row
# in one table mostly has a row of its own in another, and the gate can turn down a retrieved
# vector that does not fit the context. W_v (c_proj) starts at 0 like every output projection, so
# a fresh memory adds nothing. Left out from the paper: the short causal convolution after the
# gate, and the normalisation of token ids (e.g. case folding) before hashing.
#
# The hash: Knuth's multiplicative hashing of each token, combined by XOR. Hash function number s
# (s = layer * tables per layer + table, the tables of a layer ordered by order, then head), for
# the token i positions back (g_i):
#     m_(s,i) = (2 (s * ENGRAM_MAX_ORDER + i) + 1) * HASH_GOLDEN  mod 2^32     odd, distinct per (s, i)
#     h       = XOR over i < n of (g_i * m_(s,i)  mod 2^32)                  32 bits
#     row     = (h * engram_rows) >> 32                                      the top bits, scaled
# The TOP bits matter: the low bits of g * m depend only on the low bits of g, so "h mod rows" with
# a power-of-two number of rows would ignore the high bits of every token id. Positions before the
# start of the input, and positions in an earlier document (packed batches), hold the id
# the id vocab_size, which no token has (the pad).
# Worked example (test_model_engram_hash_worked_example): x_(t-1) = 17, x_t = 42, order 2, s = 0,
# 1000 rows. m_(0,0) = 2654435761, m_(0,1) = 3 * 2654435761 mod 2^32 = 3668339987;
#     42 * 2654435761 mod 2^32 = 4112119562,   17 * 3668339987 mod 2^32 = 2232237635,
#     h = 4112119562 XOR 2232237635 = 1880410441,   row = 1880410441 * 1000 >> 32 = 437.
# The next hash function (s = 1) sends the same pair to row 848; the pair the other way round
# (42 followed by 17) goes to row 370.
#
# Training: the tables are embeddings, so they go to AdamW at the embedding's learning rate, not to
# Muon, and only the rows a step looked up change (train.py's AdamW with lazy rows, section 4.1).
# They are reported apart, as "memory" (section 11); a token reads orders * heads rows per memory
# layer, so only that much of them is active; lookups are not matmuls and count no FLOPs.
# Decoding: the first new token needs the n - 1 tokens before it, which came in earlier calls:
# the cache keeps the last (largest order - 1) token ids of every row (KVCache.ngram, section 9).

HASH_GOLDEN = 2654435761  # 0x9E3779B1: a prime near 2^32 / golden ratio, Knuth's multiplicative-hash constant
HASH_MASK = 2 ** 32 - 1   # keep 32 bits: the products g * m then fit int64 (g < 2^31, m < 2^32)
ENGRAM_TABLE_STD = 1.0    # table init, as an untied wte: a retrieved row has unit RMS


def engram_multiplier(seed, i):
    """m_(s,i) of the hash (see above): odd, below 2^32."""
    return ((2 * (seed * ENGRAM_MAX_ORDER + i) + 1) * HASH_GOLDEN) & HASH_MASK


def engram_hash_one(gram, seed, rows):
    """The row of one n-gram (token ids, newest first) under hash function `seed`, in plain Python
    integers: the definition, and the reference of engram_hash."""
    h = 0
    for i, token in enumerate(gram):
        h ^= (token * engram_multiplier(seed, i)) & HASH_MASK
    return (h * rows) >> 32


def engram_hash(grams, multipliers, rows):
    """Rows of many n-grams at once. grams (..., S) int64: [..., i] is the token i positions back;
    multipliers (H, S) int64: m_(s,i) of each of H hash functions, 0 past the function's order (a
    zero product leaves the XOR unchanged, so a 2-gram hash ignores older tokens). -> (..., H)."""
    prod = (grams.unsqueeze(-2) * multipliers) & HASH_MASK          # (..., H, S), each < 2^32
    h = prod[..., 0]
    for i in range(1, prod.size(-1)):
        h = h ^ prod[..., i]
    return (h * rows) >> 32                                          # (..., H), in [0, rows)


def ngram_context(idx, span, pad, docs=None, past=None):
    """The last `span` tokens at every position, for the hash: (grams, history).
    idx (B, T); docs (B, T) document ids or None (one document); past = (ids, docs), each
    (B, span - 1), what came before idx (a cache's history), or None (nothing: pads).
    grams (B, T, span): [b, t, i] = the token i positions before t, or `pad` where that lies
    before everything seen or in another document. history: the last span - 1 (ids, docs), for
    the call after this one.
    Example (span 3, pad 9, no past): idx [[5, 6, 7]] -> grams [[[5, 9, 9], [6, 5, 9], [7, 6, 5]]]."""
    B, T = idx.shape
    K = span - 1
    docs = torch.zeros_like(idx) if docs is None else docs
    if past is None:
        past = (idx.new_full((B, K), pad), torch.zeros_like(idx[:, :1]).expand(B, K))
    ids = torch.cat([past[0], idx], dim=1)                          # (B, K + T)
    doc = torch.cat([past[1], docs], dim=1)                         # (B, K + T)
    grams = torch.stack([ids[:, K - i:K - i + T] for i in range(span)], dim=-1)       # (B, T, span)
    same = torch.stack([doc[:, K - i:K - i + T] for i in range(span)], dim=-1) == docs[..., None]
    return torch.where(same, grams, pad), (ids[:, T:], doc[:, T:])


class Engram(nn.Module):
    """The memory of one block: (hidden state x (B, T, C), grams (B, T, span)) -> (B, T, C), the
    gated memory to add to the residual.

    Parameters: tables (n_tables * engram_rows, engram_dim), all tables of the layer stacked (table
    t owns rows [t * engram_rows, (t + 1) * engram_rows)); c_key and c_proj (the value), Linear
    n_tables * engram_dim -> C; norm_h, norm_k (RMSNorm(C)). The hash multipliers are a buffer
    derived from the config (not saved)."""

    def __init__(self, config, layer_index=0):
        super().__init__()
        C, D, R = config.n_embd, config.engram_dim, config.engram_rows
        self.orders = [n for n in config.engram_orders for _ in range(config.engram_heads)]  # per table
        n_tables = len(self.orders)
        self.rows, self.n_embd = R, C
        self.seeds = [layer_index * n_tables + t for t in range(n_tables)]
        span = config.engram_span
        mult = [[engram_multiplier(s, i) if i < n else 0 for i in range(span)]
                for s, n in zip(self.seeds, self.orders)]
        self.register_buffer("multipliers", torch.tensor(mult, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.arange(n_tables) * R, persistent=False)
        self.tables = nn.Parameter(torch.empty(n_tables * R, D))
        self.c_key = nn.Linear(n_tables * D, C, bias=False)
        self.c_proj = nn.Linear(n_tables * D, C, bias=False)
        self.norm_h = RMSNorm(C, config.norm_gain, config.norm_eps)
        self.norm_k = RMSNorm(C, config.norm_gain, config.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """tables ~ N(0, ENGRAM_TABLE_STD^2) like an untied wte; c_key ~ N(0, 1/fan_in); c_proj = 0
        (a fresh memory adds nothing); norm gains 1."""
        self.tables.normal_(0.0, ENGRAM_TABLE_STD)
        self.c_key.weight.normal_(0.0, self.c_key.weight.size(1) ** -0.5)
        self.c_proj.weight.zero_()
        for norm in (self.norm_h, self.norm_k):
            if norm.weight is not None:
                norm.weight.fill_(1.0)

    def lookup(self, grams):
        """grams (B, T, span) -> e (B, T, n_tables * engram_dim): every table's row, side by side."""
        rows = engram_hash(grams, self.multipliers, self.rows) + self.offsets   # (B, T, n_tables)
        return F.embedding(rows, self.tables).flatten(-2)

    def forward(self, x, grams):
        e = self.lookup(grams)
        k, v = self.c_key(e), self.c_proj(e)                                   # (B, T, C) each
        gate = torch.sigmoid((self.norm_h(x) * self.norm_k(k)).sum(-1, keepdim=True) * self.n_embd ** -0.5)
        return gate * v


def engram_reference(layer, idx, x, pad):
    """Engram.forward the slow way, one position at a time from the token ids idx (B, T) (one
    document, nothing before idx): each n-gram read off the list, hashed with engram_hash_one,
    each row looked up by hand. The tests' reference for the vectorised lookup and gate."""
    B, T = idx.shape
    out = torch.zeros(B, T, layer.n_embd)
    for b in range(B):
        ids = idx[b].tolist()
        for t in range(T):
            parts = []
            for table, (seed, n) in enumerate(zip(layer.seeds, layer.orders)):
                gram = [ids[t - i] if t - i >= 0 else pad for i in range(n)]
                parts.append(layer.tables[table * layer.rows + engram_hash_one(gram, seed, layer.rows)])
            e = torch.cat(parts)
            k, v = e @ layer.c_key.weight.t(), e @ layer.c_proj.weight.t()
            h, kk = layer.norm_h(x[b, t]), layer.norm_k(k)
            out[b, t] = torch.sigmoid((h * kk).sum() / math.sqrt(layer.n_embd)) * v
    return out

# -----------------------------------------------------------------------------
# 8. Transformer block
#
# Pre-norm residual block: x = x + attn(norm(x)); x = x + mlp(norm(x)).
# Normalising the branch inputs (not the residual stream itself) keeps an identity path from the
# embedding to the output, which is what lets deep stacks train without warm-up tricks.
# The feed-forward is an MoE layer in blocks with layer_index % moe_every == moe_every - 1
# (when n_experts > 0), else the dense MLP; both are called self.mlp. The attention is the kind
# config.layer_kinds gives the layer (section 5.6); every kind has the same forward signature.
# In the blocks of engram_layers the memory of section 7c comes first: x = x + engram(x, grams).
# With hc_streams > 1 (section 7b) x is n streams (B, T, n, C) and each of the (two or three)
# sublayers reaches them through its own HyperConnection instead of "x = x + ...".


class Block(nn.Module):
    def __init__(self, config, layer_index=0, kernels=Kernels(), kind=None):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_gain, config.norm_eps)
        self.attn = make_attention(config, kind or config.layer_kinds[layer_index], kernels)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_gain, config.norm_eps)
        self.mlp = MoE(config, kernels) if config.is_moe_layer(layer_index) else MLP(config)
        # sections 7b and 7c: n-gram memory, one HyperConnection per sublayer (None when off).
        # Built on a forked random stream (GPT.init_weights draws their values last): a seed then
        # gives a model with them the same other weights as one without, so variants compared
        # at one seed start from the same dense model (and the same step-0 loss).
        with torch.random.fork_rng(devices=[]):
            self.engram = Engram(config, layer_index) if config.is_engram_layer(layer_index) else None
            self.hc_engram = self.hc_attn = self.hc_mlp = None
            if config.hc_streams > 1:
                self.hc_engram = HyperConnection(config, 2 * layer_index) if self.engram is not None else None
                self.hc_attn = HyperConnection(config, 2 * layer_index)
                self.hc_mlp = HyperConnection(config, 2 * layer_index + 1)

    def forward(self, x, layout, cache=None, layer=0, grams=None):
        """x: (B, T, C), or the streams (B, T, hc_streams, C); grams: section 7c's n-grams."""
        if self.hc_attn is not None:
            return self._forward_streams(x, layout, cache, layer, grams)
        if self.engram is not None:
            x = x + self.engram(x, grams)
        x = x + self.attn(self.ln_1(x), layout, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x

    def _forward_streams(self, H, layout, cache, layer, grams):
        """The same sublayers on n streams: each reads its mix and writes back its way (7b)."""
        if self.engram is not None:
            H = self.hc_engram(H, lambda x: self.engram(x, grams))
        H = self.hc_attn(H, lambda x: self.attn(self.ln_1(x), layout, cache, layer))
        return self.hc_mlp(H, lambda x: self.mlp(self.ln_2(x)))

# -----------------------------------------------------------------------------
# 9. KV cache
#
# Generating token t+1 needs, in every layer, what that layer remembers of tokens <= t;
# recomputing it costs a full forward per new token. The cache keeps it: one store per layer, in
# the form the layer's kind needs (its cache_spec):
#   softmax (G W S)  keys and values after RoPE, (B, n_kv_head, max_len, D) each; with GQA only
#                    the kv heads are stored, n_head / n_kv_head times less memory
#   MLA (M)          the latent c_kv and the rope key side by side, (B, 1, max_len,
#                    kv_lora_rank + qk_rope_head_dim): r + d_r numbers per token instead of 2 H D
#   linear (L)       the state (B, n_head, D, Dv [+ 1]), float32: the same size at any context
# The first two are SeqStores, preallocated for max_len positions and written at [pos, pos + T);
# the last is a StateStore, replaced by every call. The prompt is run once ("prefill", many
# tokens at cache.pos = 0), then each decode step feeds one new token at cache.pos; a softmax
# layer writes its new keys and attends to [k_start, pos + T), a linear layer folds the new tokens
# into its state. RoPE uses the absolute position pos + t, so cached and uncached runs rotate every
# token identically. The same operations serve every kind: prefill and decode (forward with
# cache=), branch(n) (row 0 copied into n rows: one prompt, n samples) and reset() (pos = 0 and
# the states cleared; sample.py re-prefills a window when the text outgrows the context).
# Document ids are kept too, so a cache prefilled with packed documents keeps masking them: per
# position for the softmax layers' masks (only if the model has such layers), and the last one
# for the linear layers (a new document resets their state).
# With Engram memory (section 7c) the cache also keeps each row's last few token ids (ngram), for
# the n-grams of the next call; branch copies them and reset forgets them, like the keys.


class SeqStore:
    """What one softmax or MLA layer keeps per token: tensors (B, heads, max_len, dim)."""

    def __init__(self, parts, batch_size, max_len, device=None, dtype=None):
        """parts: [(heads, dim), ...], e.g. keys and values: [(n_kv_head, D), (n_kv_head, D)]."""
        self.parts = [torch.zeros(batch_size, h, max_len, d, device=device, dtype=dtype) for h, d in parts]

    def update(self, new, pos, k_start):
        """Write the new entries (B, heads, T, dim) at [pos, pos + T) and return every part's
        visible slice [k_start, pos + T), in the dtype of the new entries."""
        T = new[0].size(2)
        for buf, x in zip(self.parts, new):
            buf[:, :, pos:pos + T] = x
        return [buf[:, :, k_start:pos + T].to(x.dtype) for buf, x in zip(self.parts, new)]

    def branch(self, n, pos):
        p0 = self.parts[0]
        new = SeqStore([(p.size(1), p.size(3)) for p in self.parts], n, p0.size(2), p0.device, p0.dtype)
        for dst, src in zip(new.parts, self.parts):
            dst[:, :, :pos] = src[:1, :, :pos]                # broadcasts row 0 over n rows
        return new

    def reset(self):
        pass  # positions at or past cache.pos are never read before being written


class StateStore:
    """What one linear-attention layer keeps: a fixed-size float32 state per row."""

    def __init__(self, shape, batch_size, device=None):
        self.state = torch.zeros(batch_size, *shape, device=device, dtype=torch.float32)

    def branch(self, n, pos):
        new = StateStore(self.state.shape[1:], n, self.state.device)
        new.state[:] = self.state[:1]
        return new

    def reset(self):
        self.state = torch.zeros_like(self.state)


class KVCache:
    def __init__(self, specs, batch_size, max_len, device=None, dtype=None):
        """specs: one (kind, shape) per layer, from each attention module's cache_spec():
        ("seq", [(heads, dim), ...]) or ("state", (heads, D, E))."""
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = [SeqStore(shape, batch_size, max_len, device, dtype) if kind == "seq"
                       else StateStore(shape, batch_size, device) for kind, shape in specs]
        seq = any(isinstance(s, SeqStore) for s in self.layers)
        self.doc = torch.zeros(batch_size, max_len, dtype=torch.long, device=device) if seq else None
        self.last_doc = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = 0             # number of positions filled (the same for every row)
        self.uses_docs = False   # whether any call passed doc_ids (only then is doc masking applied)
        self.ngram = None        # section 7c: (ids, doc ids), each (B, largest order - 1); None = nothing yet

    def branch(self, n):
        """A new cache of batch n whose rows are all copies of row 0 up to pos: prefill a prompt
        once with batch 1, then draw n samples from it without recomputing the prompt."""
        new = KVCache([], n, self.max_len)
        p = self.pos
        new.layers = [store.branch(n, p) for store in self.layers]
        if self.doc is not None:
            new.doc = torch.zeros(n, self.max_len, dtype=torch.long, device=self.doc.device)
            new.doc[:, :p] = self.doc[:1, :p]
        new.last_doc = self.last_doc[:1].expand(n, 1).clone()
        new.pos, new.uses_docs = p, self.uses_docs
        if self.ngram is not None:
            new.ngram = tuple(t[:1].expand(n, -1).clone() for t in self.ngram)
        return new

    def reset(self):
        self.pos, self.uses_docs, self.ngram = 0, False, None
        self.last_doc.zero_()
        for store in self.layers:
            store.reset()

# -----------------------------------------------------------------------------
# 10. The GPT model
#
# tokens -> wte -> n_layer blocks -> final RMSNorm -> lm_head -> (softcap) -> logits
#
# Multi-token prediction (DeepSeek-V3's MTP, one extra depth): besides predicting token t+1 from
# the final hidden state h_t, an extra block predicts t+2 from h_t and the embedding of the true
# token t+1:  h' = block(proj([norm(h_t), norm(wte(x_{t+1}))])),  logits' = lm_head(norm_f(h'))
# It shares wte, the final norm and lm_head with the main model, so it adds one block and one
# (2C x C) matrix. Its loss comes back as aux["mtp"]; the trainer weights (and schedules) it. It
# only runs when targets are given: at inference the model is an ordinary next-token predictor.

TIED_EMBED_STD = 0.02    # GPT-2's init for a tied wte/lm_head matrix
UNTIED_EMBED_STD = 1.0   # untied wte: unit-RMS residual stream at the start (blocks are pre-norm)
LM_HEAD_STD = 0.001      # untied lm_head: near-zero logits, so the initial loss is ~ln(vocab_size)


class MTPHead(nn.Module):
    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.norm_h = RMSNorm(config.n_embd, config.norm_gain, config.norm_eps)
        self.norm_e = RMSNorm(config.n_embd, config.norm_gain, config.norm_eps)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        # the MTP block is always a dense block on one stream, without memory, with the attention
        # of the last layer, whose hidden states it continues
        dense = dataclasses.replace(config, n_experts=0, hc_streams=1, hc_dynamic=False,
                                    hc_sinkhorn=False, engram_layers="")
        self.block = Block(dense, kernels=kernels, kind=config.layer_kinds[-1])

    def forward(self, h, next_emb, layout):
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(next_emb)], dim=-1))  # (B, T, C)
        return self.block(x, layout)


class GPT(nn.Module):
    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.config, self.kernels = config, kernels
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i, kernels) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_gain, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.mtp = MTPHead(config, kernels) if config.mtp else None
        cos, sin = rope_tables(config)
        # non-persistent: derived from the config, not stored in checkpoints, so a model can be
        # loaded with a different rope_scaling / rope_factor for context extension
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        mla = rope_tables(config, config.mla_dims[3]) if "M" in config.layer_kinds else (None, None)
        self.register_buffer("mla_rope_cos", mla[0], persistent=False)   # None without MLA layers
        self.register_buffer("mla_rope_sin", mla[1], persistent=False)
        # the views of the keys that this model's softmax layers need, built once per forward
        self.views = {m.view for m in self.modules() if isinstance(m, CausalSelfAttention)} - {"sparse"}
        if "M" in config.layer_kinds:
            self.views.add("full")
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialisation, the whole table (C = n_embd):

            parameter                               init
            wte (untied)                            N(0, UNTIED_EMBED_STD^2)
            wte = lm_head (tied)                    N(0, TIED_EMBED_STD^2)
            lm_head (untied)                        N(0, LM_HEAD_STD^2)
            c_attn, c_fc, mtp.proj (input side)     N(0, 1/fan_in): unit-variance outputs for
            MLA's wq, wq_a, wq_b, wkv_a, wkv_b      unit-variance inputs (inputs are RMS-normed)
            c_proj (attention and MLP outputs)      0: every block starts as the identity, and
                                                    the residual stream is the embedding
            attention output gate (attn_gate)       0: every gate starts at sigmoid(0) = 0.5
                                                    (section 5.2 says why)
            RMSNorm gains                           1
            linear attention decay                  gamma_h = 1 - 2^-(5+h) (RetNet; section 5.5)
            MoE router, expert inputs               N(0, 1/n_embd); expert outputs 0
            hyper-connections (7b)                  read e_(k mod n), write 1, mix I (or logits 0
                                                    with hc_sinkhorn), dynamic projection 0:
                                                    n streams start as one
            Engram (7c)                             tables N(0, 1), c_key N(0, 1/fan_in), c_proj 0
        """
        cfg = self.config
        std = TIED_EMBED_STD if cfg.tie_embeddings else UNTIED_EMBED_STD
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=LM_HEAD_STD)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "attn.gate.weight")):
                nn.init.zeros_(p)
            elif name.endswith(("c_attn.weight", "c_fc.weight", "proj.weight", "wq.weight",
                                "wq_a.weight", "wq_b.weight", "wkv_a.weight", "wkv_b.weight")):
                nn.init.normal_(p, mean=0.0, std=p.size(-1) ** -0.5)   # p: (out, in)
            elif p.ndim == 1:
                nn.init.ones_(p)                                        # norm gains
        for layer in self.moe_layers():
            layer.reset_parameters()   # router, experts: see MoE.reset_parameters
        for m in self.modules():
            if isinstance(m, LinearAttention):
                m.reset_parameters()   # the decays: see LinearAttention.reset_parameters
            if isinstance(m, (HyperConnection, Engram)):
                m.reset_parameters()   # sections 7b and 7c

    def use_kernels(self, kernels):
        """Change HOW the model computes (section 1's Kernels) after it was built, e.g. for a model
        loaded from a checkpoint on another machine. The weights are untouched."""
        self.kernels = kernels
        for m in self.modules():
            if isinstance(m, (AttentionLayer, MoE)):
                m.kernels = kernels
        return self

    # -- forward ------------------------------------------------------------------------------

    def _layout(self, B, T, pos, window, doc_ids, cache, device):
        """Build what the layers of this call share: the RoPE rows, the document ids, and the
        Visibility (which keys, which mask) of each view of the keys the model's layers use."""
        cfg = self.config
        end = pos + T
        if window < 0:
            raise ValueError(f"window={window} must be >= 0 (0 = full causal attention)")
        if window > 0 and not cfg.has_window_layers:
            raise ValueError(f"window={window}: no layer of this model ({cfg.layer_kinds}) is a "
                             f"sliding-window layer; use window=0")
        if end > cfg.max_context:
            raise bpe.UserError(
                f"{end} positions exceed the model's context of {cfg.max_context} tokens; "
                "use a shorter input, or extend the context with --rope_scaling=yarn --rope_factor=S")
        if window >= end:
            window = 0  # the window reaches back to position 0: plain causal (and SDPA's fast flag)
        prev_doc = None
        if cache is not None:
            if end > cache.max_len:
                raise bpe.UserError(f"the KV cache holds {cache.max_len} positions, {end} needed; "
                                    "make a longer cache with model.make_cache(max_len=...)")
            if doc_ids is None and cache.uses_docs:
                doc_ids = cache.last_doc.expand(B, T)   # new tokens continue the last document
            if doc_ids is not None:
                prev_doc = cache.last_doc if pos > 0 else None
                cache.last_doc = doc_ids[:, -1:].clone()
                if cache.doc is not None:
                    cache.doc[:, pos:end] = doc_ids
                cache.uses_docs = True
        k_doc = None
        if doc_ids is not None:
            k_doc = cache.doc[:, :end] if cache is not None and cache.doc is not None else doc_ids
        views = {}
        if "window" in self.views:
            views["window"] = self._visibility(pos, T, window, cfg.n_global, doc_ids, k_doc, device)
        if "full" in self.views:
            views["full"] = self._visibility(pos, T, 0, 0, doc_ids, k_doc, device)
        mla = (self.mla_rope_cos[pos:end], self.mla_rope_sin[pos:end]) if self.mla_rope_cos is not None else (None, None)
        return AttnLayout(self.rope_cos[pos:end], self.rope_sin[pos:end], pos, views, doc_ids, k_doc,
                          prev_doc, *mla)

    @staticmethod
    def _visibility(pos, T, window, n_global, doc_ids, k_doc, device):
        """Which keys new tokens pos..pos+T-1 see under a window (0 = all earlier ones)."""
        end = pos + T
        # A sliding window lets a cached query skip everything older than pos - window + 1.
        k_start = max(0, pos - window + 1) if window and not n_global else 0
        # pos == 0 as a Python bool: under sample.py's compiled decode step pos is a symbolic int,
        # pos == 0 a symbolic bool, and SDPA's is_causal takes only a bool
        is_causal = window == 0 and doc_ids is None and (True if pos == 0 else False)
        if is_causal:
            mask = None                     # SDPA's is_causal; the manual path builds a tril
        elif window == 0 and doc_ids is None and T == 1:
            mask = None                     # one new token sees every cached key
        else:
            mask = attention_mask(torch.arange(pos, end, device=device),
                                  torch.arange(k_start, end, device=device), window, n_global,
                                  doc_ids, k_doc[:, k_start:] if k_doc is not None else None)
        docs = None if doc_ids is None else (doc_ids, k_doc[:, k_start:])
        return Visibility(k_start, mask, is_causal, window, docs)

    def _logits(self, h):
        logits = self.lm_head(self.transformer.ln_f(h)).float()    # (B, T, V) float32
        cap = self.config.logit_softcap
        if cap > 0:
            logits = tanh_softcap(logits, cap, self.kernels.softcap_sigmoid)
        return logits

    def forward(self, idx, targets=None, *, doc_ids=None, window=None, cache=None,
                ignore_index=-1, reduction="mean"):
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab_size) float32.
        With targets (B, T): (loss, aux), loss = next-token cross-entropy ("mean" / "sum": a
        scalar, "none": (B, T)), aux = dict of UNWEIGHTED auxiliary losses (scalar tensors):
        "mtp" (config.mtp, no cache), "moe_aux" and "moe_z" (summed over the MoE layers).
        doc_ids (B, T): tokens attend only within their document. window: overrides
        config.window for this call (0 = full). cache: a KVCache; the new tokens sit at
        cache.pos.. and cache.pos advances by T."""
        B, T = idx.shape
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r}: choose mean, sum or none")
        if doc_ids is not None and doc_ids.shape != idx.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of idx {tuple(idx.shape)}")
        cfg = self.config
        pos = cache.pos if cache is not None else 0
        window = cfg.window if window is None else window
        layout = self._layout(B, T, pos, window, doc_ids, cache, idx.device)

        x = self.transformer.wte(idx)                                # (B, T, C)
        grams = self._ngrams(idx, layout, cache) if cfg.engram_layer_ids else None  # (B, T, span), 7c
        if cfg.hc_streams > 1:
            x = x.unsqueeze(-2).expand(B, T, cfg.hc_streams, -1)     # (B, T, n, C): 7b, all start as wte
        for i, block in enumerate(self.transformer.h):
            x = block(x, layout, cache, i, grams)
        if cfg.hc_streams > 1:
            x = x.mean(dim=-2)                                       # (B, T, C): the streams' average
        if cache is not None:
            cache.pos += T
        logits = self._logits(x)
        if targets is None:
            return logits

        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                               ignore_index=ignore_index, reduction=reduction)
        if reduction == "none":
            loss = loss.view(B, T)
        aux = {}
        if self.mtp is not None and cache is None and T > 1:
            aux["mtp"] = self._mtp_loss(x, targets, layout, ignore_index)
        moe = self.moe_layers()
        if moe:  # summed over layers, unweighted: the trainer applies moe_aux_coef, moe_z_coef
            aux["moe_aux"] = sum(layer.aux["moe_aux"] for layer in moe)
            aux["moe_z"] = sum(layer.aux["moe_z"] for layer in moe)
        return loss, aux

    def _ngrams(self, idx, layout, cache):
        """Section 7c: the last engram_span tokens at every position (B, T, span), within each
        document; with a cache, the tokens of earlier calls come from (and go back to) cache.ngram."""
        grams, history = ngram_context(idx, self.config.engram_span, self.config.vocab_size, layout.doc,
                                       cache.ngram if cache is not None else None)
        if cache is not None:
            cache.ngram = history
        return grams

    def moe_layers(self):
        """The MoE layers, in depth order (empty for a dense model). The trainer reads their
        .stats after each forward and calls update_bias(counts) once per optimizer step."""
        return [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoE)]

    def _mtp_loss(self, h, targets, layout, ignore_index):
        """Mean cross-entropy of predicting targets[:, t+1] (= token t+2) at position t < T-1."""
        ignored = targets == ignore_index
        nxt = targets.masked_fill(ignored, 0)      # ignored targets get any valid id as input ...
        h2 = self.mtp(h, self.transformer.wte(nxt), layout)
        logits = self._logits(h2[:, :-1])          # (B, T-1, V)
        tgt = targets[:, 1:].masked_fill(ignored[:, :-1], ignore_index)
        # ... and their t+2 prediction is dropped from the loss (the input token was not real)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=ignore_index)

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        """A KV cache for batch_size rows and up to max_len positions (prompt + new tokens).
        device/dtype default to the model's (linear layers' states are float32 always)."""
        p = self.lm_head.weight
        specs = [block.attn.cache_spec() for block in self.transformer.h]
        return KVCache(specs, batch_size, max_len, device or p.device, dtype or p.dtype)

    # -----------------------------------------------------------------------------------------
    # 11. Accounting and optimizer groups
    #
    # Parameter counts come from formulas over the config, so the table reads as the
    # architecture's arithmetic (test_model_param_and_flops_formulas_match_count checks them
    # against model.parameters()).

    def _attention_params(self, kind):
        """Parameters of one attention layer of kind `kind`: (matrices, norm gains, decays).
        C = n_embd, H heads of D, Hkv kv heads; MLA's widths as in section 5.4."""
        c = self.config
        C, D, H, Hkv = c.n_embd, c.head_dim, c.n_head, c.n_kv_head
        g = 1 if c.norm_gain else 0
        if kind == "M":
            q_lora, r, dn, dr, dv = c.mla_dims
            wq = C * q_lora + q_lora * H * (dn + dr) if q_lora else C * H * (dn + dr)
            matrices = wq + C * (r + dr) + r * H * (dn + dv) + H * dv * C   # wq, wkv_a, wkv_b, c_proj
            gains, out = (q_lora + r) * g, dv                                 # q_norm, kv_norm
        else:
            matrices = C * (H + 2 * Hkv) * D + H * D * C                      # c_attn + c_proj
            gains, out = (2 * D * g if c.qk_norm else 0), D                   # q_norm, k_norm
        decays = 0
        if kind == "L" and c.linear_kind == "decay":
            gains, decays = gains + D * g, H                                  # out_norm; gamma_h
        gate = {"none": 0, "output": C * H * out, "output_head": C * H}[c.attn_gate]
        return matrices, gate, gains, decays

    def _param_table(self):
        """component -> (total params, params active per token)."""
        c = self.config
        C, V = c.n_embd, c.vocab_size
        g = 1 if c.norm_gain else 0
        mlp = (3 if c.mlp == "swiglu" else 2) * C * c.hidden_size
        n_moe = c.n_moe_layers
        kinds = c.layer_kinds + (c.layer_kinds[-1] if c.mtp else "")   # the MTP block's kind last
        names = {"M": "attention (mla)", "L": "attention (linear)"}     # G W S: "attention"
        attn, gates, gains, decays = collections.Counter(), 0, 0, 0
        for i, kind in enumerate(kinds):
            matrices, gate, norm, decay = self._attention_params(kind)
            if i < c.n_layer:                 # the MTP block's attention is in "mtp head"
                attn[names.get(kind, "attention")] += matrices
                gates += gate
            gains += 2 * C * g + norm         # ln_1, ln_2 and the attention's own norms
            decays += decay
        gains += C * g + (2 * C * g if c.mtp else 0)                     # ln_f, the mtp norms
        gains += len(c.engram_layer_ids) * 2 * C * g                     # Engram's norm_h, norm_k (7c)
        table = {"embedding (wte)": (V * C, V * C)}
        for name in ("attention", "attention (mla)", "attention (linear)"):
            if attn[name]:
                table[name] = (attn[name], attn[name])
        if gates:
            table["attention gates"] = (gates, gates)
        table.update({
            "mlp": ((c.n_layer - n_moe) * mlp,) * 2,
            "norm gains": (gains, gains),
            "lm_head": (0, 0) if c.tie_embeddings else (V * C, V * C),
        })
        if decays:
            table["linear decays"] = (decays, decays)
        if n_moe:
            # per MoE layer: router (C x E), E routed experts of which top_k run per token,
            # n_shared shared experts that always run; each expert is an MLP of width moe_hidden
            expert = (3 if c.mlp == "swiglu" else 2) * C * c.expert_hidden
            table["moe router"] = (n_moe * C * c.n_experts,) * 2
            table["moe experts"] = (n_moe * c.n_experts * expert, n_moe * c.top_k * expert)
            if c.n_shared_experts:
                table["moe shared experts"] = (n_moe * c.n_shared_experts * expert,) * 2
        if c.mtp:
            matrices, gate, _, _ = self._attention_params(kinds[-1])
            n = 2 * C * C + matrices + gate + mlp             # proj + its block's matrices
            table["mtp head"] = (n, n)
        table.update(self._hc_engram_params())
        return table

    def _hc_engram_params(self):
        """Sections 7b and 7c in the table: component -> (total, active per token)."""
        c, table = self.config, {}
        C, n, g = c.n_embd, c.hc_streams, 1 if c.norm_gain else 0
        if n > 1:
            # per sublayer: read (n), write (n), mix (n, n); dynamic: projection C -> n + 2, the
            # three scales, the norm's gain. Sublayers: attention and MLP, + the memory's.
            per = 2 * n + n * n + (C * (n + 2) + 3 + C * g if c.hc_dynamic else 0)
            table["hyper-connections"] = (self.n_hc_sublayers * per,) * 2
        if c.engram_layer_ids:
            # per memory layer: orders * heads tables of engram_rows rows, engram_dim wide, of which
            # a token reads one row each; c_key and c_proj map the rows side by side (width
            # tables * engram_dim) to C
            L, tables, D = len(c.engram_layer_ids), len(c.engram_orders) * c.engram_heads, c.engram_dim
            table["engram projections"] = (L * 2 * tables * D * C,) * 2
            table["engram tables (memory)"] = (c.engram_memory_params, L * tables * D)
        return table

    @property
    def n_hc_sublayers(self):
        """Sublayers reaching the streams through a HyperConnection (0 with one stream)."""
        c = self.config
        return 0 if c.hc_streams == 1 else 2 * c.n_layer + len(c.engram_layer_ids)

    def num_params(self, by_component=False, active=False):
        """Total parameter count (tied weights once), or per-token active count (MoE), or the
        dict component -> count."""
        table = {k: v[1 if active else 0] for k, v in self._param_table().items()}
        return table if by_component else sum(table.values())

    def param_summary(self):
        """{"dense", "memory", "total", "active"}: memory = the Engram tables (looked up, section
        7c), dense = everything else (MoE experts all counted), active = what one token uses."""
        total, active = self.num_params(), self.num_params(active=True)
        memory = self._param_table().get("engram tables (memory)", (0, 0))[0]
        return {"dense": total - memory, "memory": memory, "total": total, "active": active}
    def attention_flops(self, kind, T):
        """Training FLOPs (forward + backward) per token of one attention layer's core, the part
        that is not a weight matmul, in a sequence of T tokens:
          G W S  12 * H * D * ctx: q k^T and probs v are 2 D FLOPs each per visible key, x3 for
                 the backward; ctx = mean_visible_keys under the layer's window or blocks
          M      6 * H * (d_n + d_r + d_v) * ctx: the same with MLA's key and value widths
          L      the chunked form (section 5.5) with E = D (+1 for the kernel form's normaliser):
                 inside chunks 6 H (D + E) ctx_c, ctx_c = mean visible keys of the chunk's causal
                 square; between chunks 6 H D E for the query reading the state (tokens after the
                 first chunk) and 6 H D E for writing it (tokens before the last chunk)."""
        c = self.config
        H, D = c.n_head, c.head_dim
        if kind == "L":
            E = D + (1 if c.linear_kind == "kernel" else 0)
            sizes = [min(c.linear_chunk, T - a) for a in range(0, T, c.linear_chunk)]
            ctx = sum(n * (n + 1) / 2 for n in sizes) / T
            between = (T - sizes[0] + T - sizes[-1]) / T
            return 6 * H * ((D + E) * ctx + D * E * between)
        if kind == "M":
            _, _, dn, dr, dv = c.mla_dims
            return 6 * H * (dn + dr + dv) * mean_visible_keys(T)
        if kind == "S":
            return 12 * H * D * mean_visible_keys(T, sparse=(c.sparse_block, c.sparse_local, c.sparse_global))
        if kind == "W" or not c.layer_pattern:
            return 12 * H * D * mean_visible_keys(T, c.window if c.window < T else 0, c.n_global)
        return 12 * H * D * mean_visible_keys(T)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token:
            6 * N_matmul + sum over layers of attention_flops(kind, seq_len)
        N_matmul counts the active parameters used in matmuls (everything but the wte lookup, the
        norm gains and linear attention's decays; a tied wte still counts once, as lm_head). Each
        such weight costs 2 FLOPs per token forward (multiply + add) and 4 backward (grads of
        input and weight): 6. The attention term counts the keys a query really sees (causal:
        (seq_len+1)/2 on average; a window or sparse blocks cap it): useful FLOPs. nanoGPT's
        estimate_mfu uses ctx = seq_len (the masked half too).
        Multi-token prediction adds its block (in the table), its attention, and a second pass
        through lm_head for the T-1 positions that have a token t+2 to predict.
        Hyper-connections (7b) count 6 per multiply-add of their reads, mixes and dynamic
        projections (hc_flops_per_token); Engram's tables (7c) are lookups: no FLOPs (its two
        projections are ordinary matmul weights).
        test_model_flops_counted_by_torch checks all of it against torch's own FLOP counter."""
        c = self.config
        T = seq_len or c.block_size
        table = self.num_params(by_component=True, active=True)
        not_matmul = ("norm gains", "embedding (wte)", "linear decays", "hyper-connections",
                      "engram tables (memory)")
        n_matmul = sum(v for k, v in table.items() if k not in not_matmul)
        if c.tie_embeddings:
            n_matmul += c.vocab_size * c.n_embd                        # wte used as lm_head
        if c.mtp:
            n_matmul += c.vocab_size * c.n_embd * (T - 1) / T          # lm_head again, T-1 rows
        kinds = c.layer_kinds + (c.layer_kinds[-1] if c.mtp else "")
        return int(6 * n_matmul + sum(self.attention_flops(kind, T) for kind in kinds)
                   + self.hc_flops_per_token())

    def hc_flops_per_token(self):
        """Section 7b, forward + backward: per sublayer, the read (n*C multiply-adds), the mix
        (n*n*C) and, dynamic, the projection of the n streams (n*C*(n+2)); 2 FLOPs per
        multiply-add forward, 4 backward (as the 6N rule)."""
        c = self.config
        n, C = c.hc_streams, c.n_embd
        per = n * C + n * n * C + (n * C * (n + 2) if c.hc_dynamic else 0)
        return 6 * self.n_hc_sublayers * per

    def kv_cache_bytes_per_token(self, dtype=torch.bfloat16):
        """Bytes of cache per token of context, summed over layers: softmax layers keep keys and
        values (2 * n_kv_head * D numbers), MLA layers the latent and the rope key
        (kv_lora_rank + qk_rope_head_dim), linear layers nothing per token (their state has a
        fixed size: cache_state_bytes)."""
        c = self.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        q_lora, r, dn, dr, dv = c.mla_dims
        per_layer = {"M": r + dr, "L": 0}
        return sum(per_layer.get(kind, 2 * c.n_kv_head * c.head_dim) for kind in c.layer_kinds) * itemsize

    def cache_state_bytes(self):
        """Bytes of fixed-size state per sequence (linear layers: n_head * D * E float32 numbers
        each, E = D + 1 for the kernel form's normaliser, D for the decay form), whatever the context."""
        c = self.config
        E = c.head_dim + (1 if c.linear_kind == "kernel" else 0)
        return c.layer_kinds.count("L") * c.n_head * c.head_dim * E * 4

    def cache_bytes(self, context, dtype=torch.bfloat16):
        """Cache memory of one sequence of `context` tokens: per token, plus the fixed states."""
        return self.kv_cache_bytes_per_token(dtype) * context + self.cache_state_bytes()

    def cache_bytes_per_row(self):
        """Bytes a cache keeps per row whatever the context length: Engram's n-gram history (7c),
        the last (largest order - 1) token ids and their document ids, int64."""
        span = self.config.engram_span
        return 2 * 8 * (span - 1) if span else 0

    def optim_groups(self):
        """Parameter groups for the trainer, each {"name", "params", "optimizer"}:
            matrix  (muon):  2-D weights inside the blocks (c_attn, c_proj, c_fc, mtp.proj).
                             Muon orthogonalises each update, which suits hidden linear maps.
            expert  (muon):  MoE expert weights: 3-D stacks (n_experts, in, out), which Muon
                             orthogonalises one expert matrix at a time, and the shared
                             experts' 2-D (in, out) matrices. Note the (in, out) layout: the
                             transpose of nn.Linear's (out, in).
            router  (adamw): MoE router weights (n_experts, n_embd). Not Muon: an orthogonalised
                             update moves every direction of this small matrix by the same
                             amount, so a router whose gradient is tiny (balanced, confident)
                             would still see its logits jump each step and routing flip; AdamW
                             steps each weight by its own gradient statistics.
            embed   (adamw): wte. A lookup table, not a linear map: each row is updated only
                             by the tokens that occur, so Muon's whole-matrix update does not fit.
            head    (adamw): lm_head (left out when tied to wte: the tied matrix is in "embed").
            scalar  (adamw): norm gains and any other 1-D parameters.
            hc      (adamw): hyper-connections (7b): read, write and mix coefficients, the
                             dynamic scales and norm gains. A few numbers per sublayer, not a
                             hidden linear map (the mix is (n, n), a handful of stream weights).
            hc_dyn  (adamw): the dynamic projections (C -> n + 2): read-outs of a few
                             coefficients from the hidden state, like the MoE router.
            memory  (adamw): Engram's tables (7c). Embeddings: rows are looked up, so AdamW, and
                             train.py updates only the rows a step used (lazy rows).
                             (Engram's c_key and c_proj are hidden matrices: "matrix", Muon.)
        Groups without parameters are left out (e.g. "scalar" when norm_gain=False). Every
        parameter is in exactly one group (test_model_optim_groups_cover_every_parameter_once)."""
        groups = {"matrix": [], "expert": [], "router": [], "embed": [], "head": [], "scalar": [],
                  "hc": [], "hc_dyn": [], "memory": []}
        wte, head = self.transformer.wte.weight, self.lm_head.weight
        routers = {id(layer.router.weight) for layer in self.moe_layers()}
        experts = {id(p) for layer in self.moe_layers() for n, p in layer.named_parameters()
                   if not n.startswith("router.")}
        hcs = [m for m in self.modules() if isinstance(m, HyperConnection)]
        hc_dyn = {id(m.dyn.weight) for m in hcs if m.dyn is not None}
        hc = {id(p) for m in hcs for p in m.parameters()} - hc_dyn
        memory = {id(m.tables) for m in self.modules() if isinstance(m, Engram)}
        for p in self.parameters():                  # parameters() yields a tied weight once
            if id(p) in hc or id(p) in hc_dyn or id(p) in memory:
                groups["hc" if id(p) in hc else "hc_dyn" if id(p) in hc_dyn else "memory"].append(p)
            elif id(p) in routers:
                groups["router"].append(p)
            elif id(p) in experts:
                groups["expert"].append(p)
            elif p is wte:
                groups["embed"].append(p)
            elif p is head:
                groups["head"].append(p)
            elif p.ndim >= 2:
                groups["matrix"].append(p)
            else:
                groups["scalar"].append(p)
        optimizer = {"matrix": "muon", "expert": "muon", "router": "adamw", "embed": "adamw",
                     "head": "adamw", "scalar": "adamw", "hc": "adamw", "hc_dyn": "adamw",
                     "memory": "adamw"}
        return [{"name": k, "params": v, "optimizer": optimizer[k]} for k, v in groups.items() if v]

# -----------------------------------------------------------------------------
# 12. Runtime: device, precision, compile, threads, determinism -- decided once
#
# Every decision about the hardware is made here, once, by setup_runtime, and carried in a Runtime
# that train.py and sample.py pass around. The model itself never asks "am I on CUDA?": what
# depends on the hardware reaches it as a Kernels setting (section 1), from rt.kernels.
#
#   device       auto: cuda > mps > cpu. Under torchrun each process takes GPU number LOCAL_RANK.
#   precision    CUDA: bf16 autocast (float32 master weights) where the GPU has bf16, else fp16
#                autocast with a GradScaler (fp16's small exponent range underflows small
#                gradients unless the loss is scaled up first); TF32 for the float32 matmuls.
#                CPU: bf16 autocast only where the CPU multiplies bf16 matrices in hardware
#                (Intel AMX); elsewhere bf16 is emulated and slower than float32. The choice is
#                read from the CPU's feature flags, never from a timing: a timing races with
#                whatever else the machine is doing, so a run and its resume could choose
#                differently.
#   compile      torch.compile on CUDA and CPU (it fuses the many small elementwise ops of a small
#                model); train.py falls back to eager if compiling fails at the first step.
#   threads      CPU threads per process: the cores, shared among the ranks of one machine.
#   determinism  Compiled CPU code accumulates gradients of lookups (the embedding's backward is a
#                scatter-add) with atomic adds from several threads, so the float sums happen in a
#                different order on every run and two runs with one seed drift apart after a few
#                steps. torch.use_deterministic_algorithms makes inductor call the sequential
#                kernel instead. It costs little on CPU (README, performance notes), so it is on by
#                default there; on CUDA it stays off unless asked (deterministic CUDA kernels can
#                be much slower, and CUDA was not measured).
#   resume       the resolved choices are saved in every checkpoint (rt.settings()) and reused on
#                resume, so a resumed run computes exactly as the original did.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWITCH = ("auto", "true", "false")   # the values of --compile and --deterministic


@dataclasses.dataclass
class Runtime:
    """The hardware decisions of one process (see the table above)."""
    device: torch.device
    dtype: torch.dtype = torch.float32      # autocast dtype; float32 = no autocast at all
    dtype_reason: str = ""
    compile: bool = False
    compile_options: dict = dataclasses.field(default_factory=dict)  # inductor options
    threads: int = 0
    deterministic: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    scaler: object = None                   # torch.amp.GradScaler for float16, else None

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def kernels(self):
        """How the model should compute on this hardware (section 1's Kernels)."""
        cpu = self.device.type == "cpu"
        return Kernels(sdpa_fp32=cpu and self.dtype == torch.bfloat16,
                       softcap_sigmoid=cpu and self.compile,
                       moe_padded=self.device.type == "cuda")

    @property
    def ns_dtype(self):
        """Precision of Muon's Newton-Schulz iteration: bf16 when the run computes in bf16 (its
        matmuls are fast there; each step maps the band of singular values around 1 back into
        itself, so bf16 rounding does not grow), float32 otherwise."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32

    def autocast(self):
        """The context every forward pass runs in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def settings(self):
        """The resolved choices that change the numbers, as plain values: saved in checkpoints
        and given back to setup_runtime(saved=...) on resume."""
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        return {"dtype": name, "compile": self.compile, "threads": self.threads,
                "deterministic": self.deterministic}

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def __str__(self):
        return f"{self.device} {str(self.dtype).replace('torch.', '')}"


def resolve_device(setting, local_rank=0):
    """'auto' -> cuda > mps > cpu; 'cuda' under torchrun -> cuda:LOCAL_RANK. One line for a
    device that does not exist or is not available here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if setting == "cuda":
        setting = f"cuda:{local_rank}"
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise bpe.UserError(f"--device={setting}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise bpe.UserError(f"--device={setting}: only cpu, cuda and mps are supported; use --device=auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bpe.UserError(f"--device={setting}: CUDA is not available here; use --device=cpu")
    if device.type == "mps" and not mps:
        raise bpe.UserError(f"--device={setting}: mps is not available here; use --device=cpu")
    return device


def cpu_has_bf16_matmul(cpuinfo="/proc/cpuinfo"):
    """True where the CPU multiplies bf16 matrices in hardware: Intel's AMX tiles (the amx_bf16
    flag). Read from /proc/cpuinfo (Linux); elsewhere False. AVX-512-BF16 alone (some AMD EPYC)
    has bf16 dot products, but bf16 training there was far slower than on AMX (README), so it
    keeps float32; --dtype=bfloat16 tries it anyway."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_precision(setting, device, saved=None):
    """(autocast dtype, reason, GradScaler or None); see the table at the top of this section."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if setting == "auto" and saved:
        setting, reason = saved, "as saved in the checkpoint being resumed"
    else:
        reason = "set by --dtype"
    if setting != "auto":
        if setting not in DTYPES:
            raise bpe.UserError(f"--dtype={setting}: choose auto, {', '.join(DTYPES)}")
        dtype = DTYPES[setting]
        if dtype == torch.float16 and device.type != "cuda":
            raise bpe.UserError("--dtype=float16 needs CUDA (its GradScaler); use bfloat16 or float32")
    elif device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            dtype, reason = torch.bfloat16, "CUDA with bf16"
        else:
            dtype, reason = torch.float16, "CUDA without bf16: fp16 + GradScaler"
    elif device.type == "cpu" and cpu_has_bf16_matmul():
        dtype, reason = torch.bfloat16, "CPU with AMX bf16 matmuls"
    else:
        dtype, reason = torch.float32, f"{device.type} without hardware bf16 matmuls"
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, reason, scaler


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the
    kernel, so that a CPU training step stops paying page faults for its own tensors.

    Why: PyTorch on CPU allocates every tensor with malloc. glibc serves large blocks with a
    fresh mmap and unmaps them when they are freed, and trims the top of its heap; the next step
    then touches new pages, and the kernel zero-fills each one on a page fault (a large share of
    a small model's step; README, performance notes). Here no block is mmap-ed (every tensor
    comes from the heap, where freed blocks are reused), the heap is never trimmed and grows
    64 MB at a time. Also off: "fastbins", glibc's lists of freed small blocks, which malloc
    merges back into the heap before serving each large request (malloc_consolidate); without
    them small blocks are merged as they are freed. The cost: the process keeps its peak heap
    size, which a training loop reaches on every step anyway.
    Linux with glibc only; elsewhere nothing happens (returns False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl) or none found
        return False
    M_MXFAST, M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = 1, -1, -2, -4  # from glibc's malloc.h
    ok = mallopt(M_MMAP_MAX, 0)               # never serve a block with its own mmap
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30)  # mallopt takes an int: 1 GB stands for "never"
    ok &= mallopt(M_TOP_PAD, 64 << 20)
    ok &= mallopt(M_MXFAST, 0)                # no fastbins
    return bool(ok)


def _switch(name, value, auto):
    """An auto|true|false setting (or a bool) -> bool; `auto` is what 'auto' means here."""
    value = str(value).lower()
    if value not in SWITCH:
        raise bpe.UserError(f"--{name}={value}: choose auto, true or false")
    return auto if value == "auto" else value == "true"


def setup_runtime(device="auto", dtype="auto", compile="auto", threads=0, deterministic="auto",
                  distributed=False, saved=None):
    """Decide everything once and return the Runtime. The arguments are the scripts' settings of
    the same names ("auto" and threads=0 are resolved here). saved: the "runtime" dict of a
    checkpoint being resumed (rt.settings()); its choices replace the automatic ones, so the
    resumed run computes exactly like the original (an explicit setting still wins).
    distributed: join the process group when torchrun started this process (train.py)."""
    saved = saved or {}
    rank, local_rank, world_size = 0, 0, 1
    if distributed and "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # set by torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dev.type == "cpu":
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    if threads < 0:
        raise bpe.UserError(f"--threads={threads}: must be >= 0 (0 = all cores)")
    if not threads:
        threads = saved.get("threads", 0)
    if not threads and dev.type == "cpu":
        # ranks on one machine share its cores; oversubscription makes everyone slow
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = max(1, (os.cpu_count() or 1) // local_world)
    if threads:
        torch.set_num_threads(threads)
    dtype, reason, scaler = resolve_precision(dtype, dev, saved.get("dtype"))
    compile_on = _switch("compile", compile, saved.get("compile", dev.type in ("cuda", "cpu")))
    det = _switch("deterministic", deterministic, saved.get("deterministic", dev.type == "cpu"))
    torch.use_deterministic_algorithms(det, warn_only=True)
    if det:
        # deterministic mode also fills every new tensor with NaN to expose reads of
        # uninitialised memory: a debugging aid that costs a pass over each allocation
        torch.utils.deterministic.fill_uninitialized_memory = False
    # On CPU, inductor's cpp_wrapper calls the compiled kernels from generated C++ instead of
    # generated Python: a small model's step launches a few hundred kernels, and a Python call
    # for each adds up. (CUDA keeps the default: not measured.)
    options = {"cpp_wrapper": True} if dev.type == "cpu" else {}
    return Runtime(device=dev, dtype=dtype, dtype_reason=reason, compile=compile_on,
                   compile_options=options, threads=torch.get_num_threads(), deterministic=det,
                   rank=rank, local_rank=local_rank, world_size=world_size, scaler=scaler)

# -----------------------------------------------------------------------------
# 13. Checkpoints: one file format, written by train.py, read by train.py and sample.py; growing
#     the vocabulary of a base model for new special tokens
#
# A checkpoint is a dict of tensors and plain Python values, saved with torch.save:
#   model                  state_dict of the bare GPT (no DDP or torch.compile prefixes)
#   model_config           dataclasses.asdict(GPTConfig): the model is rebuilt from this alone
#   runtime                the resolved precision / compile / threads / determinism (exact resume)
#   tokenizer              the tokenizer it was trained with, in bpe's (vocab, merges) form: a
#                          checkpoint never depends on a data directory that may be rebuilt
#   tokenizer_fingerprint  its fingerprint (any other tokenizer is refused)
#   checksum               sha256 of every tensor in the file (see tensor_checksum)
# plus what train.py needs to resume: train_config, optimizers, step, rng, best_val_loss, ...
# Plain types only, so everybody loads with torch.load(weights_only=True), which refuses to
# unpickle code: a checkpoint from the internet cannot run anything on load.
#
# Saving is atomic (a temp file in the same folder, fsync, os.replace: bpe.atomic_write), so a
# crash or a full disk mid-save leaves the previous file intact. Loading verifies: torch.load does
# not check the zip's CRCs, so bytes overwritten inside the weights would load silently; the
# checksum catches that, and names the damaged file. A file whose weights are nan or inf (a
# diverged run saved by an older train.py) is refused too: nothing useful can come out of it.

CHECKPOINT_KEYS = ("model", "model_config")


def tensor_checksum(checkpoint):
    """sha256 over every tensor of a (nested) checkpoint dict, in a fixed order: for each, its key
    path, dtype, shape and raw bytes. Plain values (ints, strings) are not covered: a damaged
    one would make the file unreadable or fail validation anyway. The "checksum" key is skipped."""
    h = hashlib.sha256()

    def walk(path, x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())       # the raw bytes, no copy
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if not (path == "" and k == "checksum"):
                    walk(f"{path}/{k}", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{path}/{i}", v)
    walk("", checkpoint)
    return h.hexdigest()


def _disk_full(err):
    """Whether an exception from torch.save means the disk (or quota) ran out. torch's zip writer
    reports it as a RuntimeError ('unexpected pos', 'file write failed'), never naming the disk."""
    if isinstance(err, OSError):
        return bpe.is_disk_full(err)
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "write failed" in text)


def save_checkpoint(path, checkpoint):
    """Write checkpoint (a dict as described above) to path atomically, with its checksum.
    A full disk is one line that says the previous file is intact."""
    checkpoint = {**checkpoint, "checksum": tensor_checksum(checkpoint)}
    try:
        bpe.atomic_write(path, lambda f: torch.save(checkpoint, f))
    except (OSError, RuntimeError) as e:
        if not _disk_full(e):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        free = bpe.free_bytes(folder) / 2 ** 20
        raise bpe.UserError(f"cannot write {path}: the disk is full ({free:.0f} MB free in {folder}); "
                            f"the previous {os.path.basename(path)} is intact: free some space and "
                            f"continue with --resume=True") from None


def load_checkpoint(path):
    """Read and verify a checkpoint; returns its dict (tensors on the CPU). Every problem is one
    line naming the file: missing, unreadable or truncated, not a nanostack checkpoint, damaged
    (checksum mismatch), or holding non-finite weights."""
    if not os.path.isfile(path):
        raise bpe.UserError(f"no checkpoint at {path}: train one with `python train.py`, or give "
                            f"the path of one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects beyond plain data
        raise bpe.UserError(f"cannot read checkpoint {path} ({bpe.first_line(e)}); it is truncated or "
                            f"not a checkpoint: use another one (last.pt, best.pt)") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise bpe.UserError(f"{path} is not a nanostack checkpoint (no {', '.join(missing)}); "
                            f"give the path of one that train.py wrote")
    if ckpt.get("checksum") is not None and tensor_checksum(ckpt) != ckpt["checksum"]:
        raise bpe.UserError(f"checkpoint {path} is damaged: its tensors no longer match the checksum "
                            f"written when it was saved; use another checkpoint (last.pt, best.pt)")
    bad = [k for k, t in ckpt["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise bpe.UserError(f"checkpoint {path} holds non-finite weights (nan or inf in {len(bad)} "
                            f"tensors, e.g. {bad[0]}): the run had diverged; use an earlier checkpoint")
    return ckpt


def model_from_checkpoint(ckpt, path, kernels=Kernels(), overrides=None):
    """The GPT a checkpoint describes, with its weights (on the CPU, in train mode).
    overrides: model_config fields to change at load time; only knobs that leave the weights
    valid make sense (rope_scaling / rope_factor: the RoPE tables are rebuilt, not stored)."""
    try:
        config = GPTConfig(**ckpt["model_config"])
        if overrides:
            config = dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as e:
        raise bpe.UserError(f"checkpoint {path}: its model_config cannot be built by this model.py "
                            f"({bpe.first_line(e)}); use the model.py it was trained with") from None
    model = GPT(config, kernels)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise bpe.UserError(f"checkpoint {path}: weights do not match its model_config "
                            f"({bpe.first_line(e)})") from None
    return model


# Fine-tuning a base model on chat data adds special tokens to its tokenizer (bpe's
# Tokenizer.with_special_tokens, at ids past the trained ones), and the model needs an input row
# (wte) and an output row (lm_head) for each new id. grow_vocab adds them, each set to the MEAN of
# the trained rows, for two reasons:
#   - as an input, a new token starts as an "average token": a vector of the size and direction
#     the blocks are used to (a fresh N(0, 1) row of an untied wte is far from every trained row,
#     and would send activations the blocks have never seen through every layer);
#   - as an output, its logit starts as the mean of the old logits: the head is linear, so
#     (mean of rows) . h = mean of (row . h) = mean_i z_i. Since exp(mean z) <= mean exp(z)
#     (Jensen: exp is convex), each new token starts with probability at most 1 / V_old, and the
#     k new ones together take at most k / (V_old + k): the base model's predictions of the old
#     tokens barely move. (Exactly so without the logit softcap; with it, cap * tanh(z / cap) bends
#     only the largest logits.) A random row could instead start with a large logit and distort
#     every prediction until training pushed it down. This is the initialisation Hewitt (2021,
#     "Initializing new word embeddings for pretrained language models") recommends.
# test_model_grow_vocab_rows_are_the_mean checks the rows, the unchanged old logits and the bound.

@torch.no_grad()
def grow_vocab(model, n_trained, vocab_size):
    """Make model's vocabulary at least vocab_size ids, and set every row from id n_trained on (new
    ones, and padding rows that were never trained) of wte and lm_head to the mean of the trained
    rows 0..n_trained-1 (see above). In place (model.config too); returns the model."""
    cfg = model.config
    if not 0 < n_trained <= min(cfg.vocab_size, vocab_size):
        raise ValueError(f"n_trained={n_trained} must be in 1..min({cfg.vocab_size}, {vocab_size})")
    size = max(cfg.vocab_size, vocab_size)

    def grown(w):                                   # (V_old, C) -> (size, C)
        out = w.new_empty(size, w.size(1))
        out[:n_trained] = w[:n_trained]
        out[n_trained:] = w[:n_trained].mean(dim=0)
        return nn.Parameter(out)

    model.transformer.wte = nn.Embedding.from_pretrained(grown(model.transformer.wte.weight), freeze=False)
    head = nn.Linear(cfg.n_embd, size, bias=False, device=model.lm_head.weight.device,
                     dtype=model.lm_head.weight.dtype)
    head.weight = model.transformer.wte.weight if cfg.tie_embeddings else grown(model.lm_head.weight)
    model.lm_head = head
    model.config = dataclasses.replace(cfg, vocab_size=size)
    return model


def checkpoint_tokenizer(ckpt, ckpt_path, tokenizer_path=""):
    """The tokenizer a checkpoint was trained with: tokenizer_path if given, else the copy stored
    in the checkpoint, else (a checkpoint of an older train.py) the path recorded in it, or a
    file of that name next to the checkpoint (the run was copied elsewhere). Whichever is used
    must carry the checkpoint's fingerprint: a different merge table maps the same text to
    different ids, and the model would read gibberish silently."""
    want = ckpt.get("tokenizer_fingerprint")
    if not tokenizer_path and ckpt.get("tokenizer"):
        tokenizer = bpe.Tokenizer.from_vocab_merges(**ckpt["tokenizer"])
        if want and tokenizer.fingerprint != want:
            raise bpe.UserError(f"checkpoint {ckpt_path}: its stored tokenizer does not match its "
                                f"fingerprint; the file is damaged: use another checkpoint")
        return tokenizer
    candidates = [tokenizer_path] if tokenizer_path else []
    recorded = ckpt.get("tokenizer_path") or ""
    if not tokenizer_path and recorded:
        candidates += [recorded, os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                                              os.path.basename(recorded))]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        where = tokenizer_path or recorded or "(none recorded in the checkpoint)"
        raise bpe.UserError(f"tokenizer {where} not found; pass --tokenizer=PATH to the tokenizer.bpe "
                            f"of the data directory the model was trained on")
    tokenizer = bpe.Tokenizer.load(found)
    if want and tokenizer.fingerprint != want:
        raise bpe.UserError(f"tokenizer {found} (fingerprint {tokenizer.fingerprint[:12]}) is not the "
                            f"one this checkpoint was trained with ({want[:12]}); pass "
                            f"--tokenizer=PATH to the right tokenizer.bpe")
    return tokenizer

# -----------------------------------------------------------------------------
# 14. safetensors: the weights file of the Hugging Face world, written and read by hand
#
# A .safetensors file is three parts, back to back:
#   8 bytes   N, the header's length: an unsigned 64-bit integer, little-endian
#   N bytes   the header, JSON: {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
#             ..., "__metadata__": {str: str} (optional)}, padded with spaces to a multiple of 8
#   the rest  the tensors' raw bytes, row-major, little-endian; [begin, end) of each tensor counts
#             from the first byte after the header, and the tensors tile that part exactly: no
#             overlaps, no gaps (a gap could hide another file inside this one)
# Unlike a pickle, it holds no code: reading one cannot run anything. And since the bytes are
# already in memory layout, a reader maps the file into memory and hands out views of it: a tensor
# is read from disk only when it is used, and a model larger than the RAM's free part still loads.
#
# Worked example (test_model_safetensors_bytes_by_hand writes it and compares every byte): the
# tensors {"g": tensor([1.0]) (bfloat16), "w": tensor([[1.0, -2.0]]) (float32)} become
#   header  {"w":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"g":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}
#           111 characters, padded with 1 space to 112 = 0x70
#   bytes   70 00 00 00 00 00 00 00 | the 112 header bytes | 00 00 80 3f  00 00 00 c0 | 80 3f
#           (1.0 in float32 is 0x3f800000 and -2.0 is 0xc0000000, stored lowest byte first; 1.0 in
#           bfloat16 is the top half of its float32, 0x3f80)
# The writer puts tensors of larger elements first (float32 before bfloat16 here), each group in
# the order given: with the data starting at a multiple of 8, every tensor then starts at a
# multiple of its element size, so the reader's views are aligned.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100 * 2 ** 20   # the reference implementation's limit on N (100 MB)
SAFETENSORS_ALIGN = 8                    # the header is padded so the data starts at a multiple of 8
SAFETENSORS_INDEX = "model.safetensors.index.json"   # a sharded checkpoint's table of contents
SAFETENSORS_SINGLE = "model.safetensors"


def safetensors_bytes_header(tensors, metadata=None):
    """(header bytes including the 8-byte length, names in file order) for a {name: tensor} dict."""
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())  # stable sort
    header, begin = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_NAMES:
            raise bpe.UserError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold here; "
                                f"use one of {', '.join(str(d) for d in SAFETENSORS_NAMES)}")
        end = begin + t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % SAFETENSORS_ALIGN)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} to path as safetensors, atomically (bpe.atomic_write). metadata: an
    optional {str: str} (Hugging Face wants {"format": "pt"})."""
    head, order = safetensors_bytes_header(tensors, metadata)

    def write(f):
        f.write(head)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes (this machine is little-endian)
    bpe.atomic_write(path, write)


def read_safetensors(path):
    """{name: tensor} from a safetensors file, memory-mapped: the tensors are views of a private
    (copy-on-write) mapping of the file, read from disk as they are used. Every problem is one
    line naming the file: too short, a header length past the end or absurd, a header that is not
    JSON, an unknown dtype, a shape that does not match its bytes, offsets past the end,
    overlapping tensors, or bytes that belong to no tensor."""
    def bad(what):
        return bpe.UserError(f"{path} is not a valid safetensors file: {what}; re-export or re-download it")
    if sys.byteorder != "little":
        raise bpe.UserError("safetensors stores little-endian numbers and this machine is big-endian; "
                            "convert the file on a little-endian machine")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise bpe.UserError(f"cannot read {path} ({e.strerror}); check the path") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"{size} bytes, fewer than the 8 of the header length (truncated)")
        n = int.from_bytes(f.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER:
            raise bad(f"its header length is {n} bytes, more than the format allows ({SAFETENSORS_MAX_HEADER})")
        if 8 + n > size:
            raise bad(f"its header length ({n} bytes) runs past the end of the file ({size} bytes): truncated")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"its header is not JSON ({bpe.first_line(e)})") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        header.pop("__metadata__", None)
        data_start, data_len = 8 + n, size - 8 - n
        spans = []
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                if not (all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)) and begin <= end):
                    raise ValueError
            except (TypeError, KeyError, ValueError):
                raise bad(f"tensor {name!r} needs dtype, shape and data_offsets [begin, end]: {entry!r}") from None
            if dtype not in SAFETENSORS_DTYPES:
                raise bad(f"tensor {name!r} has the unknown dtype {dtype!r} (this reader knows "
                          f"{', '.join(SAFETENSORS_DTYPES)})")
            itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
            if end - begin != math.prod(shape) * itemsize:
                raise bad(f"tensor {name!r}: shape {shape} of {dtype} needs {math.prod(shape) * itemsize} "
                          f"bytes, its offsets span {end - begin}")
            if end > data_len:
                raise bad(f"tensor {name!r} ends at byte {end} of the data, past its end ({data_len} bytes): truncated")
            spans.append((begin, end, name))
        spans.sort()
        at = 0
        for begin, end, name in spans:
            if begin < at:
                raise bad(f"tensor {name!r} overlaps the tensor before it (bytes {begin}..{at})")
            if begin > at:
                raise bad(f"bytes {at}..{begin} of the data belong to no tensor")
            at = end
        if at != data_len:
            raise bad(f"the last {data_len - at} bytes belong to no tensor")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if data_len else None
    tensors = {}
    for begin, end, name in spans:
        dtype, shape = SAFETENSORS_DTYPES[header[name]["dtype"]], header[name]["shape"]
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        if (data_start + begin) % raw.new_empty((), dtype=dtype).element_size():
            raw = raw.clone()  # a file from another writer may leave a tensor unaligned: copy it
        tensors[name] = raw.view(dtype).view(shape)
    return tensors


def write_hf_weights(folder, tensors, max_shard_bytes, metadata=None):
    """Write {name: tensor} into folder as model.safetensors, or, past max_shard_bytes, as shards
    model-00001-of-0000K.safetensors with model.safetensors.index.json ({"metadata": {"total_size"},
    "weight_map": {name: shard file}}), the way Hugging Face splits large checkpoints. Weight files
    of an earlier export that this one does not rewrite are removed. Returns the paths written."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        files = [SAFETENSORS_SINGLE]
    else:
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    paths = []
    for file, names in zip(files, shards):
        paths.append(os.path.join(folder, file))
        write_safetensors(paths[-1], {n: tensors[n] for n in names}, metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        paths.append(os.path.join(folder, SAFETENSORS_INDEX))
        bpe.atomic_write_bytes(paths[-1], (json.dumps(index, indent=2) + "\n").encode("utf-8"))
    for old in os.listdir(folder):
        stale = old == SAFETENSORS_INDEX or old == SAFETENSORS_SINGLE or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old)
        if stale and os.path.join(folder, old) not in paths:
            os.remove(os.path.join(folder, old))
    return paths


def read_hf_weights(folder):
    """{name: tensor} of a Hugging Face folder: model.safetensors, or the shards that
    model.safetensors.index.json lists (each name read from the shard the index gives)."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if not os.path.isfile(index_path):
        single = os.path.join(folder, SAFETENSORS_SINGLE)
        if not os.path.isfile(single):
            found = ", ".join(sorted(os.listdir(folder))[:6]) or "nothing"
            raise bpe.UserError(f"{folder} has no {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} (found: {found}); "
                                f"nanostack reads safetensors weights only (save with safe_serialization)")
        return read_safetensors(single)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        items = [(str(k), str(v)) for k, v in weight_map.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise bpe.UserError(f"cannot read {index_path} ({bpe.first_line(e)}): it needs a \"weight_map\" "
                            f"of tensor name -> shard file") from None
    shards, tensors = {}, {}
    for name, file in items:
        if os.path.basename(file) != file or file.startswith("."):
            raise bpe.UserError(f"{index_path}: shard {file!r} is not a file name inside {folder}")
        if file not in shards:
            shards[file] = read_safetensors(os.path.join(folder, file))
        if name not in shards[file]:
            raise bpe.UserError(f"{index_path} puts {name} in {file}, which does not hold it; "
                                f"the folder is incomplete: re-download it")
        tensors[name] = shards[file][name]
    return tensors

# -----------------------------------------------------------------------------
# 15. The Hugging Face format: export to it, import from it (hf:DIR)
#
# A Hugging Face model folder holds
#   config.json              the architecture: model_type, sizes, rope_theta, rms_norm_eps, ...
#   model.safetensors        the weights by name (section 14), or shards and their index
#   tokenizer.json           the tokenizer (bpe.py reads and writes it)
#   tokenizer_config.json    which tokenizer class transformers should use, its special tokens
#   generation_config.json   the BOS/EOS ids generate() uses
# Three of its architectures are our GPT with particular switches on:
#   llama      SwiGLU MLP, RMSNorm with gains, RoPE, GQA; no QK-norm, no softcaps, no window
#   qwen3      llama + QK-norm (a gain of head_dim channels for q and for k, before RoPE, as ours)
#   qwen3_moe  qwen3 + MoE feed-forward in every decoder_sparse_step-th block: top_k experts
#              weighted by the softmax of the router's logits renormalised over the chosen ones
#              ("norm_topk_prob", which is our rule for top_k > 1; for top_k = 1 we weigh the
#              expert by its probability, which is norm_topk_prob off), no shared experts, no bias
# The configuration, field by field (ours -> config.json):
#   vocab_size, n_layer, n_embd       vocab_size, num_hidden_layers, hidden_size
#   n_head, n_kv_head, head_dim       num_attention_heads, num_key_value_heads, head_dim
#   mlp=swiglu, hidden_size           hidden_act=silu, intermediate_size
#   norm_eps, rope_theta              rms_norm_eps, rope_theta
#   rope_scaling, rope_factor         rope_scaling {rope_type linear|yarn, factor} (YaRN: only with
#                                     yarn_ramp=index, Hugging Face's blend; section 3)
#   block_size                        YaRN: rope_scaling.original_max_position_embeddings;
#                                     max_position_embeddings = max_context (block_size * rope_factor)
#   tie_embeddings                    tie_word_embeddings
#   n_experts, top_k, moe_every       num_experts, num_experts_per_tok, decoder_sparse_step
#   expert_hidden                     moe_intermediate_size
# The weights, by name (layer i, expert e; ours <- theirs, all under model.layers.i. but the ends):
#   transformer.wte                   model.embed_tokens
#   h.i.ln_1, h.i.ln_2                input_layernorm, post_attention_layernorm
#   h.i.attn.c_attn                   the rows of self_attn.q_proj, then k_proj, then v_proj
#   h.i.attn.c_proj                   self_attn.o_proj
#   h.i.attn.q_norm, k_norm           self_attn.q_norm, k_norm
#   h.i.mlp.c_fc                      the rows of mlp.gate_proj, then up_proj (MLP.forward: gate first)
#   h.i.mlp.c_proj                    mlp.down_proj
#   h.i.mlp.router                    mlp.gate
#   h.i.mlp.c_gate[e], c_fc[e], c_proj[e]   mlp.experts.e.gate_proj, up_proj, down_proj, transposed:
#                                     our stacks are (E, in, out), nn.Linear keeps (out, in)
#   transformer.ln_f, lm_head         model.norm, lm_head (absent when tied)
# RoPE needs no permutation of q and k: transformers rotates the pairs (i, i + D/2) ("rotate_half")
# with frequencies theta^(-2i/D), the convention of section 3. A norm without gain (norm_gain=False)
# is the same function as a gain of ones, so it is exported as ones. What the target architectures
# cannot express is refused with one line naming the switch to train with instead; an import
# refuses what GPT cannot express (biases, other RoPE scalings, sliding windows, ...).
# Imported, a folder is a checkpoint like ours (section 13): open_checkpoint("hf:DIR") returns the
# same dict, so sample.py (--ckpt=hf:DIR) and train.py (--init_from=hf:DIR) need nothing else.

HF_PREFIX = "hf:"                         # --ckpt=hf:DIR (sample.py), --init_from=hf:DIR (train.py)
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM"}
HF_HEAD_DIM = {"qwen3": 128}              # transformers' default head_dim where config.json has none
HF_SHARD_BYTES = 5 * 2 ** 30              # shard weights past 5 GB (transformers' classic max_shard_size)
HF_ROPE_BY_NAME = {"default": "none", "linear": "linear", "yarn": "yarn"}
HF_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq")  # older exports saved RoPE's table too


def hf_model_type(config):
    return "qwen3_moe" if config.n_experts else "qwen3" if config.qk_norm else "llama"


def hf_export_problems(model):
    """What in this model the Hugging Face architectures cannot express: one 'feature (train with
    --switch)' string each; empty when it exports."""
    c, problems = model.config, []

    def need(ok, feature, switch):
        if not ok:
            problems.append(f"{feature} (train with {switch})")
    need(c.mlp == "swiglu", f"the {c.mlp} MLP (Llama and Qwen3 MLPs are SwiGLU)", "--mlp=swiglu")
    need(c.logit_softcap == 0, "the logit softcap", "--logit_softcap=0")
    need(c.attn_softcap == 0, "the attention softcap", "--attn_softcap=0")
    need(not c.mtp, "the multi-token prediction head", "--mtp=False")
    need(c.window == 0, "the sliding attention window", "--window=0")
    need(c.n_shared_experts == 0, "shared experts (Qwen3-MoE has none)", "--n_shared_experts=0")
    need(c.n_experts == 0 or c.qk_norm, "MoE without QK-norm (Qwen3-MoE has it)", "--qk_norm=True")
    need(not any(layer.expert_bias.any() for layer in model.moe_layers()),
         "non-zero expert biases (aux-loss-free balancing chooses experts differently)", "--moe_bias_rate=0")
    need(c.rope_scaling != "yarn" or c.yarn_ramp == "index", "YaRN blended by turns", "--yarn_ramp=index")
    kinds = "".join(sorted(set(c.layer_kinds) - set("GW")))
    need(not kinds, f"{', '.join(LAYER_KINDS[k] for k in kinds)} layers", "--attn=softmax and no layer_pattern")
    need(c.attn_gate == "none", "the attention output gate", "--attn_gate=none")
    need(c.hc_streams == 1, "hyper-connections", "--hc_streams=1")
    need(not c.engram_layer_ids, "Engram memory", "--engram_layers=''")
    return problems


def hf_config(config, bos_id=None, eos_id=None, dtype=torch.float32):
    """config.json for a GPTConfig (the table above). Legacy keys rope_theta / rope_scaling /
    torch_dtype: every transformers version reads them (version 5 converts them itself)."""
    kind = hf_model_type(config)
    rope = None
    if config.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_scaling == "yarn":
        rope = {"rope_type": "yarn", "factor": config.rope_factor, "beta_fast": YARN_BETA,
                "beta_slow": YARN_ALPHA, "original_max_position_embeddings": config.block_size}
    out = {"architectures": [HF_ARCHITECTURES[kind]], "model_type": kind,
           "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
           "intermediate_size": config.hidden_size, "num_hidden_layers": config.n_layer,
           "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
           "head_dim": config.head_dim, "hidden_act": "silu",
           "max_position_embeddings": config.max_context, "rms_norm_eps": config.norm_eps,
           "rope_theta": config.rope_theta, "rope_scaling": rope, "attention_bias": False,
           "attention_dropout": 0.0, "tie_word_embeddings": config.tie_embeddings,
           "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
           "torch_dtype": next(k for k, v in DTYPES.items() if v == dtype)}
    if kind == "llama":
        out["mlp_bias"] = False
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    if kind == "qwen3_moe":
        out.update(num_experts=config.n_experts, num_experts_per_tok=config.top_k,
                   moe_intermediate_size=config.expert_hidden, decoder_sparse_step=config.moe_every,
                   mlp_only_layers=[], norm_topk_prob=config.top_k > 1,
                   router_aux_loss_coef=config.moe_aux_coef, output_router_logits=False)
    return out


def gpt_config_from_hf(hf, where):
    """The GPTConfig a config.json describes (the table above), or one line naming what GPT
    cannot express. Absent fields take the defaults of transformers' class for that model_type."""
    def refuse(what):
        raise bpe.UserError(f"{where}: {what}, which nanostack's GPT cannot express")
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if kind not in HF_ARCHITECTURES:
        raise bpe.UserError(f"{where}: model_type {kind!r} is not one nanostack imports "
                            f"({', '.join(HF_ARCHITECTURES)})")
    try:
        C, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        n_layer, vocab, max_pos = int(hf["num_hidden_layers"]), int(hf["vocab_size"]), int(hf["max_position_embeddings"])
        hidden = int(hf["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise bpe.UserError(f"{where}: no usable {bpe.first_line(e)}; config.json needs the model's sizes") from None
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']} (the gated MLP here is SwiGLU: silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            refuse(f"{flag}=true (GPT's projections have no biases)")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window") or layer_types != {"full_attention"}:
        refuse(f"sliding-window attention layers ({', '.join(sorted(layer_types))})")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor={hf['partial_rotary_factor']} (RoPE on part of each head)")
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        refuse("a RoPE per layer type")
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in HF_ROPE_BY_NAME:
        refuse(f"rope_scaling type {rope_type!r} (GPT has linear and YaRN scaling)")
    fields = dict(
        vocab_size=vocab, n_layer=n_layer, n_embd=C, n_head=H,
        n_kv_head=int(hf.get("num_key_value_heads") or H),
        mlp="swiglu", mlp_hidden=hidden, norm_gain=True, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=HF_ROPE_BY_NAME[rope_type], qk_norm=kind != "llama", logit_softcap=0.0,
        attn_softcap=0.0, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), block_size=max_pos)
    head_dim = int(hf.get("head_dim") or HF_HEAD_DIM.get(kind, C // H))
    fields["head_size"] = 0 if head_dim * H == C else head_dim
    if rope_type == "linear":
        fields["rope_factor"] = float(scaling["factor"])
        fields["block_size"] = max(1, math.floor(max_pos / fields["rope_factor"]))
    elif rope_type == "yarn":
        original = int(scaling.get("original_max_position_embeddings") or max_pos)
        factor = float(scaling.get("factor") or max_pos / original)
        if (scaling.get("beta_fast") or YARN_BETA) != YARN_BETA or (scaling.get("beta_slow") or YARN_ALPHA) != YARN_ALPHA:
            refuse(f"YaRN with beta_fast={scaling.get('beta_fast')}, beta_slow={scaling.get('beta_slow')} "
                   f"(GPT blends from {YARN_BETA:g} to {YARN_ALPHA:g} turns)")
        attention = scaling.get("attention_factor")
        if scaling.get("mscale") or scaling.get("mscale_all_dim") or (
                attention is not None and not math.isclose(attention, 0.1 * math.log(factor) + 1.0)):
            refuse("a YaRN attention factor other than 0.1 ln(factor) + 1")
        if scaling.get("truncate", True) is not True:
            refuse("YaRN without truncate (an unrounded ramp)")
        fields.update(rope_factor=factor, block_size=original, yarn_ramp="index")
    n_experts = int(hf.get("num_experts", hf.get("num_local_experts")) or 0)  # transformers 5 writes the second
    if kind == "qwen3_moe" and n_experts:
        top_k = int(hf.get("num_experts_per_tok", 8))
        if hf.get("mlp_only_layers"):
            refuse(f"dense layers listed by mlp_only_layers={hf['mlp_only_layers']} (GPT places MoE "
                   f"layers every moe_every blocks)")
        if bool(hf.get("norm_topk_prob", False)) != (top_k > 1):
            refuse(f"norm_topk_prob={hf.get('norm_topk_prob', False)} with {top_k} experts per token (GPT "
                   f"renormalises the gates over the chosen experts exactly when top_k > 1)")
        fields.update(n_experts=n_experts, top_k=top_k,
                      moe_hidden=int(hf.get("moe_intermediate_size", hidden)),
                      moe_every=int(hf.get("decoder_sparse_step", 1)),
                      moe_aux_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise bpe.UserError(f"{where}: {e}") from None


def hf_weight_map(config):
    """Every weight as (our name, [(Hugging Face name, its shape), ...], how): how = "same" (one
    tensor as it is), "rows" (ours is theirs concatenated by rows) or "experts" (ours is the (E, in,
    out) stack of their (out, in) matrices, transposed). The one table both directions read."""
    C, D, H, Hkv, V = config.n_embd, config.head_dim, config.n_head, config.n_kv_head, config.vocab_size
    rows = [("transformer.wte.weight", [("model.embed_tokens.weight", (V, C))], "same")]
    for i in range(config.n_layer):
        ours, layer = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = layer + "self_attn.", layer + "mlp."
        rows += [(ours + "ln_1.weight", [(layer + "input_layernorm.weight", (C,))], "same"),
                 (ours + "attn.c_attn.weight", [(attn + "q_proj.weight", (H * D, C)),
                                                (attn + "k_proj.weight", (Hkv * D, C)),
                                                (attn + "v_proj.weight", (Hkv * D, C))], "rows"),
                 (ours + "attn.c_proj.weight", [(attn + "o_proj.weight", (C, H * D))], "same")]
        if config.qk_norm:
            rows += [(ours + "attn.q_norm.weight", [(attn + "q_norm.weight", (D,))], "same"),
                     (ours + "attn.k_norm.weight", [(attn + "k_norm.weight", (D,))], "same")]
        rows.append((ours + "ln_2.weight", [(layer + "post_attention_layernorm.weight", (C,))], "same"))
        if config.is_moe_layer(i):
            E, Hm = config.n_experts, config.expert_hidden
            rows.append((ours + "mlp.router.weight", [(mlp + "gate.weight", (E, C))], "same"))
            for mine, theirs, shape in (("c_gate", "gate_proj", (Hm, C)), ("c_fc", "up_proj", (Hm, C)),
                                        ("c_proj", "down_proj", (C, Hm))):
                rows.append((ours + "mlp." + mine,
                             [(f"{mlp}experts.{e}.{theirs}.weight", shape) for e in range(E)], "experts"))
        else:
            Hd = config.hidden_size
            rows += [(ours + "mlp.c_fc.weight", [(mlp + "gate_proj.weight", (Hd, C)),
                                                 (mlp + "up_proj.weight", (Hd, C))], "rows"),
                     (ours + "mlp.c_proj.weight", [(mlp + "down_proj.weight", (C, Hd))], "same")]
    rows.append(("transformer.ln_f.weight", [("model.norm.weight", (C,))], "same"))
    if not config.tie_embeddings:
        rows.append(("lm_head.weight", [("lm_head.weight", (V, C))], "same"))
    return rows


def hf_tensors(model, dtype=torch.float32):
    """The model's weights under Hugging Face's names: {name: contiguous CPU tensor of dtype}."""
    state = model.state_dict()
    out = {}
    for ours, theirs, how in hf_weight_map(model.config):
        w = state.get(ours)
        if w is None:  # a norm without gain (norm_gain=False): the function of a gain of ones
            assert not model.config.norm_gain, ours
            w = torch.ones(theirs[0][1])
        if how == "same":
            parts = [w]
        elif how == "rows":
            parts = w.split([shape[0] for _, shape in theirs])
        else:
            parts = [m.t() for m in w.unbind(0)]
        for (name, shape), part in zip(theirs, parts):
            out[name] = part.detach().to("cpu", dtype).contiguous()
    return out


def gpt_state_from_hf(config, tensors, where):
    """Our state_dict from Hugging Face's tensors (hf_weight_map read backwards). A missing
    tensor, a wrong shape or a tensor with no place in GPT is one line."""
    state, used = {}, set()
    for ours, theirs, how in hf_weight_map(config):
        parts = []
        for name, shape in theirs:
            t = tensors.get(name)
            if t is None:
                raise bpe.UserError(f"{where} has no tensor {name}, which its config.json implies; "
                                    f"the folder is incomplete or of another architecture")
            if tuple(t.shape) != shape:
                raise bpe.UserError(f"{where}: {name} has shape {list(t.shape)}, its config.json "
                                    f"implies {list(shape)}")
            parts.append(t)
            used.add(name)
        if how == "same":
            state[ours] = parts[0]
        elif how == "rows":
            state[ours] = torch.cat(parts, dim=0)
        else:
            state[ours] = torch.stack([p.t() for p in parts])
    for i in range(config.n_layer):
        if config.is_moe_layer(i):
            state[f"transformer.h.{i}.mlp.expert_bias"] = torch.zeros(config.n_experts)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]   # our state_dict names both
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()   # transformers ties it anyway
    extra = sorted(n for n in set(tensors) - used - tied_head if not HF_IGNORED_TENSORS.fullmatch(n))
    if extra:
        raise bpe.UserError(f"{where}: tensor {extra[0]} ({len(extra)} such) has no place in the model "
                            f"its config.json describes (a feature GPT lacks, such as biases)")
    return state


def load_hf(folder):
    """Import a Hugging Face folder as a checkpoint dict of section 13: "model" (our state_dict),
    "model_config", "tokenizer" (from tokenizer.json), "tokenizer_fingerprint", plus "hf_config"
    (the config.json read). Every problem is one line."""
    if not os.path.isdir(folder):
        raise bpe.UserError(f"{HF_PREFIX}{folder}: no such folder; give a folder holding config.json, "
                            f"model.safetensors and tokenizer.json")
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise bpe.UserError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise bpe.UserError(f"cannot read {config_path} ({bpe.first_line(e)})") from None
    config = gpt_config_from_hf(hf, config_path)
    tokenizer = bpe.Tokenizer.from_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    if tokenizer.vocab_size > config.vocab_size:
        raise bpe.UserError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens, the model only "
                            f"{config.vocab_size}; the two files do not belong together")
    state = gpt_state_from_hf(config, read_hf_weights(folder), folder)
    return {"model": state, "model_config": dataclasses.asdict(config), "hf_config": hf,
            "tokenizer": tokenizer.as_vocab_merges(), "tokenizer_fingerprint": tokenizer.fingerprint}


def open_checkpoint(path):
    """The one loader of train.py (--resume, --init_from) and sample.py (--ckpt): hf:DIR imports a
    Hugging Face folder (load_hf), anything else is a checkpoint file of ours (load_checkpoint).
    Either way the result is the dict of section 13."""
    if path.startswith(HF_PREFIX):
        return load_hf(path[len(HF_PREFIX):])
    return load_checkpoint(path)


def write_json(path, obj):
    bpe.atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def export_hf(model, tokenizer, folder, dtype=torch.float32, overwrite=False, max_shard_bytes=HF_SHARD_BYTES):
    """Write model and tokenizer as a Hugging Face folder (the files of the section comment).
    Refuses, in one line, a model the target cannot express and a folder that already holds files
    (unless overwrite). Each file is written atomically, config.json last. Returns the paths."""
    problems = hf_export_problems(model)
    if problems:
        raise bpe.UserError(f"cannot export to the Hugging Face format: {'; '.join(problems)}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise bpe.UserError(f"{folder} is a file; give the folder to export into")
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if present and not overwrite:
        raise bpe.UserError(f"{folder} already holds files ({', '.join(present[:3])}{', ...' if len(present) > 3 else ''}); "
                            f"export into a new or empty folder, or pass --overwrite=True to replace them")
    os.makedirs(folder, exist_ok=True)
    paths = write_hf_weights(folder, hf_tensors(model, dtype), max_shard_bytes, metadata={"format": "pt"})
    bos = tokenizer.special_tokens.get(bpe.EOT)
    paths.append(os.path.join(folder, "tokenizer.json"))
    tokenizer.save_tokenizer_json(paths[-1])
    specials = {"bos_token": bpe.EOT, "eos_token": bpe.EOT} if bos is not None else {}
    files = {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                       "model_max_length": model.config.max_context,
                                       "clean_up_tokenization_spaces": False, **specials},
             "generation_config.json": {"bos_token_id": bos, "eos_token_id": bos},
             "config.json": hf_config(model.config, bos, bos, dtype)}
    for name, obj in files.items():
        paths.append(os.path.join(folder, name))
        write_json(paths[-1], obj)
    return paths

# -----------------------------------------------------------------------------
# 16. main: print the architecture, run a forward/backward on random tokens


ARCH_TABLE_CONTEXT = 4096   # the context at which the architecture table gives the cache memory


def architecture_table(model):
    """The default architecture as text: parameters per component, FLOPs/token, KV bytes/token."""
    c = model.config
    total = model._param_table()
    moe = c.n_experts > 0 or bool(c.engram_layer_ids)   # an "active" column: MoE, Engram tables
    lines = [f"{'component':<22} {'params':>12}" + (f" {'active':>12}" if moe else "")]
    for name, (n, a) in total.items():
        lines.append(f"{name:<22} {n:>12,}" + (f" {a:>12,}" if moe else ""))
    lines.append(f"{'total':<22} {model.num_params():>12,}"
                 + (f" {model.num_params(active=True):>12,}" if moe else ""))
    s = model.param_summary()
    if s["memory"]:
        lines.append(f"dense {s['dense']:,} + memory {s['memory']:,} (Engram tables, looked up: no "
                     f"FLOPs); active per token {s['active']:,}")
    f = model.flops_per_token()
    lines.append(f"FLOPs/token (fwd+bwd, T={c.block_size}): {f:,} ({f / 1e6:.1f} MFLOP)")
    kinds = c.layer_kinds
    if kinds != kinds[0] * len(kinds) or kinds[0] != "G":
        counts = ", ".join(f"{kinds.count(k)} {LAYER_KINDS[k]}" for k in LAYER_KINDS if k in kinds)
        lines.append(f"layers: {kinds} ({counts})")
    lines.append(f"KV cache per token: {model.kv_cache_bytes_per_token(torch.bfloat16):,} bytes "
                 f"(bf16), {model.kv_cache_bytes_per_token(torch.float32):,} bytes (fp32)"
                 + (f"; n-gram history {model.cache_bytes_per_row():,} bytes per row"
                    if model.cache_bytes_per_row() else ""))
    if model.cache_state_bytes():
        # linear layers: a state of fixed size, the same at every context length
        lines.append(f"  + linear attention state: {model.cache_state_bytes():,} bytes per sequence "
                     f"(fp32), at any context")
    context = ARCH_TABLE_CONTEXT
    lines.append(f"cache of one {context}-token sequence: {model.cache_bytes(context) / 2 ** 20:.2f} MiB (bf16)")
    return "\n".join(lines)


def _alternate(fns, repeats):
    """Run the functions in turn, `repeats` rounds, and return each one's median seconds.
    Alternating (a, b, a, b, ...) spreads the noise of a shared machine evenly over all."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


def bench(config, repeats=7):
    """The SDPA path against the hand-written attention: a training step (forward + backward) of
    the same model both ways, in one process, alternating, medians. (What the KV cache buys is
    measured where it is used: `python sample.py --bench=True`.)"""
    torch.manual_seed(0)
    fast = GPT(config)
    slow = GPT(dataclasses.replace(config, attn_impl="manual"))
    slow.load_state_dict(fast.state_dict())
    T = config.block_size
    idx = torch.randint(config.vocab_size, (4, T))

    def train_step(m):
        loss, _ = m(idx, idx)
        loss.backward()
    t_sdpa, t_manual = _alternate([lambda: train_step(fast), lambda: train_step(slow)], repeats)
    print(f"fwd+bwd B=4 T={T}: sdpa {t_sdpa * 1e3:.1f} ms, manual {t_manual * 1e3:.1f} ms "
          f"(manual/sdpa = {t_manual / t_sdpa:.2f}x)")


def gpt_config(settings, **changes):
    """GPTConfig from any settings object that carries its fields (train.py's TrainConfig and
    ModelSettings below extend GPTConfig), with `changes` applied; one line on a bad value."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(GPTConfig)}
    try:
        return GPTConfig(**{**fields, **changes})
    except ValueError as e:
        raise bpe.UserError(f"bad model settings: {e}") from None


@dataclasses.dataclass
class ModelSettings(GPTConfig):
    """`python model.py`'s settings: every GPTConfig field, plus what to do with the model."""
    bench: bool = False             # also time SDPA against the hand-written attention (fwd + bwd)
    bench_attention: bool = False   # only time the Triton kernel vs SDPA vs hand-written attention (fwd + bwd, bf16, T = 512..4096)


# Attention benchmark sizes: FlashAttention-2's setup (B * T = 16k tokens, n_head * head_dim = 2048),
# causal, bfloat16, forward + backward. On CPU the kernel runs in Triton's interpreter, so the
# sizes shrink to something that finishes; those timings say nothing about speed.
BENCH_ATTN_GPU = dict(lengths=(512, 1024, 2048, 4096), head_dims=(64, 128), tokens=16384, width=2048)
BENCH_ATTN_CPU = dict(lengths=(64, 128), head_dims=(16, 32), tokens=256, width=64)


def bench_attention(device=None, lengths=None, head_dims=None, tokens=None, width=None, repeats=5):
    """Time forward + backward of causal self-attention, bf16: the Triton kernel (section 5b),
    SDPA (its flash backend on CUDA) and manual_attention, alternating, medians, warm-up outside
    the clock. Prints one row per (T, head_dim) with ms and TFLOP/s of each, and how far the
    kernel's output and gradients are from SDPA's, max |triton - sdpa| / max |sdpa| (a
    correctness check on the GPU too: bf16 rounding alone gives up to about 2 eps = 0.016).
    FLOPs: the forward is 2 matmuls (q k^T, p v) of 2 T^2 D each per head, halved by the causal
    mask; the backward is 5 such matmuls (q k^T again, dV, dP, dQ, dK), so fwd + bwd = 3.5 x
    4 B H T^2 D / 2 (the convention of the FlashAttention papers)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = BENCH_ATTN_GPU if device.type == "cuda" else BENCH_ATTN_CPU
    lengths, head_dims = lengths or sizes["lengths"], head_dims or sizes["head_dims"]
    tokens, width = tokens or sizes["tokens"], width or sizes["width"]
    _flash_ready(device)   # one line and stop if the kernel cannot run here
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"triton {triton.__version__}")
    else:
        print("device: CPU, Triton interpreter: a check that the benchmark runs; the times are "
              "not the kernel's speed")

    def flash_only():  # a fresh context each call: sdpa_kernel is a one-shot generator
        if device.type != "cuda":
            return contextlib.nullcontext()
        return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    header = (f"{'T':>5} {'D':>4} {'B':>3} {'H':>3} | {'triton ms':>9} {'sdpa ms':>9} {'manual ms':>9} | "
              f"{'triton TF/s':>11} {'sdpa TF/s':>9} {'manual TF/s':>11} | rel. diff out, grads")
    print(header)
    for T in lengths:
        for D in head_dims:
            B, H = max(1, tokens // T), max(1, width // D)
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()

            def sdpa(q, k, v):
                with flash_only():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            impls = {"triton": lambda q, k, v: flash_attention(q, k, v), "sdpa": sdpa,
                     "manual": lambda q, k, v: manual_attention(q, k, v, causal)}
            results, fns = {}, {}
            for name, attn in impls.items():
                def step(attn=attn, name=name):
                    out = attn(q, k, v)
                    grads = torch.autograd.grad(out, (q, k, v), do)
                    sync()
                    results[name] = (out, *grads)
                try:
                    step()                                   # warm-up: compiles the kernels
                    fns[name] = step
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    results.pop(name, None)
            times = dict(zip(fns, _alternate(list(fns.values()), repeats)))
            flops = 3.5 * 4 * B * H * T * T * D / 2
            ms = [f"{times[n] * 1e3:9.2f}" if n in times else f"{'OOM':>9}" for n in impls]
            tfs = [f"{flops / times[n] / 1e12:.1f}" if n in times else "-" for n in impls]
            diff = "-"
            if "triton" in results and "sdpa" in results:
                rel = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                       for a, b in zip(results["triton"], results["sdpa"])]
                diff = f"{rel[0]:.4f}, {max(rel[1:]):.4f}"
            print(f"{T:>5} {D:>4} {B:>3} {H:>3} | {ms[0]} {ms[1]} {ms[2]} | {tfs[0]:>11} {tfs[1]:>9} "
                  f"{tfs[2]:>11} | {diff}")


def main():
    settings = bpe.parse_settings(ModelSettings, sys.argv[1:], description=__doc__)
    if settings.bench_attention:
        return bench_attention()
    config = gpt_config(settings)
    torch.manual_seed(0)
    model = GPT(config)
    print(config)
    print(architecture_table(model))
    B, T = 2, config.block_size
    idx = torch.randint(config.vocab_size, (B, T))
    t0 = time.perf_counter()
    loss, aux = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    dt = time.perf_counter() - t0
    aux_text = "".join(f", {k} {v.item():.3f}" for k, v in aux.items())
    print(f"forward/backward on random tokens (B={B}, T={T}): loss {loss.item():.3f} "
          f"(uniform guess: ln(vocab) = {math.log(config.vocab_size):.3f}){aux_text}, "
          f"{dt * 1e3:.0f} ms")
    if settings.bench:
        bench(config)


if __name__ == "__main__":
    bpe.main_guard(main)
