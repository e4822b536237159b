"""ModelOpt-compatible knowledge distillation: a drop-in for ``modelopt.torch.distill``.

    import kdlab.distill as mtd

    model = mtd.convert(student, mode=[("kd_loss", {
        "teacher_model": teacher,
        "criterion": mtd.LogitsDistillationLoss(temperature=2.0),
        "loss_balancer": mtd.StaticLossBalancer(0.5),
    })])
    out = model(x)
    loss = model.compute_kd_loss(student_loss=task_loss(out))
    mtd.save(model, "student.safetensors")   # ModelOpt: mto.save
    student = mtd.export(model)

Everything runs on KD Lab's engine (`kdlab.worker.kd`); docs/modelopt-compat.md lists where the
two differ from ModelOpt.
"""

from kdlab.distill.conversion import KDConfigError, convert, export, restore, save
from kdlab.distill.distillation_model import DistillationModel
from kdlab.distill.loss_balancers import (
    STUDENT_LOSS_KEY,
    DistillationLossBalancer,
    StaticLossBalancer,
)
from kdlab.distill.losses import LogitsDistillationLoss, MFTLoss, MGDLoss

__all__ = [
    "STUDENT_LOSS_KEY",
    "DistillationLossBalancer",
    "DistillationModel",
    "KDConfigError",
    "LogitsDistillationLoss",
    "MFTLoss",
    "MGDLoss",
    "StaticLossBalancer",
    "convert",
    "export",
    "restore",
    "save",
]
