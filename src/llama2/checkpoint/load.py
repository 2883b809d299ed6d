"""Load a checkpoint (Meta, Hugging Face, llama2.c or ours) into a `Transformer`.

Tensors are memory-mapped (`torch.load(mmap=True, weights_only=True)`, safetensors, `np.memmap`), the
model is built on the `meta` device, and each tensor is renamed/merged/converted one at a time and
assigned with `load_state_dict(assign=True)`, so peak memory stays near one copy of the weights.
Pickles are never trusted: PyTorch files are scanned for globals and loaded with `weights_only=True`.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llama2.checkpoint import keymaps
from llama2.checkpoint.formats import (
    CheckpointFormat,
    DetectedCheckpoint,
    FileKind,
    detect,
    read_llama2c_header,
    read_safetensors_header,
    sniff,
)
from llama2.checkpoint.memory import release_pages, trim_heap
from llama2.checkpoint.pickles import torch_load
from llama2.config import ModelArgs, read_json
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

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


LLAMA2C_NORM_EPS = 1e-5  # llama2.c run.c hard-codes these; the file does not store them
LLAMA2C_ROPE_THETA = 10000.0


@dataclass
class TensorSource:
    """One tensor of a checkpoint, under our (Meta) name, not yet read.

    Attributes:
        name: our parameter name.
        file: the file it comes from (for error messages).
        shape: its shape after renaming/merging (known without reading the data).
        dtype: its stored dtype.
        load: reads it (memory-mapped where possible) and applies any permutation/merge.
        qtype: None for a plain tensor. For a tensor stored in a GGUF block format that
            `llama2.quant.gguf_blocks.BLOCK_SIZES` supports ("q8_0", "q4_0", "q4_k"): that name,
            and `load()` returns the raw blocks, uint8 (shape[0], shape[1] / block * block_bytes),
            while `shape` stays the logical (dequantized) shape.
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], Tensor]
    qtype: str | None = None


