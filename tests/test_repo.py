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
