"""The `llama2 plan` command: its options and handler (`llama2.cli` registers them).

The parsing lives here and the reading of headers in `llama2.checkpoint.plan`, so `llama2.plan`'s
planner stays a pure function of shape, scheme, dtype and context. `--quantize` takes the same specs
as every other command (`int4,groupsize=64`, `nf4,double_quant=false`, see `parse_quant_spec`); with
`--model` and no `--quantize`, a quantized checkpoint is planned as stored (GGUF per-tensor types
included) and `--dtype` defaults to the dtype `load_model` would use.
"""

from __future__ import annotations

import argparse
import dataclasses

from llama2.config import PRESETS, preset
from llama2.dtypes import DTYPE_NAMES, parse_dtype
from llama2.errors import ConfigError
from llama2.plan import MemoryPlan, estimate_memory, fits, format_plan
from llama2.quant.convert import QuantConfig, parse_quant_spec
from llama2.quant.schemes import SPEC_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`llama2 plan`'s options."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="checkpoint path or embedded model (base, chat, code)")
    src.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a named model shape")
    parser.add_argument("--quantize", default=None, metavar="SCHEME", help=SPEC_HELP)
    parser.add_argument("--quantize-output", action="store_true", help="also quantize the output head")
    parser.add_argument("--groupsize", type=int, default=None, help="int4 group size (default: 128)")
    parser.add_argument("--no-double-quant", action="store_true", help="nf4 without double quantization")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=DTYPE_NAMES,
        help="dtype of the float weights (default: what loading the checkpoint gives; bfloat16 for --preset)",
    )
    parser.add_argument("--max-seq-len", type=int, default=None, help="context (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default: 1)")
    parser.add_argument("--device", default="cpu", help="device whose free memory to compare against")
    parser.add_argument("--full-logits", action="store_true", help="plan for (B, T, vocab) logits (eval)")


def quant_config(ns: argparse.Namespace) -> QuantConfig | None:
    """`--quantize` parsed as every command parses it, then `--groupsize`, `--no-double-quant` and
    `--quantize-output` applied on top."""
    config = parse_quant_spec(ns.quantize)
    if config is None:
        if ns.groupsize is not None or ns.no_double_quant or ns.quantize_output:
            raise ConfigError("--groupsize, --no-double-quant and --quantize-output need --quantize SCHEME")
        return None
    changes: dict[str, object] = {}
    if ns.groupsize is not None:
        changes["groupsize"] = ns.groupsize
    if ns.no_double_quant:
        changes["double_quant"] = False
    if ns.quantize_output:
        changes["include_output"] = True
    return dataclasses.replace(config, **changes) if changes else config  # type: ignore[arg-type]


def make_plan(ns: argparse.Namespace) -> tuple[MemoryPlan, str]:
    """The plan of the parsed options and what it describes (preset name or checkpoint path)."""
    config = quant_config(ns)
    dtype = None if ns.dtype is None else parse_dtype(ns.dtype)
    if ns.preset is not None:
        args = preset(ns.preset)
        plan = estimate_memory(
            args,
            scheme=config,
            dtype=dtype or parse_dtype("bfloat16"),
            max_seq_len=ns.max_seq_len if ns.max_seq_len is not None else args.max_seq_len,
            batch_size=ns.batch_size,
            full_logits=ns.full_logits,
            device=ns.device,
        )
        return plan, f"preset {ns.preset}"
    from llama2.assets import resolve_model
    from llama2.checkpoint.plan import plan_checkpoint

    path = resolve_model(ns.model)
    plan = plan_checkpoint(
        path,
        quantize=config,
        dtype=dtype,
        max_seq_len=ns.max_seq_len,
        batch_size=ns.batch_size,
        full_logits=ns.full_logits,
        device=ns.device,
    )
    return plan, str(path)


def run(ns: argparse.Namespace) -> int:
    """Print the memory table for the parsed `add_arguments` options; 0 if it fits, 1 if not."""
    plan, source = make_plan(ns)
    print(format_plan(plan, source, ns.device))
    return 0 if fits(plan, ns.device) else 1


__all__ = ["add_arguments", "make_plan", "quant_config", "run"]
