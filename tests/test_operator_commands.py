"""Operator commands answer at once and name a missing path."""

import sys

import pytest

from tests.conftest import REPO, rank_env, run_command

HEAVY = ("torch", "megatron.core", "tokenizers")

OPERATOR_COMMANDS = {
    "ckpt verify": ["ckpt", "verify", "/nonexistent/step_000000010"],
    "ckpt ls": ["ckpt", "ls", "/nonexistent/run"],
    "ckpt inspect": ["ckpt", "inspect", "/nonexistent/step_000000010"],
    "snapshot status": ["snapshot", "--job", "j", "--daemons", "127.0.0.1:1", "--token-file", "/nonexistent", "status"],
}


@pytest.mark.parametrize("name", OPERATOR_COMMANDS)
def test_operator_commands_import_neither_torch_nor_megatron(name):
    """Importing megatron-core alone takes seconds; a command that reads files or asks a daemon
    must not pay for it (the CLI once imported the data pipeline for its error class)."""
    code = (
        "import sys\nfrom launcher.cli import main\n"
        f"main({OPERATOR_COMMANDS[name]!r})\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = run_command([sys.executable, "-c", code], 60, env=rank_env(1), cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ckpt", "verify", "/nonexistent/step_000000010"],
            "/nonexistent/step_000000010: no such checkpoint directory",
        ),
        (["ckpt", "inspect", "/nonexistent/step_000000010"], "no such checkpoint directory"),
        (["ckpt", "ls", "/nonexistent/run"], "/nonexistent/run: no such run or checkpoints directory"),
    ],
)
def test_a_missing_path_is_named_as_missing(args, message):
    result = run_command([sys.executable, "-m", "launcher.cli", *args], 60, env=rank_env(1), cwd=REPO)
    assert result.returncode in (1, 2)
    assert message in result.stdout + result.stderr
    assert "did not finish" not in result.stdout + result.stderr
