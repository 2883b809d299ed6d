"""DPO (`llama2.train.dpo`) on tiny random models with the embedded chat tokenizer.

Oracles: the DPO loss in closed form (-log sigmoid(beta * margin), with label smoothing) over sequence
log-probabilities summed by hand from one plain forward per unpadded row; log(2) and zero rewards
when the policy is the reference; `encode_dialog_for_training`'s answer mask for the response mask;
an uninterrupted run for resume; the saved model's own log-probabilities for the learned preference.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import llama2.train.dpo as dpo_mod
from llama2.chat import Message, encode_dialog, encode_dialog_for_training
from llama2.checkpoint.load import load_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.preferences import PreferencePair, write_pairs
from llama2.errors import ConfigError, DialogError
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer
from llama2.train.dpo import (
    DPOConfig,
    DPOStage,
    EncodedPair,
    collate,
    response_row,
    run_dpo,
    select_pairs,
    sequence_logprobs,
)
from llama2.train.loop_config import LoopConfig
from llama2.train.run_config import config_from_dict

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER)


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ARGS).eval()


def _pair(i: int, rating: str = "better", kind: str = "helpfulness", **kw: Any) -> PreferencePair:
    fields: dict[str, Any] = dict(
        dialog=[{"role": "user", "content": f"Pick a colour for item {i}."}],
        chosen="Blue.", rejected="Red, I think.", rating=rating, safety_bin="both_safe", kind=kind,
        task="colour",
    )  # fmt: skip
    return PreferencePair(**(fields | kw))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    return save_checkpoint(_model(0), ARGS, root / "base", tokenizer_path=TOKENIZER)


def _cfg(base: Path, data: Path, out: Path, **kw: Any) -> DPOConfig:
    loop_kw: dict[str, Any] = dict(
        out_dir=out, batch_size=4, max_steps=3, lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=0,
        ckpt_every=0, log_every=1, progress=False, device="cpu",
    )  # fmt: skip
    extra: dict[str, Any] = kw.pop("loop", {})
    loop = LoopConfig(**(loop_kw | extra))
    fields: dict[str, Any] = {"model": base, "data": data, "loop": loop}
    return DPOConfig(**(fields | kw))


def _oracle_logprob(model: Transformer, row: list[int], start: int) -> float:
    """Sum of log p(row[t] | row[:t]) for t >= start, from one forward of the unpadded row."""
    with torch.no_grad():
        logits = model(torch.tensor([row]))[0].double()  # (T, V)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return sum(float(logp[t - 1, row[t]]) for t in range(start, len(row)))


# ------------------------------------------------------------------------------------- encoding
def test_response_mask_excludes_prompt_and_includes_eos(tok: Tokenizer) -> None:
    single: list[Message] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
    ]
    row, start = response_row(tok, single, "Hi there!")
    want_tokens, want_mask = encode_dialog_for_training(
        [*single, {"role": "assistant", "content": "Hi there!"}], tok
    )
    assert row == want_tokens and row[-1] == tok.eos_id
    batch = collate([EncodedPair(row, start, list(row), start)], pad_id=tok.eos_id)
    assert batch["mask"][0].tolist() == want_mask  # single turn: exactly the training answer mask
    assert tok.decode(row[start:-1]).strip() == "Hi there!"
    # several turns: the earlier answer belongs to the prompt
    multi: list[Message] = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again."},
    ]
    row, start = response_row(tok, multi, "Hello again.")
    _, train_mask = encode_dialog_for_training(
        [*multi, {"role": "assistant", "content": "Hello again."}], tok
    )
    assert start == len(encode_dialog(multi, tok)) and sum(train_mask[:start]) > 0  # an answer in the prompt
    assert all(train_mask[start:]) and not train_mask[start - 1]
    mask = collate([EncodedPair(row, start, row, start)], pad_id=0)["mask"][0].tolist()
    assert mask == [False] * start + [True] * (len(row) - start)


def test_padding_does_not_change_the_sequence_logprob(tok: Tokenizer) -> None:
    model = _model(1)
    short, s0 = response_row(tok, [{"role": "user", "content": "Hi?"}], "Yes.")
    long, l0 = response_row(
        tok, [{"role": "user", "content": "A much longer question here?"}], "No, not now."
    )
    batch = collate([EncodedPair(short, s0, long, l0)], pad_id=tok.eos_id)
    assert batch["tokens"].shape == (2, len(long))
    with torch.no_grad():
        padded = sequence_logprobs(model, batch["tokens"], batch["mask"])
        alone = sequence_logprobs(model, torch.tensor([short]), batch["mask"][:1, : len(short)])
    want = _oracle_logprob(model, short, s0)
    assert padded[0].item() == pytest.approx(want, abs=1e-4)
    assert alone[0].item() == pytest.approx(want, abs=1e-4)
    assert padded[1].item() == pytest.approx(_oracle_logprob(model, long, l0), abs=1e-4)


# ------------------------------------------------------------------------------------------ loss
def _encoded(tok: Tokenizer, n: int) -> list[EncodedPair]:
    out = []
    for i in range(n):
        p = _pair(i, chosen=f"Answer {i} is blue.", rejected="No." if i % 2 else "Red, red and red.")
        c, c0 = response_row(tok, p.dialog, p.chosen)
        r, r0 = response_row(tok, p.dialog, p.rejected)
        out.append(EncodedPair(c, c0, r, r0))
    return out


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_step_loss_is_the_closed_form_over_hand_summed_logprobs(
    tok: Tokenizer, label_smoothing: float
) -> None:
    policy, reference = _model(2), _model(3)
    pairs = _encoded(tok, 3)
    beta = 0.5
    stage = DPOStage(policy, reference, dpo_mod.DPOBatches(pairs, 3, 0, tok.eos_id), beta=beta,
                     label_smoothing=label_smoothing)  # fmt: skip
    out = stage.step(collate(pairs, pad_id=tok.eos_id))
    zs, cr, rr, lc, lr_ = [], [], [], [], []
    for p in pairs:
        pc, pr = (
            _oracle_logprob(policy, p.chosen, p.chosen_start),
            _oracle_logprob(policy, p.rejected, p.rejected_start),
        )
        rc, rj = (
            _oracle_logprob(reference, p.chosen, p.chosen_start),
            _oracle_logprob(reference, p.rejected, p.rejected_start),
        )
        cr.append(beta * (pc - rc))
        rr.append(beta * (pr - rj))
        zs.append(cr[-1] - rr[-1])
        lc.append(pc)
        lr_.append(pr)

    def logsig(z: float) -> float:
        return -math.log1p(math.exp(-z))

    want = sum(-(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z) for z in zs) / 3
    assert out.loss.item() == pytest.approx(want, abs=1e-5)
    m = out.metrics
    assert m["chosen_reward"] == pytest.approx(sum(cr) / 3, abs=1e-5)
    assert m["rejected_reward"] == pytest.approx(sum(rr) / 3, abs=1e-5)
    assert m["reward_margin"] == pytest.approx(sum(zs) / 3, abs=1e-5)
    assert m["reward_accuracy"] == pytest.approx(sum(1.0 for z in zs if z > 0) / 3)
    assert m["logps_chosen"] == pytest.approx(sum(lc) / 3, abs=1e-4)
    assert m["logps_rejected"] == pytest.approx(sum(lr_) / 3, abs=1e-4)
    out.loss.backward()  # type: ignore[no-untyped-call]  # the gradient reaches the policy only
    assert policy.tok_embeddings.weight.grad is not None
    assert reference.tok_embeddings.weight.grad is None


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tok: Tokenizer) -> None:
    policy = _model(4)
    pairs = _encoded(tok, 4)
    stage = DPOStage(policy, copy.deepcopy(policy), dpo_mod.DPOBatches(pairs, 4, 0, tok.eos_id))
    out = stage.step(collate(pairs, pad_id=tok.eos_id))
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert out.metrics["reward_accuracy"] == 0.0
    assert out.metrics["chosen_reward"] == out.metrics["rejected_reward"] == 0.0


# -------------------------------------------------------------------------------------- running
def test_short_run_learns_separable_pairs(base: Path, tok: Tokenizer, tmp_path: Path) -> None:
    data = write_pairs([_pair(i) for i in range(12)], tmp_path / "train.jsonl")
    val = write_pairs([_pair(100 + i) for i in range(4)], tmp_path / "val.jsonl")
    cfg = _cfg(base, data, tmp_path / "run", val_data=val, loop={"max_steps": 20, "eval_every": 10})
    res = run_dpo(cfg)
    assert res.n_train_pairs == 12 and res.n_val_pairs == 4 and res.train.step == 20
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert train[0]["reward_accuracy"] == 0.0 and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[-1]["reward_accuracy"] == 1.0 and train[-1]["loss"] < 0.75 * math.log(2)
    val_recs = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val_recs] == [10, 20] and val_recs[-1]["reward_accuracy"] == 1.0
    # the saved policy prefers the chosen response over the start model on held-out prompts
    tuned, start = load_model(res.model_dir, progress=False).model, load_model(base, progress=False).model
    for i in range(100, 104):
        p = _pair(i)
        c, c0 = response_row(tok, p.dialog, p.chosen)
        r, r0 = response_row(tok, p.dialog, p.rejected)
        margin = (_oracle_logprob(tuned, c, c0) - _oracle_logprob(start, c, c0)) - (
            _oracle_logprob(tuned, r, r0) - _oracle_logprob(start, r, r0)
        )
        assert margin > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_pairs"] == 12 and summary["step"] == 20


def test_resume_after_interruption_is_bit_identical(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_pairs([_pair(i, chosen=f"Blue {i}.") for i in range(5)], tmp_path / "train.jsonl")
    loop = {"max_steps": 6, "ckpt_every": 3, "batch_size": 2}  # epochs of 2+2+1 pairs: the position matters
    straight = run_dpo(_cfg(base, data, tmp_path / "straight", loop=loop))

    real, calls = dpo_mod.sequence_logprobs, [0]

    def dies_in_step_4(*a: Any) -> Any:
        calls[0] += 1
        if calls[0] > 2 * 3:  # policy + reference per step
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(dpo_mod, "sequence_logprobs", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(_cfg(base, data, tmp_path / "cut", loop=loop))
    monkeypatch.setattr(dpo_mod, "sequence_logprobs", real)
    resumed = run_dpo(_cfg(base, data, tmp_path / "cut", loop=loop, resume=True))
    assert resumed.train.step == straight.train.step == 6
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(base / "model.safetensors"))
    assert not torch.equal(a["tok_embeddings.weight"], start["tok_embeddings.weight"])


# ------------------------------------------------------------------------------------ filtering
def test_select_pairs_by_kind_and_rating() -> None:
    pairs = [_pair(0, "significantly_better"), _pair(1, "negligibly_better"), _pair(2, "slightly_better"),
             _pair(3, "better", kind="safety"), _pair(4, "better")]  # fmt: skip
    kept, dropped = select_pairs(pairs, ["helpfulness", "safety"], "slightly_better")
    assert [p.dialog for p in kept] == [pairs[i].dialog for i in (0, 2, 3, 4)] and dropped["rating"] == 1
    kept, dropped = select_pairs(pairs, ["helpfulness"], "better")
    assert [p.dialog for p in kept] == [pairs[i].dialog for i in (0, 4)]
    assert dropped == {"kind": 1, "rating": 2}


def test_bad_settings_and_data(base: Path, tmp_path: Path) -> None:
    good = write_pairs([_pair(0)], tmp_path / "good.jsonl")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"kinds": ["style"]}, "kinds"), ({"kinds": []}, "kinds"), ({"min_rating": "best"}, "min_rating"),
        ({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
    ]  # fmt: skip
    for kw, match in bad:
        with pytest.raises(ConfigError, match=match):
            _cfg(base, good, tmp_path / "x", **kw)
    with pytest.raises(ConfigError, match="does not exist"):
        run_dpo(_cfg(base, tmp_path / "missing.jsonl", tmp_path / "missing"))
    weak = write_pairs([_pair(0, "negligibly_better")], tmp_path / "weak.jsonl")
    with pytest.raises(ConfigError, match="no training pairs left"):
        run_dpo(_cfg(base, weak, tmp_path / "weak"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good.read_text() + "{not json\n")
    with pytest.raises(DialogError):
        run_dpo(_cfg(base, broken, tmp_path / "broken"))
    answered: list[Message] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ends_wrong = write_pairs([_pair(0, dialog=answered)], tmp_path / "ends.jsonl")
    with pytest.raises(DialogError):
        run_dpo(_cfg(base, ends_wrong, tmp_path / "ends"))


def test_config_from_toml_dict_and_flat_aliases() -> None:
    cfg = config_from_dict(DPOConfig, {"beta": 0.3, "kinds": ["safety"], "loop": {"lr": 2e-6}})
    assert (cfg.beta, cfg.kinds, cfg.loop.lr, cfg.loop.warmup_steps) == (0.3, ["safety"], 2e-6, 30)
    flat = DPOConfig(lr=3e-6, max_steps=10)  # type: ignore[call-arg]
    assert (flat.loop.lr, flat.loop.max_steps, flat.min_rating) == (3e-6, 10, "slightly_better")
