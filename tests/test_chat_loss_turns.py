"""`loss_turns` of `encode_dialog_for_training` (Ghost Attention, Llama 2 paper sec. 3.3): "last"
trains only the last answer and its EOS, "all" trains every answer, anything else is refused.

Oracles: the last pair's answer tokens are found independently by tokenizing Meta's last-pair string
and its prompt part with sentencepiece-backed `Tokenizer.encode`, and the masked tokens are decoded
back to the answer text; the `SFTConfig` check runs before any file is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama2.chat import Message, encode_dialog_for_training
from llama2.data.sft import encode_examples
from llama2.errors import ConfigError, DialogError
from llama2.tokenizer import Tokenizer
from llama2.train.loop_config import LoopConfig
from llama2.train.sft import SFTConfig, run_sft

CHAT_TOKENIZER = Path(__file__).resolve().parents[1] / "src/llama2/assets/models/chat/tokenizer.model"

DIALOG: list[Message] = [
    {"role": "system", "content": "Always end every answer with the words 'my lord'."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5 my lord"},
    {"role": "user", "content": "Reverse the word cat."},
    {"role": "assistant", "content": "tac my lord"},
    {"role": "user", "content": "Repeat the word go 2 times."},
    {"role": "assistant", "content": "go go my lord"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(CHAT_TOKENIZER)


def test_last_masks_everything_but_the_last_answer(tok: Tokenizer) -> None:
    tokens, mask = encode_dialog_for_training(DIALOG, tok, loss_turns="last")
    pair = tok.encode("[INST] Repeat the word go 2 times. [/INST] go go my lord ", bos=True, eos=True)
    prompt = tok.encode("[INST] Repeat the word go 2 times. [/INST]", bos=True, eos=False)
    n_answer = len(pair) - len(prompt)
    assert n_answer > 2
    assert tokens[-len(pair) :] == pair
    # True exactly on the last answer's tokens, which end the sequence (the EOS included).
    assert mask == [False] * (len(tokens) - n_answer) + [True] * n_answer
    assert tokens[-1] == tok.eos_id
    assert tok.decode([t for t, m in zip(tokens, mask, strict=True) if m][:-1]).strip() == "go go my lord"


def test_all_is_the_default_and_trains_every_answer(tok: Tokenizer) -> None:
    tokens, mask = encode_dialog_for_training(DIALOG, tok, loss_turns="all")
    assert (tokens, mask) == encode_dialog_for_training(DIALOG, tok)
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert trained.count(tok.eos_id) == 3  # one EOS per answer
    text = tok.decode([t for t in trained if t != tok.eos_id])
    assert text.split() == ["5", "my", "lord", "tac", "my", "lord", "go", "go", "my", "lord"]
    tokens_last, mask_last = encode_dialog_for_training(DIALOG, tok, loss_turns="last")
    assert tokens_last == tokens
    assert sum(mask_last) < sum(mask)
    assert all(m for m, ml in zip(mask, mask_last, strict=True) if ml)  # "last" is a subset of "all"


def test_single_pair_last_equals_all(tok: Tokenizer) -> None:
    one = DIALOG[:3]
    assert encode_dialog_for_training(one, tok, loss_turns="last") == encode_dialog_for_training(one, tok)


@pytest.mark.parametrize("bad", ["first", "LAST", "", "none"])
def test_bad_loss_turns_is_refused(tok: Tokenizer, bad: str) -> None:
    with pytest.raises(DialogError, match="loss_turns must be one of"):
        encode_dialog_for_training(DIALOG, tok, loss_turns=bad)
    with pytest.raises(DialogError, match="loss_turns"):
        encode_examples([DIALOG], tok, loss_turns=bad)


def test_encode_examples_passes_loss_turns(tok: Tokenizer) -> None:
    (ex,) = encode_examples([DIALOG], tok, loss_turns="last")
    assert (ex.tokens, ex.mask) == encode_dialog_for_training(DIALOG, tok, loss_turns="last")
    (ex_all,) = encode_examples([DIALOG], tok)
    assert sum(ex_all.mask) > sum(ex.mask)


def test_sft_config_refuses_bad_loss_turns_before_reading(tmp_path: Path) -> None:
    assert SFTConfig().loss_turns == "all"
    cfg = SFTConfig(
        model=tmp_path / "missing", data=tmp_path / "missing.jsonl", loss_turns="every",
        loop=LoopConfig(out_dir=tmp_path / "out", progress=False),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="loss_turns must be one of"):
        run_sft(cfg)
