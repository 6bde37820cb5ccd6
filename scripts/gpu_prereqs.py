"""What ``scripts/gpu_check.sh`` needs, checked before anything runs: one line per missing piece, exit 2 if any.

The GPU (unless ``ALLOW_CPU=1``, the CPU rehearsal), torch, triton, numpy, PyYAML and pytest importable, a C
compiler and the Python headers (Triton compiles its kernel launcher with them at the first launch, long after
a check that only imports it), and room for the Triton and inductor caches. Standard library only, so it runs
whatever is missing.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import sysconfig
import tempfile

FREE_GB = 2.0
MODULES = {
    "torch": "the GPU machine's own torch",
    "triton": "Triton (the segment GEMM backend, and inductor's)",
    "numpy": "numpy",
    "yaml": "PyYAML (the config groups; transformers brings it)",
    "pytest": "pytest (the CUDA tests)",
}


def missing() -> list[str]:
    out = []
    for name, what in MODULES.items():
        try:
            importlib.import_module(name)
        except Exception as e:  # a broken install counts as missing, with its reason
            out.append(f"{what}: `import {name}` fails ({type(e).__name__}: {e})")
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None or not shutil.which(cc):
        out.append("a C compiler (cc, gcc or clang; or $CC): Triton builds its launcher with it at the first launch")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(headers):
        out.append(f"the Python headers ({headers}): Triton's launcher includes them (python3-dev)")
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    if free < FREE_GB:
        out.append(f"{FREE_GB:.0f} GB free in {tempfile.gettempdir()} for the Triton/inductor caches ({free:.1f} GB)")
    if "torch" in sys.modules and os.environ.get("ALLOW_CPU") != "1":
        import torch

        if not torch.cuda.is_available():
            out.append(
                f"a CUDA GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}); ALLOW_CPU=1 rehearses on a CPU"
            )
    return out


def main() -> int:
    problems = missing()
    for line in problems:
        print(f"gpu_check: missing {line}")
    if problems:
        return 2
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (ALLOW_CPU=1)"
    versions = {m: getattr(sys.modules[m], "__version__", "?") for m in ("torch", "triton", "numpy")}
    print(
        f"python {sys.version.split()[0]}, torch {versions['torch']} (CUDA {torch.version.cuda}), "
        f"triton {versions['triton']}, numpy {versions['numpy']}, GPU {gpu}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
