"""The example scripts run as documented (each asserts its own outcome)."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run(script):
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_server_kernel_example_groups_clients():
    assert "weight mass inside own group" in _run("server_kernel.py").stdout


def test_hundred_clients_learn_and_group_by_label_map():
    result = _run("hundred_clients.py")
    assert "100 clients, 5 rounds" in result.stdout
    lines = [l for l in result.stdout.splitlines() if l.startswith("round")]
    final_accuracy = float(lines[-1].split("train accuracy ")[1].split(",")[0])
    in_group = float(lines[-1].split("own group ")[1])
    assert final_accuracy > 0.9 and in_group > 0.8
