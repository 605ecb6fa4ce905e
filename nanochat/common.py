"""Things every stage shares: where artifacts live, which device to use, torch.distributed setup, logging."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# What machine this is, for every benchmark figure

_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx_ne_convert", "amx_tile", "amx_bf16", "asimd", "sve")


def describe_cpu() -> str:
    """The CPU's model name, core count and the instruction-set flags our fast paths care about (Linux's
    /proc/cpuinfo; elsewhere what platform knows), e.g. "AMD EPYC, 2 cores, x86_64: avx2"."""
    model, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and model in ("unknown CPU", platform.processor()):
                model = value.strip()
            elif key in ("flags", "features"):
                flags = set(value.split())
    present = [flag for flag in _ISA_FLAGS if flag in flags]
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}: {' '.join(present) or 'no vector flags listed'}"


# -----------------------------------------------------------------------------
# Where things live


def get_base_dir() -> Path:
    """Root of every artifact (tokenizer, checkpoints, report): $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat"
    base = Path(base).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base


def get_data_dir() -> Path | None:
    """The local data mirror ($NANOCHAT_DATA_DIR), holding datasets in their upstream formats, if configured."""
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    return Path(data_dir).expanduser() if data_dir else None


def mirror_path(*parts: str) -> Path | None:
    """`$NANOCHAT_DATA_DIR/<parts>` if the mirror is configured and holds that path."""
    data_dir = get_data_dir()
    if data_dir is None:
        return None
    path = data_dir.joinpath(*parts)
    return path if path.exists() else None


# -----------------------------------------------------------------------------
# Atomic writes: a reader never sees a half-written file, a crash never destroys the previous version


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power cut
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: Path) -> None:
    _atomic_replace(path, lambda f: torch.save(obj, f))


# -----------------------------------------------------------------------------
# Devices and dtypes


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def get_compute_dtype(device_type: str) -> torch.dtype:
    """bf16 on CUDA GPUs that do it natively (SM80+), fp16 on older ones (T4, V100: training scales the loss,
    nanochat/loss_scaling.py), fp32 elsewhere; NANOCHAT_DTYPE overrides."""
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[override]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return torch.float32


def autocast_context(device_type: str):
    """What every forward pass runs under: autocast to the compute dtype, or nothing when that is fp32. The
    returned context can be entered again and again."""
    dtype = get_compute_dtype(device_type)
    return torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# torch.distributed, from torchrun's environment


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run: torchrun's ranks, and (once compute_init has chosen it) its device."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device | None = None
    device_type: str | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0


def parse_script_args(parser, argv: list[str] | None = None):
    """parser.parse_args for a script that also runs under torchrun, where the script's own flags may follow a
    `--` (`torchrun ... -m scripts.base_train -- --depth=20`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args(argv[1:] if argv and argv[0] == "--" else argv)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the ranks, in place; itself in a plain process."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def get_dist_info() -> DistInfo:
    """This process's ranks (no device yet): the process group's once one is initialized (however it was), else as
    torchrun sets them in the environment; a plain process is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return DistInfo(True, dist.get_rank(), local_rank, dist.get_world_size())
    if all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return DistInfo(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    return DistInfo(False, 0, 0, 1)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    By default a block over 128 KB-32 MB is its own mmap, unmapped on free, and the heap is trimmed past 128 KB free,
    so each activation of a CPU training step is page-faulted in anew (an 8 MB tensor: ~2000 faults). Blocks up to
    32 MB (glibc's ceiling for this setting) now come from the heap, which keeps up to 1 GiB free. bench/train.py,
    2 Zen 5 cores: a step 340-355 -> 304-319 ms. Skipped off glibc, and where the user set MALLOC_* variables
    (theirs win). Returns whether it applied."""
    if sys.platform != "linux" or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def compute_init(device_type: str | None = None, seed: int = 42) -> DistInfo:
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device type {device_type!r} is not one of cuda, mps, cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type=cuda was asked for but no CUDA GPU is visible; use --device-type=cpu")
    torch.manual_seed(seed)
    if device_type == "cuda":
        # Growable segments instead of fixed blocks: little memory lost to fragmentation, which matters at depth 20
        # (~77 GiB peak on an 80 GB card). Read when CUDA first allocates, so it must be set before that; a value
        # the user exported wins.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()

    ranks = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ranks.ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return dataclasses.replace(ranks, device=device, device_type=device_type)


def compute_cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down under a peer's pending collective
        dist.destroy_process_group()
        # gloo's worker threads release a finished collective's tensors a moment after the caller's wait()
        # returns; when that release is the tensor's last reference it needs the GIL, and if the interpreter is
        # already finalizing, the thread is killed mid-destructor and the process aborts ("terminate called
        # without an active exception", exit -6) after all its work was done and saved (seen in ~1 of 10
        # two-rank runs on CPU). Letting go of the GIL briefly lets them finish first.
        time.sleep(0.2)


# -----------------------------------------------------------------------------
# Logging


def print0(*args, **kwargs) -> None:
    if get_dist_info().master:
        print(*args, **kwargs)


class _NoWandb:
    """Stands in for a wandb run when logging is off, so training loops need no branches."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def get_wandb(run: str, project: str, config: dict, master: bool):
    """A real wandb run for `--run NAME` on the master rank; the default run name "dummy" turns wandb off."""
    if run == "dummy" or not master:
        return _NoWandb()
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--run was given but wandb is not installed: pip install -e .[wandb]") from e
    return wandb.init(project=project, name=run, config=config)
