"""scikit-learn 8×8 digits study: LeNet-5 teacher, small MLP students.

Command:   ntkd reproduce --dataset digits --out results/digits
Runtime:   about 10 minutes on 2 CPU cores (`--quick`: about 2 minutes).

The same pre-registered criteria as the MNIST-1D default; the capacity-gap
regression uses MLP students of widths 8, 32 (the main student), 64 and 128.
"""

from ntkd.configs import capacity_regimes, standard_criteria, standard_regimes
from ntkd.study import StudyConfig

CAPACITY_STUDENTS = {
    "MLP-8": {"model": "mlp", "model_options": {"widths": [8]}},
    "MLP-64": {"model": "mlp", "model_options": {"widths": [64]}},
    "MLP-128": {"model": "mlp", "model_options": {"widths": [128]}},
}


def get_config(quick: bool = False) -> StudyConfig:
    epochs = 8 if quick else 40
    teacher = {
        "model": "lenet5",
        "model_options": {"padding": "SAME"},
        "epochs": epochs,
        "learning_rate": 3e-3,
        "batch_size": 64,
        "checkpoint_every": 1,
    }
    student = {
        "model": "mlp",
        "model_options": {"widths": [32]},
        "epochs": epochs,
        "learning_rate": 3e-3,
        "batch_size": 64,
        "checkpoint_every": 2 if quick else 4,
        "checkpoint_epochs": [1, 2, 4, 8, 16, 32],
    }
    return StudyConfig(
        name="digits (quick)" if quick else "digits",
        dataset="digits",
        teacher=teacher,
        student=student,
        regimes=standard_regimes(early_stop_epoch=2 if quick else 5)
        + capacity_regimes(CAPACITY_STUDENTS, seeds=[0, 1] if quick else [0, 1, 2, 3]),
        seeds=[0, 1, 2] if quick else list(range(8)),
        analysis_seeds=[0, 1, 2],
        n_kernel=300 if quick else 1000,
        complexity_regimes=["no-KD", "offline τ=1", "online τ=1"],
        criteria=standard_criteria(),
    )
