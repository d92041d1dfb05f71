"""Registers and spilled bytes per thread of the one-token top-K kernel under each launch configuration, compiled
for Hopper (sm_90: H100, H200) with the ptxas and cuobjdump that ship with Triton: no GPU needed.

A program holds its whole row in registers (``BLOCK`` keys, the width padded to a power of two). Once a thread's
share no longer fits, the compiler spills to local memory, and every step of the search reads the spilled keys
back: Qwen2-7B's 18944-wide activation (padded to 32768) spills with 16 warps and with 32, where 14336 (16384) fits
in 16 warps. Rows that a hinted one-token selection splits over programs by default also list that launch's two
kernels (the last counting program holds every part's histogram), plain and with SiLU and the product with up (a
compiled decode step's FFN activation). Prints a table, writes kernel_registers.json.

``--ffn`` lists instead the kernels of a gated FFN's decode step in two or three launches (`kernels.ffn`:
``QSPARSE_FUSED_FFN``) for the Mistral-7B and Qwen2-7B shapes: the gate/up GEMV that resolves the activation's top-K
(each launch configuration worth tuning, or the default), the writing launch of the listed form, and down's masked
GEMV (kernel_registers_ffn.json).

    python benchmarks/kernel_registers.py --dims 4096,14336,18944
    python benchmarks/kernel_registers.py --defaults-only   # each width's default launch only
    python benchmarks/kernel_registers.py --ffn [--defaults-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import parse_widths, print_table, write_json  # noqa: E402

#: Pointer arguments of the top-K kernel by name (bf16 rows, an int64 zero counter, int32 lists and hints).
_POINTER_TYPES = {"x_ptr": "*bf16", "y_ptr": "*bf16", "out_ptr": "*bf16", "zeros_ptr": "*i64", "index_ptr": "*i32",
                  "hint_ptr": "*i32", "part_ptr": "*i32", "ticket_ptr": "*i32"}
#: The FFN decode kernels' pointers where they differ (fp32 split-K partials, int32 histograms, bf16 keys).
_FFN_POINTER_TYPES = {**_POINTER_TYPES, "part_ptr": "*fp32", "hist_ptr": "*i32", "sem_ptr": "*i32",
                      "wt_ptr": "*bf16", "act_ptr": "*bf16", "prod_ptr": "*bf16", "state_ptr": "*i32",
                      "bias_ptr": "*bf16", "key_ptr": "*bf16"}
#: Launch options among a KernelLaunch's constants (the rest are the kernel's constexpr arguments).
_OPTIONS = ("num_warps", "num_stages", "enable_reflect_ftz", "launch_pdl")


def sm90_resources(launch, pointer_types: dict = _POINTER_TYPES) -> tuple[int, int]:
    """``(registers, spilled bytes)`` per thread of a `qsparse_hf.kernels.launch.KernelLaunch` (of the top-K kernel;
    another with its ``pointer_types``), compiled for sm_90.

    Example:
        >>> from qsparse_hf.kernels.topk import _row_launch  # doctest: +SKIP
        >>> sm90_resources(_row_launch(4096, 2048, torch.bfloat16, True, False, None, True).launch)  # doctest: +SKIP
        (168, 8)
    """
    import triton

    compiled = sm90_compile(launch, pointer_types)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def sm90_compile(launch, pointer_types: dict = _POINTER_TYPES):
    """A `qsparse_hf.kernels.launch.KernelLaunch` compiled for sm_90 as Triton's JIT would compile it (its
    ``asm`` holds the PTX and the cubin); `sm90_resources` reads its registers and spills.

    Example:
        >>> "prefetch.global.L2" in sm90_compile(launch, pointer_types).asm["ptx"]  # doctest: +SKIP
        True
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    # (constexpr parameters a launch leaves at their defaults are constants too, as the JIT passes them)
    constexprs = {param.name: param.default for param in kernel.params if param.is_constexpr and param.has_default}
    constexprs.update((name, value) for name, value in launch.constants.items() if name not in _OPTIONS)
    options = {name: value for name, value in launch.constants.items() if name in _OPTIONS}
    signature = {name: pointer_types.get(name, "constexpr" if name in constexprs else "i32")
                 for name in kernel.arg_names}
    # Specialized as Triton's JIT specializes a launch of the 7B shapes at keep 0.5: pointers 16-byte aligned,
    # integers (widths, k, strides) divisible by 16. Alignment decides the loads' vector width and with it the
    # register layout: compiled without it, the 4096-key kernel took 229 registers instead of 168.
    aligned = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
               if signature[name] != "constexpr"}
    return triton.compile(ASTSource(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", 90, 32),
                          options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="4096,14336,18944", help="comma-separated row widths")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction kept (k only changes a runtime argument)")
    parser.add_argument("--defaults-only", action="store_true", help="only each width's default launch")
    parser.add_argument("--ffn", action="store_true", help="the gated FFN's decode kernels instead (see above)")
    args = parser.parse_args(argv)
    dims = parse_widths(args.dims)
    if dims is None:
        return 2
    if not 0 < args.keep <= 1:
        print(f"--keep takes a fraction in (0, 1], got {args.keep}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_registers compiles kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import torch

    if args.ffn:
        return ffn_resources(args.keep, args.defaults_only)

    from qsparse_hf.functional import keep_count
    from qsparse_hf.kernels.topk import (MAX_LISTED_FEATURES, STREAMED_CANDIDATES, _launch_candidates, _row_launch,
                                         launch_config)

    rows, results = [], []
    for dim in dims:
        if dim > MAX_LISTED_FEATURES:
            print(f"skipping {dim}: the kernel lists kept features of rows up to {MAX_LISTED_FEATURES} wide",
                  file=sys.stderr)
            continue
        block = 1 << (dim - 1).bit_length()
        k = keep_count(args.keep, dim)
        for silu, variant in ((False, "top-K"), (True, "SiLU, top-K, × up")):
            # a decode token's default; rows a hinted token splits (below) show the register kernel's unhinted one
            chosen = launch_config(block, silu, hinted=True)
            chosen = launch_config(block, silu) if chosen[0] == "split" else chosen
            others = [*_launch_candidates(block), *([] if silu else STREAMED_CANDIDATES)]  # no fused SiLU streamed
            for config in [chosen] if args.defaults_only else others:
                launch = _row_launch(dim, k, torch.bfloat16, True, False, config, True, silu, silu).launch
                registers, spilled = sm90_resources(launch)
                search = f"streamed {config[1]}" if config[0] == "streamed" else config[0]
                results.append(dict(dim=dim, block=block, variant=variant, search=search, num_warps=config[-1],
                                    registers=registers, spilled_bytes=spilled, default=config == chosen))
                rows.append([dim, block, variant, search, config[-1], registers, spilled,
                             "←" if config == chosen else ""])
        split = launch_config(block, hinted=True)
        if split[0] != "split":
            continue
        for silu in (False, True):  # a compiled decode step's FFN activation: SiLU and the product with up fused
            launches = _row_launch(dim, k, torch.bfloat16, True, False, split, True, silu, silu)
            name = "split, SiLU × up" if silu else "split"
            for variant, launch in ((f"{name}: count", launches.launch), (f"{name}: write", launches.write)):
                registers, spilled = sm90_resources(launch)
                results.append(dict(dim=dim, block=block, variant=variant, search=f"split {split[1]}",
                                    num_warps=split[2], registers=registers, spilled_bytes=spilled, default=True))
                rows.append([dim, block, variant, f"split {split[1]}", split[2], registers, spilled, "←"])
    print_table(["dim", "keys (padded)", "kernel", "digit bits, streamed chunk or split part", "warps",
                 "registers/thread", "spilled bytes/thread", "default"], rows, title="One-token top-K, sm_90, hinted")
    write_json("kernel_registers.json", {"results": results})
    return 0


def ffn_resources(keep: float, defaults_only: bool) -> int:
    """``--ffn``: registers and spills of `kernels.ffn`'s launches for the 7B FFN shapes, kept inputs listed."""
    import torch
    from transformers import MistralConfig, Qwen2Config

    from qsparse_hf.functional import keep_count
    from qsparse_hf.kernels.ffn import _config_candidates, _default_config, _GatedLaunch
    from qsparse_hf.kernels.gemv import _default_config as _gemv_default
    from qsparse_hf.kernels.gemv import _Launch

    rows, results = [], []
    for arch, config in (("mistral", MistralConfig()), ("qwen2", Qwen2Config(hidden_size=3584,
                                                                             intermediate_size=18944))):
        hidden, inter = config.hidden_size, config.intermediate_size
        listed = keep_count(keep, hidden)
        default = _default_config(inter, listed, torch.bfloat16)
        configs = [default] if defaults_only else list(dict.fromkeys([default, *_config_candidates(
            inter, listed, torch.bfloat16)]))
        for gemv_config in configs:
            for form in ("masked", "listed"):
                launch = _GatedLaunch(hidden, listed, inter, gemv_config, True, torch.bfloat16, form == "listed")
                kernels = [("gate/up GEMV, top-K resolved", launch.launch, _FFN_POINTER_TYPES)]
                if launch.write is not None and gemv_config == default:  # (the split selection's writing kernel)
                    kernels.append(("listed: writing launch", launch.write, _POINTER_TYPES))
                for name, kernel, pointer_types in kernels:
                    registers, spilled = sm90_resources(kernel, pointer_types)
                    results.append(dict(arch=arch, form=form, kernel=name, config=list(gemv_config),
                                        registers=registers, spilled_bytes=spilled, default=gemv_config == default))
                    rows.append([arch, form, name, "/".join(map(str, gemv_config[:4])), registers, spilled,
                                 "←" if gemv_config == default else ""])
        down = _gemv_default(hidden, inter)
        masked = _Launch(1, inter, hidden, inter, down, False, False, False, masked=torch.bfloat16)
        registers, spilled = sm90_resources(masked.launch, _FFN_POINTER_TYPES)
        results.append(dict(arch=arch, form="masked", kernel="down GEMV, masked", config=list(down),
                            registers=registers, spilled_bytes=spilled, default=True))
        rows.append([arch, "masked", "down GEMV, masked", "/".join(map(str, down[:4])), registers, spilled, "←"])
    print_table(["arch", "form", "kernel", "BN/BK/split/warps", "registers/thread", "spilled bytes/thread",
                 "default"], rows, title="Gated FFN decode kernels (kernels.ffn), sm_90")
    write_json("kernel_registers_ffn.json", {"keep": keep, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
