"""Every command README.md shows runs as written (long ones with size flags this test adds and prints), or is skipped
with its reason, so a documented command cannot break unseen.

What counts as a README command (``readme_commands``):
- in a fenced code block: every line whose first word is a program in ``PROGRAMS`` (``\\`` continuations joined, a
  trailing ``# comment`` dropped, whitespace collapsed). A line starting with ``$ `` is a command too, and the lines
  after it (up to a blank line, the next ``$ `` line or the block's end) are its documented output, checked against
  what it prints (a line ending in ``...`` matches as a prefix);
- in prose and tables: every inline code span whose first word is in ``PROGRAMS`` (``make demo``,
  ``ngrpo bench hook-overhead``).

Every such command must have an entry in ``RULES``; one that has none FAILS ``test_readme_command``, so a new README
command must be classified here. Kinds:
- ``run``: run as written (cheap ones), output compared where the README shows it;
- ``reduced``: run as written plus the size flags in ``add`` (printed by the test), and its JSON checked;
- ``server``: started as written plus ``--host/--port``, polled until it answers, stopped;
- ``synopsis``: a usage line with ``[...]`` / ``|`` placeholders: every subcommand it names exists and every ``--flag``
  it shows is in that subcommand's ``--help``;
- ``skip``: not run (needs a cluster, a GPU, a hub model, a user file, or another test covers it), with the reason;
  cheap checks still run first: an ``ngrpo``/``workflows`` command line must parse and its preset and overrides must
  resolve; a ``make`` target must exist (``make -n``).

Commands run with the demo model offline (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1), from the repository root, via
``python -m ngrpo_ray.cli`` (what the ``ngrpo`` script calls). The ``reduced`` and ``server`` runs are marked slow (and
engine / ray where they build a vLLM engine / start Ray); the classification, the parse checks and the cheap ``run``
commands take seconds and always run, so ``make test-fast`` also fails on an unclassified README command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PROGRAMS = ("make", "ngrpo", "ray", "python", "python3", "mlflow", "kubectl", "docker", "pip", "helm", ".ci/run")


@dataclass(frozen=True)
class ReadmeCommand:
    text: str  # normalized: comment dropped, whitespace collapsed
    expected: tuple[str, ...] = ()  # documented output lines (``$ `` commands only)


def _normalize(line: str) -> str:
    return " ".join(shlex.split(line, comments=True))


def _is_command(text: str) -> bool:
    words = text.split()
    return bool(words) and words[0] in PROGRAMS


def readme_commands(text: str) -> list[ReadmeCommand]:
    """The commands of a README text, in order of first appearance, each once."""
    found: dict[str, ReadmeCommand] = {}
    prose: list[str] = []
    for i, chunk in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        if i % 2 == 0:  # outside fences
            prose.append(chunk)
            for span in re.findall(r"`([^`\n]+)`", chunk):
                if _is_command(span):
                    cmd = _normalize(span)
                    found.setdefault(cmd, ReadmeCommand(cmd))
            continue
        lines = re.sub(r"\\\n\s*", " ", chunk).splitlines()  # join continuations
        j = 0
        while j < len(lines):
            line = lines[j].strip()
            j += 1
            if line.startswith("$ "):
                expected = []
                while j < len(lines) and lines[j].strip() and not lines[j].startswith("$ "):
                    expected.append(lines[j].strip())
                    j += 1
                cmd = _normalize(line[2:])
                found[cmd] = ReadmeCommand(cmd, tuple(expected))
            elif _is_command(line):
                cmd = _normalize(line)
                found.setdefault(cmd, ReadmeCommand(cmd))
    return list(found.values())


@dataclass(frozen=True)
class Rule:
    kind: str  # run | reduced | server | synopsis | skip
    why: str = ""  # skip: the reason; reduced: why the flags
    add: tuple[str, ...] = ()  # reduced / server: the flags this test adds
    timeout_s: float = 120.0
    marks: tuple[str, ...] = ()  # engine / ray, besides slow
    json_keys: tuple[str, ...] = ()  # reduced: keys the printed JSON must have
    progress: str = ""  # reduced: a progress line (with the estimate) it must print on stderr


CLUSTER_DOC = "names cluster/README.md's commands (needs a cloud account or a Kubernetes cluster)"
HUB_GPU = "needs DeepSeek-R1-Distill-Qwen-1.5B from a hub and 8 GPUs (no hub, no GPU in CI)"

RULES: dict[str, Rule] = {
    # --- run (as written) ---
    "ngrpo config mixing.rhoo=0.2": Rule("run", "the documented config error"),
    # --- run with added size flags ---
    "ngrpo bench hook-overhead": Rule("skip", "5 rounds x 32 seqs x 256 tokens take about 10 minutes; "
                                              "tests/engine/test_bench.py runs its function on the suite's engines"),
    "ngrpo bench hook-overhead --neighbor-mode full": Rule(
        "skip", "the same with the full table built in the warm-up (about 96 s more) takes about 12 minutes"),
    "ngrpo bench neighbor-table": Rule(
        "reduced", "the 151,936 x 1,536 build takes 15-18 minutes on 2 cores",
        add=("--vocab", "4096", "--dim", "64"), json_keys=("vocab", "dim", "seconds")),
    "ngrpo bench sync": Rule("skip", "3 rounds of 538 MB; tests/e2e/test_sync_bench.py runs this command with --model "
                                     "on a tiny model and checks its JSON and progress line"),
    "ngrpo bench sync --transport gloo": Rule(
        "skip", "the same over the gloo group; tests/e2e/test_sync_bench.py runs it with --transport gloo on a tiny "
                "model"),
    "ngrpo bench hook-step": Rule(
        "reduced", "3 batch sizes x 15 steps at V = 151,936 take about 30 s; one small size shows the command works",
        add=("--rows", "8", "--vocab", "4096", "--steps", "2", "--warmup", "1"), timeout_s=200,
        json_keys=("per_rows", "ratio_8")),
    "ngrpo bench train-step": Rule(
        "reduced", "2 rounds of a 64-response demo iteration take about 4 minutes; one round of 8 short responses",
        add=("--rounds", "1", "--response-tokens", "8", "--prompt-tokens", "16", "trainer.prompts_per_iteration=1",
             "trainer.mini_batches=1"), timeout_s=300, json_keys=("trainer_s", "plain_s", "ratio")),
    # --- server ---
    "mlflow ui --backend-store-uri sqlite:///runs/cpu_default/mlflow.db": Rule(
        "server", "a server; started in a scratch folder holding runs/cpu_default/ (the demo's output folder)",
        add=("--host", "127.0.0.1", "--port", "{port}"), timeout_s=90),
    "ngrpo plan --config r1_distill_1p5b_ngrpo": Rule("run", "the documented memory plan (no Ray, no GPU, 0.2 s)"),
    # --- synopsis (usage lines, and subcommands named in prose) ---
    "ngrpo plan": Rule("synopsis"),
    "ngrpo train": Rule("synopsis"),
    "ngrpo config --dry-run": Rule("synopsis"),
    "ngrpo config [--config PRESET] [key=value ...]": Rule("synopsis"),
    "ngrpo train [--config PRESET] [key=value ...] [--resume]": Rule("synopsis"),
    "ngrpo eval [--config PRESET] [key=value ...]": Rule("synopsis"),
    "ngrpo demo [--resume]": Rule("synopsis"),
    "ngrpo compare [--methods grpo n-grpo stht] [--seeds 0 1] [--records DIR] [key=value ...]": Rule("synopsis"),
    "ngrpo bench hook-overhead | hook-step | neighbor-table | sync | train-step": Rule("synopsis"),
    "ngrpo plan [--config PRESET] [key=value ...] [--gpu-memory-gib 79.15] [--gpus 8]": Rule("synopsis"),
    # --- skipped, with the reason ---
    "make demo": Rule("skip", "21 minutes; a shortened demo is tests/e2e/test_demo_short.py"),
    "make test": Rule("skip", "the test suite itself"),
    ".ci/run": Rule("skip", "runs `make test`, the test suite itself"),
    "make gpu-wheels": Rule("skip", "downloads pinned wheels and builds DeepSpeed's from its sdist (about a minute) "
                            "for tests/gpu_device_check.sh, which runs only on a CUDA machine"),
    "make compare": Rule("skip", "2.5-5 h on 2 cores (12 trainings); see `ngrpo compare`"),
    "ngrpo compare": Rule("skip", "2.5-5 h on 2 cores (12 trainings); its trainings are the demo's driver "
                                  "(tests/e2e/test_demo_short.py), its table and records "
                                  "tests/evaluation/test_compare_table.py"),
    "ngrpo compare --seeds 0 1 2 3 --records results/compare_cpu": Rule(
        "skip", "prints the table of the 12 committed records (and would train any run missing from "
        "results/compare_cpu: hours); the same table is rebuilt by tests/evaluation/test_compare_table.py"),
    "ngrpo demo --resume": Rule("skip", "needs an interrupted `ngrpo demo` (minutes); resume is covered by "
                                        "tests/e2e/test_train_driver.py::test_resume_continues_the_same_run_with_the_same_prompts"),
    "ngrpo demo trainer.async_rollouts=true": Rule("skip", "21 minutes, like `make demo`; the asynchronous driver "
                                                           "is covered by tests/e2e/test_train_driver.py::"
                                                           "test_resume_continues_the_same_run_with_the_same_prompts"),
    "ngrpo train --config r1_distill_1p5b_ngrpo": Rule("skip", HUB_GPU),
    "ngrpo train --config r1_distill_1p5b_ngrpo data.train=/data/deepscaler.parquet trainer.num_workers=8": Rule(
        "skip", HUB_GPU + " and the user's DeepScaleR parquet file"),
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python workflows/train.py --config "
    "r1_distill_7b_ngrpo": Rule("skip", "needs a Ray cluster with 8 GPUs and the 7B model; `ray job submit` of "
                                        "workflows/train.py is covered by tests/e2e/test_ray_job_submit.py"),
    "ngrpo eval --config r1_distill_1p5b_ngrpo model.path=runs/r1_1p5b_ngrpo/checkpoints/iter_000100/trainer/hf": Rule(
        "skip", "needs the 1.5B run's iteration-100 checkpoint and a GPU"),
    "ray up": Rule("skip", CLUSTER_DOC),
    "ray job submit": Rule("skip", CLUSTER_DOC),
    "kubectl apply": Rule("skip", CLUSTER_DOC),
}

COMMANDS = readme_commands(README.read_text())


def _params():
    out = []
    for c in COMMANDS:
        rule = RULES.get(c.text)
        marks = []
        if rule is not None and rule.kind in ("reduced", "server"):  # "run" ones are cheap (config errors)
            marks = [pytest.mark.slow] + [getattr(pytest.mark, m) for m in rule.marks]
        added = f" [test adds: {' '.join(rule.add)}]" if rule is not None and rule.kind == "reduced" else ""
        out.append(pytest.param(c, id=c.text[:90] + added, marks=marks))  # the id says which flags were added
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the demo model needs no hub
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _argv(words: list[str]) -> list[str]:
    if words[0] == "ngrpo":  # the console script `ngrpo` is ngrpo_ray.cli:main
        return [sys.executable, "-m", "ngrpo_ray.cli", *words[1:]]
    if words[0] == "mlflow":
        return [sys.executable, "-m", "mlflow", *words[1:]]
    return words


def _ngrpo_parser():
    from ngrpo_ray.cli import build_parser

    return build_parser()


def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        assert actions and name in actions[0].choices, f"no subcommand {name!r} under {parser.prog!r}"
        parser = actions[0].choices[name]
    return parser


def _check_parses(words: list[str]) -> str:
    """An ngrpo (or workflows/train.py) command line parses and its preset plus overrides resolve."""
    from ngrpo_ray.config import load_config

    if "--" in words:  # ray job submit ... -- python workflows/train.py ARGS
        words = words[words.index("--") + 1:]
    if words[:2] == ["python", "workflows/train.py"]:
        assert (ROOT / "workflows/train.py").is_file()
        words = ["ngrpo", "train", *words[2:]]  # what workflows/train.py calls
    if words[0] == "make":
        out = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return f"`make -n {' '.join(words[1:])}` ok"
    if words[0] == ".ci/run":
        assert os.access(ROOT / ".ci/run", os.X_OK) and "make test" in (ROOT / ".ci/run").read_text()
        return ".ci/run is executable and runs make test"
    if words[0] != "ngrpo":
        return "nothing cheap to check"
    try:
        args = _ngrpo_parser().parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"`{' '.join(words)}` does not parse (exit {exc.code})")
    if getattr(args, "config", None):
        load_config(args.config, args.overrides)
        return f"parses; preset {args.config} with {len(args.overrides)} override(s) resolves"
    return "parses"


def _check_synopsis(text: str) -> None:
    words = text.split()[1:]
    head, alternatives = [], []
    for i, w in enumerate(words):
        if w.startswith(("[", "-")) or "=" in w:
            break
        if w == "|":
            continue
        if i + 1 < len(words) and words[i + 1] == "|" or i > 0 and words[i - 1] == "|":
            alternatives.append(w)
        else:
            head.append(w)
    parser = _ngrpo_parser()
    for path in ([head + [a] for a in alternatives] or [head]):
        sub = _subparser(parser, path)
        help_text = sub.format_help()
        for flag in re.findall(r"(--[a-z][a-z-]*)", text):
            assert flag in help_text, f"{flag} is not in `ngrpo {' '.join(path)} --help`"


def _matches(expected: str, got_lines: list[str]) -> bool:
    if expected.endswith("..."):
        return any(g.startswith(expected[:-3].rstrip(", ")) for g in got_lines)
    return expected in got_lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(words: list[str], rule: Rule, cwd: Path) -> str:
    port = _free_port()
    argv = _argv(words) + [a.format(port=port) for a in rule.add]
    print(f"added: {' '.join(a.format(port=port) for a in rule.add)}")
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + rule.timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    assert resp.status == 200
                    return f"answered on port {port}"
            except OSError:
                time.sleep(1.0)
        pytest.fail(f"server did not answer within {rule.timeout_s:.0f}s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run(cmd: ReadmeCommand, rule: Rule) -> subprocess.CompletedProcess:
    argv = _argv(cmd.text.split()) + list(rule.add)
    if rule.add:
        print(f"added: {' '.join(rule.add)} ({rule.why})")
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=rule.timeout_s)
    print(f"ran in {time.perf_counter() - t0:.1f}s: {' '.join(argv[2:] if argv[0] == sys.executable else argv)}")
    return out


@pytest.mark.parametrize("cmd", _params())
def test_readme_command(cmd: ReadmeCommand, tmp_path: Path):
    rule = RULES.get(cmd.text)
    if rule is None:
        pytest.fail(f"README command not classified: {cmd.text!r}. Add it to RULES in {Path(__file__).name} "
                    "(run as written, run with added size flags, or skip with the reason).")
    words = cmd.text.split()
    if rule.kind == "skip":
        checked = _check_parses(words)
        pytest.skip(f"{rule.why} [checked: {checked}]")
    if rule.kind == "synopsis":
        _check_synopsis(cmd.text)
        return
    if rule.kind == "server":
        if "sqlite:///runs/cpu_default/mlflow.db" in cmd.text:  # the folder the demo writes its store into
            from ngrpo_ray.config import load_config

            assert load_config("cpu_default", []).trainer.output_dir == "runs/cpu_default"
            (tmp_path / "runs" / "cpu_default").mkdir(parents=True)
        print(_serve(words, rule, tmp_path))
        return
    out = _run(cmd, rule)
    got = (out.stdout + out.stderr).splitlines()
    if cmd.expected:  # documented output: every shown line must appear
        missing = [e for e in cmd.expected if not _matches(e, [g.strip() for g in got])]
        assert not missing, f"documented output not printed: {missing}\n--- got:\n{out.stdout}{out.stderr}"
        return
    assert out.returncode == 0, f"exit {out.returncode}\n--- stdout:\n{out.stdout[-3000:]}\n--- stderr:\n{out.stderr[-5000:]}"
    if rule.json_keys:
        result = json.loads(out.stdout)  # stdout is the JSON alone (progress, engine and Ray worker lines: stderr)
        assert set(rule.json_keys) <= set(result), sorted(result)
    if rule.progress:
        assert rule.progress in out.stderr, f"no progress line {rule.progress!r} on stderr"


def test_every_rule_names_a_readme_command():
    """A rule whose command left the README is dead weight: remove it with the README line."""
    shown = {c.text for c in COMMANDS}
    assert sorted(set(RULES) - shown) == []


def test_the_extraction_rule():
    text = ("Run `make demo`; see `ngrpo_ray/core/` and `--seeds 0 1`.\n"
            "```\nngrpo train --config x   # a comment\nnot a command\nray job submit --a b -- \\\n"
            "    python workflows/train.py --config y\n```\n"
            "```\n$ ngrpo config bad=1\nconfig error: ...\n\nmake test\n```\n")
    got = readme_commands(text)
    assert [c.text for c in got] == ["make demo", "ngrpo train --config x",
                                     "ray job submit --a b -- python workflows/train.py --config y",
                                     "ngrpo config bad=1", "make test"]
    assert got[3].expected == ("config error: ...",)
