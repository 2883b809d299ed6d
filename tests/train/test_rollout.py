"""`sample_responses` on a tiny random model with the embedded chat tokenizer, against independent
oracles: a greedy loop over full (cache-free) forwards, the `Generator` and `Llama.chat_completion`
paths, log-softmax of a full forward for the logprobs, and Meta's nucleus sampler re-implemented
here for the first seeded token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2.api import Llama
from llama2.chat import Message, encode_dialog
from llama2.config import ModelArgs
from llama2.errors import GenerationError
from llama2.generation.generator import Generator
from llama2.generation.sampling import SamplingParams
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer
from llama2.train.rollout import Sample, sample_responses, sample_seed

TOKENIZER = (
    Path(__file__).resolve().parents[2] / "src" / "llama2" / "assets" / "models" / "chat" / "tokenizer.model"
)
ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)

DIALOGS: list[list[Message]] = [
    [{"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER)


@pytest.fixture(scope="module")
def plain() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ARGS).eval()


@pytest.fixture(scope="module")
def eosy(tok: Tokenizer) -> Transformer:
    """A model that ends roughly half its samples with EOS within 12 tokens: embedding dim 0 is a
    constant 1 and the EOS output row reads only that dim."""
    torch.manual_seed(0)
    m = Transformer(ARGS).eval()
    with torch.no_grad():
        m.tok_embeddings.weight[:, 0] = 1.0
        m.output.weight[tok.eos_id] = 0.0
        m.output.weight[tok.eos_id, 0] = 6.0
    return m


def _full_logprobs(model: Transformer, prompt: list[int], tokens: list[int]) -> list[float]:
    """Oracle: log-softmax of one cache-free forward over prompt + response at each response token."""
    seq = torch.tensor([prompt + tokens])  # (1, P+R)
    with torch.no_grad():
        logits = model(seq)[0].float()  # (P+R, V)
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # (R, V)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def test_greedy_matches_full_forward_loop_generator_and_api(plain: Transformer, tok: Tokenizer) -> None:
    out = sample_responses(plain, tok, DIALOGS, n=2, temperature=0.0, seed=3, max_new_tokens=10)
    gen = Generator(plain, tok).generate(
        [encode_dialog(d, tok) for d in DIALOGS], 10, SamplingParams(temperature=0.0)
    )
    api = Llama.from_model(plain, tok).chat_completion(DIALOGS, temperature=0.0, max_gen_len=10)
    plain.clear_caches()
    for dialog, row, g, a in zip(DIALOGS, out, gen, api, strict=True):
        prompt = encode_dialog(dialog, tok)
        ids = list(prompt)
        for _ in range(10):  # oracle: argmax of a full forward, no cache
            with torch.no_grad():
                nxt = int(plain(torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
        expected = ids[len(prompt) :]
        assert len(row) == 2 and row[0].tokens == row[1].tokens  # greedy: every sample the same
        s = row[0]
        assert s.prompt == prompt
        assert [t for t in s.tokens if t != tok.eos_id] == expected == g.tokens
        assert s.text == g.text == a["generation"]["content"]


def test_seeded_samples_independent_of_slots_and_order(plain: Transformer, tok: Tokenizer) -> None:
    kw = dict(n=3, temperature=1.0, seed=7, max_new_tokens=8)
    a = sample_responses(plain, tok, DIALOGS, max_slots=1, **kw)  # type: ignore[arg-type]
    b = sample_responses(plain, tok, DIALOGS, max_slots=8, **kw)  # type: ignore[arg-type]
    assert [[s.tokens for s in r] for r in a] == [[s.tokens for s in r] for r in b]
    # Reordering dialogs changes each dialog's index, hence its seeds: compare a dialog to itself at
    # the same index inside a different batch instead.
    c = sample_responses(plain, tok, [*DIALOGS[:1], DIALOGS[2], DIALOGS[1]], max_slots=4, **kw)  # type: ignore[arg-type]
    assert [s.tokens for s in c[0]] == [s.tokens for s in a[0]]
    # Samples of one dialog differ from each other, and another seed gives other samples.
    assert len({tuple(s.tokens) for s in a[1]}) == 3
    d = sample_responses(plain, tok, DIALOGS, max_slots=8, **(kw | {"seed": 8}))  # type: ignore[arg-type]
    assert [s.tokens for s in d[1]] != [s.tokens for s in a[1]]


def test_first_token_follows_meta_sampler_with_derived_seed(plain: Transformer, tok: Tokenizer) -> None:
    temperature, top_p, seed = 0.9, 0.8, 11
    out = sample_responses(plain, tok, DIALOGS, n=2, temperature=temperature, top_p=top_p, seed=seed,
                           max_new_tokens=1)  # fmt: skip
    for i, dialog in enumerate(DIALOGS):
        prompt = encode_dialog(dialog, tok)
        with torch.no_grad():
            logits = plain(torch.tensor([prompt]))[0, -1].float()  # (V,)
        for j in range(2):
            probs = torch.softmax(logits / temperature, dim=-1)[None]  # (1, V)
            ps, idx = torch.sort(probs, dim=-1, descending=True)
            ps[(torch.cumsum(ps, dim=-1) - ps) > top_p] = 0.0
            ps.div_(ps.sum(dim=-1, keepdim=True))
            g = torch.Generator().manual_seed(sample_seed(seed, i, j))
            expected = int(idx[0, torch.multinomial(ps, 1, generator=g)[0, 0]])
            assert out[i][j].tokens[0] == expected


def test_logprobs_and_eos(eosy: Transformer, tok: Tokenizer) -> None:
    out = sample_responses(eosy, tok, DIALOGS, n=6, temperature=1.0, seed=1, max_new_tokens=12, max_slots=5)
    samples: list[Sample] = [s for row in out for s in row]
    reasons = {s.finish_reason for s in samples}
    assert reasons == {"stop", "length"}  # the fixture makes both happen
    for s in samples:
        assert len(s.logprobs) == len(s.tokens)
        assert s.logprobs == pytest.approx(_full_logprobs(eosy, s.prompt, s.tokens), abs=1e-4)
        if s.finish_reason == "stop":
            assert s.tokens[-1] == tok.eos_id and tok.eos_id not in s.tokens[:-1]
            assert s.text == tok.decode(s.tokens[:-1])
        else:
            assert len(s.tokens) == 12 and tok.eos_id not in s.tokens
            assert s.text == tok.decode(s.tokens)


def test_long_dialog_is_cut_to_leave_room(plain: Transformer, tok: Tokenizer) -> None:
    long: list[Message] = []
    for k in range(12):
        long += [
            {"role": "user", "content": f"Tell me a long story about the king number {k}."},
            {"role": "assistant", "content": "Once upon a time there was a king who ruled a land."},
        ]
    long.append({"role": "user", "content": "And then?"})
    assert len(encode_dialog(long, tok)) > ARGS.max_seq_len
    [[s]] = sample_responses(plain, tok, [long], n=1, temperature=0.0, seed=0, max_new_tokens=20)
    assert len(s.prompt) <= ARGS.max_seq_len - 20
    assert s.prompt == encode_dialog(long, tok, max_tokens=ARGS.max_seq_len - 20)


def test_model_left_clean_and_errors(plain: Transformer, tok: Tokenizer) -> None:
    plain.train()
    sample_responses(plain, tok, DIALOGS[:1], n=1, temperature=1.0, seed=0, max_new_tokens=3)
    assert plain.cache is None and plain.training
    plain.eval()
    with pytest.raises(GenerationError, match="n "):
        sample_responses(plain, tok, DIALOGS, n=0, temperature=1.0, seed=0)
    with pytest.raises(GenerationError, match="context"):
        sample_responses(plain, tok, DIALOGS, n=1, temperature=1.0, seed=0, max_new_tokens=128)
    assert sample_responses(plain, tok, [], n=1, temperature=1.0, seed=0) == []
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) and sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
