"""Crafted pickles that run code are refused (`UnsafeCheckpointError`) and their payload never runs.

Each payload is written opcode by opcode, so the tests do not rely on our scanner's view of pickles:
a control test shows every one of them does run under plain `pickle.loads` (it creates a marker
file), then each is refused in every container (legacy pickle file, `torch.save` zip archive, and a
zip whose first `data.pkl` is a benign decoy) by `load_model` and by `torch_load`, and the marker
stays absent. The bypasses covered: STACK_GLOBAL operands fetched from the memo (including an
overwritten memo slot), `torch.*` callables (`torch.save`, `torch.load` with a pickle module,
`torch.hub`'s local loader), `os.system` via `__reduce__`, `builtins.eval`/`exec`,
`subprocess.Popen`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llama2.checkpoint import load_model
from llama2.checkpoint.formats import sniff
from llama2.checkpoint.pickles import scan_torch_file, torch_load
from llama2.errors import CheckpointError, UnsafeCheckpointError

PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 64, "multiple_of": 16, "max_seq_len": 16}

P = pickle  # opcode constants: pickle.PROTO, pickle.GLOBAL, ...


def _u(s: str) -> bytes:
    """SHORT_BINUNICODE / BINUNICODE: push the str `s`."""
    b = s.encode()
    if len(b) < 256:
        return P.SHORT_BINUNICODE + bytes([len(b)]) + b
    return P.BINUNICODE + len(b).to_bytes(4, "little") + b


def _global(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _call(func: bytes, *args: bytes) -> bytes:
    """Push `func(*args)`: func and each arg are opcodes that push one value."""
    return func + P.MARK + b"".join(args) + P.TUPLE + P.REDUCE


def _pickle(body: bytes) -> bytes:
    """A protocol-4 pickle of {"w": <body's value>}."""
    return P.PROTO + b"\x04" + P.EMPTY_DICT + _u("w") + body + P.SETITEM + P.STOP


def _touch_cmd(marker: Path) -> str:
    return f"touch {marker}"


def _open_src(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# ----------------------------------------------------------------------------- the payloads
def stack_global_memo(marker: Path, tmp: Path) -> bytes:
    """os.system via STACK_GLOBAL whose operands come from the memo; the last strings pushed (then
    popped) are a harmless "torch", "Tensor", which a scanner that pairs recent strings would see."""
    body = (
        _u("os") + P.MEMOIZE + P.POP  # memo[0] = "os"
        + _u("system") + P.MEMOIZE + P.POP  # memo[1] = "system"
        + _u("torch") + _u("Tensor") + P.POP + P.POP
        + P.BINGET + b"\x00" + P.BINGET + b"\x01" + P.STACK_GLOBAL
    )  # fmt: skip
    return _pickle(body + P.MARK + _u(_touch_cmd(marker)) + P.TUPLE + P.REDUCE)


def memo_overwrite(marker: Path, tmp: Path) -> bytes:
    """A memo slot first holding "torch" is overwritten with "builtins" before it is read back."""
    body = (
        _u("torch") + P.BINPUT + b"\x05" + P.POP
        + _u("builtins") + P.BINPUT + b"\x05" + P.POP
        + _u("exec") + P.LONG_BINPUT + (7).to_bytes(4, "little") + P.POP
        + P.BINGET + b"\x05" + P.LONG_BINGET + (7).to_bytes(4, "little") + P.STACK_GLOBAL
    )  # fmt: skip
    return _pickle(body + P.MARK + _u(_open_src(marker)) + P.TUPLE + P.REDUCE)


def torch_save(marker: Path, tmp: Path) -> bytes:
    """torch.save({}, marker) writes the marker."""
    return _pickle(_call(_global("torch", "save"), P.EMPTY_DICT, _u(str(marker))))


def torch_load_pickle_module(marker: Path, tmp: Path) -> bytes:
    """torch.load(inner, None, pickle) unpickles `inner` with plain pickle (weights_only off)."""
    inner = tmp / "inner.pkl"
    inner.write_bytes(_pickle(_call(_global("builtins", "exec"), _u(_open_src(marker)))))
    pickle_module = _global("torch", "serialization.pickle")  # a dotted name: protocol 4 resolves it
    return _pickle(_call(_global("torch", "load"), _u(str(inner)), P.NONE, pickle_module))


def torch_hub_local(marker: Path, tmp: Path) -> bytes:
    """torch.hub's local loader imports `hubconf.py` from a folder and calls an entry point."""
    hub = tmp / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"def entry():\n    {_open_src(marker)}\n")
    return _pickle(_call(_global("torch", "hub._load_local"), _u(str(hub)), _u("entry")))


def os_system_reduce(marker: Path, tmp: Path) -> bytes:
    """What pickle itself writes for an object whose __reduce__ returns (os.system, (cmd,))."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (_touch_cmd(marker),))

    return pickle.dumps({"w": Payload()}, protocol=2)


def builtins_eval(marker: Path, tmp: Path) -> bytes:
    return _pickle(_call(_global("builtins", "eval"), _u(_open_src(marker))))


def builtins_exec(marker: Path, tmp: Path) -> bytes:
    return _pickle(_call(_global("builtins", "exec"), _u(_open_src(marker))))


def subprocess_popen(marker: Path, tmp: Path) -> bytes:
    argv = P.MARK + _u("touch") + _u(str(marker)) + P.LIST
    return _pickle(_call(_global("subprocess", "Popen"), argv))


PAYLOADS: dict[str, Callable[[Path, Path], bytes]] = {
    f.__name__: f
    for f in (
        stack_global_memo,
        memo_overwrite,
        torch_save,
        torch_load_pickle_module,
        torch_hub_local,
        os_system_reduce,
        builtins_eval,
        builtins_exec,
        subprocess_popen,
    )
}


def _settle(value: object) -> None:
    """Wait for a payload that started a process (Popen) to finish."""
    if hasattr(value, "wait"):
        value.wait()


# ----------------------------------------------------------------------------- containers
def _torch_zip_entries() -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save({"tok_embeddings.weight": torch.zeros(64, 32)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _write_zip(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": intended
        for name, data in entries:
            zf.writestr(name, data)


def _container(kind: str, evil: bytes, path: Path) -> None:
    """Write `evil` as a legacy pickle file, as the data.pkl of a torch archive, or as a second
    data.pkl behind a benign one (torch reads the last of duplicate names; a lone scan of the first
    would see only the decoy), or under an upper-case name (torch's zip reader ignores case)."""
    if kind == "pickle":
        path.write_bytes(evil)
        return
    entries = _torch_zip_entries()
    data_pkl = entries[0][0]
    if kind == "torch-zip":
        entries[0] = (data_pkl, evil)
    elif kind == "decoy-first":
        entries.insert(1, (data_pkl, evil))
    elif kind == "upper-case":
        entries.insert(1, (data_pkl.replace("data.pkl", "DATA.PKL"), evil))
    _write_zip(path, entries)


CONTAINERS = ["pickle", "torch-zip", "decoy-first", "upper-case"]


def _meta_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(PARAMS))
    return folder


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("payload", PAYLOADS)
def test_control_payload_runs_under_plain_pickle(payload: str, tmp_path: Path) -> None:
    """Without the guards each payload runs, so the refusals below can fail."""
    marker = tmp_path / "pwned"
    data = PAYLOADS[payload](marker, tmp_path)
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):  # torch.load(inner, None, pickle): payload runs, then no magic
        _settle(pickle.loads(data)["w"])
    assert marker.exists()


