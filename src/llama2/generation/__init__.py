"""Token generation: sampling functions and the batched, streaming generator."""

from llama2.generation.decode import DecodeStep, decode_one_token
from llama2.generation.generator import FinishReason, GenerationResult, Generator, TokenEvent
from llama2.generation.sampling import (
    Sampler,
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    make_sampler,
    min_p_mask,
    sample_top_p,
    top_k_mask,
    top_p_probs,
)

__all__ = [
    "DecodeStep",
    "FinishReason",
    "GenerationResult",
    "Generator",
    "Sampler",
    "SamplingParams",
    "TokenEvent",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "decode_one_token",
    "make_sampler",
    "min_p_mask",
    "sample_top_p",
    "top_k_mask",
    "top_p_probs",
]