@dataclass
class CheckpointContents:
    """A checkpoint opened lazily: its shape, its tensors (unread) and metadata."""

    format: CheckpointFormat
    args: ModelArgs
    tensors: list[TensorSource]
    files: tuple[Path, ...]
    root: Path
    metadata: dict[str, str] = field(default_factory=dict)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Read every tensor (Meta names), optionally converting floating-point ones to `dtype`."""
        out: dict[str, Tensor] = {}
        for src in self.tensors:
            t = src.load()
            out[src.name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


@dataclass
class LoadedModel:
    """What `load_model` returns.

    Attributes:
        model: the Transformer, weights assigned, in eval mode.
        args: its shape (`args.max_seq_len` is the context window; see `load_model`).
        format: the checkpoint format name (`meta`, `hf`, `llama2c`, `llama2`).
        tokenizer_path: a `tokenizer.model` found next to the weights, else None.
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
        path: a checkpoint folder or a single weights file (format detected from contents).

    Returns:
        The checkpoint's `ModelArgs`, its tensors under Meta names (lazy) and its metadata.

    Raises:
        CheckpointError: unknown format, missing/truncated/corrupt file, unexpected tensor.
        UnsafeCheckpointError: a PyTorch file holds a pickle that references anything but tensors.
    """
    found = detect(path)
    readers: dict[CheckpointFormat, Callable[[DetectedCheckpoint], CheckpointContents]] = {
        CheckpointFormat.META: _read_meta,
        CheckpointFormat.HF: _read_hf,
        CheckpointFormat.LLAMA2C: _read_llama2c,
        CheckpointFormat.LLAMA2: _read_ours,
        CheckpointFormat.GGUF: _read_gguf,
    }
    return readers[found.format](found)


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
        path: a checkpoint folder, or one file (llama2.c `.bin`, `.safetensors`, `.pth`, `.gguf`).
        device: where the weights go; default CPU.
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
        CheckpointError: unknown format, missing path, truncated file, missing/unexpected tensor or a
            shape mismatch; the message names the file and the tensor.
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
    target_device = torch.device(device if device is not None else "cpu")
    requested = parse_quant_spec(quantize)
    stored = config_from_metadata(contents.metadata)
    if stored is not None and requested is not None and requested != stored:
        raise ConfigError(
            f"{contents.files[0]} is already quantized ({stored.to_metadata()}); load it without "
            f"quantize= (or with the same scheme), not {requested.to_metadata()}"
        )
    with torch.device("meta"):
        model = Transformer(args)
    float_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    target_dtype = _target_dtype(contents, dtype, target_device)
    if stored is not None:  # the file holds the quantized modules' buffers: check against those
        stored_dtypes = {src.name: src.dtype for src in contents.tensors}
        layers = [  # a layer the scheme could not hold was saved in floating point
            name
            for name in target_names(model, stored.include_output)
            if not stored_dtypes.get(f"{name}.weight", torch.float32).is_floating_point
        ]
        _swap_in(model, dict.fromkeys(layers, stored))
        _check_names_and_shapes(contents, {n: tuple(t.shape) for n, t in model.state_dict().items()})
        plan: dict[str, QuantConfig] = {}
    else:
        _check_names_and_shapes(contents, float_shapes)
        plan = _quant_plan(model, contents, requested, target_dtype)
        _swap_in(model, plan)
    if check_memory:
        context = max_seq_len if max_seq_len is not None else args.max_seq_len
        _check_memory(model, args, stored or requested, target_dtype, target_device, context)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}

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
            kept = t.to(device=target_device, dtype=target_dtype)
        else:  # a stored quantized module's buffer (packed codes, scales): kept in its stored dtype
            kept = t.to(device=target_device)
        if kept is not None:
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
        tokenizer_path=_find_tokenizer(contents),
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
    import dataclasses

    from llama2.plan import check_fits, estimate_memory

    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    linear = output = embedding = norms = 0
    for name, t in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        nbytes = t.numel() * (t.element_size() if module_name in quantized else dtype.itemsize)
        if module_name == "output":
            output += nbytes
        elif module_name == "tok_embeddings":
            embedding += nbytes
        elif name.endswith("norm.weight"):
            norms += nbytes
        else:
            linear += nbytes
    try:
        plan = estimate_memory(
            args, scheme=scheme, dtype=dtype, max_seq_len=context, batch_size=1, device=device
        )
    except ConfigError:  # some layers stay in floating point: plan KV cache and activations without it
        plan = estimate_memory(
            args, scheme=None, dtype=dtype, max_seq_len=context, batch_size=1, device=device
        )
    exact = dataclasses.replace(
        plan, linear_bytes=linear, output_bytes=output, embedding_bytes=embedding, norm_bytes=norms
    )
    check_fits(exact, device)


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


# ================================================================================== checks
def _check_names_and_shapes(contents: CheckpointContents, expected: dict[str, tuple[int, ...]]) -> None:
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
        if src.shape != expected[src.name]:
            raise CheckpointError(
                f"{src.file}: tensor {src.name!r} has shape {list(src.shape)}; expected "
                f"{list(expected[src.name])} for this model's shape (from {contents.format} config)"
            )
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{files}: missing tensor {missing[0]!r}{more}")


def _target_dtype(
    contents: CheckpointContents, dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
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


def _find_tokenizer(contents: CheckpointContents) -> Path | None:
    if contents.format is CheckpointFormat.GGUF:  # the vocabulary travels inside the file
        return contents.files[0]
    candidates = [contents.root / "tokenizer.model"]
    if contents.format is CheckpointFormat.META:  # Meta's download puts it beside the model folders
        candidates.append(contents.root.parent / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


def _config_error(file: Path, e: ConfigError) -> CheckpointError:
    return CheckpointError(f"{file}: {e}")


# ==================================================================================== readers
def _config_file(found: DetectedCheckpoint, expected: str) -> Path:
    """The checkpoint's JSON config (detect() finds one for these formats; never None here)."""
    if found.config_file is None:
        raise CheckpointError(f"{found.root}: no {expected} found beside the weights")
    return found.config_file


