"""Detect a checkpoint's format from its files' contents (magic bytes, JSON keys, tensor names).

File names matter only where a format defines them (`params.json`, `config.json`,
`model.safetensors.index.json`) and to order shards; what a file *is* comes from its bytes:

  - safetensors: 8-byte little-endian header length, then a JSON header starting with `{`;
  - PyTorch archive (`torch.save`): a zip file (`PK\\x03\\x04`); legacy PyTorch: a pickle
    (`\\x80` + protocol byte);
  - llama2.c v1+: uint32 magic 0x616b3432 ("ak42"); llama2.c v0: seven int32 of a plausible shape whose
    implied weight size matches the file size;
  - GGUF: `GGUF` magic (llama.cpp's self-describing container). A GGUF file is a model checkpoint when
    its header lists tensors and `general.architecture` is "llama"; one without tensors is a
    vocabulary-only file (a tokenizer), refused as a model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from llama2.errors import CheckpointError
from llama2.gguf_vocab import GGUFFormatError, read_gguf_architecture

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
LLAMA2C_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
LLAMA2C_V1_HEADER_BYTES = 256
LLAMA2C_V0_HEADER_BYTES = 28  # 7 x int32
_SANE_DIM = 1 << 20  # a header field larger than this is not a real model dimension

HF_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointFormat(StrEnum):
    """Checkpoint layouts `load_model` reads."""

    META = "meta"  # params.json + consolidated.NN.pth (model-parallel shards)
    HF = "hf"  # config.json + *.safetensors (or pytorch_model*.bin), HF names, permuted q/k
    LLAMA2C = "llama2c"  # karpathy/llama2.c .bin (v0 legacy or v1 header)
    LLAMA2 = "llama2"  # ours: params.json with "format": "llama2" + model.safetensors, Meta names
    GGUF = "gguf"  # llama.cpp: one self-describing .gguf file (shape, tokenizer and weights)


class FileKind(StrEnum):
    """What a single file is, judged from its first bytes."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    PICKLE = "pickle"
    LLAMA2C_V0 = "llama2c-v0"
    LLAMA2C_V1 = "llama2c-v1"  # magic header; the version number is checked by the reader
    GGUF = "gguf"
    JSON = "json"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DetectedCheckpoint:
    """A checkpoint's format and the files that hold it.

    Attributes:
        format: the layout.
        root: the folder of the checkpoint (where `tokenizer.model` is looked for).
        weight_files: tensor files in shard order.
        config_file: `params.json` / `config.json`; None for llama2.c (the header holds the shape).
        file_kind: how the weight files are encoded.
    """

    format: CheckpointFormat
    root: Path
    weight_files: tuple[Path, ...]
    config_file: Path | None
    file_kind: FileKind


