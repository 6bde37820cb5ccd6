"""Sampling from a trained model: temperature, top-k, top-p, with a KV cache.

With the cache, the prompt is run once (prefill) and each new token costs one
position (an MLA model's decode steps attend in the latent space, ``--mla-decode absorbed``, the default:
:meth:`moetrain.model.mla.MLA.absorbed`); without it every step re-runs the whole sequence. Both give the same
tokens for token-choice routing (top-K, group-limited, sigmoid, hash) without
evaluation capacity. Expert-choice routing and an evaluation capacity factor look
across the tokens of a forward, so they are not causal: their generations depend
on how many tokens each forward sees.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from moetrain.errors import check_arg, guarded_main
from moetrain.model.apply import apply_slot_sum
from moetrain.model.mla import set_absorbed_decode
from moetrain.model.transformer import Transformer


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B]: greedy at temperature 0; else softmax(logits / T) restricted to the
    ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Prompt plus up to ``max_new_tokens`` sampled tokens [B, S + n] (stops early when every
    row produced ``eos_id``; rows that finished are padded with it)."""
    model.eval()
    device = model.embed.weight.device
    tokens = prompt_BS.to(device)
    B, S = tokens.shape
    if S + max_new_tokens > model.max_seq_len:
        raise ValueError(
            f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len {model.max_seq_len}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    caches = model.new_kv_caches(B, S + max_new_tokens) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(tokens, caches, 0).logits[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if caches is not None:
            logits = model(nxt[:, None], caches, tokens.shape[1] - 1).logits[:, -1]
        else:
            logits = model(tokens).logits[:, -1]
    return tokens


def check_sampling_args(args: Any) -> Any:
    """Each sampling flag in its range (one :class:`~moetrain.errors.ArgumentError` line): ``--top-p 0``
    dropped every token (NaN probabilities), ``--top-k -3`` failed inside ``topk``."""
    check_arg("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be >= 1")
    check_arg("--num-samples", args.num_samples, args.num_samples >= 1, "must be >= 1")
    check_arg(
        "--temperature", args.temperature, 0 <= args.temperature < math.inf, "must be finite and >= 0 (0 = greedy)"
    )
    if args.top_k is not None:
        check_arg("--top-k", args.top_k, args.top_k >= 1, "must be >= 1 (the k most likely tokens)")
    if args.top_p is not None:
        check_arg("--top-p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1] (1 = no nucleus cut)")
    return args


def build_parser() -> Any:
    """``moetrain-generate``'s arguments."""
    import argparse

    from moetrain.threads import add_threads_flag

    p = argparse.ArgumentParser(description="Sample text from a moetrain checkpoint (KV cache, CPU or GPU).")
    p.add_argument("checkpoint", help="a checkpoint directory (or a run directory: its newest checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (for checking)")
    p.add_argument(
        "--mla-decode",
        choices=("absorbed", "expanded"),
        default="absorbed",
        help="MLA models' cached decode: in the latent space (W^UK, W^UV absorbed) or re-expanding the latents",
    )
    add_threads_flag(p)
    return p


def _main(argv: list[str] | None = None) -> None:
    """``moetrain-generate CHECKPOINT --prompt "..."``."""
    from moetrain.data import build_tokenizer
    from moetrain.threads import set_threads
    from moetrain.tools.export import load_checkpoint_model

    p = build_parser()
    args = check_sampling_args(p.parse_args(argv))
    set_threads(args.threads)

    model, cfg, _ = load_checkpoint_model(args.checkpoint)
    model = apply_slot_sum(model.to(args.device), torch.device(args.device))
    set_absorbed_decode(model, args.mla_decode == "absorbed")
    if args.device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    ids = torch.tensor([[int(t) for t in tokenizer.encode(args.prompt)]] * args.num_samples)
    if ids.shape[1] == 0:
        raise SystemExit("moetrain-generate: --prompt is empty")
    budget = model.max_seq_len - ids.shape[1]
    if budget <= 0:
        raise SystemExit(f"moetrain-generate: the prompt is longer than the model's context ({model.max_seq_len})")
    if args.max_new_tokens > budget:
        print(
            f"moetrain-generate: note: --max-new-tokens={args.max_new_tokens} capped at {budget} (the model's "
            f"context of {model.max_seq_len} tokens less the prompt's {ids.shape[1]})",
            file=sys.stderr,
        )
    out = generate(
        model,
        ids,
        min(args.max_new_tokens, budget),
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        use_cache=not args.no_cache,
        eos_id=tokenizer.eos_id,
    )
    for row in out.tolist():
        text = tokenizer.decode([t for t in row if t != tokenizer.eos_id])
        print(text)
        print("-" * 40)


def main(argv: list[str] | None = None) -> None:
    """``moetrain-generate``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    guarded_main("moetrain-generate", lambda: _main(argv))


if __name__ == "__main__":
    main()
