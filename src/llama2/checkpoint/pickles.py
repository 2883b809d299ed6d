"""Reading PyTorch weight files (`torch.save` archives and the legacy pickle format) without running
the code a pickle can carry.

The line of defence is `torch.load(weights_only=True)`: torch's restricted unpickler builds tensors,
storages, dtypes and plain containers and calls nothing else. `torch_load` always loads with it
(memory-mapped for zip archives; torch cannot map the legacy format, which it reads into memory).

Before that, `scan_torch_file` gives an early, clearer error: it reads (never executes) the opcodes of
every pickle torch could unpickle from the file (each `*.pkl` entry of a zip archive in any letter
case, duplicate names included; the up to five consecutive pickles of the legacy format) and refuses
a file that references any global outside `ALLOWED_GLOBALS`. It follows the unpickler's stack and
memo symbolically, so a STACK_GLOBAL whose operands come through the memo (BINPUT/LONG_BINPUT/
MEMOIZE, BINGET/LONG_BINGET) is resolved; one whose operands it cannot resolve to strings is refused.
It does not check what the allowed callables do with their arguments; that is left to torch.

After loading, each entry must be a dense (strided) tensor with data, of a real, non-quantized
dtype, whose elements do not overlap in storage; anything else is refused naming the file and tensor.
"""

from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

import torch
from torch import Tensor

from llama2.checkpoint.formats import FileKind, sniff
from llama2.errors import CheckpointError, UnsafeCheckpointError

_PLAIN_STORAGES = ("Float", "Half", "BFloat16", "Double", "Char", "Byte", "Short", "Int", "Long", "Bool")
_REAL_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip

# What `torch.save` writes for a dict of dense tensors (or Parameters) of real dtypes.
PLAIN_TENSOR_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),  # dtypes without a legacy storage class (uint16, float8)
        ("torch._utils", "_rebuild_parameter"),
        ("torch.storage", "UntypedStorage"),
    ]
    + [("torch", f"{kind}Storage") for kind in _PLAIN_STORAGES]
    + [("torch", dtype) for dtype in _REAL_DTYPES]
)
# Other tensor kinds torch's weights-only unpickler builds as plain data. The scan lets them through so
# that the check after loading can name the tensor (they are refused there: the model needs dense
# real tensors).
OTHER_TENSOR_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [
        ("torch._utils", "_rebuild_sparse_tensor"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage"),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch", "complex32"),
        ("torch", "complex64"),
        ("torch", "complex128"),
        ("torch", "ComplexFloatStorage"),
        ("torch", "ComplexDoubleStorage"),
    ]
    + [("torch", f"{kind}Storage") for kind in ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4")]
    + [
        ("torch", scheme)
        for scheme in (
            "per_tensor_affine",
            "per_tensor_symmetric",
            "per_channel_affine",
            "per_channel_symmetric",
            "per_channel_affine_float_qparams",
        )
    ]
)
ALLOWED_GLOBALS = PLAIN_TENSOR_GLOBALS | OTHER_TENSOR_GLOBALS

_LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys
_UNKNOWN = object()  # a stack value the scan does not track (anything but a string)
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GETS = ("GET", "BINGET", "LONG_BINGET")
_STRING_PUSHES = (
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
)  # fmt: skip


class _CorruptPickle(Exception):
    """The opcodes do not form a pickle the unpickler could run (raised by the scan)."""


_Global = tuple[object, object]  # (module, name) as the pickle spells them


def _pickle_globals(stream: IO[bytes]) -> list[_Global]:
    """Globals one pickle in `stream` references, as (module, name) pairs (nothing is executed).

    The unpickler's stack (marks as depths) and memo are simulated with every value unknown except
    strings, which is enough to resolve STACK_GLOBAL's two operands wherever they come from.
    """
    stack: list[object] = []
    marks: list[int] = []  # stack depth at each MARK still open
    memo: dict[int, object] = {}
    found: list[_Global] = []
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        floor = marks[-1] if marks else 0  # the unpickler cannot pop below the innermost mark
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
        elif name == "STACK_GLOBAL":
            if len(stack) - floor < 2:
                raise _CorruptPickle("STACK_GLOBAL with fewer than two operands")
            operands = stack[-2], stack[-1]
            if all(isinstance(x, str) for x in operands):
                found.append(operands)
            else:
                found.append(("<STACK_GLOBAL>", "<operands not resolved to strings>"))
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(("<copyreg extension>", str(arg)))
        if name == "MARK":
            marks.append(len(stack))
            continue
        if pickletools.markobject in op.stack_before or (name == "POP" and marks and floor == len(stack)):
            if not marks:
                raise _CorruptPickle(f"{name} without a MARK")
            below = op.stack_before.index(pickletools.markobject) if name != "POP" else 0
            depth = marks.pop()
            if depth - below < (marks[-1] if marks else 0):
                raise _CorruptPickle(f"{name} pops below the stack")
            del stack[depth - below :]
            stack.extend(_UNKNOWN for _ in op.stack_after)
            continue
        if name in _MEMO_PUTS or name == "MEMOIZE":
            if len(stack) <= floor:
                raise _CorruptPickle(f"{name} with an empty stack")
            memo[len(memo) if name == "MEMOIZE" else _memo_key(arg)] = stack[-1]  # overwrites, as pickle does
            continue
        if name in _MEMO_GETS:
            if _memo_key(arg) not in memo:
                raise _CorruptPickle(f"{name} {arg} of a memo slot never stored")
            stack.append(memo[_memo_key(arg)])
            continue
        n = len(op.stack_before)
        if len(stack) - n < floor:
            raise _CorruptPickle(f"{name} pops below the stack")
        popped = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        if name == "DUP":
            stack.extend(popped * 2)
        elif name in _STRING_PUSHES:
            stack.append(arg if isinstance(arg, str) else _UNKNOWN)
        else:
            stack.extend(_UNKNOWN for _ in op.stack_after)
    return found


