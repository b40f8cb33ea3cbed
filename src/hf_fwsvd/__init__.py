"""hf-fwsvd: Fisher-Weighted SVD (Hsu et al., ICLR 2022) compression for Hugging Face Transformers.

Importing the package registers the `fwsvd` quantization method with transformers, so
``from_pretrained(..., fwsvd_config=FWSVDConfig(...))`` compresses on load and ``from_pretrained(saved_dir)``
rebuilds a compressed checkpoint.
"""

from .compat import check_transformers_version

check_transformers_version()  # before anything touches transformers' quantizer API

from .api import compress, compute_importances, decompress  # noqa: E402
from .config import FWSVDConfig  # noqa: E402
from .factorize import factorize  # noqa: E402
from .fisher import estimate_fisher  # noqa: E402
from .importances import load_importances, save_importances  # noqa: E402
from .int8_deploy import fold_smoothing, quantize_int8  # noqa: E402
from .integration import install  # noqa: E402
from .layers import LowRankLinear  # noqa: E402
from .layerwise import compress_layerwise  # noqa: E402
from .report import CompressionReport  # noqa: E402
from .version import __version__  # noqa: E402

install()

__all__ = [
    "CompressionReport",
    "FWSVDConfig",
    "LowRankLinear",
    "__version__",
    "compress",
    "compress_layerwise",
    "compute_importances",
    "decompress",
    "estimate_fisher",
    "factorize",
    "fold_smoothing",
    "load_importances",
    "quantize_int8",
    "save_importances",
]
