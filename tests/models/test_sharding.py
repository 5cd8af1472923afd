"""Sharded forward passes equal the single-device one; rules degrade gracefully."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_fixtures
from bridge import mesh as mesh_lib, models, sharding


@pytest.mark.parametrize("shape,scan_layers", [((1, 4, 2), False), ((2, 2, 2), False), ((1, 1, 8), False),
                                               ((1, 4, 2), True)])
def test_logits_on_8_devices_equal_one_device(tmp_path, shape, scan_layers):
    hf_fixtures.tiny_hf_model(tmp_path, "qwen3", num_key_value_heads=2)
    ids = np.random.default_rng(1).integers(0, 301, (8, 11))
    single = np.asarray(models.load_hf(str(tmp_path))(ids))
    mesh = mesh_lib.make_mesh(shape)
    model = models.load_hf(str(tmp_path), mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=scan_layers)
    kernel = (model.layers.mlp.up_proj.kernel if scan_layers else model.layers[0].mlp.up_proj.kernel)[...]
    assert kernel.sharding.spec == (P(None, "fsdp", "tensor") if scan_layers else P("fsdp", "tensor"))
    with jax.set_mesh(mesh):
        batch = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
        sharded = jax.jit(lambda m, x: m(x))(model, batch)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5, rtol=0)


def test_logical_to_spec_skips_axes_that_do_not_divide():
    mesh = mesh_lib.make_mesh((1, 4, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), shape=(8, 6), mesh=mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "vocab"), shape=(8, 301), mesh=mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("batch", None), shape=(8, 3), mesh=mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",))


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="more than one -1"):
        mesh_lib.resolve_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 12 devices"):
        mesh_lib.resolve_shape((3, 4, 1), 8)
    assert mesh_lib.resolve_shape((2, -1, 2), 8) == (2, 2, 2)


def by_hf_name(state, cfg) -> dict:
    """Per-layer arrays of a parameter-shaped state, keyed by transformers tensor name."""
    out = {}
    for path, v in nnx.to_flat_state(state):
        names, _, stacked = models.hf_io.hf_tensors(path, cfg)
        out.update({name: v[...][i] if stacked else v[...] for i, name in enumerate(names)})
    return out


def test_remat_and_scan_layers_give_the_same_loss_and_gradients(tmp_path):
    """Unrolled, rematerialized, scanned and scanned+remat blocks: one function, four programs."""
    cfg = models.ModelConfig(family="qwen3", vocab_size=31, hidden_size=16, intermediate_size=32, num_layers=3,
                             num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
    models.save_hf(models.Decoder(cfg, rngs=nnx.Rngs(0)), str(tmp_path))
    ids = jnp.arange(12).reshape(2, 6) % 31
    results = []
    for remat, scan in ((False, False), (True, False), (False, True), (True, True)):
        graphdef, state = nnx.split(models.load_hf(str(tmp_path), remat=remat, scan_layers=scan))
        loss, grads = jax.jit(jax.value_and_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids) ** 2)))(state)
        results.append((loss, by_hf_name(grads, cfg.replace(scan_layers=scan))))
    for loss, grads in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        assert set(grads) == set(results[0][1])
        for name, g in grads.items():
            np.testing.assert_allclose(g, results[0][1][name], rtol=1e-5, atol=1e-6, err_msg=name)
