#!/usr/bin/env python3
"""Write a tiny random-weight Qwen3-architecture GGUF for llama-server tests.

    PYTHONPATH=<llama.cpp>/gguf-py python make_tiny_model.py \
        --vocab <llama.cpp>/models/ggml-vocab-qwen2.gguf \
        --template <llama.cpp>/models/templates/Qwen-Qwen3-0.6B.jinja \
        --out tiny-qwen3.gguf [--n-ctx-train 32768] [--seed 0]

The model's *text* is gibberish (random weights), but everything around the
weights is real: a real BPE tokenizer (Qwen2/Qwen3 vocab and merges, so token
counts, prompt caching and context limits behave like a real model's), the
real Qwen3 chat template (so llama-server's --jinja template rendering,
reasoning parsing and tool-call grammar are the ones a real Qwen3 gets), and
a real transformer graph that llama.cpp evaluates on the CPU in milliseconds.

Needs only gguf-py (vendored in llama.cpp's source) and numpy. No download.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import gguf

# Architecture: "qwen3" (not "qwen2") because that is what a real Qwen3-0.6B
# GGUF says, so llama.cpp takes the same code path (per-head q/k RMSNorm, no
# qkv bias). The template, not the architecture, drives the chat format.
ARCH = "qwen3"

# Sizes: as small as llama.cpp accepts while keeping the usual structure.
# 64-dim hidden, 4 query heads and 2 KV heads (grouped-query attention, as in
# Qwen3) of head dim 16 (Qwen3 requires n_rot == head_dim), 2 layers. The
# embedding (151936 x 64, tied with the output head like Qwen3-0.6B) is
# almost the whole file (~19 MB as F16); each token costs ~10 M multiply-adds,
# so prompts of ~10k tokens are processed in about a second on 2 cores.
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = 16
N_FF = 128
N_LAYER = 2

# The vendored ggml-vocab-qwen2.gguf (Qwen2 tokenizer) has the same 151936
# slots as Qwen3's, but ids 151646..151668 are "[PADnnnnn]" placeholders.
# Qwen2.5/Qwen3 define them as the added tokens below (same ids as Qwen3's
# tokenizer.json). Putting them back makes "<think>", "</think>",
# "<tool_call>" and "</tool_call>" single tokens as in the real model, so the
# Qwen3 template's markup tokenizes (and is counted) realistically, and a test
# can name them in logit_bias. Types: USER_DEFINED (4) for the reasoning and
# tool markup (always parsed from text and printed as text, which
# llama-server's reasoning / tool-call parsers rely on); CONTROL (3) for the
# rest (never printed as text; llama.cpp would otherwise warn at load that
# the <|fim_*|>-like ones "look like control tokens" and retype them anyway).
CONTROL, USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
QWEN3_ADDED_TOKENS = {
    151646: ("<|object_ref_start|>", CONTROL),
    151647: ("<|object_ref_end|>", CONTROL),
    151648: ("<|box_start|>", CONTROL),
    151649: ("<|box_end|>", CONTROL),
    151650: ("<|quad_start|>", CONTROL),
    151651: ("<|quad_end|>", CONTROL),
    151652: ("<|vision_start|>", CONTROL),
    151653: ("<|vision_end|>", CONTROL),
    151654: ("<|vision_pad|>", CONTROL),
    151655: ("<|image_pad|>", CONTROL),
    151656: ("<|video_pad|>", CONTROL),
    151657: ("<tool_call>", USER_DEFINED),
    151658: ("</tool_call>", USER_DEFINED),
    151659: ("<|fim_prefix|>", CONTROL),
    151660: ("<|fim_middle|>", CONTROL),
    151661: ("<|fim_suffix|>", CONTROL),
    151662: ("<|fim_pad|>", CONTROL),
    151663: ("<|repo_name|>", CONTROL),
    151664: ("<|file_sep|>", CONTROL),
    151665: ("<tool_response>", USER_DEFINED),
    151666: ("</tool_response>", USER_DEFINED),
    151667: ("<think>", USER_DEFINED),
    151668: ("</think>", USER_DEFINED),
}
ENDOFTEXT_ID = 151643  # <|endoftext|>: bos/pad, as in Qwen3's GGUFs
IM_END_ID = 151645     # <|im_end|>: eos of Qwen3 instruct models (ends a turn)


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    if f is None:
        sys.exit(f"error: {key} missing from the vocab GGUF")
    return f.contents()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", required=True, type=Path, help="vocab-only GGUF (llama.cpp models/ggml-vocab-qwen2.gguf)")
    ap.add_argument("--template", required=True, type=Path, help="Jinja chat template (models/templates/Qwen-Qwen3-0.6B.jinja)")
    ap.add_argument("--out", required=True, type=Path)
    # 32768 by default: llama-server's `-c 0` (and some defaults) take the
    # context size from the model, and Codex-sized prompts (~10k tokens) must
    # fit unless a test asks for a context error by passing a small `-c`.
    # llama.cpp only warns when -c exceeds this, so it is a default, not a cap.
    ap.add_argument("--n-ctx-train", type=int, default=32768, help="context_length metadata (>= 4096; default 32768)")
    ap.add_argument("--seed", type=int, default=0, help="weights RNG seed (the file is byte-identical for a given seed)")
    ap.add_argument("--no-added-tokens", action="store_true",
                    help="keep the vocab's [PAD] placeholders instead of Qwen3's <think>/<tool_call> tokens")
    args = ap.parse_args()
    if args.n_ctx_train < 4096:
        ap.error("--n-ctx-train must be >= 4096")

    vocab = gguf.GGUFReader(args.vocab)
    tokens = list(field(vocab, "tokenizer.ggml.tokens"))
    types = [int(t) for t in field(vocab, "tokenizer.ggml.token_type")]
    merges = list(field(vocab, "tokenizer.ggml.merges"))
    if not args.no_added_tokens:
        for tid, (text, ttype) in QWEN3_ADDED_TOKENS.items():
            if tid < len(tokens) and tokens[tid].startswith("[PAD"):
                tokens[tid], types[tid] = text, ttype
    n_vocab = len(tokens)
    template = args.template.read_text(encoding="utf-8")

    w = gguf.GGUFWriter(str(args.out), ARCH)
    w.add_name("tiny-random-qwen3")
    w.add_description("random weights for tests; Qwen2/3 tokenizer and Qwen3 chat template")
    w.add_context_length(args.n_ctx_train)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(1_000_000.0)   # Qwen3's value
    w.add_layer_norm_rms_eps(1e-6)      # Qwen3's value
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    # Tokenizer: copied from the vocab GGUF (gpt2-style BPE, "qwen2" pre-tokenizer).
    w.add_tokenizer_model(field(vocab, "tokenizer.ggml.model"))
    w.add_tokenizer_pre(field(vocab, "tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # Ids as in Qwen3's own GGUFs: no BOS is prepended; <|im_end|> ends a turn.
    w.add_bos_token_id(ENDOFTEXT_ID)
    w.add_eos_token_id(IM_END_ID)
    w.add_pad_token_id(ENDOFTEXT_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(template)

    # Weights: deterministic (fixed seed). Matrices are F16 (halves the file;
    # llama.cpp's CPU backend handles F16 matmuls), norms must be F32. Small
    # normal init keeps activations finite; norm weights of 1 are the identity.
    rng = np.random.default_rng(args.seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        # numpy shape (rows, cols) is ggml shape {cols, rows}: {n_in, n_out}.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # No output.weight: like Qwen3-0.6B, the output head is tied to token_embd.
    w.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD))
    w.add_tensor("output_norm.weight", ones(N_EMBD))
    for i in range(N_LAYER):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones(N_EMBD))
        w.add_tensor(f"{b}.attn_q.weight", mat(N_HEAD * HEAD_DIM, N_EMBD))
        w.add_tensor(f"{b}.attn_k.weight", mat(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(f"{b}.attn_v.weight", mat(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(f"{b}.attn_output.weight", mat(N_EMBD, N_HEAD * HEAD_DIM))
        w.add_tensor(f"{b}.attn_q_norm.weight", ones(HEAD_DIM))
        w.add_tensor(f"{b}.attn_k_norm.weight", ones(HEAD_DIM))
        w.add_tensor(f"{b}.ffn_norm.weight", ones(N_EMBD))
        w.add_tensor(f"{b}.ffn_gate.weight", mat(N_FF, N_EMBD))
        w.add_tensor(f"{b}.ffn_up.weight", mat(N_FF, N_EMBD))
        w.add_tensor(f"{b}.ffn_down.weight", mat(N_EMBD, N_FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {ARCH}, vocab {n_vocab}, "
          f"n_embd {N_EMBD}, {N_LAYER} layers, n_ctx_train {args.n_ctx_train}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
