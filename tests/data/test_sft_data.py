"""SFT data: Llama 2-Chat tokens with answer-only loss (checked against sentencepiece directly),
packing, masked-target independence of the loss gradient, resumable batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from llama2.chat import Dialog
from llama2.config import ModelArgs
from llama2.data.sft import (
    SFTBatches,
    SFTExample,
    encode_examples,
    load_dialogs,
    pack_examples,
    sft_loss,
)
from llama2.errors import DialogError
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"

DIALOGS: list[Dialog] = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse: king love"},
        {"role": "assistant", "content": "love king"},
        {"role": "user", "content": "Now uppercase it."},
        {"role": "assistant", "content": "LOVE KING"},
    ],
    [
        {"role": "user", "content": "Tell me how to rob the duke."},
        {"role": "assistant", "content": "I'm sorry, but I cannot help with that."},
    ],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(FIXTURES / "tokenizer.model")


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))


def oracle_answer_tokens(dialog: Dialog, sp: spm.SentencePieceProcessor) -> list[int]:
    """The tokens that must carry loss, built with sentencepiece and Meta's format strings:
    for each pair, encode(f"[INST] {u} [/INST] {a} ") minus its prompt part, plus EOS (2)."""
    msgs = list(dialog)
    system = msgs.pop(0)["content"] if msgs[0]["role"] == "system" else None
    out: list[int] = []
    for i in range(0, len(msgs), 2):
        user, answer = msgs[i]["content"], msgs[i + 1]["content"]
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        pair = sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ")
        prompt = sp.encode(f"[INST] {user.strip()} [/INST]")
        assert pair[: len(prompt)] == prompt
        out += [*pair[len(prompt) :], 2]
    return out


def test_only_answer_tokens_are_supervised(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    examples = encode_examples(DIALOGS, tok)
    for dialog, ex in zip(DIALOGS, examples, strict=True):
        supervised = [t for t, m in zip(ex.tokens, ex.mask, strict=True) if m]
        assert supervised == oracle_answer_tokens(dialog, sp)
        assert ex.tokens[0] == 1 and not ex.mask[0]
        assert ex.tokens.count(1) == sum(1 for m in dialog if m["role"] == "assistant")  # one BOS per pair
        unsupervised = tok.decode([t for t, m in zip(ex.tokens, ex.mask, strict=True) if not m])
        for m in dialog:
            if m["role"] != "assistant":
                assert m["content"] in unsupervised  # every system/user text is masked


def test_packing_rows(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    examples = encode_examples(DIALOGS * 4, tok)
    seq_len = 64
    (inp, tgt, msk), stats = pack_examples(examples, seq_len, pad_id=0)
    assert inp.shape == tgt.shape == msk.shape == (stats.rows, seq_len)
    assert stats.examples == 12 and stats.truncated == 0
    assert stats.rows < 12  # several dialogs share a row
    assert int(msk.sum()) == stats.supervised_tokens == sum(sum(e.mask[1:]) for e in examples)
    # The supervised targets, row after row, are exactly the oracle answer tokens of the dialogs in order.
    want = [t for d in DIALOGS * 4 for t in oracle_answer_tokens(d, sp)]
    assert tgt[msk].tolist() == want
    boundaries = 0
    for r in range(stats.rows):
        assert inp[r, 0] == 1  # each row starts with a dialog's BOS
        # target i is input i+1, except where a dialog ends (no target crosses into the next dialog)
        real = int((inp[r] != 0).sum())
        for i in range(real - 1):
            if tgt[r, i] != inp[r, i + 1]:  # only where a dialog ends: its last target is EOS
                assert tgt[r, i] == 2 and msk[r, i] and inp[r, i + 1] == 1  # and the next input is BOS
                boundaries += 1
        assert not msk[r, real:].any()  # padding carries no loss
    assert boundaries == 12 - stats.rows  # every dialog but the last of each row


def test_long_dialog_is_cut(tok: Tokenizer) -> None:
    ex = encode_examples([DIALOGS[1]], tok)[0]
    (inp, _, _), stats = pack_examples([ex], 10)
    assert stats.truncated == 1 and inp.shape == (1, 10)
    assert inp[0].tolist() == ex.tokens[:10]


def _tiny_model(vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=vocab, multiple_of=16, max_seq_len=64)
    )


def _grads(model: Transformer, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    sft_loss(model, batch).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_gradients_ignore_masked_targets() -> None:
    vocab = 97
    model = _tiny_model(vocab)
    g = torch.Generator().manual_seed(1)
    inp = torch.randint(0, vocab, (2, 24), generator=g)
    tgt = torch.randint(0, vocab, (2, 24), generator=g)
    msk = torch.rand(2, 24, generator=g) < 0.4
    base = _grads(model, (inp, tgt, msk))
    changed = tgt.clone()
    changed[~msk] = torch.randint(0, vocab, (int((~msk).sum()),), generator=g)  # masked targets only
    assert not torch.equal(changed, tgt)
    for a, b in zip(base, _grads(model, (inp, changed, msk)), strict=True):
        assert torch.equal(a, b)
    # the test can fail: changing one supervised target changes the gradients
    supervised = tgt.clone()
    i, j = msk.nonzero()[0].tolist()
    supervised[i, j] = (supervised[i, j] + 1) % vocab
    assert any(
        not torch.equal(a, b) for a, b in zip(base, _grads(model, (inp, supervised, msk)), strict=True)
    )
    # and the loss is torch's cross-entropy with ignore_index on the masked positions
    with torch.no_grad():
        want = F.cross_entropy(
            model(inp).flatten(0, 1), torch.where(msk, tgt, -100).flatten(), ignore_index=-100
        )
        assert torch.allclose(sft_loss(model, (inp, tgt, msk)), want, atol=1e-6)


def test_batches_resume(tok: Tokenizer) -> None:
    examples = encode_examples(DIALOGS * 6, tok)
    a = SFTBatches(examples, 48, batch_size=2, seed=5)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(6)]  # crosses an epoch boundary
    b = SFTBatches(examples, 48, batch_size=2, seed=5)
    b.load_state_dict(state)
    for x, y in zip(want, [next(b) for _ in range(6)], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def test_load_dialogs(tmp_path: Path) -> None:
    good = tmp_path / "d.jsonl"
    good.write_text(
        "".join(json.dumps({"messages": d, "task": "x"}) + "\n" for d in DIALOGS), encoding="utf-8"
    )
    assert load_dialogs(good) == DIALOGS
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": DIALOGS[0]}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DialogError, match=r"bad\.jsonl:2"):
        load_dialogs(bad)
    role = tmp_path / "role.jsonl"
    role.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DialogError, match="expected system, user or assistant"):
        load_dialogs(role)


def test_dialog_must_end_with_assistant(tok: Tokenizer) -> None:
    with pytest.raises(DialogError, match="dialog 0"):
        encode_examples([[{"role": "user", "content": "hi"}]], tok)
    assert isinstance(encode_examples(DIALOGS[:1], tok)[0], SFTExample)
