"""Builds sit_ext._C: the CPU kernels always, the CUDA kernels whenever the
installed torch is a CUDA build and a CUDA toolkit (nvcc) is found. A GPU need
not be present. This file is the one source of compiler flags.

Environment:
  SIT_EXT_CPU_ONLY=1           build without CUDA
  TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   CUDA archs (default: those of the GPUs
                               visible while building, else "8.0;9.0+PTX")
  SIT_EXT_CPU_CAPABILITY=DEFAULT|AVX2  CPU SIMD level (default: AVX2 where the
                               building machine has AVX2, FMA and F16C)
  SIT_EXT_NVCC_FLAGS="..."     extra nvcc flags (e.g. "-Xptxas -v" for the
                               register/spill report of bench/ptxas_report.py)
  MAX_JOBS=N                   parallel compile jobs
  CUDA_HOME                    toolkit root, if nvcc is not on the PATH
"""

import glob
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def find_cuda_home():
    """The toolkit root: $CUDA_HOME, else the TOP that nvcc reports for itself
    (nvcc on the PATH may be a wrapper script outside the toolkit)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        top = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
        if top:
            return os.path.realpath(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
_cuda_home = None if os.environ.get("SIT_EXT_CPU_ONLY") == "1" else find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

# Its "No CUDA runtime is found" notice on a machine without a GPU says nothing a
# user needs: the build line below says what is built and why.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cpu_capability():
    wanted = os.environ.get("SIT_EXT_CPU_CAPABILITY")
    if wanted is not None:
        if wanted not in ("DEFAULT", "AVX2"):
            sys.exit(f"SIT_EXT_CPU_CAPABILITY must be DEFAULT or AVX2, got {wanted!r}")
        return wanted
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        return "DEFAULT"
    return "AVX2" if {"avx2", "fma", "f16c"} <= flags else "DEFAULT"


def wheel_cuda_include_dirs(cuda_home):
    """CUDA library headers (cublas_v2.h, cusparse.h) that torch's headers need,
    from the nvidia wheels, when the toolkit does not have them."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [inc for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
            if glob.glob(os.path.join(inc, "cublas*.h")) or glob.glob(os.path.join(inc, "cusparse*.h"))]


def cublaslt_library(cuda_home):
    """The cuBLASLt library to link (the MLP op calls it directly; torch has
    loaded it by the time sit_ext._C is imported): the toolkit's, else the one
    in torch's nvidia wheels (which ship only the versioned name)."""
    for lib in ("lib64", "lib"):
        path = os.path.join(cuda_home, lib, "libcublasLt.so")
        if os.path.exists(path):
            return path
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcublasLt.so.*")))
    if not found:
        sys.exit(f"sit_ext: libcublasLt.so not found under {cuda_home} nor in torch's nvidia wheels; "
                 "install the toolkit's cuBLAS, or build with SIT_EXT_CPU_ONLY=1")
    return found[0]


def cuda_archs():
    """(arch list, where it came from): TORCH_CUDA_ARCH_LIST when set; else,
    as torch's own extension builder does, the archs of the GPUs visible
    here (one arch instead of the default's two cuts nvcc's time about in
    half); else DEFAULT_CUDA_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps), "the GPUs on this machine"
    return DEFAULT_CUDA_ARCHS, "no GPU visible: the default list; set TORCH_CUDA_ARCH_LIST to choose"


def extension():
    cpu_level = cpu_capability()
    # -fopenmp: at::parallel_for is OpenMP in torch's headers; without it the CPU
    # kernels run on one thread. The libgomp.so.1 that torch ships is reused.
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas", f'-DSIT_EXT_CPU_CAPABILITY="{cpu_level}"']
    link = ["-fopenmp"]
    if cpu_level == "AVX2":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    sources = (["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
               + sorted(glob.glob("csrc/autograd/*.cpp")) + sorted(glob.glob("csrc/autocast/*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]

    use_cuda = bool(_cuda_home) and torch.version.cuda is not None
    if not use_cuda:
        why = ("SIT_EXT_CPU_ONLY=1" if os.environ.get("SIT_EXT_CPU_ONLY") == "1"
               else "torch is a CPU build" if torch.version.cuda is None else "no nvcc found")
        print(f"sit_ext: building CPU kernels only ({why})")
        return CppExtension("sit_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)

    archs, source = cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"sit_ext: building CPU and CUDA kernels (CUDA_HOME={_cuda_home}, archs {archs}: {source})")
    cxx += [f'-DSIT_EXT_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *shlex.split(os.environ.get("SIT_EXT_NVCC_FLAGS", ""))]
    # -isystem: searched after the toolkit's own headers, which keep precedence.
    for inc in wheel_cuda_include_dirs(_cuda_home):
        cxx += ["-isystem", inc]
        nvcc += ["-isystem", inc]
    return CUDAExtension("sit_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                         include_dirs=include_dirs, extra_link_args=link + [cublaslt_library(_cuda_home)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc})


def static_cxx_runtime(path):
    """Whether the built library holds its own copy of the C++ runtime (it
    defines __cxa_throw), as nm sees it; False where nm is missing."""
    nm = shutil.which("nm")
    if nm is None:
        return False
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True)
    return any(line.split()[-1] == "__cxa_throw" for line in out.stdout.splitlines() if line.strip())


class Build(BuildExtension):
    """torch's extension builder, making sure the extension links the shared
    C++ runtime. A linker that brings a static libstdc++ (a wrapper adding
    -static-libstdc++, or a toolchain whose library path holds only
    libstdc++.a, as on one CUDA image) would put a second C++ runtime beside
    torch's, and there every error message (TORCH_CHECK) was a segfault. Such
    a build is linked again against libstdc++.so.6, and refused if that fails."""

    def build_extension(self, ext):
        super().build_extension(ext)
        built = self.get_ext_fullpath(ext.name)
        if not static_cxx_runtime(built):
            return
        print("sit_ext: the linker put a static libstdc++ into the extension; linking the shared one instead")
        os.remove(built)
        ext.extra_link_args = [*ext.extra_link_args, "-l:libstdc++.so.6"]
        super().build_extension(ext)
        if static_cxx_runtime(built):
            os.remove(built)
            sys.exit(f"sit_ext: {built} still holds a static libstdc++; build with CXX=g++ or a toolchain "
                     "that links the shared libstdc++.so.6")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": Build},
)
