#!/usr/bin/env python3
"""The Slurm executor on a real cluster (CI starts one with scripts/slurm_local.sh): two one-cell matrices,
each run uninterrupted with ``--executor local`` and then through ``--executor slurm --wait`` while it is
preempted -- one task requeued with ``scontrol requeue`` in the middle of its training, the other given a
``--slurm-time`` shorter than its cell -- and the metrics of every Slurm result checked equal to the local
one. Prints, per preemption, the seconds lost beyond Slurm's own requeue delay (training redone since the
last epoch checkpoint + the restarted task's way back to training) and fails when the results differ or
when a preemption costs more than ``--max-lost`` seconds. Exit 3 when no Slurm controller answers.

    eval "$(scripts/slurm_local.sh up)" && python3 scripts/slurm_check.py --json slurm-check.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MATRIX = """name: preempt-{case}
datasets: [{{name: synthetic, n: 2000, num_classes: 4, image_size: 32}}]
backbones: [test_resnet]
methods: [{{name: pteenet, hparams: {{epochs: {epochs}, n_exits: 2, placement: linear, lam: {lam}}}}}]
seeds: [0]
backbone_training: {{epochs: 2}}
evaluation: {{threads: 1, grid_size: 20}}
risk_control: false
"""


def exitbench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "exitbench", *args], **kw)


def outcome(out: Path) -> dict:
    """The cell's metrics: exit accuracies and operating points (no timings)."""
    (cell,) = sorted((out / "cells").glob("*.json"))
    r = json.loads(cell.read_text())
    return {"status": r["status"], "exits": [e["test_accuracy"] for e in r["exits"]],
            "points": [(o["kind"], o.get("thresholds"), o.get("test")) for o in r["operating_points"]]}


def log_times(out: Path) -> dict:
    """The timestamps the task's log carries (one task): its starts, checkpoint signals, resumptions."""
    (log,) = sorted((out / "slurm").glob("*/*_0_log.out"))
    text = log.read_text(errors="replace")
    starts = [float(t) for t in re.findall(r"task \S+ started at ([\d.]+)", text)]
    signals = [float(t) for t in re.findall(r"checkpoint signal at ([\d.]+)", text)]
    resumed = [(float(a), float(b)) for a, b in re.findall(r"resumed training at epoch \d+ at ([\d.]+) from a "
                                                           r"checkpoint saved at ([\d.]+)", text)]
    return {"log": str(log), "starts": starts, "signals": signals, "resumed": resumed}


def preemptions(times: dict, ended: list[float]) -> list[dict]:
    """Per preemption: the training redone (from the checkpoint to the end of the life), Slurm's delay
    (the end of a life to the start of the next) and the restart (that start to training again)."""
    rows = []
    for end, start, (back, saved) in zip(ended, times["starts"][1:], times["resumed"]):
        rows.append({"redone_s": round(max(0.0, end - saved), 1), "slurm_delay_s": round(start - end, 1),
                     "restart_s": round(back - start, 1), "lost_s": round(max(0.0, end - saved) + back - start, 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--max-lost", type=float, default=30.0, help="seconds a preemption may cost beyond Slurm's delay")
    ap.add_argument("--epochs", type=int, default=16, help="the requeued cell's training epochs (about 4 s each on "
                    "one core)")
    # longer than --slurm-time 2 minutes even on an idle machine, so that Slurm's signal always comes first
    ap.add_argument("--timeout-epochs", type=int, default=32, help="the timed-out cell's training epochs")
    ap.add_argument("--dir", default=".", help="where to work: a folder the nodes can write (kept when it fails)")
    args = ap.parse_args()
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        print("slurm_check: no Slurm controller answers; start one with scripts/slurm_local.sh up", file=sys.stderr)
        return 3
    root = Path(tempfile.mkdtemp(prefix="exitbench-slurm-check-", dir=args.dir))  # shared with the nodes
    cache = root / "cache"
    for case, lam, epochs in (("requeue", 0.5, args.epochs), ("timeout", 1.0, args.timeout_epochs)):
        (root / f"{case}.yaml").write_text(MATRIX.format(case=case, epochs=epochs, lam=lam))
    common = ["--cache", str(cache), "--no-latency", "--quiet"]
    t0 = time.time()
    refs = [exitbench("run", str(root / f"{c}.yaml"), "--out", str(root / f"local-{c}"), *common)
            for c in ("requeue", "timeout")]
    if any(p.wait() for p in refs):
        print("slurm_check: the local reference runs failed", file=sys.stderr)
        return 1
    local_s = time.time() - t0
    t0 = time.time()
    runs = {"requeue": exitbench("run", str(root / "requeue.yaml"), "--out", str(root / "slurm-requeue"), *common,
                                 "--executor", "slurm", "--slurm-time", "30", "--wait"),
            "timeout": exitbench("run", str(root / "timeout.yaml"), "--out", str(root / "slurm-timeout"), *common,
                                 "--executor", "slurm", "--slurm-time", "2", "--wait")}
    # requeue the first task once its training has checkpointed a few epochs
    partial = root / "slurm-requeue" / "partial"
    while not any(partial.glob("*/fit-0.pt")) and runs["requeue"].poll() is None:
        time.sleep(0.5)
    time.sleep(12)
    (task,) = [p.name for p in (root / "slurm-requeue" / "slurm").iterdir() if p.name[0].isdigit()]
    requeued_at = time.time()
    subprocess.run(["scontrol", "requeue", task], check=True)
    print(f"slurm_check: requeued {task} at {requeued_at:.1f}", flush=True)
    codes = {case: p.wait() for case, p in runs.items()}
    slurm_s = time.time() - t0
    report: dict = {"local_reference_s": round(local_s, 1), "slurm_runs_s": round(slurm_s, 1), "cases": {}}
    ok = True
    for case in ("requeue", "timeout"):
        times = log_times(root / f"slurm-{case}")
        ended = [requeued_at] if case == "requeue" else times["signals"]
        rows = preemptions(times, ended)
        same = codes[case] == 0 and outcome(root / f"slurm-{case}") == outcome(root / f"local-{case}")
        report["cases"][case] = {"preemptions": rows, "same_metrics_as_local": same, "exit_code": codes[case],
                                 "log": times["log"]}
        print(f"slurm_check: {case}: {len(rows)} preemption(s) {rows}; metrics equal to the local run: {same}")
        if not rows:
            print(f"slurm_check: {case}: the cell finished before it was preempted; give it more epochs "
                  f"(--epochs / --timeout-epochs)", file=sys.stderr)
        ok &= same and bool(rows) and all(r["lost_s"] <= args.max_lost for r in rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"slurm_check: {'passed' if ok else 'FAILED'} (local references {local_s:.0f} s, Slurm runs {slurm_s:.0f} s)")
    if ok:
        shutil.rmtree(root)
    else:
        print(f"slurm_check: its runs and logs are kept in {root}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
