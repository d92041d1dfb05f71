"""Registers and spilled bytes per thread of the one-token top-K kernel under each launch configuration, compiled
for Hopper (sm_90: H100, H200) with the ptxas and cuobjdump that ship with Triton: no GPU needed.

A program holds its whole row in registers (``BLOCK`` keys, the width padded to a power of two). Once a thread's
share no longer fits, the compiler spills to local memory, and every step of the search reads the spilled keys
back: Qwen2-7B's 18944-wide activation (padded to 32768) spills with 16 warps and with 32, where 14336 (16384) fits
in 16 warps. Rows that a hinted one-token selection splits over programs by default also list that launch's two
kernels (the last counting program holds every part's histogram), plain and with SiLU and the product with up (a
compiled decode step's FFN activation). Prints a table, writes kernel_registers.json.

    python benchmarks/kernel_registers.py --dims 4096,14336,18944
    python benchmarks/kernel_registers.py --defaults-only   # each width's default launch only
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
#: Launch options among a KernelLaunch's constants (the rest are the kernel's constexpr arguments).
_OPTIONS = ("num_warps", "num_stages", "enable_reflect_ftz", "launch_pdl")


def sm90_resources(launch) -> tuple[int, int]:
    """``(registers, spilled bytes)`` per thread of a `qsparse_hf.kernels.launch.KernelLaunch` of the top-K kernel,
    compiled for sm_90.

    Example:
        >>> from qsparse_hf.kernels.topk import _row_launch  # doctest: +SKIP
        >>> sm90_resources(_row_launch(4096, 2048, torch.bfloat16, True, False, None, True).launch)  # doctest: +SKIP
        (229, 0)
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    constexprs = {name: value for name, value in launch.constants.items() if name not in _OPTIONS}
    options = {name: value for name, value in launch.constants.items() if name in _OPTIONS}
    signature = {name: _POINTER_TYPES.get(name, "constexpr" if name in constexprs else "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="4096,14336,18944", help="comma-separated row widths")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction kept (k only changes a runtime argument)")
    parser.add_argument("--defaults-only", action="store_true", help="only each width's default launch")
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
            chosen = launch_config(block, silu)
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


if __name__ == "__main__":
    sys.exit(main())
