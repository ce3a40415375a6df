"""Peak memory of one worker handling one large plain JSON request, step by step.

    python benchmarks/worker_memory.py [--size large]

Each step the service sends to the pool runs in a fresh process (as a worker that has imported
its libraries); the table gives that process's peak RSS and peak address space (what
DEPLOYFLAG_WORKER_MEMORY_LIMIT limits), before and after the step, in MB.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _vm_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(step: str, path: str) -> None:
    """In this process: import as a worker does, then run ``step`` on the body at ``path``."""
    from deployflag import worker

    worker.cap_threads()
    import deployflag.pipeline.model  # noqa: F401
    from deployflag.settings import load_settings

    settings = load_settings()
    body = Path(path).read_bytes()
    task, config = settings.training_task_name, settings.pipeline_config()
    idle = (_rss_peak_mb(), _vm_peak_mb())
    job = worker.Job(body, {}, "memory-1", "application/json")
    if step == "identify":
        worker.identify(job, task)
    elif step == "process-presumed":  # the one trip of a large plain JSON body
        envelope = worker.presume_json(job)
        worker.process(
            worker.Job(body, {}, "memory-1", "application/json", envelope, True), task, config
        )
    else:  # "process": no envelope known, the worker decodes it first
        worker.process(job, task, config)
    print(f"{idle[0]:.0f} {idle[1]:.0f} {_rss_peak_mb():.0f} {_vm_peak_mb():.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.body)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        subprocess.run(
            [sys.executable, "-m", "deployflag.synthetic", "--size", args.size, "-o", str(body)],
            check=True,
        )
        size_mb = body.stat().st_size / 1e6
        print(f"body: {size_mb:.1f} MB ({args.size})")
        print("| step | RSS idle | RSS peak | VM idle | VM peak | VM growth / body |")
        print("|---|---:|---:|---:|---:|---:|")
        for step in ("identify", "process", "process-presumed"):
            done = subprocess.run(
                [sys.executable, __file__, "--step", step, "--body", str(body)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rss0, vm0, rss1, vm1 = (float(x) for x in done.stdout.split()[-4:])
            growth = (vm1 - vm0) / size_mb
            print(f"| {step} | {rss0:.0f} | {rss1:.0f} | {vm0:.0f} | {vm1:.0f} | {growth:.1f} x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