def _read_meta(found: DetectedCheckpoint) -> CheckpointContents:
    config_file = _config_file(found, "params.json")
    params = read_json(config_file)
    shards = [torch_load(f) for f in found.weight_files]
    files = found.weight_files
    first = shards[0]
    sources: list[TensorSource] = []
    for name in first:
        if keymaps.is_ignored(name, keymaps.META_IGNORED):
            continue
        try:
            dim = keymaps.split_dim(name)
        except KeyError:
            raise CheckpointError(
                f"{files[0]}: unexpected tensor {name!r}; not a Llama 2 parameter"
            ) from None
        parts: list[Tensor] = []
        for f, shard in zip(files, shards, strict=True):
            if name not in shard:
                raise CheckpointError(f"{f}: missing tensor {name!r} (present in shard {files[0].name})")
            parts.append(shard[name])
        shape = list(parts[0].shape)
        if dim is not None and len(parts) > 1:
            for f, p in zip(files, parts, strict=True):
                if p.dim() != len(shape) or any(
                    a != b for i, (a, b) in enumerate(zip(p.shape, shape, strict=True)) if i != dim
                ):
                    raise CheckpointError(
                        f"{f}: tensor {name!r} has shape {list(p.shape)}, which does not match shard "
                        f"{files[0].name}'s {shape} outside split dim {dim}"
                    )
            shape[dim] = sum(p.shape[dim] for p in parts)
        sources.append(TensorSource(name, files[0], tuple(shape), parts[0].dtype, _merge_loader(parts, dim)))
    for f, shard in zip(files[1:], shards[1:], strict=True):
        for name in shard:
            if name not in first and not keymaps.is_ignored(name, keymaps.META_IGNORED):
                raise CheckpointError(f"{f}: unexpected tensor {name!r} (absent from shard {files[0].name})")
    emb = next((s for s in sources if s.name == "tok_embeddings.weight"), None)
    vocab = emb.shape[0] if emb is not None and params.get("vocab_size", -1) in (-1, None) else None
    if vocab is None and params.get("vocab_size", -1) in (-1, None):
        raise CheckpointError(
            f"{files[0]}: missing tensor 'tok_embeddings.weight' (needed for vocab_size -1)"
        )
    try:
        args = ModelArgs.from_params_json(params, vocab_size=vocab)
    except ConfigError as e:
        raise _config_error(config_file, e) from None
    return CheckpointContents(CheckpointFormat.META, args, sources, files, found.root)


def _merge_loader(parts: list[Tensor], dim: int | None) -> Callable[[], Tensor]:
    def load() -> Tensor:
        if dim is None or len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=dim)  # one merged copy; the shards stay memory-mapped

    return load


class _SafetensorsFile:
    """A safetensors file opened lazily: header parsed now, tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header, _ = read_safetensors_header(path)
        meta = self.header.get("__metadata__") or {}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self._handle: Any = None

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.header[name].get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code!r}")
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(name)  # type: ignore[no-any-return]
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from None


_RawTensor = tuple[Path, str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]


def _tensor_iter(found: DetectedCheckpoint) -> Iterator[_RawTensor]:
    """(file, stored name, shape, dtype, loader) of every tensor in the checkpoint's weight files."""
    for f in found.weight_files:
        if sniff(f) is FileKind.SAFETENSORS:
            st = _SafetensorsFile(f)
            for name in st.names():
                yield f, name, st.shape(name), st.dtype(name), functools.partial(st.get, name)
        else:
            sd = torch_load(f)
            for name, t in sd.items():
                yield f, name, tuple(t.shape), t.dtype, functools.partial(_identity, t)


def _identity(t: Tensor) -> Tensor:
    return t


def _read_hf(found: DetectedCheckpoint) -> CheckpointContents:
    config_file = _config_file(found, "config.json")
    config = read_json(config_file)
    try:
        args = ModelArgs.from_hf_config(config)
    except ConfigError as e:
        raise _config_error(config_file, e) from None
    sources: list[TensorSource] = []
    metadata: dict[str, str] = {}
    if found.file_kind is FileKind.SAFETENSORS:
        metadata = _SafetensorsFile(found.weight_files[0]).metadata
    for f, hf_name, shape, dtype, loader in _tensor_iter(found):
        if keymaps.is_ignored(hf_name, keymaps.HF_IGNORED):
            continue
        name = keymaps.rename(hf_name, keymaps.HF_TO_META)
        if name is None:
            raise CheckpointError(f"{f}: unexpected tensor {hf_name!r}; not a LlamaForCausalLM parameter")
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = args.n_heads if name.endswith("wq.weight") else args.kv_heads
            loader = _permuted(loader, heads)
        sources.append(TensorSource(name, f, shape, dtype, loader))
    return CheckpointContents(CheckpointFormat.HF, args, sources, found.weight_files, found.root, metadata)


