"""Where one decode step's time goes: onnxruntime's profiler over the runtime's own step.

    python -m studies.step_profile OUT [OUT ...] [--contexts 128,2000] [--threads 2]

Per export and context: the kernels one step runs after onnxruntime's graph optimizations and
their time by op type (the profiler's per-kernel times; their sum is below the step's wall time,
which also pays the executor between kernels). Run on a quiet machine, one job at a time.
"""

from __future__ import annotations

import argparse

from moe_onnx.runtime.profile import profile_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+")
    parser.add_argument("--contexts", default="128,2000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="decode steps; the last one is reported")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    for out in args.outs:
        for context in (int(c) for c in args.contexts.split(",")):
            profile = profile_step(out, context, args.threads, args.steps)
            total = sum(us for _, _, us in profile.kernels)
            print(f"{out} @ context {context}: {profile.nodes} kernels, {total / 1e3:.3f} ms of kernel time")
            for op, n, us in profile.by_op()[: args.top]:
                print(f"  {op:28s} {n:4d} kernels {us / 1e3:8.3f} ms {us / total:6.1%}")


if __name__ == "__main__":
    main()
