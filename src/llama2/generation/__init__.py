"""Token generation: sampling functions, the batched streaming generator and the slot-based step
engine the server drives."""

from llama2.generation.decode import DecodeStep, decode_one_token
from llama2.generation.engine import EngineConfig, SequenceSpec, StepEngine
from llama2.generation.generator import Generator
from llama2.generation.logprobs import token_logprobs
from llama2.generation.sampling import (
    Sampler,
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    choice_seed,
    make_sampler,
    min_p_mask,
    process_logits,
    sample_tokens,
    sample_top_p,
    seeded_generator,
    top_k_mask,
    top_p_probs,
)
from llama2.generation.sequence import FinishReason, GenerationResult, SequenceState, TokenEvent

__all__ = [
    "DecodeStep",
    "EngineConfig",
    "FinishReason",
    "GenerationResult",
    "Generator",
    "Sampler",
    "SamplingParams",
    "SequenceSpec",
    "SequenceState",
    "StepEngine",
    "TokenEvent",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "choice_seed",
    "decode_one_token",
    "make_sampler",
    "min_p_mask",
    "process_logits",
    "sample_tokens",
    "sample_top_p",
    "seeded_generator",
    "token_logprobs",
    "top_k_mask",
    "top_p_probs",
]
