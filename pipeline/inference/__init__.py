"""Inference: the sampler, a paged KV cache, the continuous-batching engine with speculative
decoding, an OpenAI-compatible server and the serving benchmark (docs/inference.md)."""

from pipeline.inference.engine import Engine
from pipeline.inference.sampling import SamplingParams
from pipeline.inference.sequence import Completion

__all__ = ["Completion", "Engine", "SamplingParams"]
