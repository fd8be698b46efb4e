"""The README and docs/ stay true: every `ddptrain ...` command they show parses with the real command line (no
unknown option, no bad value), every link to a file of the checkout points at one, and the README's walkthrough
runs as written, and again."""

from __future__ import annotations

import re
import shlex
import sys

import pytest
import typer
from conftest import ROOT, clean_env, run_command

try:  # later Typers carry their own copy of click (click itself may be installed too, for other packages)
    from typer._click import exceptions as click_errors
except ImportError:  # Typer before 0.20 runs on click
    from click import exceptions as click_errors

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(text: str) -> list[str]:
    """Each command line in a ```bash block and each inline `code` span that runs ddptrain."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line for line in block.splitlines() if "ddptrain" in line]
    lines += re.findall(r"`([^`\n]*\bddptrain [a-z][^`\n]*)`", text)
    commands = []
    for line in lines:
        for piece in re.split(r"&&|\|\||;|\s#\s", line):
            piece = piece.strip()
            if re.match(r"(ddptrain|torchrun .*-m ddptrain|python -m ddptrain) ", piece):
                commands.append(piece)
    return commands


def ddptrain_args(command: str) -> list[str]:
    """The arguments after `ddptrain`: optional parts ([--json]) taken as given, the first of alternatives
    (onnx|safetensors), placeholders (...) left out."""
    command = command.replace("\\|", "|").replace("[", " ").replace("]", " ")
    words = shlex.split(command)
    words = words[words.index("ddptrain") + 1:] if "ddptrain" in words else words[words.index("-m") + 2:]
    return [word.split("|")[0] if word.startswith("-") or "|" in word else word for word in words if word != "..."]


def with_sample_numbers(command, args: list[str]) -> list[str]:
    """A placeholder (N, SECONDS) after an option that takes a number becomes a number."""
    def kind(param) -> str:  # click's type name, or (Typer with its own click) the annotation's
        return getattr(getattr(param, "type", None), "name", None) or str(param.bare_type())

    kinds = {opt: kind(param) for param in command.params for opt in param.opts}
    out = list(args)
    for i in range(1, len(out)):
        if re.fullmatch(r"[A-Z][A-Z_]*", out[i]) and re.search(r"int|float", kinds.get(out[i - 1], "")):
            out[i] = "2"
    return out


def test_every_command_in_the_docs_parses():
    from ddptrain.cli import app, with_optional_values

    root = typer.main.get_command(app)
    seen = 0
    for doc in DOCS:
        for command in shown_commands(doc.read_text()):
            args = ddptrain_args(command)
            if not args or args[0] in ("-h", "--help"):
                continue
            name, rest = args[0], with_optional_values(args[1:])
            assert name in root.commands, f"{doc.name}: `{command}`: no command {name!r}"
            if "-h" in rest or "--help" in rest:
                continue
            try:
                root.commands[name].make_context(name, with_sample_numbers(root.commands[name], rest))
            except click_errors.MissingParameter:  # a snippet may leave out what the text around it gives
                pass
            except click_errors.UsageError as exc:
                pytest.fail(f"{doc.name}: `{command}`: {exc.format_message()}")
            seen += 1
    assert seen >= 30  # the check reads what the docs show


def test_every_link_to_the_checkout_exists():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


SERVE = ROOT / "ddptrain" / "serve_onnx.py"  # what `export --server` writes out


def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A walkthrough on a real table"):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written_and_again(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    steps = walkthrough()
    assert [shlex.split(s)[:2] for s in steps][:5] == [["ddptrain", "describe"], ["ddptrain", "fit"],
                                                       ["ddptrain", "eval"], ["ddptrain", "predict"],
                                                       ["ddptrain", "export"]]
    # the second time through, the steps that would refuse to redo their work: fit (--resume auto reports the
    # finished run), predict and export (--overwrite)
    for attempt, todo in ((1, steps), (2, [s for s in steps if s.split()[1] in ("fit", "predict", "export")])):
        for step in todo:
            words = shlex.split(step)
            argv = [sys.executable, "-m", "ddptrain", *words[1:]] if words[0] == "ddptrain" else [sys.executable, *words[1:]]
            done = run_command(argv, tmp_path, clean_env(), 300)
            assert done.returncode == 0, (attempt, step, done.stderr[-2000:])
            assert "error:" not in done.stderr, (attempt, step, done.stderr)
            if words[1] == "export":  # --server writes the project's server and says how to run it
                assert "python runs/penguins/serve_onnx.py runs/penguins/checkpoints/best.onnx rows.csv" in done.stdout
                assert (tmp_path / "runs/penguins/serve_onnx.py").read_text() == SERVE.read_text()
    predicted = (tmp_path / "runs/penguins/predictions.csv").read_text().splitlines()
    served = (tmp_path / "runs/penguins/served.csv").read_text().splitlines()
    assert predicted[0] == "island,sex,prediction,prob_Adelie,prob_Chinstrap,prob_Gentoo" and len(predicted) == 69
    # the ONNX server gives predict's labels on every row
    assert [row.split(",")[2] for row in predicted[1:]] == [row.split(",")[0] for row in served[1:]]
