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

Headers are validated before anything is built from them: safetensors in `safetensors_header`,
llama2.c in `llama2c_header`, GGUF in `llama2.gguf_header`, JSON configs with `llama2.limits`. An index
file (`model.safetensors.index.json`) may only name plain files inside the checkpoint folder
(`resolve_inside`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from llama2.checkpoint.llama2c_header import (
    LLAMA2C_MAGIC,
    LLAMA2C_V0_HEADER_BYTES,
    LLAMA2C_V1_HEADER_BYTES,
    Llama2cHeader,
    read_head,
    read_llama2c_header,
)
from llama2.checkpoint.safetensors_header import (
    SAFETENSORS_MAX_HEADER,
    read_safetensors_header,
    safetensors_names,
)
from llama2.errors import CheckpointError, Llama2Error
from llama2.gguf_header import GGUFFormatError, read_gguf_architecture
from llama2.limits import BOUNDS, loads_json

__all__ = [
    "HF_INDEX_NAMES",
    "LLAMA2C_MAGIC",
    "LLAMA2C_V0_HEADER_BYTES",
    "LLAMA2C_V1_HEADER_BYTES",
    "SAFETENSORS_MAX_HEADER",
    "CheckpointFormat",
    "DetectedCheckpoint",
    "FileKind",
    "Llama2cHeader",
    "detect",
    "detect_format",
    "read_llama2c_header",
    "read_safetensors_header",
    "resolve_inside",
    "safetensors_names",
    "sniff",
]

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
def sniff(path: Path) -> FileKind:
    """Classify one file by its first bytes."""
    head = read_head(path, 16)
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


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is not one (unreadable, too large, too deep, not JSON)."""
    try:
        with path.open("rb") as f:
            raw = f.read(BOUNDS["json_bytes"].max + 1)
        data = loads_json(raw, str(path), CheckpointError)
    except (OSError, Llama2Error):
        return None
    return data if isinstance(data, dict) else None


def _json_problem(path: Path) -> str:
    """Why `path` is not a JSON object (for error messages)."""
    try:
        with path.open("rb") as f:
            data = loads_json(f.read(BOUNDS["json_bytes"].max + 1), path.name, CheckpointError)
    except OSError as e:
        return f"{path.name}: cannot read file ({e.strerror or e})"
    except Llama2Error as e:
        return str(e)
    return f"{path.name}: expected a JSON object, got {type(data).__name__}"


def _is_meta_params(data: dict[str, Any] | None) -> bool:
    return data is not None and "dim" in data and "n_layers" in data


PARAMS_FORMATS = ("llama2",)  # values of params.json's "format" key this package reads (Meta's has none)


def _check_params_format(path: Path, data: dict[str, Any] | None) -> None:
    """Refuse a params.json whose "format" names a layout other than ours (e.g. "llama3"): its weights
    would be read with Llama 2's rules. Meta's params.json has no "format" key; ours has "llama2"."""
    if data is None or "format" not in data or data["format"] in PARAMS_FORMATS:
        return
    raise CheckpointError(
        f"{path}: \"format\" is {data['format']!r:.60}, which this package cannot read; expected "
        f"{', '.join(repr(f) for f in PARAMS_FORMATS)} (ours) or no \"format\" key (Meta's params.json)"
    )


_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def _meta_shards(root: Path, files: list[Path], torch_files: tuple[Path, ...]) -> tuple[Path, ...]:
    """The PyTorch files of a Meta folder in rank order, after checking Meta's shard names.

    Meta writes rank r's shard as `consolidated.{r:02d}.pth`: the names must be exactly ranks 0..N-1
    (one gap would merge the wrong slices). A file named `consolidated.*` that is not one of these, or a
    PyTorch file beside them with another name, is refused. PyTorch files none of which is named like a
    shard are taken in sorted order, as Meta's own `Llama.build` does (`sorted(glob("*.pth"))`); a
    missing or extra one then fails the shape check of the merged tensors.
    """
    named = [
        p for p in files if p.name.startswith("consolidated.") and (p.suffix == ".pth" or p in torch_files)
    ]
    if not named:  # no Meta shard names: rank order is the sorted order, as Meta's loader does
        return tuple(sorted(torch_files))
    ranks: dict[int, Path] = {}
    for p in named:
        m = _META_SHARD.fullmatch(p.name)
        if m is None or m.group(1) != f"{int(m.group(1)):02d}":
            raise CheckpointError(
                f"{p}: not a Meta shard name; expected consolidated.NN.pth with NN the rank in two digits "
                "(consolidated.00.pth, consolidated.01.pth, ...)"
            )
        ranks[int(m.group(1))] = p
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        found = ", ".join(ranks[r].name for r in sorted(ranks)[:4]) + (", ..." if len(ranks) > 4 else "")
        raise CheckpointError(
            f"{root}: Meta shard consolidated.{missing[0]:02d}.pth is missing (found {found}); expected "
            f"consolidated.00.pth .. consolidated.{max(ranks):02d}.pth, one per model-parallel rank"
        )
    others = [p for p in torch_files if p not in named]
    if others:
        raise CheckpointError(
            f"{others[0]}: a PyTorch file beside Meta shards consolidated.NN.pth; expected only the shards "
            "in a Meta checkpoint folder (move other .pth files elsewhere)"
        )
    return tuple(ranks[r] for r in sorted(ranks) if ranks[r] in torch_files)  # others: meta.py names them


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
        params_data = _json_object(params)
        if not _is_meta_params(params_data):
            raise CheckpointError(f"{path}: llama2 weights need a params.json beside them: {params}")
        _check_params_format(params, params_data)
        return DetectedCheckpoint(CheckpointFormat.LLAMA2, path.parent, (path,), params, kind)
    if kind in (FileKind.TORCH_ZIP, FileKind.PICKLE):
        params_data = _json_object(params)
        if _is_meta_params(params_data):
            _check_params_format(params, params_data)
            if _META_SHARD.fullmatch(path.name):  # one shard of a Meta folder: load all its shards
                found = _detect_dir(path.parent)
                if found.format is CheckpointFormat.META and path in found.weight_files:
                    return found
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
        _check_params_format(params_path, params)
        if params is not None and params.get("format") == "llama2" and st_files:
            return DetectedCheckpoint(_OURS, root, st_files, params_path, _ST)
        if torch_files:
            shards = _meta_shards(root, files, torch_files)
            if shards:
                kind = kinds[shards[0]]
                return DetectedCheckpoint(CheckpointFormat.META, root, shards, params_path, kind)
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
    unknown = [p for p, k in kinds.items() if k is FileKind.UNKNOWN]
    not_weights = f"; not weight files: {_describe_unknown(unknown)}" if unknown else ""
    if params is not None or config is not None:
        raise CheckpointError(
            f"{root}: a params.json/config.json is present but no weight files were found{not_weights}"
        )
    broken = [_json_problem(p) for p in (params_path, config_path) if p.is_file()]
    if broken:
        raise CheckpointError(f"{root}: {'; '.join(broken)}{not_weights}")
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


def _describe_unknown(files: list[Path], limit: int = 3) -> str:
    """`name (why)` for files whose first bytes match no weight format, e.g. a corrupt safetensors file."""
    out: list[str] = []
    for p in files[:limit]:
        head = read_head(p, 16)
        if len(head) >= 9 and head[8:9] == b"{":
            (n,) = struct.unpack("<Q", head[:8])
            out.append(f"{p.name} (a safetensors-like file whose header length {n} is out of range)")
        else:
            out.append(f"{p.name} (starts with {head[:12]!r}; not safetensors, PyTorch, llama2.c or GGUF)")
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(out) + more


def _allowed_roots(root: Path) -> list[Path]:
    """Folders a checkpoint's files may resolve into: the checkpoint folder, and for a Hugging Face
    hub cache snapshot (`models--X/snapshots/REV/`) that repository's `blobs/`, where its links point."""
    base = root.resolve()
    roots = [base]
    if base.parent.name == "snapshots":
        roots.append(base.parent.parent / "blobs")
    return roots


def resolve_inside(root: Path, name: Any, source: Path) -> Path:
    """The file a checkpoint index or pointer names, refused unless it is a plain file in `root`.

    Args:
        root: the checkpoint folder.
        name: the JSON value naming the file (must be a relative path string).
        source: the index file (for messages).

    Raises:
        CheckpointError: `name` is not a string, is absolute, holds `..`, does not exist, is not a
            regular file, or resolves (through a symbolic link) outside the checkpoint folder.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: a file name must be a non-empty string, got {name!r:.60}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise CheckpointError(
            f"{source}: file {name!r:.80} is not a plain name inside the checkpoint folder "
            "(absolute paths and '..' are refused)"
        )
    path = root / rel
    if not path.is_file():
        raise CheckpointError(f"{source}: lists file {name!r:.80} which does not exist in {root}")
    target = path.resolve()
    if not any(target.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(
            f"{source}: file {name!r:.80} is a link to {target}, outside the checkpoint folder {root}"
        )
    return path


def _index_shards(index_path: Path) -> tuple[Path, ...]:
    index = _json_object(index_path)
    if index is None:
        raise CheckpointError(f"{index_path}: {_json_problem(index_path)}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected a JSON object with a non-empty 'weight_map'")
    if len(weight_map) > BOUNDS["tensors_per_file"].max:
        raise CheckpointError(
            f"{index_path}: 'weight_map' lists {len(weight_map)} tensors; at most "
            f"{BOUNDS['tensors_per_file'].max} are supported"
        )
    names: list[Any] = []
    for name in weight_map.values():
        if name not in names:
            names.append(name)
    return tuple(sorted({resolve_inside(index_path.parent, name, index_path) for name in names}))


def detect_format(path: Path | str) -> CheckpointFormat:
    """The format of the checkpoint at `path` (a folder or a single file), read from file contents."""
    return detect(path).format
