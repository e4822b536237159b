"""KD Lab's knowledge-distillation engine (modelled on `modelopt.torch.distill`).

dm = kd.convert(student, teacher=teacher, criterion=kd.losses.LogitsKL(temperature=4.0))
loss = dm.compute_kd_loss()
student = kd.export(dm)
"""

from kdlab.worker.kd import losses
from kdlab.worker.kd.adapters import NormalizationAdapter
from kdlab.worker.kd.conversion import build_teacher, convert, export
from kdlab.worker.kd.distillation_model import DistillationModel, pair_key
from kdlab.worker.kd.loss_balancers import (
    BALANCERS,
    DynamicBalancer,
    LossBalancer,
    StaticBalancer,
    build_balancer,
)
from kdlab.worker.kd.serialization import (
    fingerprint,
    load_metadata,
    load_state_dict,
    restore,
    save,
    student_state_dict,
)

__all__ = [
    "BALANCERS",
    "DistillationModel",
    "DynamicBalancer",
    "LossBalancer",
    "NormalizationAdapter",
    "StaticBalancer",
    "build_balancer",
    "build_teacher",
    "convert",
    "export",
    "fingerprint",
    "load_metadata",
    "load_state_dict",
    "losses",
    "pair_key",
    "restore",
    "save",
    "student_state_dict",
]
