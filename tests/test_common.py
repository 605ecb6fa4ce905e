import os
import platform

import pytest
import torch

from nanochat import common


def test_base_dir_comes_from_the_environment_and_is_created(tmp_path, monkeypatch):
    target = tmp_path / "artifacts"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(target))
    assert common.get_base_dir() == target
    assert target.is_dir()


def test_mirror_path_only_returns_existing_paths(tmp_path, monkeypatch):
    (tmp_path / "fineweb").mkdir()
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    assert common.mirror_path("fineweb") == tmp_path / "fineweb"
    assert common.mirror_path("absent") is None
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    assert common.mirror_path("fineweb") is None


def test_dtype_override_and_cpu_default(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert common.get_compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert common.get_compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        common.get_compute_dtype("cpu")


def test_single_process_needs_no_torchrun(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    info = common.compute_init("cpu")
    assert (info.ddp, info.rank, info.world_size, info.device.type) == (False, 0, 1, "cpu")
    assert info.master
    common.compute_cleanup()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_freed_memory_is_kept_unless_the_user_tuned_malloc(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert common.keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert common.keep_freed_memory() is False


def test_unknown_device_type_is_rejected():
    with pytest.raises(ValueError, match="cuda, mps, cpu"):
        common.compute_init("tpu")


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    common.atomic_write_text(path, "first")
    common.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["file.txt"]


def test_failed_atomic_write_keeps_the_previous_version(tmp_path):
    path = tmp_path / "model.pt"
    common.atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        common.atomic_torch_save({"bad": Unpicklable()}, path)
    assert torch.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["model.pt"]
