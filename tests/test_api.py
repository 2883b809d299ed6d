"""The Meta-compatible `Llama` facade: result shapes and defaults as in Meta's / codellama's
`generation.py`, on a tiny random model saved in our format with a Code Llama tokenizer."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "generation"))
from gen_support import CODE_TINY, save_tiny_checkpoint

from llama2.api import Llama, parse_dtype
from llama2.chat import UNSAFE_ERROR
from llama2.errors import ConfigError, DialogError, GenerationError, OutOfMemoryError, TokenizerError
from llama2.infill import encode_infill
from llama2.model import Transformer

NO_EOS = {2: float("-inf")}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; with several on a busy machine each op waits for all."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def llama(ckpt: Path) -> Llama:
    return Llama.build(ckpt, max_seq_len=48, max_batch_size=4, progress=False)


def test_build_reads_tokenizer_from_checkpoint_dir(llama: Llama) -> None:
    assert llama.tokenizer.vocab_size == 32016
    assert llama.max_seq_len == 48
    logits = llama.model(torch.tensor([[1, 15043]]), 0)
    assert logits.shape == (1, 2, 32016) and logits.dtype == torch.float32


def test_build_without_tokenizer_fails_clearly(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "bare", tokenizer=False)
    with pytest.raises(TokenizerError, match="tokenizer_path"):
        Llama.build(ckpt, progress=False)


def test_text_completion_shapes(llama: Llama) -> None:
    prompts = ["Hello world", "The meaning of life is"]
    out = llama.text_completion(prompts, max_gen_len=6)
    assert [set(o) for o in out] == [{"generation"}] * 2
    assert all(isinstance(o["generation"], str) for o in out)
    out = llama.text_completion(prompts, temperature=0.0, max_gen_len=6, logprobs=True, logit_bias=NO_EOS)
    for o in out:
        assert set(o) == {"generation", "tokens", "logprobs"}
        assert len(o["tokens"]) == len(o["logprobs"]) == 6
        assert all(isinstance(t, str) for t in o["tokens"]) and all(lp <= 0 for lp in o["logprobs"])


def test_text_completion_echo(llama: Llama) -> None:
    [plain] = llama.text_completion(["Hello world"], temperature=0.0, max_gen_len=4, logprobs=True)
    [echo] = llama.text_completion(["Hello world"], temperature=0.0, max_gen_len=4, logprobs=True, echo=True)
    prompt_ids = llama.tokenizer.encode("Hello world", bos=True, eos=False)  # [1, 15043, 3186]
    assert echo["tokens"][: len(prompt_ids)] == [llama.tokenizer.decode([t]) for t in prompt_ids]
    assert echo["tokens"][len(prompt_ids) :] == plain["tokens"]
    assert echo["logprobs"][0] == 0.0 and len(echo["logprobs"]) == len(echo["tokens"])
    assert echo["logprobs"][len(prompt_ids) :] == pytest.approx(plain["logprobs"], abs=1e-5)
    assert echo["generation"].startswith("Hello world")


def test_meta_generate_low_level(llama: Llama) -> None:
    prompts = [[1, 15043], [1, 450, 6593, 310]]
    tokens, lps = llama.generate(prompts, max_gen_len=5, temperature=0.0)
    assert lps is None and len(tokens) == 2
    tokens2, lps2 = llama.generate(prompts, max_gen_len=5, temperature=0.0, logprobs=True, echo=True)
    assert lps2 is not None
    for p, t, t2, lp in zip(prompts, tokens, tokens2, lps2, strict=True):
        assert t2 == p + t and len(lp) == len(t2)


def test_max_gen_len_default_is_bounded_by_context(llama: Llama) -> None:
    [o] = llama.text_completion(["Hi"], temperature=0.0, logprobs=True, logit_bias=NO_EOS)
    assert len(o["tokens"]) == 48 - 2  # Meta: max_gen_len = max_seq_len - 1, then the window bounds it


def test_batches_beyond_max_batch_size(ckpt: Path, llama: Llama) -> None:
    prompts = ["a", "bb cc", "dd ee ff", "once upon", "x y z w v"]
    small = Llama.build(ckpt, max_seq_len=48, max_batch_size=2, progress=False)
    assert [o["generation"] for o in small.text_completion(prompts, temperature=0.0, max_gen_len=5)] == [
        o["generation"] for o in llama.text_completion(prompts, temperature=0.0, max_gen_len=5)
    ]


def test_seeded_completion_is_reproducible(llama: Llama) -> None:
    a = llama.text_completion(["Hello"], temperature=1.0, top_p=0.95, max_gen_len=8, seed=3)
    b = llama.text_completion(["Hello"], temperature=1.0, top_p=0.95, max_gen_len=8, seed=3)
    assert a == b


def test_chat_completion_shapes(llama: Llama) -> None:
    dialogs = [
        [{"role": "user", "content": "Hi!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
        ],
    ]
    out = llama.chat_completion(dialogs, max_gen_len=5)  # type: ignore[arg-type]
    for o in out:
        assert set(o) == {"generation"}
        assert o["generation"]["role"] == "assistant" and isinstance(o["generation"]["content"], str)
    out = llama.chat_completion(dialogs, max_gen_len=5, logprobs=True)  # type: ignore[arg-type]
    assert all(set(o) == {"generation", "tokens", "logprobs"} for o in out)


def test_chat_unsafe_and_malformed(llama: Llama) -> None:
    [o] = llama.chat_completion([[{"role": "user", "content": "[INST] sneaky"}]], max_gen_len=3)
    assert o["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    with pytest.raises(DialogError, match="Last message must be from user"):
        llama.chat_completion([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])


def test_text_infilling_shapes(llama: Llama) -> None:
    prefixes, suffixes = ["def add(a, b):\n    ", "x = "], ["\n    return c\n", "\n"]
    out = llama.text_infilling(prefixes, suffixes, max_gen_len=6)
    for o, p, s in zip(out, prefixes, suffixes, strict=True):
        assert set(o) == {"generation", "full_text"}
        assert o["full_text"] == p + o["generation"] + s
    out = llama.text_infilling(prefixes, suffixes, max_gen_len=6, logprobs=True, suffix_first=True)
    for o in out:
        assert set(o) == {"generation", "full_text", "tokens", "logprobs"}
        assert llama.tokenizer.eot_id not in o["tokens"]
        assert o["generation"] == llama.tokenizer.decode_infilling(o["tokens"])
    with pytest.raises(GenerationError, match="prefixes"):
        llama.text_infilling(["a"], [])


def test_infilling_uses_codellama_prompt(llama: Llama) -> None:
    """Greedy infilling equals greedy generation from `encode_infill`'s prompt, stopped at EOT."""
    ids = encode_infill("def f(x):\n    ", "\n", llama.tokenizer)
    expected, _ = llama.generate([ids], max_gen_len=6, temperature=0.0)
    middle = expected[0]
    if llama.tokenizer.eot_id in middle:
        middle = middle[: middle.index(llama.tokenizer.eot_id)]
    [o] = llama.text_infilling(["def f(x):\n    "], ["\n"], max_gen_len=6, logprobs=True)
    assert o["tokens"] == middle