@pytest.mark.parametrize("container", ["decoy-first", "upper-case"])
def test_control_torch_reads_the_hidden_pickle(container: str, tmp_path: Path) -> None:
    """Control for the zip tricks: torch.load without weights_only does unpickle the hidden entry."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    _container(container, builtins_exec(marker, tmp_path), path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_refused_and_never_runs(payload: str, container: str, tmp_path: Path) -> None:
    folder = _meta_folder(tmp_path)
    marker = tmp_path / "pwned"
    target = folder / "consolidated.00.pth"
    _container(container, PAYLOADS[payload](marker, tmp_path), target)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(folder, progress=False)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnsafeCheckpointError, match="its pickle references"):  # the scan's own refusal
        scan_torch_file(target, sniff(target))
    if payload == "subprocess_popen":
        time.sleep(0.3)  # a started process would have touched the marker by now
    assert not marker.exists()


def test_hf_bin_payload_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "vocab_size": 64}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    _container("decoy-first", stack_global_memo(marker, tmp_path), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin: refused .*os\.system"):
        load_model(folder, progress=False)
    assert not marker.exists()


def test_refusal_names_the_global(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    _container("torch-zip", memo_overwrite(tmp_path / "pwned", tmp_path), path)
    with pytest.raises(UnsafeCheckpointError, match=r"references builtins\.exec,"):
        torch_load(path)


def test_unresolved_stack_global_refused(tmp_path: Path) -> None:
    """STACK_GLOBAL operands that are not strings pushed in the pickle (here: a tuple) are refused."""
    body = _u("torch") + _u("Tensor") + P.TUPLE2 + P.DUP + P.STACK_GLOBAL
    path = tmp_path / "m.pth"
    path.write_bytes(_pickle(body))
    with pytest.raises(UnsafeCheckpointError, match="STACK_GLOBAL"):
        torch_load(path)


@pytest.mark.parametrize(
    "tensors",
    [
        {"a": torch.zeros(3, 2)},
        {"a": torch.zeros(2, 3).t(), "b": torch.ones(4, dtype=torch.bfloat16)},
        {"p": torch.nn.Parameter(torch.ones(2)), "i": torch.arange(3)},
        {"u": torch.zeros(2, dtype=torch.uint16), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn)},
    ],
)
@pytest.mark.parametrize("legacy", [False, True])
def test_plain_tensor_files_load(tensors: dict[str, torch.Tensor], legacy: bool, tmp_path: Path) -> None:
    """What torch.save writes for plain tensors passes the scan (in both of torch's formats)."""
    if legacy and any(t.dtype == torch.uint16 for t in tensors.values()):
        pytest.skip("torch's legacy format cannot store uint16 (torch itself fails to read it back)")
    path = tmp_path / "m.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
    out = torch_load(path)
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(out[name], t)


def test_truncated_pickle_is_corrupt_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    torch.save({"a": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"m\.pth: corrupt pickle") as err:
        torch_load(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
