"""The README's Python blocks run unchanged, in order (the Example first, alone), and its
Quickstart matches what CI runs."""

import re
from pathlib import Path

import jax
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    quickstart = text.split("## Quickstart", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    assert "experiments/digits.py" in commands[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


@pytest.mark.standard_promotion
def test_every_python_block_runs_in_order(tmp_path, monkeypatch, capsys):
    """Blocks fenced ```python are runnable and run here; signature listings use ```py."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 6
    namespace = {"__name__": "__readme__"}
    # the first block is the Example, which runs alone in a fresh namespace
    assert blocks[0] == _python_block_after("## Example")
    with jax.numpy_rank_promotion("allow"):  # user code, run in JAX's default config
        for number, code in enumerate(blocks):
            exec(compile(code, f"README python block {number}", "exec"), namespace)
            if number == 0:
                example = capsys.readouterr().out
    assert "layer 0 (dense(32))" in example  # the check_grads table
    assert re.search(r"z_6: shape \(16, 3\)", example)  # L = 5 layers: z_1..z_6
    assert "|q_1|" in example
    out = capsys.readouterr().out
    assert "(40, 4) (10, 4)" in out          # the .npz snippet
    assert "[2, 3]" in out                   # the resumed fit ran epochs 2 and 3
    assert "eval_accuracy" in out
    assert "order: (J[" in out              # the bottleneck plan multiplies two segments
    assert namespace["J"].shape == (100, 100)
