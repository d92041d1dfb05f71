"""qsparse_hf: Q-Sparse (fully sparsely-activated LLMs, arXiv 2407.10969) for Hugging Face Transformers.

>>> import qsparse_hf
>>> model = qsparse_hf.convert_to_qsparse(model, topk=0.7)   # doctest: +SKIP
>>> print(qsparse_hf.sparsity_report(model, input_ids))       # doctest: +SKIP
"""

from .callbacks import QSparseCallback
from .config import QSparseConfig
from .convert import convert_to_qsparse, is_qsparse_model, revert_qsparse, sparsify_adapter_inputs
from .integration import register as _register
from .layers import QSparseActivation, QSparseLinear
from .stats import SparsityReport, reset_sparsity, set_sparsity_tracking, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "QSparseActivation",
    "QSparseCallback",
    "QSparseConfig",
    "QSparseLinear",
    "SparsityReport",
    "__version__",
    "convert_to_qsparse",
    "is_qsparse_model",
    "reset_sparsity",
    "revert_qsparse",
    "set_sparsity_tracking",
    "sparsify_adapter_inputs",
    "sparsity_report",
]

_register()
