"""GGUF model files written independently with the `gguf` package's `GGUFWriter` (llama.cpp names,
keys and block formats; `gguf.quants` as the reference quantizer/dequantizer) load into our model."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from ckpt_support import hf_logits, hf_model, randomize_
from gguf.quants import dequantize, quantize

from llama2.checkpoint import CheckpointFormat, detect, load_model, read_checkpoint, save_checkpoint
from llama2.checkpoint.gguf_model import dequantize_source
from llama2.config import ModelArgs, RopeScaling
from llama2.errors import CheckpointError
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "llama2-tokenizer"
VOCAB_GGUF = FIXTURES / "ggml-vocab-llama-spm.gguf"
Q = gguf.GGMLQuantizationType

ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96, rope_theta=1e6, max_seq_len=32
)

# llama.cpp's tensor names, written out here independently of the loader's table.
LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}
GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
with torch.device("meta"):
    ARGS_SHAPES = {name: tuple(t.shape) for name, t in Transformer(ARGS).state_dict().items()}


def llama_cpp_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    if name == "output.weight":
        return name
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def random_model(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    randomize_(model, seed)
    return model.eval()


def write_gguf(
    path: Path,
    args: ModelArgs,
    tensors: dict[str, np.ndarray],
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
    *,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
    vocab: tuple[list[str], list[float], list[int]] | None = None,
) -> Path:
    """A GGUF file as llama.cpp's converter writes one: `tensors` maps llama.cpp names to float arrays
    (or, with a type in `types`, to already-encoded uint8 blocks)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_tokenizer_model("llama")
    if vocab is None:
        pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(args.vocab_size - 3))]
        vocab = (pieces, [0.0] * len(pieces), [2, 3, 3, *([6] * (len(pieces) - 3))])
    w.add_token_list(vocab[0])
    w.add_token_scores(vocab[1])
    w.add_token_types(vocab[2])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if extra is not None:
        extra(w)
    for name, arr in tensors.items():
        qt = (types or {}).get(name)
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def float_tensors(model: Transformer, dtype: type = np.float32) -> dict[str, np.ndarray]:
    out = {}
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        out[llama_cpp_name(name)] = arr if arr.ndim == 1 else arr.astype(dtype)
    return out


