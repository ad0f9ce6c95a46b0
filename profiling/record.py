"""Recorded runs: ``python -m profiling.bench --record`` keeps a run in the repository, in
``benchmarks/results/<UTC date>-<device slug>-<suite>/``: results.csv (profiling/report.py's
schema), summary.md, the plots, and meta.json (what ran, on what, from which commit). README's
Performance section is generated from these records (profiling/publish.py).

A copy of the repository without ``.git`` (what a lent GPU machine runs) records ``git_commit:
"unknown"``, ``git_dirty: null`` and ``source_manifest``: git's blob hash of every source file.
Back in the checkout, ``python -m profiling.record --adopt SRC`` files such a run under
benchmarks/results/ and resolves its commit from the manifest (the recent commit whose sources
match; the nearest one, with the differing paths, where none does).
"""
import argparse
import csv
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CSV_NAME, SUMMARY_NAME, META_NAME, PLOT_STEM = "results.csv", "summary.md", "meta.json", "plot"
# The sources a manifest lists: what git tracks under these folders and these root files, by suffix.
MANIFEST_DIRS = ("rnn", "kernels", "profiling", "scripts", "tests", ".ci")
MANIFEST_FILES = ("pyproject.toml", "README.md", ".ci/run")
MANIFEST_SUFFIXES = (".py", ".sh", ".toml", ".md")
COMMITS_SEARCHED = 200  # how far back --adopt looks for the commit a manifest came from


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


def _ignore_patterns(root: Path) -> list[str]:
    """.gitignore's patterns (negations left out: none applies to the sources a manifest lists)."""
    try:
        lines = (root / ".gitignore").read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]


def _ignored(path: str, patterns: list[str], folder: bool = False) -> bool:
    """Whether .gitignore's patterns ignore ``path`` (posix, relative to the root; ``folder``: a
    folder's): a pattern with no inner slash matches any component (a trailing slash: folders
    only), one with a slash matches from the root."""
    parts = path.split("/")
    for pattern in patterns:
        folders_only = pattern.endswith("/")
        body = pattern.strip("/")
        names = parts[:-1] if folders_only and not folder else parts
        if "/" in body or pattern.startswith("/"):
            if any(fnmatch.fnmatchcase("/".join(parts[:i + 1]), body) for i in range(len(names))):
                return True
        elif any(fnmatch.fnmatchcase(name, body) for name in names):
            return True
    return False


def in_manifest(path: str, patterns: list[str]) -> bool:
    """Whether a manifest lists ``path`` (posix, relative to the repository root)."""
    if path not in MANIFEST_FILES and not (path.split("/")[0] in MANIFEST_DIRS and path.endswith(MANIFEST_SUFFIXES)):
        return False
    return not _ignored(path, patterns)


def blob_sha(data: bytes) -> str:
    """git's object id of a file's content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def source_manifest(root: Path | None = None) -> dict[str, str]:
    """{path: git blob sha} of the project's sources in the folder ``root`` (default: this
    repository), git or not."""
    root = Path(root or ROOT)
    patterns, manifest = _ignore_patterns(root), {}
    for top in MANIFEST_DIRS:
        for folder, dirs, files in os.walk(root / top):
            rel = Path(folder).relative_to(root).as_posix()
            dirs[:] = sorted(d for d in dirs if not _ignored(f"{rel}/{d}", patterns, folder=True))
            for name in files:
                path = f"{rel}/{name}"
                if in_manifest(path, patterns) and not os.path.islink(root / path):
                    manifest[path] = blob_sha((root / path).read_bytes())
    for path in MANIFEST_FILES:
        if "/" not in path and (root / path).is_file():
            manifest[path] = blob_sha((root / path).read_bytes())
    return dict(sorted(manifest.items()))


def commit_manifest(commit: str) -> dict[str, str]:
    """The manifest of a commit of this checkout, from its tree."""
    patterns, manifest = _ignore_patterns(ROOT), {}
    for entry in _git("ls-tree", "-r", "-z", "--full-tree", commit).split("\0"):
        if "\t" in entry:
            info, path = entry.split("\t", 1)
            mode, kind, sha = info.split()
            if kind == "blob" and mode != "120000" and in_manifest(path, patterns):
                manifest[path] = sha
    return manifest


def differing_paths(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(path for path in a.keys() | b.keys() if a.get(path) != b.get(path))


def resolve_commit(manifest: dict[str, str], depth: int = COMMITS_SEARCHED) -> tuple[str, list[str]]:
    """(commit, differing paths): among HEAD's last ``depth`` commits, the newest whose manifest
    equals ``manifest``, else the newest of those with the fewest differing paths; ('', []) where
    there is no history or no commit shares a single file with it."""
    best = ("", [])
    for commit in _git("rev-list", f"--max-count={depth}", "HEAD").split():
        tree = commit_manifest(commit)
        diff = differing_paths(manifest, tree)
        if not diff:
            return commit, []
        shares = len(diff) < len(manifest.keys() | tree.keys())
        if shares and (not best[0] or len(diff) < len(best[1])):
            best = (commit, diff)
    return best


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
    profiling.bench's results.csv; ``autotune``: scripts.autotune's sweep). A copy without
    ``.git`` has no commit to name: its ``source_manifest`` lets --adopt find it."""
    in_git = (ROOT / ".git").exists() and bool(_git("rev-parse", "HEAD"))
    gpu = meta["device"] != "cpu"
    info = dict(meta, gpu=gpu, driver=_driver() if gpu else "", cuda_version=torch.version.cuda or "",
                python_version=sys.version.split()[0],
                git_dirty=bool(_git("status", "--porcelain")) if in_git else None,
                command=f"python -m {program} " + " ".join(argv), kind=kind)
    if not in_git:
        info.update(git_commit="unknown", source_manifest=source_manifest())
    return info


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


