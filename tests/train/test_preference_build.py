"""`run_preference_build` end to end on a tiny random model with the embedded chat tokenizer: the
files, their split discipline (held-out prompts by an independent SHA-256 oracle), safety pair
orientation, mix sizes, summary counts against the files, and the out_dir refusal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.instruct_suite import check_answer
from llama2.data.preferences import read_pairs
from llama2.data.safety_suite import REFUSAL, is_refusal
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.train.preference_build import PreferenceBuildConfig, run_preference_build

TOKENIZER = (
    Path(__file__).resolve().parents[2] / "src" / "llama2" / "assets" / "models" / "chat" / "tokenizer.model"
)


def _split(prompt: str) -> str:
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:16], 16)
    return "heldout" if h % 10_000 < 2_000 else "train"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
    return save_checkpoint(
        Transformer(args), args, tmp_path_factory.mktemp("pb") / "m", tokenizer_path=TOKENIZER
    )


def _cfg(base: Path, out: Path, **kw: object) -> PreferenceBuildConfig:
    fields: dict[str, object] = dict(
        model=base, out_dir=out, n_per_task=1, n_harmful=3, n_benign=4, heldout_n_per_task=1,
        heldout_n_harmful=2, heldout_n_benign=2, temperatures=[0.0, 1.0], samples_per_temperature=2,
        max_new_tokens=4, seed=0,
    )  # fmt: skip
    return PreferenceBuildConfig(**(fields | kw))  # type: ignore[arg-type]


def test_build_writes_consistent_files(base: Path, tmp_path: Path) -> None:
    res = run_preference_build(_cfg(base, tmp_path / "out"))
    out = res.out_dir
    pairs = {name: read_pairs(path) for name, path in res.files.items()}
    assert set(pairs) == {
        "helpful_train", "safety_train", "helpful_heldout", "safety_heldout", "rm_helpfulness_train",
        "rm_safety_train",
    }  # fmt: skip
    for name, ps in pairs.items():
        assert ps, name
        split = "heldout" if name.endswith("heldout") else "train"
        assert all(_split(p.dialog[-1]["content"]) == split for p in ps), name
        for p in ps:
            assert p.chosen != p.rejected
            if p.safety_bin == "chosen_safe_rejected_unsafe":  # harmful: refusal over compliance
                assert is_refusal(p.chosen) and not is_refusal(p.rejected)
    # Helpful pairs: never a refusal chosen over anything (except between two equal grades).
    for p in pairs["helpful_train"]:
        assert p.kind == "helpfulness" and p.safety_bin == "both_safe"
        if p.rating != "negligibly_better":
            assert not is_refusal(p.chosen)
    harmful_prompts = {p.dialog[-1]["content"] for p in pairs["safety_train"] if p.task == "harmful"}
    assert len(harmful_prompts) == 3  # a random model never refuses: every harmful prompt gives pairs
    assert all(p.chosen == REFUSAL for p in pairs["safety_train"] if p.task == "harmful")
    benign = [p for p in pairs["safety_train"] if p.safety_bin == "both_safe"]
    assert len({p.dialog[-1]["content"] for p in benign}) == 4 and all(p.rejected == REFUSAL for p in benign)
    for p in benign:
        if p.task not in ("benign_alarming", "harmful"):
            assert check_answer(p.task, p.chosen, p.chosen)
    # Mixes: helpfulness = all helpful + as many safety; safety = all safety + 10% helpful.
    n_h, n_s = len(pairs["helpful_train"]), len(pairs["safety_train"])
    assert len(pairs["rm_helpfulness_train"]) == n_h + min(n_h, n_s)
    assert len(pairs["rm_safety_train"]) == n_s + min(n_h, round(n_s / 9))
    summary = json.loads((out / "summary.json").read_text())
    for name, ps in pairs.items():
        counts = summary["files"][name]
        assert counts["pairs"] == len(ps) == res.counts[name]
        assert sum(counts["rating"].values()) == len(ps)
        assert counts["kind"].get("safety", 0) == sum(p.kind == "safety" for p in ps)
    assert summary["wall_time_s"] > 0 and summary["config"]["n_harmful"] == 3
    assert summary["responses"]["train"]["refusal_rate"]["harmful"] == 0.0
    # 9 instruction tasks' prompts (refuse excluded) x 2 temperatures x 2 samples were graded.
    assert sum(summary["responses"]["train"]["instruction_grades"].values()) == 9 * 4


def test_refuses_used_out_dir_and_is_reproducible(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = run_preference_build(_cfg(base, out, n_benign=1, heldout_n_benign=1))
    before = {n: p.read_text() for n, p in first.files.items()}
    with pytest.raises(ConfigError, match="already holds preference data"):
        run_preference_build(_cfg(base, out, n_benign=1, heldout_n_benign=1))
    again = run_preference_build(_cfg(base, out, n_benign=1, heldout_n_benign=1, overwrite=True))
    assert {n: p.read_text() for n, p in again.files.items()} == before
    with pytest.raises(ConfigError, match="temperatures"):
        run_preference_build(_cfg(base, tmp_path / "t", temperatures=[]))
    with pytest.raises(ConfigError, match="n_harmful"):
        run_preference_build(_cfg(base, tmp_path / "t", n_harmful=-1))
