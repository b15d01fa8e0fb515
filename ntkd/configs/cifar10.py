"""CIFAR-10 study of Harutyunyan et al. (2023): ResNet-56 teacher; LeNet-5x8 and
ResNet-20 students. Sized for one GPU; needs the python-pickle archive
``cifar-10-batches-py`` in ``--data-dir`` (or ``$NTKD_DATA``).

Command:   ntkd reproduce --dataset cifar10 --data-dir /data --out results/cifar10
Runtime:   roughly 3-4 hours on one modern GPU (teacher 200 epochs, 6 regimes ×
           3 seeds of ResNet-20); the NTK analyses use n_kernel = 2000 with the
           `sum` (pseudo-NTK) mode. Set ``student.model`` to ``lenet5`` with
           ``model_options={"width": 8}`` for the LeNet-5x8 student.

Same pre-registered criteria as the MNIST-1D default, on 3 seeds (a GPU
budget): paired t-tests with 2 degrees of freedom have little power, so
expect "inconclusive" for small effects; the capacity-gap regression needs
≥ 3 students and is "not tested" here.
"""

from ntkd.configs import standard_criteria, standard_regimes
from ntkd.study import StudyConfig


def get_config(quick: bool = False, num_classes: int = 10) -> StudyConfig:
    sgd = {
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "batch_size": 128,
        "augment": True,
    }
    teacher = {"model": "resnet56", "epochs": 200, "checkpoint_every": 5, **sgd}
    student = {"model": "resnet20", "epochs": 200, "checkpoint_every": 20, **sgd}
    cfg = StudyConfig(
        name=f"CIFAR-{num_classes}",
        dataset=f"cifar{num_classes}",
        teacher=teacher,
        student=student,
        regimes=standard_regimes(early_stop_epoch=50),
        n_kernel=2000,
        ntk_mode="sum",
        complexity_regimes=["no-KD", "offline τ=1", "online τ=1"],
        ridge=1e-6,
        criteria=standard_criteria(),
    )
    if quick:
        cfg.teacher.update(epochs=2, model="resnet20")
        cfg.student.update(epochs=2, model="lenet5", checkpoint_every=1)
        cfg.regimes = standard_regimes(early_stop_epoch=1)
        cfg.seeds = [0]
        cfg.n_kernel = 64
    return cfg
