"""MNIST-1D study: CNN teacher, MLP student (the default of `ntkd reproduce`).

Command:   ntkd reproduce --dataset mnist1d --out results/mnist1d
Runtime:   about 10 minutes on 2 CPU cores (`--quick`: about 2 minutes).

The 1-D CNN teacher reaches ~92% test accuracy; the MLP student alone ~70%,
a real capacity gap. Teacher and students train 60 epochs, so online KD
follows the teacher's checkpoints epoch by epoch. A second, small-gap
student (a narrower 1-D CNN, ~86% alone) is trained without KD and with
offline/online KD at τ = 4 to test whether online KD helps most when the
capacity gap is large.
"""

from ntkd.configs import standard_regimes
from ntkd.study import StudyConfig

SMALL_GAP_STUDENT = {"student": "CNN-16", "model": "cnn1d", "model_options": {"features": [16, 16, 16]}}


def small_gap_regimes() -> list[dict]:
    """No-KD, offline and online KD (τ = 4) for the small-gap CNN student."""
    return [{"name": "no-KD · CNN-16", "regime": "none", **SMALL_GAP_STUDENT},
            {"name": "offline τ=4 · CNN-16", "regime": "offline", "temperature": 4.0, **SMALL_GAP_STUDENT},
            {"name": "online τ=4 · CNN-16", "regime": "online", "temperature": 4.0, **SMALL_GAP_STUDENT}]


def get_config(quick: bool = False) -> StudyConfig:
    teacher = {"model": "cnn1d", "epochs": 60, "learning_rate": 1e-2, "batch_size": 128, "checkpoint_every": 1}
    student = {"model": "mlp", "model_options": {"widths": [256, 256]}, "epochs": 60, "learning_rate": 1e-2,
               "batch_size": 128, "checkpoint_every": 5}
    cfg = StudyConfig(name="MNIST-1D", dataset="mnist1d", teacher=teacher, student=student,
                      regimes=standard_regimes(early_stop_epoch=10) + small_gap_regimes(), seeds=[0, 1, 2],
                      n_kernel=1000,
                      complexity_regimes=["no-KD", "offline τ=1", "online τ=1"],
                      teacher_epochs=[0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60])
    if quick:
        cfg.name = "MNIST-1D (quick)"
        cfg.dataset_options = {"num_samples": 1500}
        cfg.teacher.update(epochs=12)
        cfg.student.update(epochs=12, checkpoint_every=3, model_options={"widths": [128, 128]})
        cfg.regimes = standard_regimes(early_stop_epoch=3)
        cfg.seeds = [0, 1, 2]
        cfg.n_kernel = 300
        cfg.teacher_epochs = None
    return cfg
