"""scikit-learn 8×8 digits study: LeNet-5 teacher, small MLP student.

Command:   ntkd reproduce --dataset digits --out results/digits
Runtime:   about 8 minutes on 2 CPU cores.
"""

from ntkd.configs import standard_regimes
from ntkd.study import StudyConfig


def get_config(quick: bool = False) -> StudyConfig:
    teacher = {"model": "lenet5", "model_options": {"padding": "SAME"}, "epochs": 40, "learning_rate": 3e-3,
               "batch_size": 64, "checkpoint_every": 1}
    student = {"model": "mlp", "model_options": {"widths": [32]}, "epochs": 40, "learning_rate": 3e-3,
               "batch_size": 64, "checkpoint_every": 4}
    cfg = StudyConfig(name="digits", dataset="digits", teacher=teacher, student=student,
                      regimes=standard_regimes(early_stop_epoch=5), n_kernel=1000,
                      complexity_regimes=["no-KD", "offline τ=1", "online τ=1"])
    if quick:
        cfg.teacher.update(epochs=8)
        cfg.student.update(epochs=8, checkpoint_every=2)
        cfg.regimes = standard_regimes(early_stop_epoch=2)
        cfg.n_kernel = 300
    return cfg
