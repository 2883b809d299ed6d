"""Weight quantization: int8, int4 (gpt-fast), NF4 (QLoRA/bitsandbytes), GGUF Q8_0/Q4_0/Q4_K.

Numerics live in one file per format; `linear.py` holds the drop-in modules, `registry.py` one object
per scheme (its module, storage layout, shapes, metadata, quantizer), `config.py` the `QuantConfig`
and its spec parsers, and `convert.py` swaps the modules into a model and saves/loads the result with
the scheme in safetensors metadata.
"""

from llama2.quant.config import QuantConfig, parse_quant_spec, parse_quant_specs
from llama2.quant.convert import (
    config_from_metadata,
    empty_module,
    load_quantized,
    prepare_model,
    quantization_metadata,
    quantize_model,
    quantize_weight,
    save_quantized,
    target_names,
)
from llama2.quant.gguf_blocks import dequantize_gguf, quantize_gguf
from llama2.quant.int4 import dequantize_int4, quantize_int4
from llama2.quant.int8 import dequantize_int8, quantize_int8
from llama2.quant.linear import (
    DenseLinear,
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    accelerate,
)
from llama2.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from llama2.quant.registry import Scheme, get_scheme, storage_bytes
from llama2.quant.schemes import SCHEMES

__all__ = [
    "SCHEMES",
    "DenseLinear",
    "GGUFLinear",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "NF4Tensor",
    "QuantConfig",
    "QuantizedLinear",
    "Scheme",
    "accelerate",
    "config_from_metadata",
    "dequantize_gguf",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_nf4",
    "empty_module",
    "get_scheme",
    "load_quantized",
    "parse_quant_spec",
    "parse_quant_specs",
    "prepare_model",
    "quantization_metadata",
    "quantize_gguf",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "quantize_nf4",
    "quantize_weight",
    "save_quantized",
    "storage_bytes",
    "target_names",
]
