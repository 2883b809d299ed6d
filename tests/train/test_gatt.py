"""GAtt stage: sampling keeps adherent answers and styles the others (stubbed sampler), training
dialogs carry the instruction in the first user turn only and fit the context, and a tiny model runs
end to end (data, SFT with loss on the last turn, model at out_dir/model, summary)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import llama2.train.gatt as gatt_mod
from llama2.chat import Message, encode_dialog_for_training
from llama2.checkpoint.load import load_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.gatt import INSTRUCTIONS_BY_NAME, gatt_dialogs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer
from llama2.train.gatt import GattConfig, build_training_dialogs, run_gatt, sample_gatt_answers
from llama2.train.loop_config import LoopConfig
from llama2.train.rollout import Sample

CHAT_TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(CHAT_TOKENIZER)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
    return save_checkpoint(
        Transformer(args), args, tmp_path_factory.mktemp("gatt") / "base", tokenizer_path=CHAT_TOKENIZER
    )


def _loop(out: Path, **kw: Any) -> LoopConfig:
    fields: dict[str, Any] = dict(
        out_dir=out, batch_size=2, max_steps=2, lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=1,
        ckpt_every=0, progress=False, device="cpu",
    )  # fmt: skip
    return LoopConfig(**(fields | kw))


def test_sampling_keeps_adherent_answers_and_styles_the_rest(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialogs = gatt_dialogs("train", 4, seed=0, max_turns=3)
    seen: list[list[list[Message]]] = []
    stub: Any = torch.nn.Identity()  # never called: sampling is stubbed

    def fake(model: Any, tokenizer: Any, prompts: Sequence[list[Message]], **kw: Any) -> list[list[Sample]]:
        seen.append([list(p) for p in prompts])
        out = []
        for i in range(len(prompts)):
            d, t = dialogs[i], len(seen) - 1
            # dialogs 0 and 1 answer in style with the right content; 2 and 3 plainly, 3 wrongly
            text = d.items[t].answer if i < 3 else "nonsense"
            text = d.instruction.apply(text) if i < 2 else text
            out.append([Sample(prompt=[], tokens=[], text=f" {text}", finish_reason="stop")])
        return out

    monkeypatch.setattr(gatt_mod, "sample_responses", fake)
    cfg = GattConfig(max_turns=3, n_dialogs=4)
    answers, stats = sample_gatt_answers(stub, tok, dialogs, cfg)
    for t, prompts in enumerate(seen):  # the instruction in EVERY user turn while sampling
        for p, d in zip(prompts, dialogs, strict=True):
            users = [m["content"] for m in p if m["role"] == "user"]
            assert len(users) == t + 1 and all(u.startswith(d.instruction_text + "\n") for u in users)
    for i, d in enumerate(dialogs):
        for t in range(3):
            assert d.instruction.check(answers[i][t])
            content = d.items[t].answer if i < 3 else "nonsense"
            assert answers[i][t] == d.instruction.apply(content)
    assert stats["totals"] == {
        "n": 12, "adhered": 6, "applied": 6, "correct": 9, "replaced": 0, "cut": 0, "adherence": 0.5
    }  # fmt: skip
    assert [r["adhered"] for r in stats["per_turn"]] == [2, 2, 2]
    seen.clear()
    answers, stats = sample_gatt_answers(
        stub,
        tok,
        dialogs,
        GattConfig(max_turns=3, n_dialogs=4, reference_on_wrong=True),
    )
    assert stats["totals"]["replaced"] == 3
    assert answers[3] == [dialogs[3].instruction.apply(dialogs[3].items[t].answer) for t in range(3)]


def test_training_dialogs_first_turn_instruction_and_fit(tok: Tokenizer) -> None:
    dialogs = gatt_dialogs("train", 12, seed=1, max_turns=5)
    answers = [[d.instruction.apply(it.answer) for it in d.items] for d in dialogs]
    records, built = build_training_dialogs(dialogs, answers, tok, seq_len=10_000, seed=0)
    assert built["shortened"] == 0 and len(set(r["turns"] for r in records)) > 1
    for r, d in zip(records, dialogs, strict=True):
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert len(users) == r["turns"] and r["messages"][-1]["role"] == "assistant"
        assert users[0] == f"{d.instruction_text}\n{d.items[0].prompt}"
        assert users[1:] == [it.prompt for it in d.items[1 : r["turns"]]]
    tight, built = build_training_dialogs(dialogs, answers, tok, seq_len=70, seed=0)
    assert built["shortened"] > 0
    for r, r0 in zip(tight, records, strict=True):
        n = len(encode_dialog_for_training(r["messages"], tok)[0])
        assert n <= 70 or r["turns"] == 1
        assert r["turns"] <= r0["turns"]


def test_run_gatt_end_to_end(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = GattConfig(
        model=base, n_dialogs=4, max_turns=3, max_new_tokens=4, plain_fraction=0.5, val_fraction=0.0,
        loop=_loop(out),
    )  # fmt: skip
    res = run_gatt(cfg)
    lines = [json.loads(x) for x in (out / "gatt_train.jsonl").read_text().splitlines()]
    gatt = [r for r in lines if r["kind"] == "gatt"]
    assert len(gatt) == 4 and sum(r["kind"] == "plain" for r in lines) == 4
    for r in gatt:
        inst = INSTRUCTIONS_BY_NAME[r["instruction"]]
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert users[0].split("\n")[0] in (inst.text, inst.terse)
        assert all(inst.text not in u and inst.terse not in u for u in users[1:])
        assert all(inst.check(m["content"]) for m in r["messages"] if m["role"] == "assistant")
    summary = json.loads((out / "summary.json").read_text())
    totals = summary["samples"]["totals"]
    assert totals["n"] == 12 and totals["adhered"] + totals["applied"] == 12
    assert summary["sft"]["step"] == 2 and summary["wall_time_s"] > summary["sft"]["wall_time_s"] > 0
    assert 'loss_turns = "last"' in (out / "sft" / "config.toml").read_text()
    assert res.model_dir == out / "model" and not (out / "sft" / "model").exists()
    tuned = load_model(res.model_dir, progress=False).model.state_dict()
    before = load_model(base, progress=False).model.state_dict()
    assert not torch.equal(tuned["tok_embeddings.weight"], before["tok_embeddings.weight"])
    with pytest.raises(ConfigError, match="already holds"):  # refused before any sampling
        run_gatt(cfg)


def test_bad_config(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain_fraction"):
        run_gatt(GattConfig(model=base, plain_fraction=1.0, loop=_loop(tmp_path / "a")))
    with pytest.raises(ConfigError, match="n_dialogs"):
        run_gatt(GattConfig(model=base, n_dialogs=0, loop=_loop(tmp_path / "b")))
    flat: dict[str, Any] = {"lr": 1e-4}
    assert GattConfig(**flat).loop.lr == 1e-4  # flat loop aliases
