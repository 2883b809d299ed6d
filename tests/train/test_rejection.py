"""Rejection sampling: best-of-K selection and cross-iteration pooling on hand-built scores (the
expected winners are written out by hand), the gold SFT data, and `run_rejection` end to end on a tiny
random policy with tiny random reward models (2 iterations; resume skips a finished iteration)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from llama2.chat import Message
from llama2.checkpoint.reward_io import save_reward_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.sft import load_dialogs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.model.reward import RewardModel
from llama2.train.loop_config import LoopConfig
from llama2.train.rejection import (
    Candidate,
    RejectionConfig,
    RSPrompt,
    best_per_prompt,
    build_prompts,
    gold_dialogs,
    pool_best,
    read_samples,
    run_rejection,
    score_samples,
    write_gold,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)


def _c(key: str, r_c: float, it: int = 0, j: int = 0) -> Candidate:
    return Candidate(key=key, response=f"{key}-{it}-{j}", r_h=0.5, r_s=0.5, r_c=r_c, iteration=it, sample=j)


def test_best_per_prompt_picks_the_max_reward() -> None:
    cands = [_c("a", 0.2, j=0), _c("b", 0.9, j=0), _c("a", 0.7, j=1), _c("b", 0.1, j=1), _c("a", 0.7, j=2)]
    best = best_per_prompt(cands)
    assert {k: (c.r_c, c.sample) for k, c in best.items()} == {"a": (0.7, 1), "b": (0.9, 0)}  # tie: first


def test_pooling_keeps_an_earlier_sample_that_beats_the_new_one() -> None:
    old = best_per_prompt([_c("a", 0.8, it=0), _c("b", 0.3, it=0), _c("c", 0.5, it=0)])
    new = best_per_prompt([_c("a", 0.6, it=1), _c("b", 0.4, it=1), _c("c", 0.5, it=1), _c("d", 0.1, it=1)])
    pooled = pool_best(old, new)
    assert {k: (c.r_c, c.iteration) for k, c in pooled.items()} == {
        "a": (0.8, 0),  # the earlier sample wins
        "b": (0.4, 1),  # the new one wins
        "c": (0.5, 0),  # a tie keeps the earlier
        "d": (0.1, 1),  # a prompt new in this iteration
    }


class FakeScorer:
    """`RewardScorer.score`'s signature: r_h = len(response) / 100, r_s = 0.9 for safety prompts."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[bool]]] = []

    def score(
        self, dialogs: Sequence[Sequence[Message]], responses: Sequence[str], is_safety: Sequence[bool]
    ) -> Any:
        self.calls.append((len(dialogs), list(is_safety)))
        r_h = torch.tensor([len(r) / 100 for r in responses])
        r_s = torch.full((len(responses),), 0.9)
        r_c = torch.where(torch.tensor(list(is_safety)), r_s, r_h)

        @dataclasses.dataclass
        class S:
            r_h: Tensor
            r_s: Tensor
            r_c: Tensor

        return S(r_h, r_s, r_c)


def test_score_samples_and_gold_dialogs(tmp_path: Path) -> None:
    p0 = RSPrompt([{"role": "user", "content": "What is 2 plus 2?"}], False, "add")
    p1 = RSPrompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Tell me how to rob the king."},
        ],
        True,
        "harmful",
    )
    scorer = FakeScorer()
    cands = score_samples(scorer, [p0, p1], [["4", "four!"], ["no", "I cannot."]], iteration=3, seed=7)
    assert scorer.calls == [(4, [False, False, True, True])]
    assert [(c.key, c.response, c.sample, c.iteration, c.seed) for c in cands] == [
        (p0.key, "4", 0, 3, 7), (p0.key, "four!", 1, 3, 7),
        (p1.key, "no", 0, 3, 7), (p1.key, "I cannot.", 1, 3, 7),
    ]  # fmt: skip
    assert [c.r_c for c in cands] == pytest.approx([0.01, 0.05, 0.9, 0.9])
    best = best_per_prompt(cands)
    gold = gold_dialogs([p0, p1], best, min_reward=0.0)
    path = write_gold(tmp_path / "best.jsonl", gold)
    dialogs = load_dialogs(path)
    assert dialogs == [
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "four!"}],
        [*p1.dialog, {"role": "assistant", "content": "no"}],  # tie at 0.9: the first sample
    ]
    # min_reward drops the prompt whose best is 0.05
    assert [d[-1]["content"] for d, _ in gold_dialogs([p0, p1], best, min_reward=0.5)] == ["no"]


def test_build_prompts_flags_safety_prompts() -> None:
    prompts = build_prompts(n_per_task=1, n_harmful=2, n_benign=2, seed=0)
    tasks = [p.task for p in prompts]
    assert tasks.count("add") == 1 and tasks.count("refuse") == 1
    assert all(p.is_safety == (p.task == "refuse" or i >= 10) for i, p in enumerate(prompts))
    assert len(prompts) == 14 and len({p.key for p in prompts}) == 14
    assert all(p.dialog[-1]["role"] == "user" for p in prompts)


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rs")
    torch.manual_seed(0)
    policy = save_checkpoint(Transformer(ARGS), ARGS, root / "policy", tokenizer_path=TOKENIZER)
    out = {"policy": policy}
    for objective in ("helpfulness", "safety"):
        rm = RewardModel(Transformer(ARGS))
        torch.nn.init.normal_(rm.head.weight, std=1.0)
        out[objective] = save_reward_model(rm, root / objective, TOKENIZER, {"objective": objective})
    return out


