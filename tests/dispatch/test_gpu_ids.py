"""GPU ids without a GPU: `nvidia-smi -L` parsing, detection through a fake `nvidia-smi`, the
worker's CUDA environment, and GPU UUIDs / MIG ids inside executor ids."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from kdlab.backend.executors.base import Launch
from kdlab.backend.executors.gpus import detect_gpus, parse_gpu_listing, parse_mig_modes
from kdlab.backend.executors.local import ExecutorId, LocalExecutor

GPU0 = "GPU-5e1f2a3b-6c7d-8e9f-0a1b-2c3d4e5f6a7b"
GPU1 = "GPU-9d2c1b0a-8f7e-6d5c-4b3a-29180f7e6d5c"
GPU2 = "GPU-0badf00d-1234-5678-9abc-def012345678"
MIG_A = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"
MIG_B = "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"
MIG_OLD_A = f"MIG-{GPU0}/1/0"
MIG_OLD_B = f"MIG-{GPU0}/2/0"

PLAIN = f"""\
GPU 0: NVIDIA GeForce RTX 3090 (UUID: {GPU0})
GPU 1: NVIDIA GeForce RTX 4090 (UUID: {GPU1})
"""

# GPU 0 split into two MIG devices, GPU 1 whole, GPU 2 in MIG mode with no instance yet
MIXED = f"""\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: {GPU0})
  MIG 3g.20gb     Device  0: (UUID: {MIG_A})
  MIG 1g.5gb      Device  1: (UUID: {MIG_B})
GPU 1: NVIDIA A100-SXM4-40GB (UUID: {GPU1})
GPU 2: NVIDIA A100-SXM4-40GB (UUID: {GPU2})
"""

OLD_MIG = f"""\
GPU 0: A100-SXM4-40GB (UUID: {GPU0})
  MIG 3g.20gb Device 0: (UUID: {MIG_OLD_A})
  MIG 3g.20gb Device 1: (UUID: {MIG_OLD_B})
"""

MODES = f"{GPU0}, Enabled\n{GPU1}, Disabled\n{GPU2}, Enabled\n"


def test_plain_gpus_are_named_by_uuid_in_listing_order() -> None:
    assert parse_gpu_listing(PLAIN) == [GPU0, GPU1]


def test_mig_devices_replace_their_parent_gpu() -> None:
    assert parse_gpu_listing(MIXED) == [MIG_A, MIG_B, GPU1, GPU2]
    # a GPU in MIG mode without instances offers CUDA nothing
    assert parse_gpu_listing(MIXED, parse_mig_modes(MODES)) == [MIG_A, MIG_B, GPU1]


def test_old_driver_mig_ids() -> None:
    assert parse_gpu_listing(OLD_MIG) == [MIG_OLD_A, MIG_OLD_B]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
        "No devices were found\n",
        "  MIG 1g.5gb Device 0: (UUID: MIG-orphan-without-a-gpu-line)\n",
        "GPU: nonsense\nGPUS 0: x (UUID: GPU-1)\n",
    ],
)
def test_empty_and_garbage_listings_give_no_gpu(text: str) -> None:
    assert parse_gpu_listing(text) == []


def test_gpu_line_without_uuid_falls_back_to_its_index() -> None:
    assert parse_gpu_listing("GPU 0: Tesla K80\nGPU 1: Tesla K80\n") == ["0", "1"]


def test_mig_modes_ignore_na_and_headers() -> None:
    text = f"uuid, mig.mode.current\n{GPU0}, [N/A]\n{GPU1}, Enabled\n\ngarbage\n"
    assert parse_mig_modes(text) == {GPU1}


def fake_nvidia_smi(directory: Path, listing: str, modes: str = "", code: int = 0) -> None:
    (directory / "listing.txt").write_text(listing)
    (directory / "modes.txt").write_text(modes)
    script = directory / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f'here="{directory}"\n'
        'if [ "$1" = "-L" ]; then cat "$here/listing.txt"; else cat "$here/modes.txt"; fi\n'
        f"exit {code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def smi_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return directory


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for nvidia-smi")
def test_detect_gpus_through_nvidia_smi(smi_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(smi_dir, MIXED, MODES)
    assert detect_gpus() == [MIG_A, MIG_B, GPU1]
    fake_nvidia_smi(smi_dir, PLAIN, "")  # the mode query printing nothing changes nothing
    assert detect_gpus() == [GPU0, GPU1]
    fake_nvidia_smi(smi_dir, PLAIN, code=9)  # nvidia-smi failing: no GPU
    assert detect_gpus() == []
    # the server's own CUDA_VISIBLE_DEVICES wins, entries as given
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"1,{MIG_A}")
    assert detect_gpus() == ["1", MIG_A]


def test_detect_gpus_without_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == []


@pytest.mark.parametrize(
    "gpus",
    [(), ("0", "3"), (GPU0, GPU1), (MIG_A,), (MIG_OLD_A, MIG_OLD_B), ("1", MIG_A, GPU2)],
)
def test_executor_id_round_trips_gpu_uuids_and_mig_ids(gpus: tuple[str, ...]) -> None:
    eid = ExecutorId("host-1a2b3c4d", 4242, "98765", gpus, "run-x/3.log")
    assert ExecutorId.parse(str(eid)) == eid


@pytest.mark.parametrize("bad", ["", "-", "a:b", "a,b", " 0"])
def test_gpu_ids_that_cannot_travel_in_an_executor_id_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a usable GPU id"):
        LocalExecutor(tmp_path, gpu_ids=["0", bad], owner="t")


def test_workers_get_pci_bus_order_and_their_uuids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # the server's own does not leak
    gpus = [MIG_OLD_A, GPU1, MIG_A]
    ex = LocalExecutor(tmp_path / "logs", gpu_ids=gpus, owner="t", cpu_count=3)
    dump = [
        sys.executable,
        "-c",
        "import json, os; print(json.dumps([os.environ.get(k) for k in "
        "('CUDA_VISIBLE_DEVICES', 'CUDA_DEVICE_ORDER')]))",
    ]
    try:
        launch_env = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}  # nor does a launch's
        two = ex.submit(Launch("a", 1, dump, launch_env, gpus=2))
        cpu = ex.submit(Launch("b", 1, dump, gpus=0))
        assert ExecutorId.parse(two).gpus == (MIG_OLD_A, GPU1)
        deadline = time.monotonic() + 20
        while ex.poll() is not None and ex.tracked() and time.monotonic() < deadline:
            time.sleep(0.02)  # poll reaps what ended; tracked is what still runs
        assert not ex.tracked()
        assert json.loads(ex.logs(two)[0]) == [f"{MIG_OLD_A},{GPU1}", "PCI_BUS_ID"]
        assert json.loads(ex.logs(cpu)[0]) == ["", "PCI_BUS_ID"]
        # released in discovery order, and adopted back by a restarted server
        assert ex.free_slots() == (1, 3)
        held = ex.submit(
            Launch("c", 1, [sys.executable, "-c", "import time; time.sleep(60)"], gpus=2)
        )
        restarted = LocalExecutor(tmp_path / "logs", gpu_ids=gpus, owner="t")
        assert restarted.adopt(held) and restarted.free_slots() == (1, 1)
        ex.kill_all()
        restarted.poll()
        assert restarted.free_slots() == (1, 3)
    finally:
        ex.kill_all()
