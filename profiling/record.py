"""Recorded runs: ``python -m profiling.bench --record`` keeps a run in the repository, in
``benchmarks/results/<UTC date>-<device slug>-<suite>/``: results.csv (profiling/report.py's
schema), summary.md, the plots, and meta.json (what ran, on what, from which commit). README's
Performance section is generated from these records (profiling/publish.py).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CSV_NAME, SUMMARY_NAME, META_NAME, PLOT_STEM = "results.csv", "summary.md", "meta.json", "plot"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_dir(meta: dict, root: Path = RESULTS) -> Path:
    """A new folder for this run: <date>-<device>-<suite>, with the UTC time added when a run of the
    same suite on the same device already has that day's folder."""
    stamp = meta["timestamp"]  # ISO 8601 UTC
    base = f"{stamp[:10]}-{slug(meta['device'])}-{meta['suite']}"
    path = root / base
    if path.exists():
        path = root / f"{base}-{stamp[11:19].replace(':', '')}"
    n = 2
    while path.exists():
        path, n = root / f"{base}-{stamp[11:19].replace(':', '')}-{n}", n + 1
    path.mkdir(parents=True)
    return path


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _driver() -> str:
    """The NVIDIA driver's version, or '' where nvidia-smi is missing (a CPU machine)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def provenance(meta: dict, argv: list[str], program: str = "profiling.bench", kind: str = "bench") -> dict:
    """meta.json: the CSV's run metadata plus the driver, CUDA, Python, whether the checkout had
    uncommitted changes when the run started, the command line and the kind of run (``bench``:
    profiling.bench's results.csv; ``autotune``: scripts.autotune's sweep)."""
    in_git = bool(_git("rev-parse", "HEAD"))
    gpu = meta["device"] != "cpu"
    return dict(meta, gpu=gpu, driver=_driver() if gpu else "", cuda_version=torch.version.cuda or "",
                python_version=sys.version.split()[0],
                git_dirty=bool(_git("status", "--porcelain")) if in_git else None,
                command=f"python -m {program} " + " ".join(argv), kind=kind)


def write_meta(path: Path, info: dict):
    (path / META_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def runs(root: Path = RESULTS) -> list[dict]:
    """Every recorded run under root: its meta.json plus ``path``, oldest first."""
    found = []
    for meta_path in sorted(Path(root).glob(f"*/{META_NAME}")):
        info = json.loads(meta_path.read_text())
        info["path"] = meta_path.parent
        found.append(info)
    return sorted(found, key=lambda info: (info["timestamp"], str(info["path"])))
