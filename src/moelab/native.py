"""Native helpers: the one place moelab talks to the operating system and a C compiler.

* :func:`load_c_kernel` - compile (once, cached on disk) and load a small OpenMP C kernel;
  :func:`float_kernel` / :func:`c_ptr` - the checks and pointers its float32/float64 callers share.
* :func:`advise_huge_pages` - back a large CPU tensor with transparent huge pages.
* :func:`available_memory_bytes` / :func:`check_fits_in_memory` - refuse a layer that cannot fit
  in RAM before allocating it; :func:`adamw_state_dtype` - the dtype of the AdamW moments, which
  both that estimate and ``moelab.train.optim`` use.
* :func:`numerics_fingerprint` - what, besides the code and the thread count, decides CPU float
  results bit for bit (CPU, instruction sets, kernels chosen, compiler of the C kernels).

A leaf utility: it imports only the standard library and torch, so both ``moelab.layers`` and
``moelab.train`` may use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FLOAT_SUFFIX",
    "adamw_state_dtype",
    "advise_huge_pages",
    "available_memory_bytes",
    "c_ptr",
    "check_fits_in_memory",
    "float_kernel",
    "load_c_kernel",
    "mkl_gemm_batch",
    "numerics_fingerprint",
]

# --------------------------------------------------------------------------- memory


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, else free pages via sysconf; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def adamw_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the AdamW moments (and of the update arithmetic) for a parameter of ``dtype``.

    float32 for 16-bit floats: with 8 (bfloat16) or 11 (float16) significant bits, ``β2·v`` rounds
    back to ``v``, ``1 − β2^t`` rounds to 0 (bfloat16) and ``g²`` underflows (float16).
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_fits_in_memory(what: str, param_bytes: int, state_bytes: int) -> None:
    """Raise ``MemoryError`` before allocating if params + optimizer state exceed available RAM."""
    avail = available_memory_bytes()
    need = param_bytes + state_bytes
    if avail is not None and need > avail:
        gib = 1024**3
        raise MemoryError(
            f"{what} would need about {need / gib:.1f} GiB (parameters {param_bytes / gib:.1f} GiB "
            f"+ AdamW state {state_bytes / gib:.1f} GiB) but only {avail / gib:.1f} GiB is "
            f"available; use fewer experts/memories or a smaller d_model (or check_memory=False)"
        )


# --------------------------------------------------------------------------- C kernels

_KERNELS: dict[str, ctypes.CDLL | None] = {}

FLOAT_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}  # C function suffix per dtype


def _cpu_signature() -> str:
    """Machine + CPU model/flags, so a cache shared between hosts never loads a foreign -march."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    sig += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return sig


def _compiler() -> str | None:
    """Path of the C compiler the kernels are built with (``$CC``, else cc, else gcc)."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def load_c_kernel(name: str, source: str) -> ctypes.CDLL | None:
    """Compile (once, cached on disk) and load a small OpenMP C kernel; None if unavailable.

    Used for memory-bound row loops that eager PyTorch can only express as several passes
    (e.g. the fused lazy AdamW row update). Plain C with raw pointers via ``ctypes`` (no torch
    headers, compiles in about a second). Disabled by ``MOELAB_NO_C_KERNELS=1``; every caller keeps
    an eager fallback, and tests check both paths agree. Cache: ``$MOELAB_CACHE/kernels`` or
    ``~/.cache/moelab/kernels``.
    """
    if os.environ.get("MOELAB_NO_C_KERNELS"):
        return None
    if name in _KERNELS:
        return _KERNELS[name]
    lib = None
    cc = _compiler()
    if cc is not None:
        flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
        blob = (source + _cpu_signature() + " ".join(flags)).encode()
        key = hashlib.sha256(blob).hexdigest()[:16]
        root = Path(os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab")
        path = root.expanduser() / "kernels" / f"{name}-{key}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                    src = Path(tmp) / f"{name}.c"
                    src.write_text(source)
                    out = Path(tmp) / "k.so"
                    cmd = [cc, *flags, str(src), "-o", str(out)]
                    subprocess.run(cmd + ["-lm"], check=True, capture_output=True, timeout=120)
                    os.replace(out, path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError):
            lib = None
    _KERNELS[name] = lib
    return lib


def float_kernel(name: str, source: str, *tensors: Tensor) -> ctypes.CDLL | None:
    """:func:`load_c_kernel` when every tensor is a contiguous CPU tensor of one dtype listed in
    :data:`FLOAT_SUFFIX` (the kernel defines one function per such dtype), else None."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in FLOAT_SUFFIX:
        return None
    if any(t.dtype != t0.dtype or not t.is_contiguous() for t in tensors):
        return None
    return load_c_kernel(name, source)


