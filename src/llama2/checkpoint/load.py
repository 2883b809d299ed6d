"""Load a checkpoint (Meta, Hugging Face, llama2.c or ours) into a `Transformer`.

Tensors are memory-mapped (`torch.load(mmap=True, weights_only=True)`, safetensors, `np.memmap`), the
model is built on the `meta` device, and each tensor is renamed/merged/converted one at a time and
assigned with `load_state_dict(assign=True)`, so peak memory stays near one copy of the weights.
Pickles are never trusted: PyTorch files are loaded with `weights_only=True` (after a scan of their
globals for a clearer error; see `llama2.checkpoint.pickles`). The readers (`llama2.checkpoint.readers`,
one per format) produce lazy `TensorSource`s (`llama2.checkpoint.source`); this module checks and loads.

What is checked, and when (each failure is one line naming the file and tensor, a `CheckpointError`;
the memory checks raise `OutOfMemoryError`):
  - reading: torch pickles hold only dense, real, non-overlapping tensors with data (`pickles`); Meta
    shards agree (same tensors and dtypes, matching shapes, identical replicated tensors: `readers.meta`);
  - before building anything: for float weights, the memory plan from the shape alone (`llama2.plan`);
    after building the model on `meta` (no memory): the exact plan, then names, shapes, and the
    dtypes of stored quantized buffers;
  - per tensor, while loading: the data matches the shape/dtype its header promised, weights are
    floating point, and the norm weights are finite. The big matrices are not scanned for NaN/inf
    (that would be a full extra pass over the weights).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from llama2.assets import resolve_model
from llama2.checkpoint.formats import CheckpointFormat, detect
from llama2.checkpoint.memory import release_pages, trim_heap
from llama2.checkpoint.readers import READERS
from llama2.checkpoint.readers.common import SAFETENSORS_DTYPES
from llama2.checkpoint.readers.llama2c import LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.checkpoint.tokenizer_path import find_tokenizer
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError
from llama2.model import Transformer
from llama2.quant.convert import (
    QuantConfig,
    config_from_metadata,
    empty_module,
    parse_quant_spec,
    quantize_weight,
    target_names,
)
from llama2.quant.gguf_blocks import dequantize_gguf
from llama2.quant.linear import QuantizedLinear, accelerate
from llama2.runtime import resolve_device

NORM_SUFFIX = "norm.weight"  # attention_norm, ffn_norm and the final norm: checked finite on load

__all__ = [  # the types and constants now defined beside the readers stay importable from here
    "LLAMA2C_NORM_EPS",
    "LLAMA2C_ROPE_THETA",
    "SAFETENSORS_DTYPES",
    "CheckpointContents",
    "LoadedModel",
    "TensorSource",
    "load_model",
    "read_checkpoint",
]


@dataclass
class LoadedModel:
    """What `load_model` returns.

    Attributes:
        model: the Transformer, weights assigned, in eval mode.
        args: its shape (`args.max_seq_len` is the context window; see `load_model`).
        format: the checkpoint format name (`meta`, `hf`, `llama2c`, `llama2`).
        tokenizer_path: the checkpoint's tokenizer (`llama2.checkpoint.tokenizer_path`), else None.
        metadata: string metadata stored with the weights (safetensors `__metadata__`), else empty.
        max_seq_len: the context window the caller asked for (or the checkpoint's).
        quantization: the scheme the projection layers hold (asked for, or stored in the file);
            None for float weights (GGUF files may still hold block-quantized layers: see the modules).
    """

    model: Transformer
    args: ModelArgs
    format: str
    tokenizer_path: Path | None
    metadata: dict[str, str] = field(default_factory=dict)
    max_seq_len: int = 0
    quantization: QuantConfig | None = None


# ================================================================================ public API
def read_checkpoint(path: Path | str) -> CheckpointContents:
    """Open a checkpoint without reading its tensor data.

    Args:
        path: a checkpoint folder or a single weights file (format detected from contents), or the
            name of an embedded model (`base`, `chat`, `code`; an existing path of that name wins).

    Returns:
        The checkpoint's `ModelArgs`, its tensors under Meta names (lazy) and its metadata.

    Raises:
        CheckpointError: unknown format, missing/truncated/corrupt file, unexpected tensor.
        UnsafeCheckpointError: a PyTorch file holds a pickle that references anything but tensors.
    """
    found = detect(resolve_model(path))  # an embedded model's name (`base`, `chat`, `code`) works too
    return READERS[found.format](found)


def load_model(
    path: Path | str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    progress: bool = True,
    quantize: QuantConfig | str | None = None,
    check_memory: bool = True,
) -> LoadedModel:
    """Load a checkpoint of any supported format into a `Transformer`.

    Args:
        path: a checkpoint folder, or one file (llama2.c `.bin`, `.safetensors`, `.pth`, `.gguf`), or
            an embedded model's name (`base`, `chat`, `code`).
        device: where the weights go; default CPU. A name this torch build or machine lacks (`mps`
            off Apple silicon, `cuda` without a GPU) raises `ConfigError`.
        dtype: dtype of the float weights (and of the activations). None keeps float32/bfloat16
            checkpoints as they are; float16 becomes bfloat16 on CPU (float16 matmuls are slow there)
            and stays float16 on other devices; GGUF files whose embeddings are block-quantized give
            float32.
        max_seq_len: context window to use instead of the checkpoint's. It replaces
            `args.max_seq_len` unless the model uses dynamic rope scaling (there `args.max_seq_len`
            is the trained length the scaling is relative to, so it is kept); either way it is
            returned as `LoadedModel.max_seq_len`.
        progress: show a tqdm bar over tensors on stderr.
        quantize: a scheme (`"nf4"`, `"int8"`, `"int4,groupsize=64"`, ... see
            `llama2.quant.parse_quant_spec`) or a `QuantConfig`. The projection layers are quantized
            one tensor at a time as they are read from the memory-mapped source, whose pages are then
            released, so peak memory is about the quantized model plus one float tensor. Checkpoints
            that are already quantized (our format with a scheme in its metadata, GGUF block types)
            load as stored without this argument. Layers whose shape the scheme cannot hold stay
            in floating point (a warning names them).
        check_memory: before reading any tensor, estimate the weights, the KV cache of one
            sequence over the context window and the prefill activations (`llama2.plan`), and
            raise `OutOfMemoryError` when they will not fit in the device's available memory.

    Returns:
        A `LoadedModel` with the model in eval mode.

    Raises:
        CheckpointError: unknown format, missing path, truncated or corrupt file, missing/unexpected
            tensor, a shape or dtype mismatch, a tensor kind the model cannot hold (sparse, meta,
            complex, torch-quantized), Meta shards that disagree, a NaN/inf norm weight; the message
            names the file and the tensor.
        UnsafeCheckpointError: a pickle that references anything but tensors (its code never runs).
        ConfigError: an invalid scheme, or a scheme asked for a checkpoint already quantized
            differently.
        OutOfMemoryError: the model will not fit (see `check_memory`).
    """
    contents = read_checkpoint(path)
    args = contents.args
    if max_seq_len is not None:
        if max_seq_len <= 0:
            raise CheckpointError(f"max_seq_len must be a positive integer, got {max_seq_len}")
        if args.rope_scaling is None or args.rope_scaling.type != "dynamic":
            args = args.replace(max_seq_len=max_seq_len)
    target_device = resolve_device(device) if isinstance(device, str) else (device or torch.device("cpu"))
    requested = parse_quant_spec(quantize)
    stored = config_from_metadata(contents.metadata)
    if stored is not None and requested is not None and requested != stored:
        raise ConfigError(
            f"{contents.files[0]} is already quantized ({stored.to_metadata()}); load it without "
            f"quantize= (or with the same scheme), not {requested.to_metadata()}"
        )
    target_dtype = float_weight_dtype(contents, dtype, target_device)
    context = max_seq_len if max_seq_len is not None else args.max_seq_len
    if check_memory and contents.format is not CheckpointFormat.GGUF:
        _precheck_memory(args, stored or requested, target_dtype, target_device, context)
    with torch.device("meta"):  # no memory: parameters are shapes only until assigned below
        model = Transformer(args)
    if stored is not None:  # the file holds the quantized modules' buffers: check against those
        stored_dtypes = {src.name: src.dtype for src in contents.tensors}
        layers = [  # a layer the scheme could not hold was saved in floating point
            name
            for name in target_names(model, stored.include_output)
            if not stored_dtypes.get(f"{name}.weight", torch.float32).is_floating_point
        ]
        _swap_in(model, dict.fromkeys(layers, stored))
        expected = dict(model.state_dict())  # the quantized modules' buffers, as stored
        plan: dict[str, QuantConfig] = {}
    else:
        expected = dict(model.state_dict())
        plan = _quant_plan(model, contents, requested, target_dtype)
        _swap_in(model, plan)
    if check_memory:  # before the names: a model too big for the device is refused whatever it holds
        _check_memory(model, args, stored or requested, target_dtype, target_device, context)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    _check_names_and_shapes(contents, expected, quantized if stored is not None else set())

    from tqdm import tqdm

    state: dict[str, Tensor] = {}
    bar = tqdm(
        contents.tensors,
        desc=f"loading {Path(path).name}" + (f" ({requested.scheme})" if requested else ""),
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    for src in bar:
        module_name = src.name.rsplit(".", 1)[0]
        t = src.load()
        if src.qtype is None and (tuple(t.shape) != src.shape or t.dtype != src.dtype):
            raise CheckpointError(
                f"{src.file}: tensor {src.name!r} read as {t.dtype} {list(t.shape)}; its header "
                f"promised {src.dtype} {list(src.shape)}"
            )
        kept: Tensor | None = None  # the tensor that goes into the model, if it may share t's memory
        if src.qtype is not None and module_name in plan:  # GGUF blocks, kept as stored
            kept = t.to(target_device)
        elif src.qtype is not None:  # a block-quantized embedding or norm: dequantize it
            kept = dequantize_gguf(t, src.qtype).reshape(src.shape).to(target_device, target_dtype)
        elif module_name in plan:
            config = plan[module_name]
            try:
                buffers = quantize_weight(t.to(device=target_device), config)
            except ConfigError as err:
                raise ConfigError(
                    f"cannot quantize {src.name!r} {list(src.shape)} with {config.scheme}: {err}"
                ) from None
            state.update({f"{module_name}.{k}": v for k, v in buffers.items()})
        elif module_name not in quantized:
            if not t.is_floating_point():
                raise CheckpointError(
                    f"{src.file}: tensor {src.name!r} has dtype {t.dtype}; expected floating point"
                )
            kept = t.to(device=target_device, dtype=target_dtype).contiguous()
        else:  # a stored quantized module's buffer (packed codes, scales): kept in its stored dtype
            kept = t.to(device=target_device).contiguous()
        if kept is not None:
            if src.name.endswith(NORM_SUFFIX):
                _check_finite(src, kept)
            state[src.name] = kept
        converted = kept is None or kept.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        if converted:
            release_pages(t)  # t was converted: its memory-mapped pages are no longer needed
        del t, kept
        if converted:
            trim_heap()  # hand the freed temporaries back to the OS so they do not pile up
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    if target_device.type == "cpu":
        accelerate(model)  # bf16/fp16 linears -> the C++ matrix-vector kernels (shares the weights)
    return LoadedModel(
        model=model,
        args=args,
        format=str(contents.format),
        tokenizer_path=find_tokenizer(contents.root, contents.files, contents.format),
        metadata=dict(contents.metadata),
        max_seq_len=max_seq_len if max_seq_len is not None else args.max_seq_len,
        quantization=stored or requested,
    )


def _quant_plan(
    model: Transformer, contents: CheckpointContents, requested: QuantConfig | None, dtype: torch.dtype
) -> dict[str, QuantConfig]:
    """Which linears become which quantized modules: GGUF block tensors keep their type; with
    `requested`, the other projection layers (and `output` if asked) are quantized while loading,
    except layers whose shape the scheme cannot hold (e.g. q4_k needs rows of whole 256-value
    blocks): those stay in `dtype`, with a warning naming them, as llama.cpp falls back per tensor."""
    linears = set(target_names(model, include_output=True))
    plan: dict[str, QuantConfig] = {}
    for src in contents.tensors:
        module_name = src.name.rsplit(".", 1)[0]
        if src.qtype is None or module_name not in linears:
            continue
        if requested is not None and requested.scheme != src.qtype:
            raise ConfigError(
                f"{src.file}: tensor {src.name!r} is stored as {src.qtype}; it loads as stored and "
                f"cannot be re-quantized to {requested.scheme} (load it without quantize=)"
            )
        compute = requested.compute_dtype if requested is not None else None
        plan[module_name] = QuantConfig(src.qtype, compute_dtype=compute)
    if requested is not None:
        unfit: dict[str, str] = {}
        for name in target_names(model, requested.include_output):
            if name in plan:
                continue
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                continue
            try:
                empty_module(linear.in_features, linear.out_features, requested, "meta")
            except ConfigError as err:
                unfit[name] = str(err)
                continue
            plan[name] = requested
        if unfit:
            first, reason = next(iter(unfit.items()))
            more = f" and {len(unfit) - 1} more" if len(unfit) > 1 else ""
            warnings.warn(
                f"{len(unfit)} layers cannot be quantized with {requested.scheme} and stay in "
                f"{str(dtype).removeprefix('torch.')}: {first}{more} ({reason})",
                UserWarning,
                stacklevel=3,
            )
    return plan


def _check_memory(
    model: Transformer,
    args: ModelArgs,
    scheme: QuantConfig | None,
    dtype: torch.dtype,
    device: torch.device,
    context: int,
) -> None:
    """Refuse to load, before reading any tensor, a model that will not fit on `device`.

    The weights are counted exactly from the (meta) model as it will be filled; the KV cache of one
    sequence over the context window and the prefill activations come from `llama2.plan`.
    """
    from llama2.plan import WeightBytes, check_fits, estimate_memory

    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}

    def nbytes(name: str, t: Tensor) -> int:  # quantized buffers as declared, float weights in dtype
        return t.numel() * (t.element_size() if name.rsplit(".", 1)[0] in quantized else dtype.itemsize)

    sizes = [(name, nbytes(name, t)) for name, t in model.state_dict().items()]
    weights = WeightBytes.from_tensors(sizes, output_quantized="output" in quantized)
    plan = estimate_memory(
        args, scheme=scheme, dtype=dtype, max_seq_len=context, batch_size=1, device=device, stored=weights
    )
    check_fits(plan, device)


def _swap_in(model: Transformer, plan: dict[str, QuantConfig]) -> None:
    """Replace each planned linear (on `meta`) by an empty quantized module."""
    for name, config in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = parent.get_submodule(child)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{name} is not a linear layer; cannot quantize it")
        try:
            module = empty_module(linear.in_features, linear.out_features, config, "meta")
        except ConfigError as err:
            raise ConfigError(f"cannot quantize layer {name!r} with {config.scheme}: {err}") from None
        setattr(parent, child, module)


def _precheck_memory(
    args: ModelArgs, scheme: QuantConfig | None, dtype: torch.dtype, device: torch.device, context: int
) -> None:
    """`_check_memory` from the shape alone, before the (meta) model is built, so that a model far too
    big (a config claiming 1024 layers of width 65536) is refused in milliseconds.

    The plan never counts more than `_check_memory` will: its weights are exact for float weights and
    for a scheme that fits every layer (a stored checkpoint may keep more layers in float; skipped
    when some layer cannot take the scheme, and for GGUF files, whose tensor types are mixed)."""
    from llama2.plan import check_fits, estimate_memory

    try:
        plan = estimate_memory(
            args, scheme=scheme, dtype=dtype, max_seq_len=context, batch_size=1, device=device
        )
    except ConfigError:  # some layers stay in floating point: only the exact check can tell
        return
    check_fits(plan, device)


# ================================================================================== checks
def _check_names_and_shapes(
    contents: CheckpointContents, expected: dict[str, Tensor], stored_quantized: set[str]
) -> None:
    """Every tensor the model needs is there once, with its shape; the buffers of stored quantized
    modules (`stored_quantized`: packed codes, scales) also with their integer dtype or a float one."""
    seen: dict[str, TensorSource] = {}
    files = ", ".join(str(f) for f in contents.files)
    for src in contents.tensors:
        if src.name in seen:
            raise CheckpointError(
                f"{src.file}: tensor {src.name!r} appears twice (also in {seen[src.name].file})"
            )
        seen[src.name] = src
        if src.name not in expected:
            raise CheckpointError(
                f"{src.file}: unexpected tensor {src.name!r}; a Llama 2 model with "
                f"{contents.args.n_layers} layers has no such parameter"
            )
        want = expected[src.name]
        if src.shape != tuple(want.shape):
            raise CheckpointError(
                f"{src.file}: tensor {src.name!r} has shape {list(src.shape)}; expected "
                f"{list(want.shape)} for this model's shape (from {contents.format} config)"
            )
        if src.name.rsplit(".", 1)[0] in stored_quantized and (
            src.dtype != want.dtype if not want.is_floating_point() else not src.dtype.is_floating_point
        ):
            kind = want.dtype if not want.is_floating_point() else "a floating-point dtype"
            raise CheckpointError(
                f"{src.file}: tensor {src.name!r} has dtype {src.dtype}; expected {kind} for a "
                "quantized layer of the scheme in the file's metadata"
            )
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{files}: missing tensor {missing[0]!r}{more}")


def float_weight_dtype(
    contents: CheckpointContents, dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
    """The dtype `load_model` gives the float weights: `dtype` if given, else the stored embeddings'
    (float16 -> bfloat16 on CPU; float32 for block-quantized or integer embeddings)."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise CheckpointError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    stored = next((s.dtype for s in contents.tensors if s.name == "tok_embeddings.weight"), torch.float32)
    if stored == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    if stored in (torch.float32, torch.bfloat16, torch.float16):
        return stored
    return torch.float32


def _check_finite(src: TensorSource, t: Tensor) -> None:
    """Refuse NaN/inf in a norm weight (a few KB per layer, so checking costs nothing; the big
    matrices are not scanned: that would be a full extra pass over the weights)."""
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{src.file}: tensor {src.name} contains NaN/inf; expected finite norm weights")
