"""lm-eval's own command line with the plugin loaded: ``python -m qsparse_hf.harness <lm_eval arguments>``.

The harness builds its model with ``AutoModelForCausalLM.from_pretrained``; transformers knows the ``qsparse``
quantization method only once `qsparse_hf` is imported, which the plain ``lm_eval`` command never does (it fails
with "Unknown quantization type, got qsparse"). This runs the same CLI after that import, and makes the tasks
shipped with the package (``openorca_definitions``) visible unless ``--include_path`` is given::

    python -m qsparse_hf.harness --model hf --model_args pretrained=runs/sft-qsparse --tasks openorca_definitions
"""

from __future__ import annotations

import sys

import qsparse_hf  # noqa: F401  (registers the qsparse quantization method with transformers)

from .tasks import task_include_path

__all__ = ["harness_argv", "main"]


def harness_argv(argv: list[str]) -> list[str]:
    """``argv`` for lm-eval with the package's task folder added (as ``--include_path``) unless one is given.

    Example:
        >>> harness_argv(["--tasks", "openorca_definitions"])[:2] == ["--tasks", "openorca_definitions"]
        True
    """
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return list(argv)
    return [*argv, "--include_path", task_include_path()]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line with ``argv`` (default ``sys.argv[1:]``).

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("qsparse_hf.harness needs lm-eval: pip install 'qsparse_hf[eval]'", file=sys.stderr)
        raise SystemExit(3) from None
    sys.argv = [sys.argv[0], *harness_argv(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