def _memo_key(arg: object) -> int:
    if not isinstance(arg, int):
        raise _CorruptPickle(f"memo index {arg!r}")
    return arg


def _scan_stream(stream: IO[bytes], where: str, max_pickles: int) -> list[_Global]:
    """Globals of up to `max_pickles` consecutive pickles in `stream` (stops at the end of data)."""
    found: list[_Global] = []
    for _ in range(max_pickles):
        if stream.read(1) == b"":
            break
        stream.seek(-1, 1)
        try:
            found += _pickle_globals(stream)
        except (_CorruptPickle, ValueError, EOFError, UnicodeDecodeError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{where}: corrupt pickle ({e}); expected torch.save output") from None
    return found


def scan_torch_file(file: Path, kind: FileKind) -> None:
    """Refuse, before anything is unpickled, a PyTorch file whose pickles reference any global outside
    `ALLOWED_GLOBALS` (an early, precise error; `torch.load(weights_only=True)` is the real guard).

    Raises:
        UnsafeCheckpointError: a disallowed or unresolvable global (named in the message).
        CheckpointError: not a zip archive or pickle, a damaged archive, a pickle that does not parse,
            a TorchScript archive.
    """
    found: list[_Global] = []
    if kind is FileKind.TORCH_ZIP:
        try:
            with zipfile.ZipFile(file) as zf:
                # torch finds records by case-insensitive name (miniz): `ARCHIVE/DATA.PKL` is read too
                infos = [i for i in zf.infolist() if i.filename.lower().endswith(".pkl")]
                if not any(PurePosixPath(i.filename.lower()).name == "data.pkl" for i in infos):
                    raise CheckpointError(
                        f"{file}: PyTorch archive without data.pkl; expected torch.save output"
                    )
                if any(PurePosixPath(i.filename.lower()).name == "constants.pkl" for i in infos):
                    raise CheckpointError(
                        f"{file}: a TorchScript archive (torch.jit.save), not a weights file; expected "
                        "torch.save(model.state_dict())"
                    )
                for info in infos:  # every pickle, not only the one torch is expected to read
                    with zf.open(info) as stream:
                        found += _scan_stream(stream, f"{file} ({info.filename})", max_pickles=1)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise CheckpointError(
                f"{file}: truncated or corrupt PyTorch archive ({e}); cannot read any tensor"
            ) from None
    else:
        try:
            with file.open("rb") as f:
                found = _scan_stream(f, str(file), max_pickles=_LEGACY_PICKLES)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read file ({e})") from None
    bad = sorted({f"{module}.{attr}" for module, attr in found if (module, attr) not in ALLOWED_GLOBALS})
    if bad:
        raise UnsafeCheckpointError(
            f"{file}: refused to load: its pickle references {', '.join(bad)}, which a file of plain "
            "tensors never needs (it could run code); expected torch.save output of tensors only"
        )


def torch_load(file: Path) -> dict[str, Tensor]:
    """Read a PyTorch weights file with `torch.load(weights_only=True)` (memory-mapped when it is a zip
    archive) after `scan_torch_file`, and return its flat name -> tensor dict, each tensor checked
    by `check_tensor`."""
    kind = sniff(file)
    if kind not in (FileKind.TORCH_ZIP, FileKind.PICKLE):
        raise CheckpointError(
            f"{file}: not a PyTorch file (it looks like {kind}); expected torch.save output"
        )
    scan_torch_file(file, kind)
    try:
        # torch warns while building some tensor kinds (a sparse CSR tensor: "support is in beta
        # state"); those are refused below with one line, so its warnings are not shown. Only this call
        # is silenced: our own warnings are issued outside it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=kind is FileKind.TORCH_ZIP)
    except pickle.UnpicklingError as e:
        reason = " ".join(line for line in str(e).splitlines()[2:] if line.strip())[:300]
        raise UnsafeCheckpointError(
            f"{file}: refused to load: it holds objects other than plain tensors, which could run code "
            f"when unpickled ({reason}); expected only tensors"
        ) from None
    except Exception as e:  # a damaged file can make torch raise almost anything
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{file}: truncated or corrupt PyTorch file ({type(e).__name__}: {reason}); "
            "cannot read its tensors"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{file}: entry {name!r:.80} is a {type(value).__name__}; expected a tensor"
            )
        check_tensor(file, name, value)
    return obj


def check_tensor(file: Path, name: str, t: Tensor) -> None:
    """Refuse a tensor the model cannot hold: sparse, without data (meta), torch-quantized, complex,
    or with elements that overlap in storage (e.g. an expanded view)."""
    problem = ""
    if t.layout != torch.strided:
        problem = f"is a {str(t.layout).removeprefix('torch.')} tensor; expected a dense tensor"
    elif t.is_meta:
        problem = "is a meta tensor (shape only, no data: saved from a model on the meta device)"
    elif t.is_quantized:
        problem = f"is a torch-quantized tensor ({t.dtype}); expected float weights"
    elif t.is_complex():
        problem = f"has complex dtype {t.dtype}; expected real (floating-point) weights"
    elif t.numel() > 1 and torch._debug_has_internal_overlap(t) != 0:
        problem = f"has elements that share storage (strides {list(t.stride())}); expected a plain tensor"
    if problem:
        raise CheckpointError(f"{file}: tensor {name!r} {problem}")
