"""Every test of ModelOpt's tests/unit/torch/distill/test_distill.py, mapped to its kdlab.distill
counterpart in test_compat.py, or listed as not applicable, with the reason.

Not applicable:

- test_distillation_mode_config_types: reads ModelOpt's internal `ModeloptStateManager` state
  (`manager._state[-1][1]["config"]`). kdlab.distill keeps no mode-state record; the teacher and
  criterion are used as given (a callable teacher is built once, at convert).
- test_multiple_modelopt_states: checks that a teacher carrying its own ModelOpt state is
  hidden from and re-exposed to `ModeloptStateManager.is_converted`. There is no ModelOpt state
  (no `_modelopt_state` attribute) in kdlab; a teacher is never modified by convert/export
  beyond `requires_grad_(False)`, `eval()` and the hooks export removes.
- test_dynamic_module_inheritance: `isinstance(model, mto.dynamic.DynamicModule)`. The
  converted model is a `kdlab.distill.DistillationModel` (a `kdlab.worker.kd.DistillationModel`),
  not a ModelOpt DynamicModule; the other half of that test, `isinstance(model,
  model.original_cls)`, is test_isinstance_original_cls.
- The `ModeloptStateManager.has_state` checks in test_distillation_save_restore and the
  `_modelopt_state` attribute check in test_distillation_export: same reason; the observable
  part (restore returns the plain student, a later convert works; export drops the teacher)
  is tested.
- `mto.save` / `mto.restore` checkpoints themselves: kdlab writes safetensors files
  (`mtd.save` / `mtd.restore`), so a ModelOpt `.pt` checkpoint does not load and vice versa.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.distill import test_compat

NOT_APPLICABLE = "not applicable"

MODELOPT_TESTS = {
    "test_distillation_model_loss_params": "test_distillation_model_loss_params",
    "test_distillation_model_no_balancer": "test_distillation_model_no_balancer",
    "test_distillation_model_multiloss_balancer": "test_distillation_model_multiloss_balancer",
    "test_distillation_model_mft": "test_distillation_model_mft",
    "test_distillation_mode_default_config": "test_distillation_mode_default_config",
    "test_distillation_mode_config_types": NOT_APPLICABLE,
    "test_distillation_save_restore": "test_distillation_save_restore",
    "test_distillation_export": "test_distillation_export",
    "test_logits_distillation": "test_logits_distillation",
    "test_minimal_state_dict_mode": "test_minimal_state_dict_mode",
    "test_full_state_dict_mode": "test_full_state_dict_mode",
    "test_load_student_only_state": "test_load_student_only_state",
    "test_multiple_modelopt_states": NOT_APPLICABLE,
    "test_dynamic_module_inheritance": "test_isinstance_original_cls",  # half applies
    "test_forward_signature_replacement": "test_forward_signature_replacement",
    "test_duplicate_fwd_hook_call": "test_duplicate_fwd_hook_call",
    "test_teacher_fwd_only": "test_teacher_fwd_only",
    "test_student_fwd_only": "test_student_fwd_only",
    "test_train_eval_mode_switch": "test_train_eval_mode_switch",
}


def test_every_modelopt_test_is_mapped():
    for modelopt_test, ours in MODELOPT_TESTS.items():
        if ours == NOT_APPLICABLE:
            assert modelopt_test in (__doc__ or ""), f"{modelopt_test}: say why in the docstring"
        else:
            assert callable(getattr(test_compat, ours, None)), f"{modelopt_test} → {ours} missing"


def test_no_modelopt_state_api():
    import kdlab.distill as mtd

    assert not hasattr(mtd, "ModeloptStateManager")


PACKAGE = Path(__file__).resolve().parents[2] / "kdlab" / "distill"


def test_distill_imports_only_the_engine_and_torch():
    """Import contract: kdlab.distill may import only kdlab.worker.kd (and itself) and torch."""
    allowed = ("torch", "kdlab.worker.kd", "kdlab.worker import kd", "kdlab.distill")
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "kdlab.worker":
                    names = [f"kdlab.worker import {a.name}" for a in node.names]
                else:
                    names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "kdlab" and top in sys.stdlib_module_names | {"__future__"}:
                    continue
                assert name.startswith(allowed), f"{path.name} imports {name}"


def test_engine_does_not_import_distill():
    code = "import sys, kdlab.worker.kd; print('kdlab.distill' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
