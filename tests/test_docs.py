"""Every `engine ...` command in the README and docs/ is checked as a newcomer would type it.

Running each to completion would take a launch each (~20 s on 2 cores, 50 commands); instead each
goes as far as it can without starting a process, which is where everything a user can get wrong
is refused (engine/preflight.py):
- every command: its subcommand and options parse (a renamed or removed option fails here);
- `engine launch` on CPU with a real config: the whole CLI path through the launcher's preflight
  (config, data files, tokenizer and model, backend layout checks), the process start replaced by a
  stub; the run goes to a temporary output_dir (the docs' own may hold a finished run on a dev tree);
- `engine estimate`: run as written; `engine bench`: its backend specs and model names parsed;
- `engine eval --data PATH`: the data exists.
Not run further: commands on a placeholder (CONFIG, my.yaml, HEAD_IP), on GPUs, several nodes or a
Ray cluster, and those reading the run another command makes (generate, plot, export, eval of
runs/...). A hub name (gpt2) must fail at once with the offline line (tests run with
HF_HUB_OFFLINE=1), which is what the docs say it needs."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import REPO
from launch.cli import main

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
        REPO / "benchmarks" / "gpu" / "README.md"]
PLACEHOLDERS = ("CONFIG", "my.yaml", "HEAD_IP", "...", "valid.txt")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv after `engine`) of every `engine` line in a shell code block."""
    found = []
    for path in DOCS:
        block, text, start = None, "", 0
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                block = None if block is not None else line.strip()[3:]
                continue
            if block not in ("bash", "sh"):
                continue
            start = start or n
            text += line[:-1] + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            tokens = shlex.split(text, comments=True)
            if tokens and tokens[0] == "engine":
                found.append((f"{path.relative_to(REPO)}:{start}", tokens[1:]))
            text, start = "", 0
    return found


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    names = {argv[0] for _, argv in COMMANDS}
    assert len(COMMANDS) >= 40 and {"launch", "eval", "export", "generate", "plot", "bench", "estimate"} <= names


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_runs_as_far_as_it_can_here(where, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' relative paths (examples/, ../shared/data) are from the checkout
    command = main.get_command(None, argv[0])
    assert command is not None, f"{where}: no subcommand {argv[0]!r}"
    command.make_context(argv[0], list(argv[1:]))  # unknown options and bad values raise here

    placeholder = any(p in a for a in argv for p in PLACEHOLDERS)
    if any(a.startswith("runs/") and not Path(a).exists() for a in argv[1:2]):
        return  # reads a run another documented command makes (eval, export, generate, plot, estimate)
    elsewhere = (any(o in argv for o in ("--nnodes", "--address")) or _option(argv, "--launcher") == "ray"
                 or int(_option(argv, "--gpus") or 0) > 0)
    if argv[0] == "launch" and not placeholder and not elsewhere:
        _launch_up_to_the_processes(where, argv, tmp_path, monkeypatch)
    elif argv[0] == "estimate":
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, f"{where}: {result.output}"
    elif argv[0] == "bench":
        from benchmarks.runner import parse_backend
        from engine.flops import parse_model
        for spec in (_option(argv, "--backends") or "").split(","):
            parse_backend(spec)
        for model in (_option(argv, "--models") or "tiny").split(","):
            parse_model(model)
    elif argv[0] == "eval" and _option(argv, "--data") and not placeholder:
        assert Path(_option(argv, "--data")).exists(), f"{where}: --data {_option(argv, '--data')} does not exist"


def _launch_up_to_the_processes(where, argv, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr("launch.torchrun.launch", lambda cfg, **kw: started.append(cfg))
    result = CliRunner().invoke(main, [*argv, f"output_dir={tmp_path / 'run'}"])
    hub = next((a.split("=", 1)[1] for a in argv if a.startswith("model.name_or_path=")), None)
    from engine.hub import in_local_cache
    if hub and not Path(hub).exists() and not in_local_cache(hub):  # needs the network: refused at once, in one line
        assert result.exit_code == 2 and "is a hub name that is not in the local cache" in result.output, \
            f"{where}: {result.output}"
        return
    assert result.exit_code == 0 and len(started) == 1, f"{where}: {result.output}"
