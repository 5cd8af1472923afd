"""Exports a stage checkpoint of a run as a Hugging Face folder (safetensors + config.json).

    python -m launch.convert --workdir=runs/toy --stage=opd --step=100 --out=/tmp/opd_step100

Finished stages are already exported under <workdir>/models/<stage>; this reaches the
intermediate checkpoints (default: the latest).
"""

import json
import os
import sys

from absl import app, flags, logging

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).")
_STAGE = flags.DEFINE_string("stage", None, "Stage (or unit of a block, <stage>@<iteration>) whose checkpoint "
                             "to export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import ml_collections
    from flax import nnx

    from bridge import checkpoint, models, runtime, train_state
    from bridge.stages import common

    if not (_WORKDIR.value and _STAGE.value and _OUT.value):
        cli.fail("--workdir, --stage and --out are required.")
    with cli.user_errors():
        path = os.path.join(_WORKDIR.value, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{_WORKDIR.value} has no config.json; is it a run directory?")
        with open(path) as f:
            cfg = ml_collections.ConfigDict(json.load(f))
        stage = _STAGE.value.split("@")[0]
        if stage not in cfg.stages:
            raise ValueError(f"Unknown stage {stage!r}; the run has {', '.join(cfg.stages)}.")
        scfg = cfg.stages[stage]
        ctx = runtime.make_context(cfg, _WORKDIR.value)
        graphdef, params = nnx.split(ctx.model(scfg.model))  # the trained slot's architecture
        tx = common.optimizer(scfg, 1)
        ckpts = checkpoint.StageCheckpoints(_WORKDIR.value, _STAGE.value)
        step = _STEP.value if _STEP.value is not None else ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoints for stage {_STAGE.value!r} in {ckpts.directory}.")
        state, _ = ckpts.restore(step, jax.eval_shape(lambda: train_state.init_state(params, tx)), {})
        models.save_hf(nnx.merge(graphdef, state.params), _OUT.value, tokenizer=ctx.tokenizer)
    print(f"wrote {_OUT.value} ({_STAGE.value} step {step})")


if __name__ == "__main__":
    sys.exit(app.run(main))