def _permuted(loader: Callable[[], Tensor], n_heads: int) -> Callable[[], Tensor]:
    def load() -> Tensor:
        return keymaps.hf_to_meta_qk(loader(), n_heads).contiguous()

    return load


def _read_ours(found: DetectedCheckpoint) -> CheckpointContents:
    config_file = _config_file(found, "params.json")
    params = read_json(config_file)
    try:
        args = ModelArgs.from_params_json(params)
    except ConfigError as e:
        raise _config_error(config_file, e) from None
    sources: list[TensorSource] = []
    metadata: dict[str, str] = {}
    for f in found.weight_files:
        st = _SafetensorsFile(f)
        metadata.update(st.metadata)
        for name in st.names():
            loader = functools.partial(st.get, name)
            sources.append(TensorSource(name, f, st.shape(name), st.dtype(name), loader))
    return CheckpointContents(
        CheckpointFormat.LLAMA2, args, sources, found.weight_files, found.root, metadata
    )


def _read_gguf(found: DetectedCheckpoint) -> CheckpointContents:
    from llama2.checkpoint.gguf_model import read_gguf

    return read_gguf(found)


def _read_llama2c(found: DetectedCheckpoint) -> CheckpointContents:
    file = found.weight_files[0]
    header = read_llama2c_header(file)
    if header is None:
        raise CheckpointError(f"{file}: not a llama2.c file (its header holds no plausible model shape)")
    size = file.stat().st_size
    offset = header.header_bytes
    layout: list[tuple[str, tuple[int, ...], int]] = []  # (name, shape, byte offset)
    for name, shape in header.tensor_shapes():
        nbytes = 4 * int(np.prod(shape))
        if offset + nbytes > size:
            raise CheckpointError(
                f"{file}: truncated llama2.c file: tensor {name!r} needs bytes {offset}..{offset + nbytes} "
                f"but the file has {size} bytes"
            )
        layout.append((name, shape, offset))
        offset += nbytes
    if offset != size:
        raise CheckpointError(
            f"{file}: llama2.c file has {size - offset} bytes after the last tensor; expected exactly "
            f"{offset} bytes for the shape in its header"
        )
    # Copy-on-write map: pages are read lazily and never written back to the file.
    data = np.memmap(file, dtype=np.float32, mode="c", offset=header.header_bytes)
    base = header.header_bytes

    def view(shape: tuple[int, ...], byte_offset: int) -> Callable[[], Tensor]:
        start = (byte_offset - base) // 4
        count = int(np.prod(shape))
        return lambda: torch.from_numpy(data[start : start + count]).view(shape)

    sources: list[TensorSource] = []
    emb_loader: Callable[[], Tensor] | None = None
    for name, shape, byte_offset in layout:
        if name in keymaps.LLAMA2C_ROPE_TABLES:
            continue
        loader = view(shape, byte_offset)
        if name == "tok_embeddings.weight":
            emb_loader = loader
        sources.append(TensorSource(name, file, shape, torch.float32, loader))
    if header.shared_classifier and emb_loader is not None:
        shared = emb_loader  # Llama 2's head is untied: give the output its own copy
        sources.append(
            TensorSource(
                "output.weight",
                file,
                (header.vocab_size, header.dim),
                torch.float32,
                lambda: shared().clone(),
            )
        )
    try:
        args = ModelArgs(
            dim=header.dim,
            n_layers=header.n_layers,
            n_heads=header.n_heads,
            n_kv_heads=None if header.n_kv_heads == header.n_heads else header.n_kv_heads,
            vocab_size=header.vocab_size,
            hidden_dim=header.hidden_dim,
            norm_eps=LLAMA2C_NORM_EPS,
            rope_theta=LLAMA2C_ROPE_THETA,
            max_seq_len=header.seq_len,
        )
    except ConfigError as e:
        raise _config_error(file, e) from None
    return CheckpointContents(
        CheckpointFormat.LLAMA2C, args, sources, (file,), found.root, {"llama2c_version": str(header.version)}
    )
