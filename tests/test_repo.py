"""The promises of README.md: .ci/run runs its test command verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [b.strip() for b in blocks if "pytest" in b]
    assert len(test_commands) == 1, "README.md must show exactly one test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in [line.strip() for line in ci]


def test_gpu_check_refuses_bad_arguments_and_machines_without_cuda():
    import subprocess

    import torch

    script = ["bash", str(ROOT / "scripts" / "gpu_check.sh")]
    for args in (["--full"], ["--full", "6"], ["--quick"]):
        run = subprocess.run(script + args, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "usage" in run.stderr, args
    if not torch.cuda.is_available():
        for args in ([], ["--full", "3"], ["--full", "5"]):
            run = subprocess.run(script + args, capture_output=True, text=True, timeout=120)
            assert run.returncode == 1 and "no CUDA device" in run.stderr, args
