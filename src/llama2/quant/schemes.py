"""Names of the quantization schemes and the help text of `--quantize` (no torch import, so the CLI
can build its parser without loading torch)."""

from __future__ import annotations

SCHEMES = ("int8", "int4", "nf4", "q8_0", "q4_0", "q4_k")
SPEC_HELP = (
    "quantize the projection layers while loading: int8 | int4 | nf4 | q8_0 | q4_0 | q4_k, with "
    "options after commas, e.g. int4,groupsize=64  nf4,double_quant=false  q4_0,include_output=true "
    "(default: none; quantized checkpoints load as stored)"
)
