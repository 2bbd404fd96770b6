"""Inference: sampling, a paged KV cache, the continuous-batching engine with speculative
decoding, an OpenAI-compatible server and the serving benchmark (docs/inference.md)."""

from pipeline.inference.engine import Engine
from pipeline.inference.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams"]