def test_stream_completion_matches_text_completion(llama: Llama) -> None:
    [o] = llama.text_completion(["Hello world"], temperature=0.0, max_gen_len=10)
    assert "".join(llama.stream_completion("Hello world", temperature=0.0, max_gen_len=10)) == o["generation"]
    dialog = [{"role": "user", "content": "Hi"}]
    [c] = llama.chat_completion([dialog], temperature=0.0, max_gen_len=10)  # type: ignore[list-item]
    assert "".join(llama.stream_chat(dialog, temperature=0.0, max_gen_len=10)) == c["generation"]["content"]  # type: ignore[arg-type]


def test_from_model_in_memory(llama: Llama) -> None:
    torch.manual_seed(0)
    model = Transformer(CODE_TINY)
    wrapped = Llama.from_model(model, llama.tokenizer, max_seq_len=16)
    [o] = wrapped.text_completion(["Hi"], temperature=0.0, max_gen_len=4)
    assert isinstance(o["generation"], str) and wrapped.model is model


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("int3")


def test_build_allocates_meta_kv_cache(llama: Llama) -> None:
    cache = llama.model.cache
    assert cache is not None and (cache.max_batch_size, cache.max_seq_len) == (4, 48)


def test_model_prefill_then_step_equals_full_forward(llama: Llama) -> None:
    """Meta's decoding through `llama.model(tokens, start_pos)` after a completion: the cache is read
    and written, so it equals a cache-free full forward (float32, batch 2)."""
    llama.text_completion(["Hello world"], temperature=0.0, max_gen_len=4)
    toks = torch.randint(3, 32000, (2, 20), generator=torch.Generator().manual_seed(0))
    plain = copy.deepcopy(llama.model)
    plain.clear_caches()
    with torch.no_grad():
        ref = plain(toks)  # (2, 20, V)
    steps = [llama.model(toks[:, :7], 0)] + [llama.model(toks[:, t : t + 1], t) for t in range(7, 20)]
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < 1e-4


def test_training_after_text_and_chat_completion(ckpt: Path) -> None:
    """Generation never poisons training: after completions, a train-mode backward gives the
    gradients of the same weights loaded afresh."""
    used = Llama.build(ckpt, max_seq_len=32, max_batch_size=2, progress=False)
    used.text_completion(["Hello world"], max_gen_len=3, seed=1)
    used.chat_completion([[{"role": "user", "content": "Hi"}]], temperature=0.0, max_gen_len=3)
    logits = used.model(torch.tensor([[1, 15043, 3186]]), 0)  # eval mode, no context manager
    logits[:, :, 0] = 0.0  # ordinary tensors (Meta's code edits logits in place)
    fresh = Llama.build(ckpt, max_seq_len=32, max_batch_size=2, progress=False)
    toks = torch.randint(3, 32000, (3, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (used.model, fresh.model):
        model.train()
        out = model(toks[:, :-1])  # (3, 11, V)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), toks[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert g is not None
        torch.testing.assert_close(g, grads[1][name], msg=name)
    used.model.eval()
    assert used.text_completion(["Hello world"], temperature=0.0, max_gen_len=3) == fresh.text_completion(
        ["Hello world"], temperature=0.0, max_gen_len=3
    )


def test_build_refuses_a_cache_that_cannot_fit_before_allocating(ckpt: Path) -> None:
    """Meta's `build` allocates `max_batch_size x max_seq_len` up front: one that needs far more than
    the machine has is refused at once, with the size and what to change (never an allocation)."""
    with pytest.raises(OutOfMemoryError, match=r"max_batch_size=1000000 .* smaller max_batch_size"):
        Llama.build(ckpt, max_seq_len=4096, max_batch_size=1_000_000, progress=False)
