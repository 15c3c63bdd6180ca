"""sit_ext: fused CUDA/CPU kernels and a drop-in SiT for PyTorch.

Convention: t = 0 is data, t = 1 is noise; x_t = alpha(t) x + beta(t) noise.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "sit_ext's compiled kernels (sit_ext._C) are missing or failed to load: "
        f"{e}. Install with `pip install --no-build-isolation .` against the torch you run."
    ) from e

from . import ops, reference, schedules  # noqa: E402
from ._build import build_info  # noqa: E402
from .functional import (  # noqa: E402
    cosine_interpolant,
    cosine_velocity,
    linear_interpolant,
    linear_velocity,
    sample_interpolant_time,
    sit_loss,
)
from .models import SiT, SiT_models, build, output_size  # noqa: E402
from .ops import (  # noqa: E402
    gated_residual,
    gated_residual_ln_modulate,
    gelu_mlp,
    interpolant,
    ln_modulate,
    mse,
    velocity_mse,
)
from .transport import Transport, create_transport  # noqa: E402


def _check_cpu() -> None:
    import json

    # The raw build record: build_info() would also query CUDA, which import should not.
    built_for = json.loads(torch.ops.sit_ext.build_info())["cpu_capability"]
    if built_for == "AVX2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise ImportError(
            "sit_ext was built with AVX2 but this CPU lacks it; rebuild with SIT_EXT_CPU_CAPABILITY=DEFAULT"
        )


_check_cpu()

__all__ = [
    "SiT",
    "SiT_models",
    "Transport",
    "create_transport",
    "schedules",
    "build",
    "build_info",
    "cosine_interpolant",
    "cosine_velocity",
    "gated_residual",
    "gated_residual_ln_modulate",
    "gelu_mlp",
    "interpolant",
    "linear_interpolant",
    "linear_velocity",
    "ln_modulate",
    "mse",
    "ops",
    "output_size",
    "reference",
    "sample_interpolant_time",
    "sit_loss",
    "velocity_mse",
]
