"""Plot training (and eval) loss of several runs of pretrain_from_scratch.py on one chart.

    python examples/plot_loss_curves.py runs/dense runs/qsparse runs/qsparse-1.58 --output docs/from_scratch_loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output directories holding log_history.json")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--title", default="From scratch: dense vs Q-Sparse (same tokens)")
    args = parser.parse_args(argv)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in args.runs:
        record = json.loads((Path(run) / "log_history.json").read_text())
        train = [(e["step"], e["loss"]) for e in record["log_history"] if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in record["log_history"] if "eval_loss" in e]
        if not train:
            raise SystemExit(f"{run}: log_history.json has no training loss entries")
        line, = ax.plot(*zip(*train), label=f"{record['variant']} (final train {train[-1][1]:.3f})")
        if evals:
            ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{record['variant']} eval {evals[-1][1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
