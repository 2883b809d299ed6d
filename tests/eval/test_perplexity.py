"""`run_perplexity` against transformers' LlamaForCausalLM loss on the same windows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from torch import nn

from llama2.checkpoint.save import export_hf, save_checkpoint
from llama2.config import ModelArgs
from llama2.data.corpus import build_token_file
from llama2.errors import ConfigError
from llama2.eval.perplexity import PerplexityConfig, run_perplexity
from llama2.model import Transformer

DOCS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3,
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 2,
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, llama2_tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppl")
    tok = llama2_tokenizer_dir / "tokenizer.model"
    args = ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=24
    )
    torch.manual_seed(0)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if p.ndim == 2:  # peaky, input-dependent predictions so that windowing mistakes show
            nn.init.normal_(p, std=0.6 if name == "output.weight" else 0.2)
    save_checkpoint(model, args, root / "model", tokenizer_path=tok)
    export_hf(model, args, root / "hf")
    texts = root / "texts"
    texts.mkdir()
    for i, doc in enumerate(DOCS):
        (texts / f"{i}.txt").write_text(doc, encoding="utf-8")
    return {"root": root, "model": root / "model", "hf": root / "hf", "texts": texts, "tok": tok}


def _oracle_nll(setup: dict[str, Path], seq_len: int) -> tuple[float, int]:
    from transformers import LlamaForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(setup["tok"]))
    stream = [t for doc in DOCS for t in [1, *sp.encode(doc), 2]]
    hf = LlamaForCausalLM.from_pretrained(setup["hf"], torch_dtype=torch.float32).eval()
    total, n = 0.0, 0
    i = 0
    with torch.no_grad():
        while i * seq_len + seq_len + 1 <= len(stream):
            window = torch.tensor([stream[i * seq_len : i * seq_len + seq_len + 1]])
            out = hf(input_ids=window, labels=window)  # HF shifts: predicts window[1:] from window[:-1]
            total += float(out.loss) * seq_len
            n += seq_len
            i += 1
    return total / n, n


def test_matches_transformers(setup: dict[str, Path]) -> None:
    for seq_len in (0, 10):
        res = run_perplexity(
            PerplexityConfig(model=str(setup["model"]), data=[str(setup["texts"])], seq_len=seq_len)
        )
        nll, n = _oracle_nll(setup, seq_len or 24)
        assert res.n_tokens == n and res.seq_len == (seq_len or 24)
        assert res.nll == pytest.approx(nll, abs=2e-5)
        assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
        assert 1.0 < res.nll < 30.0


def test_chat_scores_only_answer_tokens(setup: dict[str, Path], tmp_path: Path) -> None:
    """`chat=True`: NLL of the assistant answers (and their `▁</s>`) only, against transformers on the
    literal Llama 2-Chat string, with the answer's position found by sentencepiece itself."""
    import json

    from transformers import LlamaForCausalLM

    data = tmp_path / "dialogs.jsonl"
    data.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        )
        + "\n",
        encoding="utf-8",
    )
    res = run_perplexity(PerplexityConfig(model=str(setup["model"]), data=[str(data)], seq_len=24, chat=True))
    sp = spm.SentencePieceProcessor(model_file=str(setup["tok"]))
    prompt = [1, *sp.encode("[INST] Hi [/INST]")]
    full = [1, *sp.encode("[INST] Hi [/INST] Hello "), 2]
    assert full[: len(prompt)] == prompt
    hf = LlamaForCausalLM.from_pretrained(setup["hf"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([full[:-1]])).logits[0]  # (T, V)
    logp = torch.log_softmax(logits, -1)
    targets = range(len(prompt), len(full))  # "▁Hello", "▁", "</s>"
    expected = -sum(float(logp[t - 1, full[t]]) for t in targets) / len(targets)
    assert res.n_tokens == len(targets) == 3
    assert res.nll == pytest.approx(expected, abs=2e-5)


def test_token_file_and_max_windows(setup: dict[str, Path], tmp_path: Path) -> None:
    tf = build_token_file([str(setup["texts"])], setup["tok"], tmp_path / "val.bin")
    a = run_perplexity(PerplexityConfig(model=str(setup["model"]), data=[str(tf.path)], batch_size=3))
    b = run_perplexity(PerplexityConfig(model=str(setup["model"]), data=[str(setup["texts"])]))
    # Same windows, other batch composition: float32 GEMMs may block (and thread) differently, so
    # the mean NLL agrees to float32 rounding (~1e-7 relative), not bit for bit.
    assert a.nll == pytest.approx(b.nll, rel=1e-6) and a.n_tokens == b.n_tokens
    c = run_perplexity(PerplexityConfig(model=str(setup["model"]), data=[str(setup["texts"])], max_windows=2))
    assert c.n_tokens == 48


def test_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no data"):
        run_perplexity(PerplexityConfig(model=str(setup["model"])))
    short = tmp_path / "short.txt"
    short.write_text("Hi", encoding="utf-8")
    with pytest.raises(ConfigError, match="fewer than one window"):
        run_perplexity(PerplexityConfig(model=str(setup["model"]), data=[str(short)]))
    with pytest.raises(ConfigError, match="dtype"):
        run_perplexity(PerplexityConfig(model=str(setup["model"]), data=[str(short)], dtype="int4"))


# ------------------------------------------------------------------------- the embedded base model
REPO = Path(__file__).resolve().parents[2]
SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""
# Golden value for the embedded base model (scripts/train_base.sh); update it when base is retrained.
BASE_SONNET_NLL = 4.48756  # 192 tokens in 3 windows of 64


def test_embedded_base_golden(tmp_path: Path) -> None:
    from llama2.assets import embedded_model_dir

    if not (embedded_model_dir("base") / "model.safetensors").is_file():
        pytest.skip("the embedded base model is not installed")
    text = tmp_path / "sonnet18.txt"
    text.write_text(SONNET_18, encoding="utf-8")
    res = run_perplexity(PerplexityConfig(model="base", data=[str(text)], seq_len=64))
    assert res.n_tokens > 64
    assert res.nll == pytest.approx(BASE_SONNET_NLL, abs=1e-3)


@pytest.mark.slow
def test_model_card_validation_loss_reproduces() -> None:
    """The base model card's number: `llama2 eval perplexity --model base --data .cache/shakespeare/val`."""
    val = REPO / ".cache" / "shakespeare" / "val"
    if not val.is_dir():
        pytest.skip("run scripts/get_shakespeare.sh first")
    card = (REPO / "src" / "llama2" / "assets" / "models" / "base" / "MODEL_CARD.md").read_text(
        encoding="utf-8"
    )
    import re

    match = re.search(r"validation loss[^\n]*?\*\*([0-9.]+)\*\*", card)
    assert match, "the model card states the validation loss in bold"
    res = run_perplexity(PerplexityConfig(model="base", data=[str(val)]))
    assert abs(res.nll - float(match.group(1))) < 0.02
