"""Data parallelism: 4 fake CPU devices give the same training result as 1."""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from ntkd.training import TrainConfig, train
    assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
    cfg = TrainConfig(dataset="mnist1d", dataset_options={"num_samples": 600}, model="mlp",
                      model_options={"widths": [32]}, epochs=2, batch_size=64, learning_rate=1e-3)
    out = train(cfg, sys.argv[1], progress=False)
    leaves = jax.tree_util.tree_leaves(out["variables"])
    np.savez(sys.argv[1] + ".npz", *leaves)
""")


def _run(tmp_path, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = tmp_path / f"run{devices}"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(devices)], check=True, env=env)
    with np.load(str(out) + ".npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]


def test_four_devices_match_one(tmp_path):
    one, four = _run(tmp_path, 1), _run(tmp_path, 4)
    assert len(one) == len(four)
    for a, b in zip(one, four):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
