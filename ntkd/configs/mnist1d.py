"""MNIST-1D study: CNN teacher, MLP student (the default of `ntkd reproduce`).

Command:   ntkd reproduce --dataset mnist1d --out results/mnist1d
Runtime:   about 10 minutes on 2 CPU cores (`--quick`: about 2 minutes).

The 1-D CNN teacher reaches ~92% test accuracy; the MLP student alone ~69%,
a real capacity gap. Teacher and students train 60 epochs, so online KD
follows the teacher's checkpoints epoch by epoch.
"""

from ntkd.configs import standard_regimes
from ntkd.study import StudyConfig


def get_config(quick: bool = False) -> StudyConfig:
    teacher = {"model": "cnn1d", "epochs": 60, "learning_rate": 1e-2, "batch_size": 128, "checkpoint_every": 1}
    student = {"model": "mlp", "model_options": {"widths": [256, 256]}, "epochs": 60, "learning_rate": 1e-2,
               "batch_size": 128, "checkpoint_every": 5}
    cfg = StudyConfig(name="MNIST-1D", dataset="mnist1d", teacher=teacher, student=student,
                      regimes=standard_regimes(early_stop_epoch=10), seeds=[0, 1, 2], n_kernel=1000,
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
