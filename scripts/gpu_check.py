#!/usr/bin/env python3
"""The GPU check in one command, for a GPU machine borrowed for minutes with no package index.

    python3 scripts/gpu_check.py [--out DIR] [--wheelhouse dist/wheelhouse] [--no-install]

Run from a checkout (or a copy of one). It (1) installs exitbench and the pure-Python dependencies such a
machine lacks (ptflops, submitit, cloudpickle) offline from a wheelhouse built beforehand on a machine with
an index (``scripts/build_wheelhouse.sh``), into ``DIR/site`` with ``--no-deps`` so that pip never touches
torch; (2) prints the environment (GPU, driver, CUDA, torch and every dependency) and which of
``pyproject.toml``'s floors it meets or misses; then, each step capped in time, (3) the tests marked ``gpu``,
(4) the GPU benchmarks (``tests/perf``, marked ``gpu``: compaction against the per-stage ideal, the CUDA-graph
fast path against compaction and against the graphed backbone, the training epoch against a minimal
GPU-resident loop), (5) ``exitbench doctor --device cuda`` and (6) ``exitbench plan paper --rate measured``.
Everything lands in DIR: ``summary.json`` and ``summary.md`` (each step's status, seconds and the lines
that matter), each step's full log, the benchmarks' JSON and the doctor's results. The caps add up to 7.5
minutes. Without CUDA (or without the wheels) it stops at once with one line saying what is missing and
exit code 2, having written what it found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("ptflops", "submitit", "cloudpickle")  # what the GPU image lacks (the rest is preinstalled)
STEPS = (  # name, arguments after `python3 -m`, cap in seconds
    ("gpu tests", ["pytest", "-m", "gpu", "-rA", "-q", "-p", "no:cacheprovider", "--junitxml", "{out}/gpu_tests.xml"],
     90),
    ("gpu benchmarks", ["pytest", "tests/perf", "-m", "gpu", "-o", "python_files=bench_*.py", "--benchmark-enable",
                        "--benchmark-only", "-s", "-q", "-p", "no:cacheprovider", "--benchmark-json",
                        "{out}/benchmarks.json", "--benchmark-columns=median,iqr,rounds"], 120),
    ("doctor", ["exitbench", "doctor", "--device", "cuda", "--out", "{out}/doctor", "--cache", "{out}/cache",
                "--quiet"], 150),
    ("plan", ["exitbench", "plan", "paper", "--rate", "measured", "--device", "cuda", "--cache", "{out}/cache"], 45),
)
INSTALL_CAP, ENV_CAP = 30, 15


class Missing(Exception):
    """What the machine lacks for the check; one line."""


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def floors() -> list[dict]:
    """Each dependency of pyproject.toml with its floor, the installed version and whether it meets it."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    out = []
    for name, floor in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', block.group(1) if block else ""):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        out.append({"package": name, "floor": floor, "installed": have,
                    "meets": have is not None and _version_tuple(have) >= _version_tuple(floor)})
    return out


def install(wheelhouse: Path, target: Path) -> str:
    """The wheels into ``target`` (``pip --no-index --no-deps``), and ``target`` onto this process's path."""
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    if not wheelhouse.is_dir():
        raise Missing(f"no wheelhouse at {wheelhouse}: build it on a machine with a package index with "
                      "scripts/build_wheelhouse.sh and carry it along (or pass --no-install where "
                      f"{', '.join(NEEDED)} are installed)")
    if not any(w.name.startswith("exitbench-") for w in wheels):
        raise Missing(f"no exitbench wheel in {wheelhouse} ({len(wheels)} wheels there): rebuild it with "
                      "scripts/build_wheelhouse.sh")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                           "--target", str(target), *map(str, wheels)], capture_output=True, text=True,
                          timeout=INSTALL_CAP)
    if proc.returncode != 0:
        raise Missing(f"pip could not install the wheels of {wheelhouse}: {_last_line(proc.stderr)}")
    _use(target)
    return f"{len(wheels)} wheels into {target}"


def _use(target: Path) -> None:
    sys.path.insert(1, str(target))  # after the checkout: the same exitbench files either way
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(target), os.environ.get("PYTHONPATH", "")])
    os.environ["PATH"] = os.pathsep.join([str(target / "bin"), os.environ.get("PATH", "")])


