"""What a probe is asked to do and where it runs: the settings and their checks, layer and size
specs, the compute device and dtype, the activation budget, and the torchrun process group.

Owns: `ProbeSettings`, `parse_layers`, `parse_size`, `resolve_device_dtype`,
`default_activation_budget`, `distributed_rank_world`, `init_distributed`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import DowserError
from ..score import validate_ratio
from .prompts import Sampling

METHODS = ("dowser", "magnitude", "wanda", "random")
ESTIMATORS = ("reference", "hutchinson")
INCLUDES = ("lm_head", "projector", "vision", "router")


@dataclass
class ProbeSettings:
    """Every choice of one probe run, as `dowser probe` takes them (docs/CLI.md); `validate` refuses
    a bad one with a DowserError naming its option."""

    update_ratio: float = 0.1
    layers: str | None = None  # e.g. "0-11", "last:20", "3,5"; None = all decoder layers
    include: tuple[str, ...] = ()
    probes: int = 64
    probe_len: int = 64
    batch_size: int = 4
    draws: int = 8
    images: bool = False
    estimator: str = "reference"
    method: str = "dowser"
    probe_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    save_stats: bool = True
    resident: str = "auto"  # keep layers in memory between uses: auto (if they fit), always, never
    cache_dir: str | None = None  # parent of the temporary layer cache for Hub checkpoints (default: cwd)
    activation_budget: int | None = None  # bytes of stored layer inputs per pass; None: 1/4 of free RAM
    sampling: Sampling = field(default_factory=Sampling)

    def fingerprint(self) -> dict:
        """The settings that decide the result (a resumed run must match them exactly)."""
        d = asdict(self)
        for k in ("device", "resident", "activation_budget", "cache_dir"):
            d.pop(k)
        return d

    def validate(self) -> None:
        validate_ratio(self.update_ratio)
        if self.method not in METHODS:
            raise DowserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.estimator not in ESTIMATORS:
            raise DowserError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        bad = [x for x in self.include if x not in INCLUDES]
        if bad:
            raise DowserError(f"--include takes {', '.join(INCLUDES)}; got {', '.join(bad)}")
        for name in ("probes", "probe_len", "batch_size", "draws"):
            if getattr(self, name) < 1:
                raise DowserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.probe_len < 2 and not self.probe_file:
            raise DowserError("--probe-len must be at least 2")
        if ({"vision", "projector"} & set(self.include)) and not self.images and self.method == "dowser":
            raise DowserError("--include vision/projector needs image probes: add --images")


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'all', 'last:20', '0-11', '3,5,7' -> sorted layer indices."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    try:
        if spec.startswith("last:"):
            k = int(spec[5:])
            if not 0 < k <= n_layers:
                raise ValueError
            return list(range(n_layers - k, n_layers))
        out = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
            out.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise DowserError(f"--layers {spec!r}: expected all, last:N, A-B or a comma list within 0-{n_layers - 1}") from None
    if not out or min(out) < 0 or max(out) >= n_layers:
        raise DowserError(f"--layers {spec!r}: the model has layers 0-{n_layers - 1}")
    return sorted(out)


def auto_gpu_dtype(config: dict, bf16_supported: bool) -> torch.dtype:
    """What `--dtype auto` computes in on a GPU: bfloat16, which has float32's exponent range, so
    activations that fit float32 never overflow it (float16 tops out at 65504: Gemma and others
    overflow in float16, transformers#36822), even for a checkpoint stored in float16; float32 on a
    GPU without bfloat16 (before Ampere). The checkpoint's own dtype does not decide it: a float16
    checkpoint computed in float16 is what overflows. `config` is kept for the record's sake."""
    return torch.bfloat16 if bf16_supported else torch.float32


def resolve_device_dtype(device: str, dtype: str, config: dict) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype as torch objects; `auto` picks CUDA if present, computing there in
    bfloat16 (`auto_gpu_dtype`), and float32 on the CPU. DowserError for a device that is absent or a name not known."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DowserError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DowserError(f"--device must be auto, cpu or cuda, got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # under torchrun: this rank's GPU
    if dtype == "auto":
        if dev.type == "cpu":
            return dev, torch.float32  # CPUs lack fast half kernels, and float32 is exact enough to compare
        return dev, auto_gpu_dtype(config, torch.cuda.is_bf16_supported())
    try:
        return dev, {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise DowserError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}") from None


def default_activation_budget() -> int:
    """A quarter of the memory available now (Linux), else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 << 30


def parse_size(text: str) -> int:
    """'512MB', '2GB', '1.5GiB', '1000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise DowserError(f"cannot read size {text!r} (examples: 512MB, 2GB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the torchrun process group when launched with several processes (gloo on CPU, nccl on GPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
