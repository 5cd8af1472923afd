"""Sharded forward passes equal the single-device one; rules degrade gracefully."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_fixtures
from bridge import mesh as mesh_lib, models, sharding


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_logits_on_8_devices_equal_one_device(tmp_path, shape):
    hf_fixtures.tiny_hf_model(tmp_path, "qwen3", num_key_value_heads=2)
    ids = np.random.default_rng(1).integers(0, 301, (8, 11))
    single = np.asarray(models.load_hf(str(tmp_path))(ids))
    mesh = mesh_lib.make_mesh(shape)
    model = models.load_hf(str(tmp_path), mesh=mesh, rules=sharding.DEFAULT_RULES)
    assert model.layers[0].mlp.up_proj.kernel[...].sharding.spec != P()
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


def test_remat_gives_the_same_loss_and_gradients():
    import jax.numpy as jnp
    from flax import nnx

    cfg = models.ModelConfig(family="qwen3", vocab_size=31, hidden_size=16, intermediate_size=32, num_layers=2,
                             num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
    ids = jnp.arange(12).reshape(2, 6) % 31
    results = []
    for remat in (False, True):
        graphdef, state = nnx.split(models.Decoder(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))
        results.append(jax.jit(jax.value_and_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids) ** 2)))(state))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