def environment() -> dict:
    """The machine: Python, torch and its CUDA, the GPU, the driver, and every dependency against its floor."""
    env: dict = {"python": sys.version.split()[0], "floors": floors()}
    missing = [n for n in NEEDED if _absent(n)]
    if missing:
        raise Missing(f"{', '.join(missing)} not importable: install the wheelhouse (drop --no-install) or "
                      "`pip install` them", env)
    import torch

    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if not torch.cuda.is_available():
        built = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise Missing(f"no CUDA device: this machine has {built} (torch {torch.__version__}); run the check on "
                      "the GPU machine", env)
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), memory_gib=props.total_memory / 2**30,
               capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=ENV_CAP)
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    from exitbench.benchmarks.fast import triton_missing

    env["torch_compile"] = triton_missing() or "available"
    return env


def _absent(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is None


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


KEEP = re.compile(r"passed|failed|skipped|error|harness / minimal|efficiency|speed-up|fast /|exitbench doctor|"
                  r"cells ok|total:|estimate|Traceback|Error", re.I)


def run_step(name: str, args: list[str], cap: int, out: Path) -> dict:
    """One capped step; its whole output in ``out/<name>.log`` and the lines that matter in the summary."""
    args = [a.replace("{out}", str(out)) for a in args]
    began = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=cap)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (
            e.stdout or "")
    (out / f"{name.replace(' ', '_')}.log").write_text(text)
    seconds = time.perf_counter() - began
    lines = [x for x in text.splitlines() if KEEP.search(x)][-25:]
    print(f"[gpu_check] {name}: {'ok' if rc == 0 else rc} in {seconds:.0f} s (cap {cap} s)", flush=True)
    for line in lines:
        print(f"    {line}")
    return {"step": name, "command": "python3 -m " + " ".join(args), "returncode": rc, "seconds": round(seconds, 1),
            "cap_s": cap, "lines": lines}


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    md = [f"# exitbench GPU check ({summary['started']})", "", f"Result: **{summary['result']}**", ""]
    env = summary.get("environment") or {}
    md += [f"- {k}: {v}" for k, v in env.items() if k != "floors"]
    if env.get("floors"):
        md += ["", "| package | floor | installed | meets |", "| :--- | ---: | ---: | :--- |"]
        md += [f"| {f['package']} | {f['floor']} | {f['installed'] or 'absent'} | {'yes' if f['meets'] else 'NO'} |"
               for f in env["floors"]]
    for s in summary.get("steps", []):
        md += ["", f"## {s['step']}: {'ok' if s['returncode'] == 0 else s['returncode']} in {s['seconds']} s "
               f"(cap {s['cap_s']} s)", "", f"`{s['command']}`", "", "```", *s["lines"], "```"]
    (out / "summary.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_out", help="where everything is written (default: gpu_check_out)")
    p.add_argument("--wheelhouse", default=str(ROOT / "dist" / "wheelhouse"))
    p.add_argument("--no-install", action="store_true", help="exitbench's dependencies are installed already")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the checkout's exitbench (run as a script, sys.path[0] is scripts/)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": []}
    began = time.perf_counter()
    try:
        summary["install"] = "skipped (--no-install)" if args.no_install else install(Path(args.wheelhouse),
                                                                                       out / "site")
        summary["environment"] = environment()
    except Missing as e:
        if len(e.args) > 1:
            summary["environment"] = e.args[1]
        summary["result"] = f"not run: {e.args[0]}"
        write_summary(out, summary)
        print(f"gpu_check: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"[gpu_check] {json.dumps({k: v for k, v in summary['environment'].items() if k != 'floors'})}")
    for f in summary["environment"]["floors"]:
        print(f"[gpu_check]   {f['package']:<12} floor {f['floor']:<8} installed {f['installed'] or 'absent':<14} "
              f"{'ok' if f['meets'] else 'BELOW THE FLOOR'}")
    os.environ.setdefault("EXITBENCH_CACHE", str(out / "cache"))
    for name, step_args, cap in STEPS:
        summary["steps"].append(run_step(name, step_args, cap, out))
        write_summary(out, {**summary, "result": "running"})
    failed = [s["step"] for s in summary["steps"] if s["returncode"] != 0]
    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["result"] = f"failed: {', '.join(failed)}" if failed else "passed"
    write_summary(out, summary)
    print(f"[gpu_check] {summary['result']} in {summary['seconds']:.0f} s; {out}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
