"""Does a config fit its accelerators? Compiles every jitted program of every stage of the
pipeline (update step, rollout prefill and decode, scoring passes: whatever the stage kind
declares, `bridge.stages.StageKind`) and of the evaluation each exported stage runs (stage
"eval": the sampler's prefill and decode of eval.batch_size * eval.n rows with a cache of
prompt + eval.max_new_tokens tokens, and the scoring passes; `bridge.abstract.evaluation_programs`)
against abstract shapes on the config's mesh and prints per-device memory; nothing is allocated.

    python -m launch.fit --config=configs/sparse_to_dense/llama31_8b_math.py --devices=64 --hbm_gib=80

On a CPU-only machine --devices fakes that many host devices, so a laptop checks a pod's
shapes, shardings and memory in seconds a stage. Exits 1 when a stage needs more than
--hbm_gib per device (when given). See `bridge.abstract` for what the numbers mean.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:variant].",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake this many CPU devices (0: the machine's devices).")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Accelerator memory per device, GiB (0: no verdict).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per row (left-padded bucket).")


def _programs(c, trained, mesh, rules, models):
    """Every stage's programs, then the evaluation's, each as soon as it is compiled."""
    from bridge import abstract

    for name in trained:
        yield from abstract.stage_programs(c, name, mesh, rules, models, prompt_len=_PROMPT_LEN.value)
    yield from abstract.evaluation_programs(c, mesh, rules, models, prompt_len=_PROMPT_LEN.value)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _DEVICES.value:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_DEVICES.value}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from bridge import abstract, runtime, sharding
    from bridge.mesh import make_mesh

    c = _CONFIG.value
    with cli.user_errors():
        mesh = make_mesh(tuple(c.mesh.shape))
        rules = sharding.as_rules(c.mesh.rules)
        models = abstract.abstract_models(c)
        trained = list(dict.fromkeys(unit.stage for unit, _, _ in runtime.pipeline_units(c)))
        print(f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}; "
              f"GiB per device")
        print("| stage | program | rows | tokens/row | arguments | temporaries | total | fits |")
        print("|---|---|---:|---:|---:|---:|---:|:---:|")
        over = []
        for m in _programs(c, trained, mesh, rules, models):
            fits = "-" if not _HBM.value else ("yes" if m.total_gib <= _HBM.value else "no")
            if fits == "no":
                over.append(f"{m.stage} {m.program}")
            print(f"| {m.stage} | {m.program} | {m.rows} | {m.tokens_per_row} | {m.arguments_gib:.2f} | "
                  f"{m.temp_gib:.2f} | {m.total_gib:.2f} | {fits} |", flush=True)
    if over:
        print(f"over {_HBM.value:g} GiB per device: {', '.join(over)} (raise microbatches or lower "
              "sample_batch_size or eval.batch_size, shard wider, or turn on remat)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
