"""Model families: output shapes, parameter counts against hand counts, BatchNorm state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkd.models import count_params, get_model, init_variables


@pytest.mark.parametrize(
    "name,options,shape",
    [
        ("mlp", {"widths": (16, 8)}, (40, 1)),
        ("cnn1d", {"features": (4, 4, 4)}, (40, 1)),
        ("lenet5", {}, (32, 32, 3)),
        ("lenet5", {"padding": "SAME"}, (8, 8, 1)),
        ("resnet", {"depth": 8, "width": 4}, (16, 16, 3)),
    ],
)
def test_logit_shapes(name, options, shape):
    model = get_model(name, 7, **options)
    v = init_variables(model, jax.random.key(0), shape)
    out = model.apply(v, jnp.ones((3, *shape)))
    assert out.shape == (3, 7) and np.all(np.isfinite(out))


def test_param_counts_match_hand_counts():
    mlp = init_variables(get_model("mlp", 10, widths=(16, 8)), jax.random.key(0), (40, 1))
    assert count_params(mlp) == (40 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)
    lenet = init_variables(get_model("lenet5", 10), jax.random.key(0), (32, 32, 3))
    # classic LeNet-5 on 32x32x3: conv 5x5x3x6, conv 5x5x6x16, dense 400-120-84-10
    assert count_params(lenet) == (75 * 6 + 6) + (150 * 16 + 16) + (400 * 120 + 120) + (
        120 * 84 + 84
    ) + (84 * 10 + 10)
    lenet8 = init_variables(get_model("lenet5", 10, width=8), jax.random.key(0), (32, 32, 3))
    assert count_params(lenet8) > 40 * count_params(lenet)


def test_resnet_batchnorm_train_vs_eval():
    model = get_model("resnet", 5, depth=8, width=4)
    v = init_variables(model, jax.random.key(0), (8, 8, 3))
    assert "batch_stats" in v
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    out, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], updates["batch_stats"]
    )
    assert any(jax.tree_util.tree_leaves(changed))
    # eval mode uses running statistics: output independent of the other batch members
    single = model.apply(v, x[:1])
    np.testing.assert_allclose(model.apply(v, x)[:1], single, rtol=1e-5, atol=1e-6)


def test_resnet_depth_names_and_errors():
    assert get_model("resnet56", 10).depth == 56 and get_model("resnet110", 10).depth == 110
    with pytest.raises(ValueError, match="6n\\+2"):
        init_variables(get_model("resnet", 10, depth=21), jax.random.key(0), (8, 8, 3))
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        get_model("vgg", 10)
    with pytest.raises(ValueError, match="bad options"):
        get_model("mlp", 10, depth=3)
