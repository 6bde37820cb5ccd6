"""``moetrain-inspect CHECKPOINT [--text "..."]``: which experts each token is routed to.

For every token of the text and every MoE layer it prints the experts the router
chose, with their combine weights, as a terminal table, and writes a
self-contained HTML page (``--html``, default ``RUN_DIR/routes.html``) that colours each
token by its top expert, one row per layer (hover a token for all its experts).
``--corpus N`` adds per-expert statistics over N validation sequences (64 by default without
``--text``), on the terminal and in the page: each expert's share of the tokens and the tokens and
character classes it takes most.

The routes are read where each MoE layer hands its assignments to its dispatcher
during one ordinary forward, so they are exactly what the experts computed.
"""

from __future__ import annotations

import argparse
import html
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrain.errors import check_arg, guarded_main
from moetrain.model.transformer import Transformer
from moetrain.threads import add_threads_flag, set_threads

# Categorical colours for expert ids: expert e uses PALETTE[e % 16] and PATTERNS[e // 16 % 4] (64 distinct).
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
]  # fmt: skip


PATTERNS = [
    "",
    "repeating-linear-gradient(45deg, rgba(255,255,255,.55) 0 2px, transparent 2px 6px)",
    "radial-gradient(rgba(255,255,255,.7) 1.2px, transparent 1.4px) 0 0 / 5px 5px",
    "repeating-linear-gradient(0deg, rgba(0,0,0,.45) 0 2px, transparent 2px 5px)",
]
"""Overlays on the colour, by expert // 16: solid, diagonal stripes, dots, horizontal bars."""