def toks(n: int = 12, vocab: int = ARGS.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits(path: Path, **kw: object) -> torch.Tensor:
    return load_model(path, progress=False, **kw).model(toks())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ float tensors
def test_f32_gguf_logits_equal_safetensors(tmp_path: Path) -> None:
    model = random_model()
    ref_dir = save_checkpoint(model, ARGS, tmp_path / "ours")
    path = write_gguf(tmp_path / "m.gguf", ARGS, float_tensors(model))
    assert detect(path).format is CheckpointFormat.GGUF
    loaded = load_model(path, progress=False)
    assert loaded.format == "gguf"
    assert loaded.args.ffn_hidden_dim == ARGS.ffn_hidden_dim
    assert (loaded.args.norm_eps, loaded.args.rope_theta) == (ARGS.norm_eps, ARGS.rope_theta)
    assert loaded.args.kv_heads == 2 and loaded.args.max_seq_len == 32
    assert loaded.tokenizer_path == path
    with torch.no_grad():
        ours = loaded.model(toks())
    assert torch.equal(ours, logits(ref_dir))


def test_f16_and_bf16_gguf(tmp_path: Path) -> None:
    model = random_model()
    ref = logits(save_checkpoint(model, ARGS, tmp_path / "ours"))
    f16 = write_gguf(tmp_path / "f16.gguf", ARGS, float_tensors(model, np.float16))
    contents = read_checkpoint(f16)
    wq = next(s for s in contents.tensors if s.name == "layers.0.attention.wq.weight")
    assert wq.dtype == torch.float16 and wq.qtype is None
    assert torch.equal(wq.load(), model.layers[0].attention.wq.weight.detach().half())
    out = logits(f16, dtype=torch.float32)
    assert (out - ref).abs().max().item() < 2e-2 * ref.abs().max().item()

    bf = {}
    types = {}
    for name, arr in float_tensors(model).items():
        if arr.ndim == 2:
            bf[name] = quantize(arr, Q.BF16)  # the gguf package's bf16 rounding
            types[name] = Q.BF16
        else:
            bf[name] = arr
    bf16 = write_gguf(tmp_path / "bf16.gguf", ARGS, bf, types)
    src = next(s for s in read_checkpoint(bf16).tensors if s.name == "output.weight")
    assert src.dtype == torch.bfloat16
    expected = dequantize(bf["output.weight"], Q.BF16)
    assert torch.equal(src.load().float(), torch.from_numpy(expected))


def test_qk_rows_are_in_meta_layout_like_llama_cpp_converter(tmp_path: Path) -> None:
    """Convert a transformers model the way llama.cpp's convert_hf_to_gguf.py does (its `permute`
    undoes HF's rotary permutation) and compare with transformers' logits."""
    hf = hf_model("gqa", seed=7)
    cfg = hf.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    hf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    tensors: dict[str, np.ndarray] = {}
    for name, t in hf.state_dict().items():
        arr = t.detach().float().numpy()
        if name in hf_names:
            tensors[hf_names[name]] = arr
            continue
        _, _, i, rest = name.split(".", 3)
        key = rest.removesuffix(".weight")
        if key == "self_attn.q_proj":
            arr = permute(arr, n_heads)
        elif key == "self_attn.k_proj":
            arr = permute(arr, n_kv)
        tensors[f"blk.{i}.{per_layer[key]}.weight"] = arr
    args = ModelArgs(
        dim=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=cfg.vocab_size,
        hidden_dim=cfg.intermediate_size,
        norm_eps=cfg.rms_norm_eps,
        max_seq_len=cfg.max_position_embeddings,
    )
    path = write_gguf(tmp_path / "hf.gguf", args, tensors)
    t = toks(vocab=cfg.vocab_size)
    with torch.no_grad():
        ours = load_model(path, progress=False).model(t)
    assert (ours - hf_logits(hf, t)).abs().max().item() < 1e-4


def test_tied_output_and_metadata(tmp_path: Path) -> None:
    model = random_model()
    tensors = float_tensors(model)
    del tensors["output.weight"]

    def extra(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_name("tiny")

    path = write_gguf(tmp_path / "tied.gguf", ARGS, tensors, extra=extra)
    contents = read_checkpoint(path)
    assert contents.args.rope_scaling == RopeScaling("linear", 4.0)
    assert contents.metadata["general.name"] == "tiny"
    by_name = {s.name: s for s in contents.tensors}
    out = by_name["output.weight"].load()
    assert torch.equal(out, model.tok_embeddings.weight.detach())
    assert out.data_ptr() != by_name["tok_embeddings.weight"].load().data_ptr()  # its own copy


def test_tensor_data_is_memory_mapped(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", ARGS, float_tensors(random_model()))
    src = next(s for s in read_checkpoint(path).tensors if s.name == "tok_embeddings.weight")
    t = src.load()
    info = next(r for r in gguf.GGUFReader(path).tensors if r.name == "token_embd.weight")
    assert torch.equal(t, torch.from_numpy(np.array(info.data)))
    # The tensor's memory lies inside a mapping of the file itself (Linux /proc/self/maps).
    ptr = t.data_ptr()
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    assert any(lo <= ptr < hi for lo, hi in spans)


# -------------------------------------------------------------------------- quantized tensors
def _quantized_file(tmp_path: Path, qt: gguf.GGMLQuantizationType) -> tuple[Path, dict[str, np.ndarray]]:
    model = random_model()
    tensors: dict[str, np.ndarray] = {}
    types: dict[str, gguf.GGMLQuantizationType] = {}
    for name, arr in float_tensors(model).items():
        if arr.ndim == 2:
            tensors[name] = quantize(arr, qt)  # the gguf package's reference quantizer
            types[name] = qt
        else:
            tensors[name] = arr
    return write_gguf(tmp_path / f"{qt.name}.gguf", ARGS, tensors, types), tensors


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q4_0])
def test_gguf_package_quantized_tensors_read_as_blocks(tmp_path: Path, qt: gguf.GGMLQuantizationType) -> None:
    path, written = _quantized_file(tmp_path, qt)
    sources = {s.name: s for s in read_checkpoint(path).tensors}
    for name, src in sources.items():
        arr = written[llama_cpp_name(name)]
        if arr.dtype != np.uint8:
            assert src.qtype is None
            continue
        assert src.qtype == qt.name.lower()
        assert src.dtype == torch.uint8
        assert src.shape == ARGS_SHAPES[name]
        blocks = src.load()
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == arr.shape  # (rows, row_bytes)
        assert torch.equal(blocks, torch.from_numpy(arr))
        assert torch.equal(dequantize_source(src), torch.from_numpy(dequantize(arr, qt)))


def _random_blocks(rows: int, row_len: int, qt: gguf.GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random but finite blocks: random bytes with the fp16 scale fields set to small values."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * row_len // block, size), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q5_K: (0, 2), Q.Q4_1: (0, 2)}[qt]
    for off in scale_offsets:
        d = rng.uniform(1e-3, 2e-2, size=data.shape[0]).astype(np.float16)
        data[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def test_q4_k_blocks_and_other_types_dequantized(tmp_path: Path) -> None:
    args = ModelArgs(
        dim=256, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=32, hidden_dim=256, max_seq_len=16
    )
    model = random_model(args)
    tensors = float_tensors(model)
    types: dict[str, gguf.GGMLQuantizationType] = {}
    chosen = {"blk.0.attn_q.weight": Q.Q4_K, "blk.0.ffn_down.weight": Q.Q6_K, "blk.0.ffn_up.weight": Q.Q5_K}
    for i, (name, qt) in enumerate(chosen.items()):
        rows, row_len = tensors[name].shape
        tensors[name] = _random_blocks(rows, row_len, qt, seed=i)
        types[name] = qt
    path = write_gguf(tmp_path / "k.gguf", args, tensors, types)
    by_name = {s.name: s for s in read_checkpoint(path).tensors}
    q4k = by_name["layers.0.attention.wq.weight"]
    assert q4k.qtype == "q4_k" and q4k.shape == (256, 256)
    assert tuple(q4k.load().shape) == (256, 144)
    ref = torch.from_numpy(dequantize(tensors["blk.0.attn_q.weight"], Q.Q4_K))
    assert torch.equal(dequantize_source(q4k), ref)
    for ours, theirs in (("feed_forward.w2", "ffn_down"), ("feed_forward.w3", "ffn_up")):
        src = by_name[f"layers.0.{ours}.weight"]
        assert src.qtype is None and src.dtype == torch.float32  # decoded on load
        expected = dequantize(tensors[f"blk.0.{theirs}.weight"], types[f"blk.0.{theirs}.weight"])
        assert torch.equal(src.load(), torch.from_numpy(expected))
    # Through load_model: the dequantized types become ordinary float weights.
    loaded = load_model(path, progress=False, dtype=torch.float32)
    w2 = loaded.model.layers[0].feed_forward.w2.weight
    assert torch.equal(w2, torch.from_numpy(dequantize(tensors["blk.0.ffn_down.weight"], Q.Q6_K)))


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q4_0])
def test_load_model_quantized_weights_match_gguf_dequantize(
    tmp_path: Path, qt: gguf.GGMLQuantizationType
) -> None:
    """Needs load_model's GGUF block path (GGUFLinear swap + dequantized embeddings)."""
    path, written = _quantized_file(tmp_path, qt)
    loaded = load_model(path, progress=False, dtype=torch.float32)
    modules = dict(loaded.model.named_modules())
    for name in ARGS_SHAPES:
        arr = written[llama_cpp_name(name)]
        if arr.dtype != np.uint8:
            continue
        expected = torch.from_numpy(dequantize(arr, qt))
        mod = modules[name.removesuffix(".weight")]
        if hasattr(mod, "dequantize_weight"):  # kept quantized (GGUFLinear)
            assert torch.equal(mod.weight, torch.from_numpy(arr))
            assert torch.equal(mod.dequantize_weight(torch.float32), expected)
        else:
            assert torch.equal(mod.weight.detach().float(), expected)
    with torch.no_grad():
        quantized = loaded.model(toks())
    # Same as a float model holding gguf's dequantized weights, and near the original float model.
    deq = {n: dequantize(a, qt) if a.dtype == np.uint8 else a for n, a in written.items()}
    same = logits(write_gguf(tmp_path / "deq.gguf", ARGS, deq))
    assert (quantized - same).abs().max().item() < 1e-4 * same.abs().max().item()
    ref = logits(write_gguf(tmp_path / "f32.gguf", ARGS, float_tensors(random_model())))
    rel = ((quantized - ref).norm() / ref.norm()).item()
    assert 0 < rel < (0.05 if qt == Q.Q8_0 else 0.4), rel


# -------------------------------------------------------------------------- detection / errors
def test_detection_by_content_and_errors(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "weights.bin", ARGS, float_tensors(random_model()))  # name says nothing
    found = detect(path)
    assert (found.format, found.weight_files, found.config_file, found.root) == (
        CheckpointFormat.GGUF, (path,), None, tmp_path,
    )  # fmt: skip
    assert detect(tmp_path).weight_files == (path,)  # a folder holding one GGUF model
    with pytest.raises(CheckpointError, match="no tensors"):
        detect(VOCAB_GGUF)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_model(VOCAB_GGUF, progress=False)
    shutil.copyfile(path, tmp_path / "second.gguf")
    with pytest.raises(CheckpointError, match="several GGUF"):
        detect(tmp_path)

    other = tmp_path / "other"
    other.mkdir()
    w = gguf.GGUFWriter(other / "gpt2.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'gpt2'"):
        load_model(other / "gpt2.gguf", progress=False)

    cut = tmp_path / "cut"
    cut.mkdir()
    data = path.read_bytes()
    (cut / "m.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"m\.gguf: truncated GGUF file: tensor 'output\.weight'"):
        read_checkpoint(cut / "m.gguf")
    (cut / "m.gguf").write_bytes(data[:3000])
    with pytest.raises(CheckpointError, match=r"m\.gguf: truncated"):
        read_checkpoint(cut / "m.gguf")


def test_unknown_tensor_and_unsupported_rope(tmp_path: Path) -> None:
    tensors = float_tensors(random_model())
    tensors["rope_freqs.weight"] = np.ones(ARGS.head_dim // 2, np.float32)
    with pytest.raises(CheckpointError, match="rope_freqs"):
        read_checkpoint(write_gguf(tmp_path / "a.gguf", ARGS, tensors))
    del tensors["rope_freqs.weight"]

    def yarn(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)

    with pytest.raises(CheckpointError, match="'yarn' is not supported"):
        read_checkpoint(write_gguf(tmp_path / "b.gguf", ARGS, tensors, extra=yarn))


def test_tokenizer_from_model_gguf_and_header_parser(tmp_path: Path) -> None:
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "H", "i", "▁H", "▁Hi"]
    vocab = (pieces, [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0], [2, 3, 3] + [6] * 256 + [1] * 5)
    args = ARGS.replace(vocab_size=len(pieces))
    path = write_gguf(tmp_path / "m.gguf", args, float_tensors(random_model(args)), vocab=vocab)
    tok = Tokenizer.from_file(load_model(path, progress=False).tokenizer_path or "")
    assert tok.vocab_size == 264 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("Hi", bos=True, eos=False) == [1, 263]
    # The 32k-token llama.cpp vocabulary parses quickly (gguf.GGUFReader takes seconds).
    from llama2.gguf_vocab import read_gguf_header

    header = read_gguf_header(VOCAB_GGUF)
    reader = gguf.GGUFReader(VOCAB_GGUF)
    assert header.fields["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert np.array_equal(
        header.fields["tokenizer.ggml.scores"], reader.fields["tokenizer.ggml.scores"].contents()
    )
    for key in (
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.add_bos_token",
    ):
        assert header.fields[key] == reader.fields[key].contents()
    assert math.isclose(len(header.fields["tokenizer.ggml.token_type"]), 32000)