def c_ptr(t: Tensor) -> ctypes.c_void_p:
    """A tensor's data pointer as a C ``void*`` argument."""
    return ctypes.c_void_p(t.data_ptr())


# --------------------------------------------------------------------------- huge pages

_MADV_HUGEPAGE = 14
_HUGE = 2 * 1024 * 1024


def advise_huge_pages(t: Tensor) -> Tensor:
    """Advise transparent huge pages for a large CPU tensor *before* first touch; returns ``t``.

    Random row reads from GB-sized tables (expert tables, their AdamW moments) are dominated by
    TLB misses on 4 KiB pages; 2 MiB pages cut PEER's step time at 1024² experts by about a third
    (docs/peer.md). ``madvise(MADV_HUGEPAGE)`` covers the 2 MiB-aligned interior of the buffer
    (Linux with THP in "madvise" or "always" mode; silently a no-op elsewhere). Memory contents and
    tensor layout are unchanged.
    """
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < 8 * _HUGE or not t.is_contiguous():
        return t
    lo = -(-t.data_ptr() // _HUGE) * _HUGE
    hi = (t.data_ptr() + nbytes) // _HUGE * _HUGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_HUGEPAGE))
    except (OSError, AttributeError):
        pass
    return t


# --------------------------------------------------------------------------- MKL batched GEMM

_GEMM_BATCH: dict[torch.dtype, object] = {}
_GEMM_BATCH_SYMBOL = {torch.float32: "cblas_sgemm_batch", torch.float64: "cblas_dgemm_batch"}


def mkl_gemm_batch(dtype: torch.dtype):
    """MKL's grouped GEMM (``cblas_?gemm_batch``, LP64) for ``dtype`` from the MKL that PyTorch's
    CPU library carries, or None (another BLAS, a dtype MKL has no batch GEMM for, or
    ``MOELAB_NO_MKL_BATCH=1``).

    One call runs every expert's matmul, each with its own row count (one parallel region instead
    of one per expert, no padding): measured 2-10% faster than a ``torch.mm`` per expert and than
    a padded ``bmm`` for fine-grained experts on CPU.
    """
    if dtype not in _GEMM_BATCH_SYMBOL:
        return None
    if dtype not in _GEMM_BATCH:  # looked up once per process (the environment too)
        fn = None
        if os.environ.get("MOELAB_NO_MKL_BATCH"):
            _GEMM_BATCH[dtype] = None
            return None
        try:
            lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
            fn = getattr(lib, _GEMM_BATCH_SYMBOL[dtype])
            fn.restype = None
        except (OSError, AttributeError):
            fn = None
        _GEMM_BATCH[dtype] = fn
    return _GEMM_BATCH[dtype]


# --------------------------------------------------------------------------- numerics fingerprint

# CPU flags that change which vectorised code runs (ATen's kernels, MKL's, -march=native C kernels)
_KERNEL_ISA = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
)


_CPUINFO_KEYS = ("vendor_id", "cpu family", "model", "stepping", "model name", "flags")


def _cpuinfo() -> dict[str, str]:
    """The first processor's vendor, model and flags from /proc/cpuinfo (empty elsewhere)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in _CPUINFO_KEYS and key not in out:
                    out[key] = value.strip()
                if not line.strip() and out:
                    break
    except OSError:
        pass
    return out


def _compiler_version() -> str | None:
    """First line of ``cc --version`` when C kernels load here (enabled, a compiler, a writable
    cache: a probe kernel is built), else None: the eager fallbacks run."""
    cc = _compiler()
    if cc is None or load_c_kernel("probe", "int moelab_probe(void) { return 1; }\n") is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.splitlines() or [cc])[0].strip()


def numerics_fingerprint() -> dict[str, object]:
    """What, besides moelab's code and the thread count, decides float results on CPU bit for bit.

    Two processes with equal fingerprints (and equal code, inputs and threads) compute the same
    bits; anything else may differ in the last place, and training amplifies that. Covers: the
    CPU (vendor, model name, family/model/stepping), the instruction sets that change which
    kernels run (``isa``), the kernel level ATen dispatches to (``ATEN_CPU_CAPABILITY`` can lower
    it), the torch build and whether it has MKL, whether MoE expert matmuls use MKL's grouped GEMM
    (``MOELAB_NO_MKL_BATCH``), and the compiler of moelab's C kernels (None: eager fallbacks,
    ``MOELAB_NO_C_KERNELS``).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu_vendor": info.get("vendor_id") or platform.machine(),
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        # family/model/stepping: a virtual machine's model name may hide the generation
        "cpu_id": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "isa": [f for f in _KERNEL_ISA if f in flags],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "mkl_gemm_batch": mkl_gemm_batch(torch.float32) is not None,
        "c_kernels": _compiler_version(),
    }
