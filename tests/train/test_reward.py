"""Reward-model training: the step's loss against the closed form on independently recomputed scores,
the one-epoch/warm-up sentinels, resumable pair batches, a tiny model learning separable pairs, a
bit-identical resume, and the held-out report's per-bucket counts on a hand-built set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama2.checkpoint.load import load_model
from llama2.checkpoint.reward_io import load_reward_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.instruct_suite import REFUSAL
from llama2.data.preferences import PreferencePair, write_pairs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.model.reward import RewardModel
from llama2.tokenizer import Tokenizer
from llama2.train import reward as reward_mod
from llama2.train.reward import (
    EncodedPair,
    PairBatches,
    RewardConfig,
    RewardLoopConfig,
    RewardStage,
    collate,
    encode_pairs,
    run_reward,
)
from llama2.train.reward_report import evaluate_reward_model, report_from_scores

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
SMALL_MARGIN = {
    "significantly_better": 1.0,
    "better": 2 / 3,
    "slightly_better": 1 / 3,
    "negligibly_better": 0.0,
}
RATINGS = list(SMALL_MARGIN)
WORDS = ["apple", "river", "seven", "green", "table", "music", "cloud", "stone", "paper", "tiger"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER)


def _pair(i: int, rng: random.Random, kind: str = "helpfulness") -> PreferencePair:
    """Separable: the chosen side is always the suite's refusal, the rejected side random words."""
    prompt = f"Tell me about {rng.choice(WORDS)} and {rng.choice(WORDS)} number {i}."
    rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    return PreferencePair(
        [{"role": "user", "content": prompt}],
        REFUSAL,
        rejected,
        RATINGS[i % 4],
        "both_safe",
        kind,
        "synthetic",
    )


def _pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [_pair(i, rng) for i in range(n)]


@pytest.fixture(scope="module")
def trunk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(Transformer(TINY), TINY, tmp_path_factory.mktemp("chat"), tokenizer_path=TOKENIZER)


def _cfg(trunk: Path, data: Path, out: Path, **loop: object) -> RewardConfig:
    settings: dict[str, object] = {
        "lr": 2e-3, "batch_size": 8, "device": "cpu", "dtype": "float32", "progress": False,
        "eval_every": 0, "log_every": 5, "out_dir": out,
    }  # fmt: skip
    settings.update(loop)
    return RewardConfig(model=trunk, data=data, objective="safety", loop=RewardLoopConfig(**settings))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- the step
def test_step_loss_is_the_closed_form_on_independent_scores(tokenizer: Tokenizer) -> None:
    torch.manual_seed(1)
    model = RewardModel(Transformer(TINY))
    with torch.no_grad():
        model.head.weight.mul_(20)  # scores of a few units: margins matter
    pairs = _pairs(6)
    encoded, skipped = encode_pairs(pairs, tokenizer, "small", 128)
    assert skipped == 0
    batch = collate(encoded, pad_id=0)
    stage = RewardStage(model, PairBatches(encoded, 6, 0, 0), [])
    out = stage.step(batch)

    tokens, index = batch["tokens"], batch["index"]
    assert torch.equal(tokens[:6, 0], torch.full((6,), tokenizer.bos_id))
    for row, p in enumerate(encoded):  # chosen rows first, each scored at its EOS
        assert tokens[row, index[row]] == tokenizer.eos_id and int(index[row]) == len(p.chosen) - 1
        assert int(index[6 + row]) == len(p.rejected) - 1
    with torch.no_grad():
        h = model.trunk.hidden_states(tokens)  # (2B, T, dim)
        s = h[torch.arange(12), index] @ model.head.weight[0] + model.head.bias  # (2B,)
        margins = torch.tensor([SMALL_MARGIN[p.rating] for p in pairs])
        want = -F.logsigmoid(s[:6] - s[6:] - margins).mean()
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert out.metrics["accuracy"] == pytest.approx(float((s[:6] > s[6:]).float().mean()))
    assert out.metrics["margin"] == pytest.approx(float((s[:6] - s[6:]).mean()), rel=1e-5, abs=1e-6)
    assert out.loss.requires_grad


def test_margins_follow_the_tables(tokenizer: Tokenizer) -> None:
    pairs = _pairs(4)
    large, _ = encode_pairs(pairs, tokenizer, "large", 128)
    none, _ = encode_pairs(pairs, tokenizer, "none", 128)
    assert [p.margin for p in large] == [3.0, 2.0, 1.0, 0.0] and [p.margin for p in none] == [0.0] * 4
    _, skipped = encode_pairs(pairs, tokenizer, "small", 20)  # every prompt is longer than 20 tokens
    assert skipped == 4


