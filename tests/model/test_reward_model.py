"""The reward model and its checkpoint folder: scores against transformers' final hidden states (an
independent oracle), the EOS index and right padding, batching, save/load round trips and bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_support import build_ours
from transformers import LlamaForCausalLM

from llama2.checkpoint.load import load_model
from llama2.checkpoint.reward_io import HEAD_NAME, INFO_NAME, load_reward_model, save_reward_model
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError, GenerationError
from llama2.model import Transformer
from llama2.model.reward import RewardModel, pad_rows, score_rows

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)

Pair = tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]


def _tiny_rm(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(Transformer(TINY))


def test_scores_match_transformers_hidden_states_at_the_index(pair: Pair) -> None:
    hf, args, sd = pair
    rm = RewardModel(build_ours(args, sd))
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.head.bias.fill_(0.25)
    tokens = torch.randint(0, args.vocab_size, (3, 12))
    index = torch.tensor([11, 4, 0])
    with torch.no_grad():
        h = hf.model(input_ids=tokens).last_hidden_state  # (B, T, dim): after the final RMSNorm
        expected = h[torch.arange(3), index] @ rm.head.weight[0] + 0.25  # (B,)
        got = rm(tokens, index)
        values = rm.values(tokens)  # (B, T)
        all_expected = h @ rm.head.weight[0] + 0.25
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(values, all_expected, rtol=1e-4, atol=1e-4)


def test_head_init_is_normal_with_std_one_over_sqrt_dim_plus_one() -> None:
    args = ModelArgs(dim=1024, n_layers=1, n_heads=8, vocab_size=64, multiple_of=16, max_seq_len=16)
    rm = RewardModel(Transformer(args))
    w = rm.head.weight.detach()
    assert w.shape == (1, 1024) and torch.equal(rm.head.bias.detach(), torch.zeros(1))
    # 1024 samples: the sample std is within ~3 * std/sqrt(2n) = 6.6 % of 1/sqrt(1025) = 0.03123
    assert abs(float(w.std()) - 1 / math.sqrt(1025)) < 0.07 / math.sqrt(1025)
    assert abs(float(w.mean())) < 4 / math.sqrt(1025) / math.sqrt(1024)


def test_score_at_eos_is_unchanged_by_extra_right_padding() -> None:
    rm = _tiny_rm().eval()
    row = torch.randint(3, 4096, (9,)).tolist()
    alone = rm(torch.tensor([row]), torch.tensor([8]))
    for pad in (1, 7, 40):
        padded = torch.tensor([row + torch.randint(0, 4096, (pad,)).tolist()])  # garbage after the EOS
        torch.testing.assert_close(rm(padded, torch.tensor([8])), alone, rtol=1e-5, atol=1e-6)


def test_pad_rows_and_score_rows_batch_in_any_order() -> None:
    rm = _tiny_rm().eval()
    rows = [torch.randint(3, 4096, (n,)).tolist() for n in (5, 17, 1, 9, 12)]
    tokens, index = pad_rows(rows, pad_id=7)
    assert tokens.shape == (5, 17) and index.tolist() == [4, 16, 0, 8, 11]
    assert tokens[2, 1:].eq(7).all() and tokens[0, :5].tolist() == rows[0]
    one_by_one = torch.cat([rm(torch.tensor([r]), torch.tensor([len(r) - 1])) for r in rows]).detach()
    for bs in (1, 2, 64):
        torch.testing.assert_close(score_rows(rm, rows, bs), one_by_one, rtol=1e-5, atol=1e-6)
    assert score_rows(rm, [], 4).shape == (0,)
    with pytest.raises(GenerationError, match="empty"):
        pad_rows([[1, 2], []])


def test_bad_index_is_refused() -> None:
    rm = _tiny_rm()
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(GenerationError, match=r"\[0, 5\)"):
        rm(tokens, torch.tensor([0, 5]))
    with pytest.raises(GenerationError, match="one position per row"):
        rm(tokens, torch.tensor([0, 1, 2]))


def test_save_load_round_trip_gives_equal_scores(tmp_path: Path) -> None:
    rm = _tiny_rm(3).eval()
    with torch.no_grad():
        rm.head.bias.fill_(-0.5)
    tokens = torch.randint(0, 4096, (4, 10))
    index = torch.tensor([9, 3, 5, 0])
    info = {"objective": "safety", "margin": "small", "threshold": 0.15, "data": "x.jsonl"}
    folder = save_reward_model(rm, tmp_path / "rm", TOKENIZER, info)
    loaded, got_info, tok = load_reward_model(folder)
    assert not loaded.training
    assert got_info == {"kind": "reward", **info}
    assert tok == folder / "tokenizer.model" and tok.read_bytes() == TOKENIZER.read_bytes()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, index), rm(tokens, index))
    # the folder is still an ordinary model folder: the trunk loads with its vocabulary head
    trunk = load_model(folder, progress=False).model
    with torch.no_grad():
        assert torch.equal(trunk(tokens), rm.trunk(tokens))
    assert json.loads((folder / INFO_NAME).read_text())["kind"] == "reward"


def test_bfloat16_save_and_reload(tmp_path: Path) -> None:
    rm = _tiny_rm(4).eval()
    folder = save_reward_model(rm, tmp_path / "rm", None, {"objective": "helpfulness"}, dtype=torch.bfloat16)
    from safetensors.torch import load_file

    assert load_file(str(folder / HEAD_NAME))["weight"].dtype == torch.bfloat16
    loaded, _, tok = load_reward_model(folder, dtype=torch.float32)
    assert tok is None and loaded.head.weight.dtype == torch.float32
    assert torch.equal(loaded.head.weight, rm.head.weight.to(torch.bfloat16).float())


def test_save_refuses_bad_info(tmp_path: Path) -> None:
    rm = _tiny_rm()
    with pytest.raises(ConfigError, match="objective"):
        save_reward_model(rm, tmp_path / "a", None, {"objective": "fun"})
    with pytest.raises(ConfigError, match="JSON"):
        save_reward_model(rm, tmp_path / "b", None, {"objective": "safety", "x": object()})
    with pytest.raises(ConfigError, match="floating"):
        save_reward_model(rm, tmp_path / "c", None, {"objective": "safety"}, dtype=torch.int8)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_reward_model(_tiny_rm(), tmp_path / "rm", TOKENIZER, {"objective": "helpfulness"})


def _bad_head(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / HEAD_NAME))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda f: (f / INFO_NAME).unlink(), "reward.json: not found"),
        (lambda f: (f / INFO_NAME).write_text("{oops"), "not readable JSON"),
        (lambda f: (f / INFO_NAME).write_text("[1, 2]"), "holds a list"),
        (lambda f: (f / INFO_NAME).write_text('{"kind": "model", "objective": "safety"}'), "kind"),
        (lambda f: (f / INFO_NAME).write_text('{"kind": "reward", "objective": "x"}'), "objective"),
        (lambda f: (f / HEAD_NAME).unlink(), "head.safetensors: not found"),
        (lambda f: (f / HEAD_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"), "readable"),
        (lambda f: _bad_head(f, {"weight": torch.zeros(1, 31), "bias": torch.zeros(1)}), r"shape \[1, 31\]"),
        (lambda f: _bad_head(f, {"weight": torch.zeros(1, 32)}), "expected exactly"),
        (lambda f: _bad_head(f, {"weight": torch.zeros(1, 32, dtype=torch.int32), "bias": torch.zeros(1)}),
         "floating point"),
        (lambda f: _bad_head(f, {"weight": torch.full((1, 32), torch.nan), "bias": torch.zeros(1)}), "NaN"),
        (lambda f: (f / "params.json").unlink(), "unknown checkpoint format"),
    ],
)  # fmt: skip
def test_bad_files_raise_checkpoint_error(saved: Path, damage: object, match: str) -> None:
    damage(saved)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=match):
        load_reward_model(saved)


def test_not_a_folder_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a folder"):
        load_reward_model(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_reward_model(f)