def expert_style(e: int) -> str:
    """CSS ``background`` and text ``color`` of expert ``e``: one of 16 colours x 4 patterns, distinct for up to
    64 experts, with dark text on light colours and white on dark ones (white on the pale ones was unreadable)."""
    colour, pattern = PALETTE[e % len(PALETTE)], PATTERNS[(e // len(PALETTE)) % len(PATTERNS)]
    background = f"{pattern}, {colour}" if pattern else colour
    return f"background:{background};color:{text_colour(colour)}"


def text_colour(hex_colour: str) -> str:
    """``#111`` or ``#fff``, whichever contrasts more with the colour (WCAG relative luminance, threshold 0.18)."""
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "#111" if luminance > 0.18 else "#fff"


@dataclass
class LayerRoutes:
    """Routes of one MoE layer for T tokens (kept assignments only)."""

    experts: list[list[int]]
    """Per token, its experts, highest weight first."""
    weights: list[list[float]]
    """Per token, the matching combine weights."""


class _CapturingDispatcher:
    """Delegates to a layer's dispatcher and records the (token, expert, weight) assignments it is given."""

    def __init__(self, inner: Any, layer: int, into: dict[int, Any]) -> None:
        self.inner, self.layer, self.into = inner, layer, into

    def run(self, experts: Any, x_TD: torch.Tensor, token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor,
            weight_A: torch.Tensor, *rest: Any, **kw: Any) -> Any:  # fmt: skip
        self.into[self.layer] = (
            x_TD.shape[0],
            token_idx_A.clone(),
            expert_idx_A.clone(),
            weight_A.detach().float().clone(),
        )
        return self.inner.run(experts, x_TD, token_idx_A, expert_idx_A, weight_A, *rest, **kw)

    def __getattr__(self, name: str) -> Any:  # dispatch, combine, num_local_experts, ...
        return getattr(self.inner, name)


@torch.no_grad()
def routes_for(model: Transformer, tokens_BS: torch.Tensor) -> dict[int, LayerRoutes]:
    """Each MoE layer's routing of the tokens (batch flattened), as dispatched in one ordinary forward.

    The (token, expert, weight) assignments are read where the layer hands them to
    its dispatcher, after capacity dropping, so they are exactly what the experts
    computed.
    """
    captured: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    originals = {}
    for i, layer in model.moe_layers().items():
        originals[i] = layer.dispatcher
        # A wrapper around whatever dispatcher the layer has (the fused one included): it sees every kept
        # assignment the layer hands over.
        layer.dispatcher = _CapturingDispatcher(layer.dispatcher, i, captured)  # type: ignore[assignment]
    try:
        model.eval()
        model(tokens_BS)
    finally:
        for i, layer in model.moe_layers().items():
            layer.dispatcher = originals[i]
    out = {}
    for i, (T, token_idx, expert_idx, weight) in sorted(captured.items()):
        per_token: list[list[tuple[float, int]]] = [[] for _ in range(T)]
        for t, e, w in zip(token_idx.tolist(), expert_idx.tolist(), weight.tolist()):
            per_token[t].append((w, e))
        ranked = [sorted(pairs, key=lambda p: (-p[0], p[1])) for pairs in per_token]
        out[i] = LayerRoutes([[e for _, e in r] for r in ranked], [[w for w, _ in r] for r in ranked])
    return out


def token_pieces(tokenizer, ids: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """Readable text of each token (bytes of a split UTF-8 character shown as \\xNN)."""
    pieces = []
    for t in ids:
        if getattr(tokenizer, "name", "") == "byte" and t < 256:
            b = bytes([t])
            pieces.append(b.decode("utf-8") if t < 128 else f"\\x{t:02x}")
        else:
            pieces.append(tokenizer.decode([t]))
    return pieces


def _show(piece: str) -> str:
    return piece.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")


def terminal_table(pieces: list[str], routes: dict[int, LayerRoutes]) -> str:
    layers = list(routes)
    header = ["#", "token"] + [f"layer {i}" for i in layers]
    rows = []
    for t, piece in enumerate(pieces):
        cells = [
            " ".join(f"e{e}:{w:.2f}" for e, w in zip(routes[i].experts[t], routes[i].weights[t])) or "(dropped)"
            for i in layers
        ]
        rows.append([str(t), repr(piece)[1:-1], *cells])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def html_page(pieces: list[str], routes: dict[int, LayerRoutes], title: str, stats: str | None = None) -> str:
    """A self-contained page: per layer, the text with each token coloured by its top expert; then the per-expert
    statistics (``--corpus``), when given."""
    num_experts = 1 + max((e for r in routes.values() for es in r.experts for e in es), default=0)
    legend = "".join(f'<span class="tok" style="{expert_style(e)}">e{e}</span>' for e in range(num_experts))
    sections = []
    for i, r in routes.items():
        spans = []
        for t, piece in enumerate(pieces):
            tip = ", ".join(f"e{e} {w:.3f}" for e, w in zip(r.experts[t], r.weights[t])) or "dropped"
            style = expert_style(r.experts[t][0]) if r.experts[t] else "background:#ddd;color:#111"
            text = html.escape(_show(piece))
            spans.append(f'<span class="tok" style="{style}" title="{html.escape(tip)}">{text}</span>')
            if piece == "\n":
                spans.append("<br>")
        sections.append(f"<h2>layer {i}</h2><div class='text'>{''.join(spans)}</div>")
    if stats:
        sections.append(f"<h2>per-expert statistics</h2><pre>{html.escape(stats)}</pre>")
    intro = (
        "<p>Each token is coloured by the expert with the highest combine weight; hover for all its experts and "
        f"weights.</p><p>{legend}</p>"
        if pieces
        else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.text {{ font-family: monospace; font-size: 15px; line-height: 2.0; }}
.tok {{ padding: 2px 1px; margin: 0 1px; border-radius: 3px; }}
pre {{ background: #f6f6f6; padding: 0.8em; font-size: 12px; }}
h2 {{ font-size: 15px; margin: 1em 0 0.2em 0; }}
</style></head><body>
<h1 style="font-size:18px">{html.escape(title)}</h1>
{intro}
{"".join(sections)}
</body></html>
"""


def char_class(piece: str) -> str:
    if piece.isspace():
        return "whitespace"
    if not piece:
        return "other"
    c = piece[0]
    if c.isdigit():
        return "digit"
    if c.isalpha():
        return "upper" if c.isupper() else "letter"
    return "punct" if unicodedata.category(c).startswith(("P", "S")) else "other"


def expert_statistics(model: Transformer, tokenizer, seqs: torch.Tensor, batch: int = 8) -> str:  # type: ignore[no-untyped-def]
    """Per layer and expert: share of assignments, top character classes and top tokens."""
    from tqdm import tqdm

    counts: dict[int, list[Counter]] = {}
    classes: dict[int, list[Counter]] = {}
    starts = range(0, seqs.shape[0], batch)
    for start in tqdm(starts, desc="routing the corpus", unit="batch", disable=len(starts) < 2, leave=False):
        x = seqs[start : start + batch, :-1]
        pieces = token_pieces(tokenizer, x.reshape(-1).tolist())
        for i, r in routes_for(model, x).items():
            n = model.moe_cfg.num_experts
            counts.setdefault(i, [Counter() for _ in range(n)])
            classes.setdefault(i, [Counter() for _ in range(n)])
            for t, experts in enumerate(r.experts):
                for e in experts:
                    counts[i][e][pieces[t]] += 1
                    classes[i][e][char_class(pieces[t])] += 1
    lines = []
    for i in sorted(counts):
        total = sum(sum(c.values()) for c in counts[i]) or 1
        lines.append(f"layer {i}")
        for e, c in enumerate(counts[i]):
            n = sum(c.values())
            cls = ", ".join(f"{k} {v / max(n, 1):.0%}" for k, v in classes[i][e].most_common(3))
            top = " ".join(repr(_show(p)) for p, _ in c.most_common(8))
            lines.append(f"  e{e:<3} {n / total:6.1%}  [{cls}]  {top}")
    return "\n".join(lines)


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint argument: the directory itself when it is a run's, the run holding
    ``checkpoints/step_N``, else the checkpoint's own directory."""
    p = Path(checkpoint).resolve()
    if p.parent.name == "checkpoints":
        return p.parent.parent
    return p if p.is_dir() else p.parent


def _main(argv: list[str] | None = None) -> None:
    from moetrain.data import build_tokenizer, prepare_data
    from moetrain.tools.export import load_checkpoint_model

    p = argparse.ArgumentParser(description="Show which experts each token is routed to.")
    p.add_argument("checkpoint", help="a checkpoint directory (or a run directory: its newest checkpoint)")
    p.add_argument("--text", default=None, help="the text to route (without it: statistics only, see --corpus)")
    p.add_argument("--html", type=Path, default=None, help="the page to write (default RUN_DIR/routes.html)")
    p.add_argument("--corpus", type=int, default=None, help="per-expert statistics over N validation sequences "
                   "(default 64 without --text, else none)")  # fmt: skip
    add_threads_flag(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    corpus = args.corpus if args.corpus is not None else (0 if args.text else 64)
    check_arg("--corpus", corpus, corpus >= 0, "must be >= 0")

    model, cfg, meta = load_checkpoint_model(args.checkpoint)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    pieces: list[str] = []
    routes: dict[int, LayerRoutes] = {}
    if args.text is not None:
        ids = [int(t) for t in tokenizer.encode(args.text)][: model.max_seq_len]
        if not ids:
            raise SystemExit("moetrain-inspect: --text is empty")
        routes = routes_for(model, torch.tensor([ids]))
        pieces = token_pieces(tokenizer, ids)
        print(terminal_table(pieces, routes))
    stats = None
    if corpus:
        data = prepare_data(cfg.data, tokenizer)
        seqs = torch.from_numpy(data.val[:corpus].astype("int64"))
        stats = f"per-expert statistics over {seqs.shape[0]} validation sequences:\n"
        stats += expert_statistics(model, tokenizer, seqs)
        print(f"\n{stats}")
    page = args.html or run_dir_of(args.checkpoint) / "routes.html"
    title = f"moetrain routes: {args.checkpoint} (step {meta.get('step', '?')})"
    page.write_text(html_page(pieces, routes, title, stats), encoding="utf-8")
    print(f"\nwrote {page}")


def main(argv: list[str] | None = None) -> None:
    """``moetrain-inspect``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    guarded_main("moetrain-inspect", lambda: _main(argv))


if __name__ == "__main__":
    main()
