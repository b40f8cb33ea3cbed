"""hf-fwsvd: Fisher-Weighted SVD (Hsu et al., ICLR 2022) compression for Hugging Face Transformers.

Importing the package registers the `fwsvd` quantization method with transformers, so
``from_pretrained(..., fwsvd_config=FWSVDConfig(...))`` compresses on load and ``from_pretrained(saved_dir)``
rebuilds a compressed checkpoint.
"""

from .api import compress, compute_importances, decompress
from .config import FWSVDConfig
from .factorize import factorize
from .fisher import estimate_fisher
from .importances import load_importances, save_importances
from .integration import install
from .layers import LowRankLinear
from .layerwise import compress_layerwise
from .report import CompressionReport
from .version import __version__

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
    "load_importances",
    "save_importances",
]
