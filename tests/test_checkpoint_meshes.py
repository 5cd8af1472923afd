"""A stage checkpoint saved on one mesh restores onto another mesh shape (more data-parallel
ways, or the parameters sharded over fsdp and tensor axes instead), value for value."""

import jax
import numpy as np
import pytest
from flax import nnx

from bridge import checkpoint, mesh as mesh_lib, train_state
from bridge.stages import common as stage_common
from configs import common
from stage_helpers import tiny_model


def _state_on(shape, params):
    """A TrainState of `params` (after one AdamW step so the moments are not zero) placed by its
    logical axes on a mesh of `shape` over the 8 fake devices."""
    mesh = mesh_lib.make_mesh(shape)
    tx = stage_common.optimizer(common.rl_stage("student", 1e-2, 1), 1)
    state = train_state.init_state(params, tx)
    grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
    _, opt_state = tx.update(grads, state.opt_state, params)
    state = train_state.TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=state.skipped)
    return jax.device_put(state, train_state.state_shardings(state, mesh, None)), mesh


@pytest.mark.parametrize("saved,restored", [((1, -1, 1), (2, -1, 1)), ((1, -1, 1), (1, 2, 4)),
                                            ((2, 2, 2), (1, 1, -1))])
def test_a_checkpoint_restores_onto_another_mesh_shape(tmp_path, saved, restored):
    params = nnx.split(tiny_model(layers=2, vocab=32))[1]
    state, _ = _state_on(saved, params)
    ckpts = checkpoint.StageCheckpoints(str(tmp_path), "stage")
    ckpts.save(1, state, {"stage": "stage"})
    target, mesh = _state_on(restored, jax.tree.map(np.zeros_like, params))
    back, meta = checkpoint.StageCheckpoints(str(tmp_path), "stage").restore(1, target, {"stage": "stage"})
    assert meta["stage"] == "stage"
    for want, got, template in zip(jax.tree.leaves(state), jax.tree.leaves(back), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
        assert got.sharding == template.sharding  # laid out as the new mesh says, not as saved
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(back.params))