# ------------------------------------------------------------------------------- sniffing
def _read_head(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None


@dataclass(frozen=True)
class Llama2cHeader:
    """The shape stored in a llama2.c `.bin` header."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here
    seq_len: int
    shared_classifier: bool
    header_bytes: int

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor in file order (including v0's rope tables)."""
        from llama2.checkpoint.keymaps import LLAMA2C_V0_ORDER, LLAMA2C_V1_ORDER, expand

        hd = self.dim // self.n_heads
        kv = self.n_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "tok_embeddings.weight": (self.vocab_size, self.dim),
            "norm.weight": (self.dim,),
            "output.weight": (self.vocab_size, self.dim),
            "freq_cis_real": (self.seq_len, hd // 2),
            "freq_cis_imag": (self.seq_len, hd // 2),
            "layers.{i}.attention_norm.weight": (self.dim,),
            "layers.{i}.ffn_norm.weight": (self.dim,),
            "layers.{i}.attention.wq.weight": (self.n_heads * hd, self.dim),
            "layers.{i}.attention.wk.weight": (kv, self.dim),
            "layers.{i}.attention.wv.weight": (kv, self.dim),
            "layers.{i}.attention.wo.weight": (self.dim, self.n_heads * hd),
            "layers.{i}.feed_forward.w1.weight": (self.hidden_dim, self.dim),
            "layers.{i}.feed_forward.w2.weight": (self.dim, self.hidden_dim),
            "layers.{i}.feed_forward.w3.weight": (self.hidden_dim, self.dim),
        }
        order = LLAMA2C_V0_ORDER if self.version == 0 else LLAMA2C_V1_ORDER
        out: list[tuple[str, tuple[int, ...]]] = []
        for template in order:
            if template == "output.weight" and self.shared_classifier:
                continue
            for name in expand([template], self.n_layers):
                out.append((name, shapes[template]))
        return out

    def expected_file_size(self) -> int:
        n = 0
        for _, shape in self.tensor_shapes():
            count = 1
            for s in shape:
                count *= s
            n += count
        return self.header_bytes + 4 * n


def _plausible_shape(ints: tuple[int, ...]) -> bool:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
    positive = (dim, hidden, n_layers, n_heads, n_kv, seq_len)
    if any(v <= 0 or v > _SANE_DIM for v in positive) or vocab == 0 or abs(vocab) > _SANE_DIM:
        return False
    return dim % n_heads == 0 and n_heads % n_kv == 0 and (dim // n_heads) % 2 == 0


def read_llama2c_header(path: Path) -> Llama2cHeader | None:
    """Parse a llama2.c header; None when the file is not a llama2.c file.

    A v1+ file is recognised by its magic; a v0 file (no magic) by a plausible shape whose weights
    fit the file: a file at most as large as the shape implies is taken as (possibly truncated) v0.
    """
    head = _read_head(path, LLAMA2C_V1_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise CheckpointError(
                f"{path}: llama2.c file version {version} is not supported; expected version 0 or 1 "
                "(float32). Version 2 is Q8_0-quantized: re-export it as float32 with llama2.c export.py"
            )
        if len(head) < 8 + 28 + 1:
            raise CheckpointError(f"{path}: truncated llama2.c v1 header ({len(head)} bytes, expected 256)")
        ints = struct.unpack("<7i", head[8:36])
        if not _plausible_shape(ints) or ints[5] < 0:
            raise CheckpointError(f"{path}: llama2.c v1 header holds an impossible shape {ints}")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
        return Llama2cHeader(
            1, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, bool(head[36]), LLAMA2C_V1_HEADER_BYTES
        )
    if len(head) < LLAMA2C_V0_HEADER_BYTES:
        return None
    ints = struct.unpack("<7i", head[:28])
    if not _plausible_shape(ints):
        return None
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
    header = Llama2cHeader(
        0, dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0, LLAMA2C_V0_HEADER_BYTES
    )
    size = path.stat().st_size
    # More than a small fraction of the implied size, and not larger: a v0 file (maybe truncated).
    if size > header.expected_file_size() or size < LLAMA2C_V0_HEADER_BYTES + 4 * dim:
        return None
    return header


def sniff(path: Path) -> FileKind:
    """Classify one file by its first bytes."""
    head = _read_head(path, 16)
    if head.startswith(b"PK\x03\x04"):
        return FileKind.TORCH_ZIP
    if head.startswith(b"GGUF"):
        return FileKind.GGUF
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
            return FileKind.SAFETENSORS
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return FileKind.PICKLE
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        return FileKind.LLAMA2C_V1
    if head.lstrip()[:1] == b"{":
        return FileKind.JSON
    if read_llama2c_header(path) is not None:
        return FileKind.LLAMA2C_V0
    return FileKind.UNKNOWN


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header and check every tensor's bytes lie inside the file.

    Returns:
        (header, data_start): the JSON header (tensor name -> {dtype, shape, data_offsets}, plus an
        optional `__metadata__`), and the byte offset where tensor data begins.

    Raises:
        CheckpointError: naming the file (and the first tensor cut off) when truncated or malformed.
    """
    size = path.stat().st_size
    head = _read_head(path, 8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    (n,) = struct.unpack("<Q", head)
    if n > SAFETENSORS_MAX_HEADER:
        raise CheckpointError(f"{path}: safetensors header length {n} is implausible (file corrupt?)")
    if 8 + n > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: header needs {8 + n} bytes, file has {size}"
        )
    with path.open("rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has no valid data_offsets") from None
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} needs bytes "
                f"{data_start + begin}..{data_start + end} but the file has {size} bytes"
            )
    return header, data_start


def safetensors_names(path: Path) -> list[str]:
    header, _ = read_safetensors_header(path)
    return [k for k in header if k != "__metadata__"]


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_meta_params(data: dict[str, Any] | None) -> bool:
    return data is not None and "dim" in data and "n_layers" in data


def _is_hf_config(data: dict[str, Any] | None) -> bool:
    return data is not None and "hidden_size" in data and "num_hidden_layers" in data


def _looks_hf(names: list[str]) -> bool:
    return any(n.startswith(("model.", "lm_head.")) for n in names)


# ------------------------------------------------------------------------------- detection
def detect(path: Path | str) -> DetectedCheckpoint:
    """Find a checkpoint's format and files from a folder or a single file.

    Args:
        path: a checkpoint folder, or one file in it (a llama2.c `.bin`, a `.safetensors`, a `.pth`,
            a llama.cpp GGUF model, or the folder's `params.json`/`config.json`).

    Raises:
        CheckpointError: the path does not exist or holds no checkpoint this package can read.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; expected a checkpoint folder or file")
    if path.is_dir():
        return _detect_dir(path)
    kind = sniff(path)
    if kind is FileKind.JSON:
        return _detect_dir(path.parent)
    if kind in (FileKind.LLAMA2C_V0, FileKind.LLAMA2C_V1):
        return DetectedCheckpoint(CheckpointFormat.LLAMA2C, path.parent, (path,), None, kind)
    if kind is FileKind.GGUF:
        _check_gguf_model(path)
        return DetectedCheckpoint(CheckpointFormat.GGUF, path.parent, (path,), None, kind)
    params = path.parent / "params.json"
    config = path.parent / "config.json"
    if kind is FileKind.SAFETENSORS:
        names = safetensors_names(path)
        if _looks_hf(names):
            if not _is_hf_config(_json_object(config)):
                raise CheckpointError(
                    f"{path}: Hugging Face weights need a config.json beside them: {config}"
                )
            return DetectedCheckpoint(CheckpointFormat.HF, path.parent, (path,), config, kind)
        if not _is_meta_params(_json_object(params)):
            raise CheckpointError(f"{path}: llama2 weights need a params.json beside them: {params}")
        return DetectedCheckpoint(CheckpointFormat.LLAMA2, path.parent, (path,), params, kind)
    if kind in (FileKind.TORCH_ZIP, FileKind.PICKLE):
        if _is_meta_params(_json_object(params)):
            return DetectedCheckpoint(CheckpointFormat.META, path.parent, (path,), params, kind)
        if _is_hf_config(_json_object(config)):
            return DetectedCheckpoint(CheckpointFormat.HF, path.parent, (path,), config, kind)
        raise CheckpointError(
            f"{path}: a PyTorch file needs params.json (Meta) or config.json (Hugging Face) beside it"
        )
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected safetensors, a PyTorch archive, a llama2.c .bin, "
        "a GGUF model, or a folder holding one"
    )


_OURS, _ST = CheckpointFormat.LLAMA2, FileKind.SAFETENSORS


def _detect_dir(root: Path) -> DetectedCheckpoint:
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    params_path, config_path = root / "params.json", root / "config.json"
    params = _json_object(params_path) if params_path.is_file() else None
    config = _json_object(config_path) if config_path.is_file() else None
    kinds = {p: sniff(p) for p in files if p.suffix != ".json"}
    torch_files = tuple(p for p, k in kinds.items() if k in (FileKind.TORCH_ZIP, FileKind.PICKLE))
    st_files = tuple(p for p, k in kinds.items() if k is FileKind.SAFETENSORS)

    if _is_meta_params(params):
        if params is not None and params.get("format") == "llama2" and st_files:
            return DetectedCheckpoint(_OURS, root, st_files, params_path, _ST)
        if torch_files:
            kind = kinds[torch_files[0]]
            return DetectedCheckpoint(CheckpointFormat.META, root, torch_files, params_path, kind)
        meta_st = tuple(p for p in st_files if not _looks_hf(safetensors_names(p)))
        if meta_st:
            return DetectedCheckpoint(_OURS, root, meta_st, params_path, _ST)
    if _is_hf_config(config):
        for index_name in HF_INDEX_NAMES:
            index_path = root / index_name
            if index_path.is_file():
                shards = _index_shards(index_path)
                kind = sniff(shards[0])
                if kind not in (FileKind.SAFETENSORS, FileKind.TORCH_ZIP, FileKind.PICKLE):
                    raise CheckpointError(
                        f"{shards[0]}: not a safetensors or PyTorch file (listed in {index_name})"
                    )
                return DetectedCheckpoint(CheckpointFormat.HF, root, shards, config_path, kind)
        if st_files:
            return DetectedCheckpoint(CheckpointFormat.HF, root, st_files, config_path, _ST)
        if torch_files:
            kind = kinds[torch_files[0]]
            return DetectedCheckpoint(CheckpointFormat.HF, root, torch_files, config_path, kind)
        raise CheckpointError(f"{root}: config.json found but no safetensors or PyTorch weight files")
    l2c = [(p, k) for p, k in kinds.items() if k in (FileKind.LLAMA2C_V0, FileKind.LLAMA2C_V1)]
    if len(l2c) == 1:
        p, k = l2c[0]
        return DetectedCheckpoint(CheckpointFormat.LLAMA2C, root, (p,), None, k)
    if len(l2c) > 1:
        names = ", ".join(p.name for p, _ in l2c)
        raise CheckpointError(f"{root}: several llama2.c files ({names}); pass the one to load")
    gguf_files = [p for p, k in kinds.items() if k is FileKind.GGUF]
    if gguf_files and not torch_files and not st_files:
        models = [p for p in gguf_files if _gguf_counts(p)[0] > 0]
        if len(models) > 1:
            names = ", ".join(p.name for p in models)
            raise CheckpointError(f"{root}: several GGUF model files ({names}); pass the one to load")
        model = models[0] if models else gguf_files[0]
        _check_gguf_model(model)  # a vocabulary-only file is refused here with its reason
        return DetectedCheckpoint(CheckpointFormat.GGUF, root, (model,), None, FileKind.GGUF)
    if params is not None or config is not None:
        raise CheckpointError(f"{root}: a params.json/config.json is present but no weight files were found")
    raise CheckpointError(
        f"{root}: unknown checkpoint format; expected params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors (Hugging Face), params.json + model.safetensors (llama2), "
        "a llama2.c .bin file, or a llama.cpp .gguf model file"
    )


def _gguf_counts(path: Path) -> tuple[int, str | None]:
    try:
        return read_gguf_architecture(path)
    except GGUFFormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None


def _check_gguf_model(path: Path) -> None:
    """Refuse a GGUF file that is not a Llama model with weights (reason and expectation named)."""
    n_tensors, arch = _gguf_counts(path)
    if n_tensors == 0:
        raise CheckpointError(
            f"{path}: this GGUF file holds no tensors (a vocabulary-only file, i.e. a tokenizer); "
            "expected a GGUF model with weights. Pass it as the tokenizer instead"
        )
    if arch != "llama":
        raise CheckpointError(
            f"{path}: GGUF general.architecture is {arch!r}; expected 'llama' (Llama 2 / Code Llama)"
        )


def _index_shards(index_path: Path) -> tuple[Path, ...]:
    index = _json_object(index_path)
    weight_map = index.get("weight_map") if index else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a JSON object with a non-empty 'weight_map'")
    shards: list[Path] = []
    for shard in weight_map.values():
        p = index_path.parent / str(shard)
        if p not in shards:
            shards.append(p)
    for p in shards:
        if not p.is_file():
            raise CheckpointError(f"{index_path}: lists shard {p.name} which does not exist")
    return tuple(sorted(shards))


def detect_format(path: Path | str) -> CheckpointFormat:
    """The format of the checkpoint at `path` (a folder or a single file), read from file contents."""
    return detect(path).format