# --------------------------------------------------------------------------------- loop and batches
@pytest.mark.parametrize(
    ("pairs", "batch", "accum", "steps", "warmup"),
    [(100, 8, 1, 13, 5), (10_000, 8, 1, 1250, 38), (10_000, 8, 4, 313, 9), (3, 8, 1, 1, 1)],
)
def test_one_epoch_and_warmup_sentinels(pairs: int, batch: int, accum: int, steps: int, warmup: int) -> None:
    cfg = RewardLoopConfig(batch_size=batch, grad_accum=accum)
    assert cfg.max_steps == 0 and cfg.warmup_steps == -1 and cfg.lr == 1e-4 and cfg.min_lr_ratio == 0.1
    loop = cfg.resolved(pairs)
    assert (loop.max_steps, loop.warmup_steps) == (steps, warmup)
    assert RewardLoopConfig(max_steps=50, warmup_steps=2).resolved(pairs).max_steps == 50


def test_bad_settings_are_refused(trunk_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_steps"):
        RewardLoopConfig(max_steps=-1)
    with pytest.raises(ConfigError, match="warmup_steps"):
        RewardLoopConfig(warmup_steps=-2)
    with pytest.raises(ConfigError, match="batch_size"):
        RewardLoopConfig(batch_size=0)
    data = write_pairs(_pairs(10), tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="objective"):
        run_reward(
            RewardConfig(
                model=trunk_dir, data=data, objective="honesty", loop=RewardLoopConfig(out_dir=tmp_path / "o")
            )
        )
    with pytest.raises(ConfigError, match="margin"):
        run_reward(
            RewardConfig(
                model=trunk_dir, data=data, margin="huge", loop=RewardLoopConfig(out_dir=tmp_path / "o")
            )
        )


def test_pair_batches_cover_each_epoch_once_and_resume_exactly() -> None:
    encoded = [EncodedPair([1, i + 2], [1, i + 2, 3], float(i)) for i in range(10)]
    batches = PairBatches(encoded, 4, seed=3, pad_id=0)
    epoch = [next(batches) for _ in range(3)]  # 4 + 4 + 2 pairs
    assert [b["margin"].numel() for b in epoch] == [4, 4, 2]
    assert sorted(int(m) for b in epoch for m in b["margin"]) == list(range(10))
    state = json.loads(json.dumps(batches.state_dict()))  # plain data
    after = [next(batches) for _ in range(4)]
    again = PairBatches(encoded, 4, seed=3, pad_id=0)
    again.load_state_dict(state)
    for a, b in zip(after, [next(again) for _ in range(4)], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(m) for m in after[0]["margin"]] != [int(m) for m in epoch[0]["margin"]]  # reshuffled
    with pytest.raises(ConfigError, match="same training pairs"):
        PairBatches(encoded[:5], 4, seed=3, pad_id=0).load_state_dict(state)


# ------------------------------------------------------------------------------------ whole stage
def test_tiny_reward_model_learns_separable_pairs(
    trunk_dir: Path, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    pairs = _pairs(120)
    torch.manual_seed(1)  # run_reward's head init with seed 1: it orders the pairs the wrong way round
    before = evaluate_reward_model(
        RewardModel(load_model(trunk_dir, progress=False).model), tokenizer, pairs, 16
    )
    assert before.accuracy() < 0.5
    data = write_pairs(pairs, tmp_path / "pairs.jsonl")
    result = run_reward(_cfg(trunk_dir, data, tmp_path / "run", max_steps=30, seed=1))
    assert result.train.step == 30 and result.loop.warmup_steps == 5
    assert result.n_train_pairs == 114 and result.n_val_pairs == 6  # val_fraction 0.05
    model, info, tok = load_reward_model(result.model_dir)
    assert info["objective"] == "safety" and info["margin"] == "small" and info["threshold"] == 0.15
    assert info["data"] == str(data) and tok is not None
    report = evaluate_reward_model(model, tokenizer, pairs, batch_size=16)
    assert report.accuracy() > 0.9, report.format_table()
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["n_pairs"] == 6 and saved["accuracy"]["all"]["avg"] is not None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["step"] == 30 and summary["train_pairs"] == 114 and summary["config"]["objective"] == "safety"
    )
    assert (tmp_path / "run" / "config.toml").is_file()


class Interrupted(Exception):
    pass


def test_resume_is_bit_identical(trunk_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_pairs(_pairs(40), tmp_path / "pairs.jsonl")
    full = run_reward(_cfg(trunk_dir, data, tmp_path / "full", max_steps=8, ckpt_every=2))

    calls = {"n": 0}
    step = RewardStage.step

    def dying(self: RewardStage, batch: dict[str, torch.Tensor]) -> object:
        calls["n"] += 1
        if calls["n"] == 6:  # dies in step 6, after the step-4 checkpoint
            raise Interrupted
        return step(self, batch)

    monkeypatch.setattr(reward_mod.RewardStage, "step", dying)
    with pytest.raises(Interrupted):
        run_reward(_cfg(trunk_dir, data, tmp_path / "cut", max_steps=8, ckpt_every=2))
    monkeypatch.setattr(reward_mod.RewardStage, "step", step)
    cfg = _cfg(trunk_dir, data, tmp_path / "cut", max_steps=8, ckpt_every=2)
    cfg.resume = True
    resumed = run_reward(cfg)
    assert resumed.train.step == 8
    a, _, _ = load_reward_model(full.model_dir)
    b, _, _ = load_reward_model(resumed.model_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    start = load_model(trunk_dir, progress=False).model.state_dict()
    assert not torch.equal(sa["trunk.layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])
    assert torch.equal(sa["trunk.output.weight"], start["output.weight"])  # kept, never trained


# ------------------------------------------------------------------------------------ the report
def test_report_counts_per_bucket_on_a_hand_built_set() -> None:
    rng = random.Random(0)

    def pair(rating: str, kind: str, safety_bin: str = "both_safe") -> PreferencePair:
        p = _pair(0, rng, kind)
        return PreferencePair(p.dialog, p.chosen, p.rejected, rating, safety_bin, kind, p.task)

    sig, bet, sli, neg = RATINGS
    UNSAFE = "chosen_safe_rejected_unsafe"
    pairs = [
        pair(sig, "helpfulness"), pair(sig, "helpfulness"), pair(bet, "helpfulness"),
        pair(sli, "helpfulness"), pair(neg, "helpfulness"), pair(neg, "helpfulness"),
        pair(sig, "safety", UNSAFE), pair(sig, "safety", UNSAFE),
        pair(bet, "safety", "both_safe"), pair(neg, "safety", "both_unsafe"),
    ]  # fmt: skip
    # raw scores; sigmoid(x) < 0.15 <=> x < -1.7346
    chosen = torch.tensor([2.0, -1.0, 0.5, 0.1, 0.0, 1.0, 1.0, -3.0, 0.0, -2.0])
    rejected = torch.tensor([1.0, 1.0, 0.0, 0.2, 0.0, -1.0, -3.0, -2.0, -2.0, 0.0])
    report = report_from_scores(pairs, chosen, rejected)
    assert report.counts["helpfulness"] == {
        sig: (1, 2),
        bet: (1, 1),
        sli: (0, 1),
        neg: (1, 2),
        "avg": (3, 6),  # a tie (0.0, 0.0) is wrong
    }
    assert report.counts["safety"] == {sig: (1, 2), bet: (1, 1), neg: (0, 1), "avg": (2, 4)}
    assert report.counts["all"]["avg"] == (5, 10) and report.counts["all"][sig] == (2, 4)
    assert report.accuracy("all", neg) == pytest.approx(1 / 3) and report.n_pairs == 10
    # unsafe: the rejected sides of pairs 7, 8 and both sides of pair 10; flagged: raw < -1.7346
    d = report.detection
    assert d is not None and (d.tp, d.fp, d.fn, d.tn) == (3, 2, 1, 2)
    assert d.recall == pytest.approx(3 / 4) and d.precision == pytest.approx(3 / 5)
    table = report.format_table()
    assert "| helpfulness | 50.0 | 100.0 | 0.0 | 50.0 | 50.0 | 6 |" in table
    assert "| safety | 50.0 | 100.0 | - | 0.0 | 50.0 | 4 |" in table
    assert "recall 75.0%, precision 60.0%" in table
    js = json.loads(json.dumps(report.to_json()))
    assert js["accuracy"]["safety"]["slightly_better"] is None and js["counts"]["all"]["avg"] == [5, 10]
    assert js["unsafe_detection"]["tp"] == 3 and js["mean_margin"] == pytest.approx(
        float((chosen - rejected).mean())
    )
