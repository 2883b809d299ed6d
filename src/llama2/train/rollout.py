"""Sampling several responses per chat prompt for RLHF data (rejection sampling, PPO, preference
building), through the one batched step engine (`llama2.generation.engine.StepEngine`).

Decisions:
  - One engine for all prompts: every (dialog, sample) pair becomes a `SequenceSpec` and the engine
    batches them through `max_slots` KV-cache rows (continuous batching). The engine's prefill is
    per-prompt and its decode batches are padded to a fixed minimum, so a row's tokens do not depend
    on what else is in the batch.
  - Seeds: sample j of dialog i draws from its own generator seeded with `sample_seed(seed, i, j)`
    (a SHA-256 of the three numbers), so results never depend on batching, on `max_slots` or on the
    order the engine admits sequences in. Temperature 0 (below `GREEDY_TEMPERATURE`) is greedy.
  - The prompt is `encode_dialog(dialog, max_tokens=context - max_new_tokens)`: oldest turns are
    dropped when a conversation is too long, so there is always room to generate.
  - EOS: `GenerationResult.tokens` exclude the EOS that ended generation, but a reward model and the
    PPO loss need it (the reward is read at the EOS position). We drive `StepEngine.step` ourselves
    (as `StepEngine.run` does) to keep the logprob of that last event, and append EOS and its logprob
    to `Sample.tokens` / `Sample.logprobs` iff `finish_reason == "stop"`.
  - Logprobs are the raw model's (log-softmax of the logits before temperature and top-p): what the
    PPO ratio and the KL penalty need.
  - The engine allocates its cache in the model; it is cleared afterwards (`model.clear_caches()`)
    and the model's train/eval mode restored, so training can resume right away.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llama2.chat import Message, encode_dialog
from llama2.errors import GenerationError
from llama2.generation.engine import EngineConfig, SequenceDone, SequenceFailed, SequenceSpec, StepEngine
from llama2.generation.sampling import SamplingParams
from llama2.generation.sequence import GenerationResult, TokenEvent
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

__all__ = ["Sample", "sample_responses", "sample_seed"]


@dataclass
class Sample:
    """One sampled response.

    Attributes:
        prompt: the prompt token ids (BOS first).
        tokens: response token ids, with the EOS appended when `finish_reason == "stop"`.
        text: the response text (no EOS).
        logprobs: raw-model logprob of each of `tokens` (the EOS's included when present).
        finish_reason: "stop" (EOS) or "length" (ran out of `max_new_tokens`).
    """

    prompt: list[int]
    tokens: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


def sample_seed(seed: int, dialog_index: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of dialog `dialog_index`: 63 bits of a SHA-256, so distinct
    (dialog, sample) pairs get unrelated streams and the seed never depends on batching."""
    digest = hashlib.sha256(f"rollout/{seed}/{dialog_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _check_args(n: int, temperature: float, max_new_tokens: int, max_slots: int, context: int) -> None:
    if n < 1:
        raise GenerationError(f"n (samples per dialog) must be >= 1, got {n}")
    if max_slots < 1:
        raise GenerationError(f"max_slots must be >= 1, got {max_slots}")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens >= context:
        raise GenerationError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in the model's "
            f"context of {context} tokens; expected max_new_tokens < {context}"
        )
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


def _run_engine(
    engine: StepEngine, specs: Sequence[SequenceSpec]
) -> list[tuple[GenerationResult, float | None]]:
    """`StepEngine.run`, keeping each sequence's final event logprob (that of its EOS when it stopped)."""
    owner = object()
    engine.add([engine.new_sequence(owner, i, spec) for i, spec in enumerate(specs)])
    results: dict[int, GenerationResult] = {}
    last_lp: dict[int, float | None] = {}
    with torch.no_grad():
        while len(results) < len(specs) and engine.has_work():
            for who, item in engine.step():
                if who is not owner:
                    continue
                if isinstance(item, TokenEvent) and item.finish_reason is not None:
                    last_lp[item.index] = item.logprob
                elif isinstance(item, SequenceDone):
                    results[item.index] = item.result
                elif isinstance(item, SequenceFailed):
                    engine.drop({id(owner)})
                    raise GenerationError(f"sampling sequence {item.index} failed: {item.message}")
    return [(results[i], last_lp.get(i)) for i in range(len(specs))]


def sample_responses(
    model: Transformer,
    tokenizer: Tokenizer,
    dialogs: Sequence[Sequence[Message]],
    *,
    n: int,
    temperature: float,
    seed: int,
    max_new_tokens: int = 32,
    top_p: float = 1.0,
    max_slots: int = 32,
) -> list[list[Sample]]:
    """Sample `n` responses to every dialog.

    Args:
        model: the policy.
        tokenizer: its tokenizer (chat format, EOS).
        dialogs: each ends with a user turn (optional system prompt and earlier turns before).
        n: samples per dialog.
        temperature: sampling temperature (0: greedy, every sample the same).
        seed: base seed; sample j of dialog i uses `sample_seed(seed, i, j)`.
        max_new_tokens: most tokens per response (EOS included).
        top_p: nucleus mass.
        max_slots: sequences decoded together (KV-cache rows).

    Returns:
        `out[i][j]`: sample j of dialog i.

    Raises:
        GenerationError: invalid arguments, or a sequence failed.
        DialogError: a dialog has the wrong role order or does not end with a user turn.
    """
    context = model.args.max_seq_len
    _check_args(n, temperature, max_new_tokens, max_slots, context)
    if not dialogs:
        return []
    eos = tokenizer.eos_id
    specs: list[SequenceSpec] = []
    for i, dialog in enumerate(dialogs):
        prompt = encode_dialog(dialog, tokenizer, max_tokens=context - max_new_tokens)
        for j in range(n):
            params = SamplingParams(temperature=temperature, top_p=top_p, seed=sample_seed(seed, i, j))
            specs.append(SequenceSpec(prompt=prompt, max_tokens=max_new_tokens, params=params, logprobs=0))
    was_training = model.training
    model.eval()
    try:
        engine = StepEngine(model, tokenizer, EngineConfig(max_slots=max_slots, max_seq_len=context))
        done = _run_engine(engine, specs)
    finally:
        model.clear_caches()
        model.train(was_training)
    out: list[list[Sample]] = []
    for i in range(len(dialogs)):
        row: list[Sample] = []
        for result, final_lp in done[i * n : (i + 1) * n]:
            tokens = list(result.tokens)
            logprobs = list(result.logprobs or [])
            if result.finish_reason == "stop":
                if final_lp is None:  # every stop here is EOS, whose event carries its logprob
                    raise GenerationError("the engine reported no logprob for the EOS that ended a sample")
                tokens.append(eos)
                logprobs.append(final_lp)
            row.append(Sample(result.prompt_tokens, tokens, result.text, logprobs, result.finish_reason))
        out.append(row)
    return out