def _rewrite_commit(csv_path: Path, commit: str) -> bool:
    """Puts ``commit`` in the git_commit column of a CSV; False where the CSV has no such column.
    Every other field is written back as it was read."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "git_commit" not in rows[0]:
        return False
    column = rows[0].index("git_commit")
    for row in rows[1:]:
        if len(row) > column:
            row[column] = commit
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return True


def adopt_all(src: Path, results: Path = RESULTS) -> list[Path]:
    """``adopt`` the run in ``src`` and every run in a subfolder of it that has a meta.json of its
    own (scripts/gpu_check.sh returns its evidence with the benchmark run it recorded inside)."""
    src = Path(src)
    nested = [item for item in sorted(src.iterdir()) if item.is_dir() and (item / META_NAME).is_file()]
    made = [adopt(src, results)] if (src / META_NAME).is_file() else []
    made += [adopt(item, results) for item in nested]
    if not made:
        raise FileNotFoundError(f"{src} holds no {META_NAME}, nor does any folder in it")
    return made


def adopt(src: Path, results: Path = RESULTS) -> Path:
    """Files a run recorded elsewhere (a folder with its meta.json) under ``results``: copies its
    files (and those of its subfolders, one level, but for runs of their own: adopt_all), resolves
    its commit from its source manifest where it names none, and draws the plots where results.csv
    came back without them."""
    src = Path(src)
    meta = json.loads((src / META_NAME).read_text())
    same = ("timestamp", "device", "suite", "kind")
    for run in runs(results):
        if all(run.get(key) == meta.get(key) for key in same):
            raise FileExistsError(f"{src} is already on record as {run['path']}")
    out = run_dir(meta, results)
    for item in sorted(src.iterdir()):
        if item.is_file():
            shutil.copy2(item, out / item.name)
        elif item.is_dir() and not (item / META_NAME).is_file():
            (out / item.name).mkdir()
            for sub in sorted(item.iterdir()):
                if sub.is_file():
                    shutil.copy2(sub, out / item.name / sub.name)
    manifest = meta.get("source_manifest")
    if manifest and meta.get("git_commit", "unknown") == "unknown":
        commit, dirty = resolve_commit(manifest)
        if commit:
            meta.update(git_commit=commit, git_dirty=bool(dirty), dirty_paths=dirty,
                        git_commit_from="source_manifest")
            write_meta(out, meta)
            for path in sorted(out.rglob("*.csv")):
                _rewrite_commit(path, commit)
            print(f"commit {commit} ({'sources differ: ' + ', '.join(dirty) if dirty else 'sources identical'})")
        else:
            print(f"no commit among HEAD's last {COMMITS_SEARCHED} shares a source file with the run: "
                  f"git_commit stays unknown")
    elif meta.get("git_commit", "unknown") == "unknown":
        print("meta.json names no commit and has no source manifest: git_commit stays unknown")
    if (out / CSV_NAME).exists() and not any(out.glob(f"{PLOT_STEM}-*.png")):
        import pandas as pd

        from profiling import report
        from profiling.impls import BASELINE
        baseline = BASELINE["cuda" if meta.get("gpu") else "cpu"]
        pngs = report.plots(pd.read_csv(out / CSV_NAME), out, PLOT_STEM, baseline)
        print(f"{len(pngs)} plots drawn" if pngs else "no plots: matplotlib missing or one batch size")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.record",
                                description="File a run recorded on another machine under benchmarks/results/.")
    p.add_argument("--adopt", metavar="SRC", required=True,
                   help="the run's folder as it came back (meta.json, results.csv, summary.md, ...); runs in its "
                        "subfolders (with a meta.json of their own) are filed too, each on its own")
    p.add_argument("--results", default=str(RESULTS), help="where runs are kept (default: benchmarks/results/)")
    args = p.parse_args(argv)
    try:
        made = adopt_all(Path(args.adopt), Path(args.results))
    except (OSError, ValueError) as exc:
        print(f"not adopted: {exc}", file=sys.stderr)
        return 1
    for out in made:
        print(f"recorded in {out}")
    print("commit them, then `python -m profiling.publish` updates README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
