"""Compression methods: one [`CompressionMethod`] subclass per file, found through a registry.

Config validation, the CLI (`compress --method`, `sweep --methods` and their `--help`), the sweep's plot styles, the
model card and the test matrix all read the registry, so adding a method is one new file (see `docs/methods.md`,
"Adding a method"). Importing this package registers the built-ins:

==================  ===============================================  ============================================
method              weighting ``M M^T`` of ``||(W - A B) M||_F``     statistics
==================  ===============================================  ============================================
``fwsvd``           ``diag(F)``, row Fisher (the paper)              ``row_fisher`` (labels)
``svd``             identity                                         none
``tfwsvd``          ``diag(F)``, then element-wise ALS on ``I_oi``   ``row_fisher``, ``elementwise_fisher``
``whiten``          ``E[x x^T]`` (SVD-LLM)                           ``activation_second_moment`` (no labels)
``asvd``            ``diag(mean |x|)`` (ASVD, alpha = 0.5)           ``activation_abs_mean`` (no labels)
``fisher_whiten``   ``E[|g|^2 x x^T]``, gradient-weighted moment      ``gradient_second_moment`` (labels)
``svdllm``          as ``whiten``, then SVD-LLM's update of ``up``   ``activation_second_moment`` (no labels)
``fisher_svdllm``   as ``fisher_whiten``, then SVD-LLM's update      ``gradient_second_moment`` (labels)
``whiten_v2``       ``E[x x^T]``, truncated by SVD-LLM V2's two SVDs  ``activation_second_moment`` (no labels)
``kfac_whiten``     ``E[|g|^2 x x^T]``, output side ``E[g g^T]``     ``gradient_second_moment`` and
                                                                     ``output_gradient_second_moment`` (labels)
``kfac_svdllm``     as ``kfac_whiten``, then SVD-LLM's update        as ``kfac_whiten``
==================  ===============================================  ============================================
"""

from ..statistics import Statistics
from .base import CompressionMethod
from .registry import available_methods, get_method, register_method, unregister_method

# The built-ins, in the order the CLI and error messages list them.
from . import fwsvd, svd, tfwsvd, whiten, asvd, fisher_whiten, svdllm, fisher_svdllm, whiten_v2  # noqa: E402, F401, I001  isort: skip
from . import kfac_whiten, kfac_svdllm  # noqa: E402, F401, I001  isort: skip
from .calibrate import check_statistics, collect_statistics, known_statistics, required_statistics  # noqa: E402

__all__ = [
    "CompressionMethod",
    "Statistics",
    "available_methods",
    "check_statistics",
    "collect_statistics",
    "get_method",
    "known_statistics",
    "register_method",
    "required_statistics",
    "unregister_method",
]