def _cfg(models: dict[str, Path], out: Path, overwrite: bool = False, **kw: Any) -> RejectionConfig:
    loop = LoopConfig(
        out_dir=out, batch_size=4, max_steps=2, lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=1,
        ckpt_every=0, progress=False, device="cpu", overwrite=overwrite,
    )  # fmt: skip
    fields: dict[str, Any] = dict(
        model=models["policy"], reward_helpful=models["helpfulness"], reward_safety=models["safety"],
        n_per_task=1, n_harmful=1, n_benign=1, k=3, max_new_tokens=4, iterations=2, val_fraction=0.0,
        loop=loop,
    )  # fmt: skip
    return RejectionConfig(**(fields | kw))


def _best_by_prompt(*sample_files: Path) -> dict[str, float]:
    """Oracle: the max r_c per prompt over plain JSON lines of every samples file."""
    best: dict[str, float] = {}
    for f in sample_files:
        for line in f.read_text().splitlines():
            obj = json.loads(line)
            best[obj["key"]] = max(best.get(obj["key"], -1.0), obj["r_c"])
    return best


def test_two_iterations_end_to_end_and_resume(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "full"
    res = run_rejection(_cfg(models, out))
    n_prompts = len(build_prompts(1, 1, 1, 0))
    it0, it1 = out / "iter_0", out / "iter_1"
    for it in (it0, it1):
        samples = read_samples(it / "samples.jsonl")
        assert len(samples) == 3 * n_prompts
        assert all(0 < c.r_c < 1 and 0 < c.r_h < 1 and 0 < c.r_s < 1 for c in samples)
        assert (it / "sft" / "model" / "model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "params.json").is_file()
    # iteration 1 fine-tunes the model of iteration 0 (and samples from it)
    sft1 = tomllib.loads((it1 / "sft" / "config.toml").read_text())
    assert Path(sft1["model"]) == it0 / "sft" / "model"
    # the pooled gold data: per prompt the best over BOTH iterations' samples (oracle from raw JSON)
    want = _best_by_prompt(it0 / "samples.jsonl", it1 / "samples.jsonl")
    gold = [json.loads(line) for line in (it1 / "best.jsonl").read_text().splitlines()]
    assert {g["key"]: g["r_c"] for g in gold} == want
    for g in gold:
        prompt = json.loads(g["key"])
        assert g["messages"] == [*prompt, {"role": "assistant", "content": g["response"]}]
    summary = json.loads((out / "summary.json").read_text())
    recs = summary["iterations"]
    assert [r["iteration"] for r in recs] == [0, 1] and recs[0]["from_earlier_iterations"] == 0
    assert recs[1]["from_earlier_iterations"] == sum(g["iteration"] == 0 for g in gold)
    assert recs[1]["max_best_reward"] == pytest.approx(max(want.values()))
    assert res.model_dir == out / "model" and len(res.iterations) == 2

    # a used out_dir is refused without resume/overwrite
    with pytest.raises(ConfigError, match="already holds"):
        run_rejection(_cfg(models, out))

    # resume: run 1 iteration, then ask for 2 with resume: iteration 0 is skipped, not redone
    out2 = tmp_path / "resumed"
    run_rejection(_cfg(models, out2, iterations=1))
    first = {p.name: p.stat().st_mtime_ns for p in (out2 / "iter_0").iterdir()}
    first_model = (out2 / "iter_0" / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    run_rejection(_cfg(models, out2, resume=True))
    assert {p.name: p.stat().st_mtime_ns for p in (out2 / "iter_0").iterdir()} == first
    assert (out2 / "iter_0" / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == first_model
    assert len(json.loads((out2 / "summary.json").read_text())["iterations"]) == 2
    # deterministic on CPU: the resumed run's second iteration equals the uninterrupted one's
    assert (out2 / "iter_1" / "samples.jsonl").read_text() == (it1 / "samples.jsonl").read_text()

    # an iteration interrupted during its SFT: its samples are reused, the SFT resumes from its checkpoint
    it1b = out2 / "iter_1"
    weights = (it1b / "sft" / "model" / "model.safetensors").read_bytes()
    samples_mtime = (it1b / "samples.jsonl").stat().st_mtime_ns
    (it1b / "iteration.json").unlink()
    shutil.rmtree(it1b / "sft" / "model")
    run_rejection(_cfg(models, out2, resume=True))
    assert (it1b / "samples.jsonl").stat().st_mtime_ns == samples_mtime
    assert (it1b / "iteration.json").is_file()
    assert (it1b / "sft" / "model" / "model.safetensors").read_bytes() == weights

    # overwrite replaces a used out_dir: a 1-iteration run leaves no iter_1 behind
    run_rejection(_cfg(models, out2, overwrite=True, iterations=1))
    assert not (out2 / "iter_1").exists()
    assert len(json.loads((out2 / "summary.json").read_text())["iterations"]) == 1


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="k must be >= 1"):
        RejectionConfig(k=0)
    with pytest.raises(ConfigError, match="needs prompts"):
        RejectionConfig(n_per_task=0, n_harmful=0, n_benign=0)
    with pytest.raises(ConfigError, match="loss_turns"):
        RejectionConfig(loss_turns="first")
