"""SiLU(GroupNorm(x)), the U-net's most frequent pair, with a fused CPU kernel for channels_last.

PyTorch's CPU GroupNorm is fast on NCHW tensors but 3–5× slower on channels_last ones when a group has
only a few channels (1–4 in the MNIST preset), which cancels the ~17 % that channels_last saves in the
convolutions. ``group_norm_silu.c`` does both layers in two passes over the NHWC memory forward and two
backward (statistics in double), at or below the cost of PyTorch's NCHW pair. It is compiled once per
machine with the system C compiler (well under a second) into a cache folder and loaded with ctypes;
its OpenMP loop runs on the thread pool PyTorch already loaded.

:func:`group_norm_silu` uses it only where it applies — float32 channels_last CPU tensors, outside
``torch.compile`` — and PyTorch's ``F.silu(norm(x))`` everywhere else, and also where no compiler is
found (one notice) or ``SDEFLOW_FUSED_KERNELS=0`` is set. A backward pass that builds a graph
(``create_graph=True``, as the ``elbo`` loss needs) is recomputed through PyTorch's ops, so second
derivatives stay exact.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SOURCE = Path(__file__).with_name("group_norm_silu.c")
# -ffast-math lets GCC vectorise expf; it is given to the compile step only, because linking a shared
# library with it (GCC < 13) adds a constructor that flushes denormals to zero for the whole process.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")


def group_norm_silu(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``F.silu(norm(x))``, through the fused kernel where it applies."""
    if _fused_applies(x, norm) and (kernel := load_kernel()) is not None:
        return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, kernel)
    return F.silu(norm(x))


def is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor laid out NHWC in memory (and not also NCHW, as size-1 channel or spatial dims allow)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


MAX_CHANNELS = 8192  # the kernel keeps ~40 bytes per channel on each thread's stack


def _fused_applies(x: Tensor, norm: nn.GroupNorm) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and is_channels_last(x)
        and norm.affine
        and x.shape[1] == norm.num_channels <= MAX_CHANNELS  # else PyTorch raises the usual error
        and norm.weight.dtype == norm.bias.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and os.environ.get("SDEFLOW_FUSED_KERNELS", "1") != "0"
    )


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, kernel):
        N, C, H, W = x.shape
        out = torch.empty_like(x)
        mean = x.new_empty((N, groups), dtype=torch.float64)
        rstd = torch.empty_like(mean)
        kernel.forward(*_pointers(x, weight.detach().contiguous(), bias.detach().contiguous(), out, mean, rstd),
                       N, H * W, C, groups, eps, torch.get_num_threads())
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps, ctx.kernel = groups, eps, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate through PyTorch's ops instead
            return (*_graph_backward(ctx, x, weight, bias, grad_out), None, None, None)
        N, C, H, W = x.shape
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x)
        dweight, dbias = x.new_empty((N, C)), x.new_empty((N, C))
        ctx.kernel.backward(*_pointers(grad_out, x, weight.detach().contiguous(), bias.detach().contiguous(), mean,
                                       rstd, dx, dweight, dbias), N, H * W, C, ctx.groups, torch.get_num_threads())
        return dx, dweight.sum(0), dbias.sum(0), None, None, None


def _graph_backward(ctx, x: Tensor, weight: Tensor, bias: Tensor, grad_out: Tensor) -> tuple:
    """The vector-Jacobian product as a graph of PyTorch ops, so that it can be differentiated again
    (through PyTorch's NCHW GroupNorm, the faster and more accurate of its two CPU layouts)."""
    inputs = (x, weight, bias)
    with torch.enable_grad():
        out = F.silu(F.group_norm(x.contiguous(), ctx.groups, weight, bias, ctx.eps))
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


def _pointers(*tensors: Tensor) -> list[ctypes.c_void_p]:
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


class Kernel:
    """The compiled library's two entry points with their C signatures."""

    def __init__(self, library: ctypes.CDLL):
        p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        self.forward = library.gn_silu_forward
        self.forward.argtypes = [p] * 6 + [i] * 4 + [d, ctypes.c_int]
        self.forward.restype = None
        self.backward = library.gn_silu_backward
        self.backward.argtypes = [p] * 9 + [i] * 4 + [ctypes.c_int]
        self.backward.restype = None


@functools.cache
def load_kernel() -> Kernel | None:
    """Build (once per machine, compiler and source) and load the kernel; None, with a notice, if not."""
    try:
        return Kernel(ctypes.CDLL(str(build_library())))
    except Exception as error:  # any failure to build or load only costs speed
        detail = getattr(error, "stderr", None) or str(error)
        print(f"sdeflow: the fused channels-last GroupNorm+SiLU kernel is unavailable "
              f"({detail.strip().splitlines()[-1][:200] if detail.strip() else type(error).__name__}); "
              "using PyTorch's GroupNorm", file=sys.stderr)
        return None


def build_library() -> Path:
    """The shared library for this machine, compiled into the cache folder if it is not there yet."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("the fused kernel is built on Linux only")
    compiler = _compiler()
    version = _run([compiler, "--version"])
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), compiler, version, " ".join(COMPILE_FLAGS + LINK_FLAGS), platform.machine(),
         _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"group_norm_silu-{key}.so"
    if target.exists():
        if _intact(target):
            return target
        print(f"sdeflow: the cached kernel {target} is damaged (its digest does not match); rebuilding it",
              file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp, "kernel.o"), Path(tmp, "kernel.so")
        _run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(obj)])
        _run([compiler, *LINK_FLAGS, str(obj), "-o", str(lib), "-lm"])
        digest = Path(tmp, "kernel.sha256")
        digest.write_text(_digest(lib))
        os.replace(lib, target)  # atomic: ranks building side by side never load half a file
        os.replace(digest, _digest_path(target))
    return target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(library: Path) -> Path:
    return library.with_suffix(".sha256")


def _intact(library: Path) -> bool:
    """Whether ``library`` is the file its build wrote: loading a truncated or altered shared library
    can crash the process (SIGBUS) instead of raising, so it is checked before ctypes maps it."""
    try:
        return _digest_path(library).read_text().strip() == _digest(library)
    except OSError:
        return False


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, errors="replace", check=True, timeout=120).stdout


def cache_dir() -> Path:
    if "SDEFLOW_CACHE_DIR" in os.environ:
        return Path(os.environ["SDEFLOW_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdeflow"


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate.split()[0]):
            return shutil.which(candidate.split()[0])
    raise RuntimeError("no C compiler found (set CC)")


def _cpu_flags() -> str:
    """-march=native code is only valid on CPUs with the same features: part of the cache key."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
