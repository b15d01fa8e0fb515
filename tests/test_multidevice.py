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
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    out = tmp_path / f"run{devices}"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(devices)], check=True, env=env)
    with np.load(str(out) + ".npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]


def test_four_devices_match_one(tmp_path):
    one, four = _run(tmp_path, 1), _run(tmp_path, 4)
    assert len(one) == len(four)
    for a, b in zip(one, four):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


NTK_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if rank >= 0:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
        assert jax.process_count() == 2
    from ntkd.ntk import empirical_ntk_fn
    class M(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.BatchNorm(use_running_average=not train)(nn.relu(nn.Conv(3, (3,))(x)))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))
    x = jax.random.normal(jax.random.PRNGKey(1), (11, 6, 1))
    m = M(); v = m.init(jax.random.PRNGKey(0), x)
    result = {}
    for mode in ("full", "trace"):
        for impl in ("structured", "jacobian", "ntvp"):
            fn = empirical_ntk_fn(m, mode=mode, implementation=impl, block_size=3)
            result[mode + impl] = np.asarray(fn(x, None, v))
            result[mode + impl + "x2"] = np.asarray(fn(x, x[:5], v))
        parts = empirical_ntk_fn(m, mode=mode, block_size=3, by_layer=True)(x, None, v)
        result.update({mode + "layer" + g: np.asarray(k) for g, k in parts.items()})
    if rank <= 0:
        np.savez(out, **result)
""")


def test_two_processes_match_one_process(tmp_path):
    """jax.distributed with 2 local CPU processes: block rows dealt out, the same kernel as 1 process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    procs = [
        subprocess.Popen([sys.executable, "-c", NTK_SCRIPT, str(r), port, str(two)], env=env)
        for r in (0, 1)
    ]
    subprocess.run(
        [sys.executable, "-c", NTK_SCRIPT, "-1", port, str(one)], check=True, env=env, timeout=600
    )
    for p in procs:
        assert p.wait(timeout=600) == 0
    with np.load(one) as a, np.load(two) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7, err_msg=key)
