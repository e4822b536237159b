"""The GPUs this machine can hand out, found without initialising CUDA (the server forks the
workers): `CUDA_VISIBLE_DEVICES` when set, else the UUIDs `nvidia-smi` lists (docs/deployment.md,
"GPUs")."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Collection

# `nvidia-smi -L`: one line per physical GPU, then (MIG mode on) one indented line per MIG
# device. Drivers from R470 print `MIG-<uuid>`, older ones `MIG-GPU-<parent uuid>/<gi>/<ci>`:
#   GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)
#     MIG 1g.5gb      Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
_GPU_LINE = re.compile(r"^GPU\s+(\d+)\s*:.*?\(UUID:\s*(GPU-[0-9A-Za-z-]+)\s*\)")
_GPU_LINE_NO_UUID = re.compile(r"^GPU\s+(\d+)\s*:")
_MIG_LINE = re.compile(r"^\s+MIG\b.*?\bDevice\s+\d+\s*:.*?\(UUID:\s*(MIG-[0-9A-Za-z/-]+)\s*\)")


def parse_gpu_listing(text: str, mig_enabled: Collection[str] = ()) -> list[str]:
    """The CUDA device ids in an `nvidia-smi -L` listing, in its (PCI bus) order.

    Each GPU is named by its UUID (`GPU-…`), stable whatever order CUDA enumerates devices in.
    A GPU with MIG devices listed under it is replaced by their UUIDs (`MIG-…`): CUDA sees only
    the MIG instances of such a GPU, never the GPU itself. `mig_enabled`: UUIDs of GPUs in MIG
    mode; one of them with no MIG device listed yet offers nothing to CUDA and is left out. A
    GPU line without a UUID (not seen from real drivers) falls back to its index. Lines that
    match neither form are ignored, so garbage yields [].
    """
    devices: list[tuple[str, list[str]]] = []  # (GPU id, its MIG device ids)
    for line in text.splitlines():
        if gpu := _GPU_LINE.match(line):
            devices.append((gpu.group(2), []))
        elif bare := _GPU_LINE_NO_UUID.match(line):
            devices.append((bare.group(1), []))
        elif (mig := _MIG_LINE.match(line)) and devices:
            devices[-1][1].append(mig.group(1))
    ids: list[str] = []
    for gpu_id, migs in devices:
        if migs:
            ids.extend(migs)
        elif gpu_id not in mig_enabled:
            ids.append(gpu_id)
    return ids


def parse_mig_modes(text: str) -> set[str]:
    """UUIDs of the GPUs in MIG mode, from
    `nvidia-smi --query-gpu=uuid,mig.mode.current --format=csv,noheader`
    (lines `GPU-…, Enabled`; GPUs without MIG say `[N/A]`)."""
    enabled: set[str] = set()
    for line in text.splitlines():
        uuid, _, mode = (part.strip() for part in line.partition(","))
        if uuid.startswith("GPU-") and mode.lower() == "enabled":
            enabled.add(uuid)
    return enabled


def _nvidia_smi(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def detect_gpus() -> list[str]:
    """GPU ids this process may hand out, without initialising CUDA.

    `CUDA_VISIBLE_DEVICES` when set, entries as given (CUDA's rules: the list ends at the first
    invalid entry, so "" and "-1" mean none), else the UUIDs of `nvidia-smi -L`
    (`parse_gpu_listing`: MIG instances in place of their GPU), else none.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for entry in (part.strip() for part in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            ids.append(entry)
        return ids
    listing = _nvidia_smi("-L")
    if listing is None:
        return []
    modes = _nvidia_smi("--query-gpu=uuid,mig.mode.current", "--format=csv,noheader")
    return parse_gpu_listing(listing, parse_mig_modes(modes or ""))
