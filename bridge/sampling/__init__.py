"""Rollout sampling: prefill + `lax.while_loop` decode over a KV cache, logit processors.

    out = sampling.generate(model, prompts, max_new_tokens=64, temperature=0.0, eos_ids=(2,), n=4)
    out.tokens int32[B*n, N], out.logprobs float32[B*n, N], out.mask bool[B*n, N]

`make_sampler(graphdef, SamplingConfig(...))` gives the compiled functional form for trainers;
`sample(...)` is the pure function for use inside other jitted code.
"""

from bridge.sampling import processors
from bridge.sampling.sampler import (FINISH_EOS, FINISH_LENGTH, SampleOutput, Sampler, SamplingConfig, bucket,
                                     decode, generate, left_pad, make_sampler, prefill, sample)

__all__ = ["FINISH_EOS", "FINISH_LENGTH", "SampleOutput", "Sampler", "SamplingConfig", "bucket", "decode",
           "generate", "left_pad", "make_sampler", "prefill", "processors", "sample"]
