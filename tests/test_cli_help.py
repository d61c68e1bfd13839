"""`cirkit --help` and every `cirkit <stage> --help` are fast and never import torch."""

import resource
import subprocess
import sys

import pytest

from cirkit.cli import app

COMMANDS = sorted(c.name for c in app.registered_commands)
PROBE = (
    "import sys; from cirkit.cli import app\n"
    "try:\n    app(sys.argv[1:], prog_name='cirkit')\n"
    "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    "heavy = sorted(m for m in ('torch', 'transformers', 'open_clip', 'lancedb', 'peft', 'accelerate', 'datasets') if m in sys.modules)\n"
    "assert not heavy, f'--help imported {heavy}'\n"
)


def _best_of(args, n=3):
    """Best CPU seconds (user + system) of the child over ``n`` runs, and its stdout.

    CPU time, not wall time: it is what the import work costs, and it does not grow when
    other jobs share the machine's cores (wall time on an idle machine is about the same).
    """
    best = float("inf")
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        assert proc.returncode == 0, proc.stderr
    return best, proc.stdout


def test_stages_are_registered():
    assert {"synth", "evaluate"} <= set(COMMANDS)
    stages = sorted(["caption", "embed", "evaluate", "index", "query", "reformulate", "serve", "synth", "train"])
    # issue 14 adds two tools beside the stages (was: COMMANDS == stages)
    assert COMMANDS == sorted([*stages, "doctor", "recipes"])


@pytest.mark.parametrize("args", [["--help"]] + [[c, "--help"] for c in COMMANDS], ids=lambda a: " ".join(a))
def test_help_is_fast_and_light(args):
    seconds, out = _best_of(args)
    assert "Usage" in out
    assert seconds < 0.5, f"cirkit {' '.join(args)} took {seconds:.2f}s of CPU"


def test_stage_docstrings_have_examples():
    for c in app.registered_commands:
        assert "Examples" in (c.callback.__doc__ or ""), f"cirkit {c.name} --help has no Examples block"


def test_top_level_help_builds_no_stage():
    """`cirkit --help` lists the stages from their docstrings; no config module is imported."""
    probe = PROBE + ("stages = sorted(m for m in sys.modules if m.split('.')[-1] in "
                     "('synth', 'caption', 'reformulate', 'embed', 'index', 'query', 'evaluate', 'config') "
                     "and not m.startswith('cirkit.cli') and m != 'cirkit.config')\n"
                     "assert not stages and 'numpy' not in sys.modules, stages\n")
    proc = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- every setting is written once: options, defaults and help come from the config field ------
import dataclasses  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from cirkit.cli._common import COMMANDS as STAGES  # noqa: E402
from cirkit.cli._common import build, click_command, config_class  # noqa: E402
from cirkit.config import default_of, default_text, help_text, setting, spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _fields(name):
    return dataclasses.fields(config_class(STAGES[name].config))


def _params(name):
    return {p.name: p for p in click_command(name).params}


@pytest.mark.parametrize("name", STAGES)
def test_every_setting_is_an_option_or_listed_as_recipe_only(name):
    params, cmd = _params(name), click_command(name)
    for f in _fields(name):
        if spec(f).cli:
            assert f.name in params, f"cirkit {name}: setting {f.name} has no option"
        else:
            assert f.name not in params and f"{f.name}: {help_text(f)}" in (cmd.epilog or ""), \
                f"cirkit {name}: recipe-only setting {f.name} is not listed under --help"


@pytest.mark.parametrize("name", STAGES)
def test_help_defaults_are_the_dataclass_defaults(name):
    params = _params(name)
    for f in _fields(name):
        if not spec(f).cli:
            continue
        shown_default = re.search(r"\(default (.*)\)$", params[f.name].help or "")
        expected = default_text(f)
        assert (shown_default.group(1) if shown_default else "") == expected, f"cirkit {name} {f.name}"
        value = default_of(f)
        if spec(f).show_default is None and value not in (None, dataclasses.MISSING) and not isinstance(value, bool):
            as_text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            assert expected == as_text, f"cirkit {name} {f.name}: help says {expected!r}, the default is {value!r}"


def test_help_shows_defaults_as_rendered():
    out = CliRunner().invoke(_app_of("train"), ["--help"], env={"COLUMNS": "200"}).stdout
    assert "Peak learning rate (AdamW). (default 0.0001)" in out
    assert "--learn-temperature" in out and "--fixed-temperature" in out
    assert "templates: mllm prompt templates" in out  # recipe-only, listed


def _app_of(name, body=None, cls=None):
    import typer

    stage = STAGES[name]
    fn = build(body or stage.body, cls or config_class(stage.config), stage.section)
    app = typer.Typer(rich_markup_mode="rich", add_completion=False)
    app.command(name=name, epilog=fn.epilog)(fn)
    return app


def test_a_field_added_to_a_config_appears_in_help_and_reaches_the_config_with_no_other_edit():
    from cirkit.embed import EmbedConfig

    @dataclasses.dataclass
    class Grown(EmbedConfig):
        new_knob: int = setting(7, ge=1, short="-K", help="A brand-new setting.")
        new_mode: str = setting("x", choices=("x", "y"), help="Another one.")

    seen = []
    app = _app_of("embed", body=lambda config, json_out: seen.append(config), cls=Grown)
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    assert "--new-knob" in out and "A brand-new setting. (default 7)" in out
    assert "Another one. One of: x, y. (default x)" in out
    res = CliRunner().invoke(app, ["imgs", "-K", "3", "--new-mode", "y"])
    assert res.exit_code == 0, res.output
    assert (seen[-1].new_knob, seen[-1].new_mode, seen[-1].input) == (3, "y", Path("imgs"))
    res = CliRunner().invoke(app, ["imgs", "--new-knob", "0"])
    assert res.exit_code == 1 and "error: --new-knob must be at least 1, got 0" in res.stderr
    res = CliRunner().invoke(app, ["imgs", "--new-mode", "z"])
    assert res.exit_code == 1 and "error: unknown --new-mode 'z'; choose one of x, y" in res.stderr


# -- one vocabulary -----------------------------------------------------------------------------
def _visible_options():
    for name in STAGES:
        for p in click_command(name).params:
            if getattr(p, "hidden", False) or not p.opts[0].startswith("-"):
                continue
            yield name, p


def test_a_short_flag_means_one_thing_in_every_command():
    meaning: dict[str, set[str]] = {}
    for _, p in _visible_options():
        long = next((o for o in p.opts if o.startswith("--")), None)
        for o in p.opts:
            if not o.startswith("--"):
                meaning.setdefault(o, set()).add(long)
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}
    assert meaning["-m"] == {"--model"} and meaning["-o"] == {"--output"} and meaning["-c"] == {"--config"}
    assert "-m" in {o for n, p in _visible_options() if n == "train" for o in p.opts}


def test_one_spelling_per_idea():
    longs = {o for _, p in _visible_options() for o in p.opts}
    assert "--dtype" not in longs and "--precision" in longs
    for name in STAGES:
        assert "json_out" in _params(name) and "verbose" in _params(name) and "quiet" in _params(name)


@pytest.mark.parametrize("name, args, expected", [
    ("caption", ["x", "-b", "3", "--dtype", "bf16"], {"batch_size": 3, "precision": "bf16"}),
    ("reformulate", ["x", "-b", "5", "--dtype", "float32"], {"batch_size": 5, "precision": "float32"}),
    ("evaluate", ["synth", "-b", "clip", "-i", "imgs"], {"backbone": "clip", "images": Path("imgs")}),
    ("query", ["q.jpg", "-i", "idx"], {"index": "idx"}),
])
def test_old_spellings_still_work_hidden_with_a_warning(name, args, expected, caplog):
    seen = []
    app = _app_of(name, body=lambda config, json_out: seen.append(config))
    with caplog.at_level("WARNING", logger="cirkit"):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {k: getattr(seen[-1], k) for k in expected} == expected
    assert "is an old spelling of" in caplog.text
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    assert "--dtype" not in out and not re.search(r"\s-[bi]\s", out)  # hidden


def test_argument_or_option_for_the_same_setting():
    seen = []
    app = _app_of("synth", body=lambda config, json_out: seen.append(config))
    assert CliRunner().invoke(app, ["-o", "out"]).exit_code == 0 and seen[-1].out == Path("out")
    assert CliRunner().invoke(app, ["out2"]).exit_code == 0 and seen[-1].out == Path("out2")
    res = CliRunner().invoke(app, ["a", "-o", "b"])
    assert res.exit_code == 2 and "error: --output given twice (OUT and --output); give it once" in res.stderr
    res = CliRunner().invoke(app, [])
    assert res.exit_code == 2 and "error: missing OUT (or --output)" in res.stderr
    app = _app_of("query", body=lambda config, json_out: seen.append(config))
    assert CliRunner().invoke(app, ["--text", "red"]).exit_code == 0 and seen[-1].text == "red"


def test_list_settings_take_repeats_and_commas():
    seen = []
    app = _app_of("train", body=lambda config, json_out: seen.append(config))
    res = CliRunner().invoke(app, ["--cross-attn-layers", "0,2", "--cross-attn-layers", "-1",
                                   "--lora-target-modules", "q_proj,v_proj"])
    assert res.exit_code == 0, res.output
    assert seen[-1].cross_attn_layers == [0, 2, -1] and seen[-1].lora_target_modules == ["q_proj", "v_proj"]
    res = CliRunner().invoke(app, ["--cross-attn-layers", "0,x"])
    assert res.exit_code == 2 and "error: --cross-attn-layers: 'x' is not an integer" in res.stderr


# -- help examples are true ---------------------------------------------------------------------
def _examples(doc):
    lines = doc.split("\n")
    assert sum(ln.strip() == "Examples" for ln in lines) == 1, "one 'Examples' heading"
    body = "\n".join(lines[[ln.strip() for ln in lines].index("Examples") + 1:]).replace("\\\n", " ")
    return [ln.strip() for ln in body.splitlines() if ln.strip()]


@pytest.mark.parametrize("name", STAGES)
def test_every_help_example_parses_and_its_recipes_exist(name):
    examples = _examples(STAGES[name].body.__doc__)
    assert examples
    for line in examples:
        for recipe in re.findall(r"recipes/[\w.-]+", line):
            assert (ROOT / recipe).is_file(), f"cirkit {name} --help: {line!r} names {recipe}, which does not exist"
        words = shlex.split(line)
        words = words[words.index("cirkit") + 1:] if words[0] != "cirkit" else words[1:]
        assert words[0] == name, line
        cmd = click_command(name)
        ctx = cmd.make_context(name, words[1:])  # raises on an unknown option or a bad value
        assert ctx.params is not None


def test_docstring_example_headings_are_one_spelling():
    from cirkit.cli import app

    for c in app.registered_commands:
        assert "Examples:" not in c.callback.__doc__


# Files the examples name that a user brings (README "Your own images"): anything else an example
# reads must be shipped with cirkit, or be written by an example (a stage's output is the next one's
# input), so no example names a file that appears from nowhere (like a `tiny.safetensors`).
USER_FILES = {
    "photos/": "a folder of your images", "shoe.jpg": "your reference image", "queries.jsonl": "your queries",
    "gallery.jsonl": "your gallery listing (generic format)", "triplets.jsonl": "your triplets",
    "tags.jsonl": "metadata columns for 'index --metadata' (its help says the format)",
    "old-ids.txt": "ids to delete, one per line ('index --delete' help)", "more.lance": "another embed output",
    "models/llm.Q4_K_M.gguf": "a GGUF model you downloaded ('reformulate --gguf-file' help)",
}
OUTPUT_FLAGS = {"-o", "--output", "--html", "--grid", "--submission", ">"}
FILE = re.compile(r"\.(ya?ml|jsonl|json|safetensors|gguf|lance|png|jpe?g|html|txt|csv)$")


def _all_examples():
    from cirkit.cli import app

    for c in app.registered_commands:
        for line in _examples(c.callback.__doc__):
            yield c.name, line, shlex.split(line)


def _written(words: list[str]) -> set[str]:
    """What an example line writes: its output flags' values, and synth's OUT folder."""
    out = {b for a, b in zip(words, words[1:], strict=False) if a in OUTPUT_FLAGS}
    if "synth" in words:
        out |= {w for w in words[words.index("synth") + 1:][:1] if not w.startswith("-")}
    return out


def test_every_help_example_names_files_that_exist_or_are_explained():
    """A file an example reads is shipped (recipes by path or name), written by an example, or the user's own."""
    from cirkit.config import find_recipe

    written = set().union(*(_written(words) for _, _, words in _all_examples()))
    for name, line, words in _all_examples():
        outs = _written(words)
        for prev, word in zip(["", *words], words, strict=False):
            if word in outs or prev in OUTPUT_FLAGS or not (FILE.search(word) or word.endswith("/")):
                continue
            if prev in ("-c", "--config"):
                find_recipe(word)  # a shipped recipe (raises if not)
                continue
            ok = (ROOT / word).exists() or word in USER_FILES or any(
                word == w or word.startswith(w.rstrip("/") + "/") for w in written)
            assert ok, f"cirkit {name} --help: {line!r} reads {word}, which nothing ships, writes or explains"


def test_the_examples_file_check_catches_what_it_should(monkeypatch):
    from cirkit.cli import app

    cmd = next(c for c in app.registered_commands if c.name == "evaluate")
    for bad in ("cirkit evaluate synth -d data/synth/benchmark --pretrained tiny.safetensors",
                "cirkit evaluate -c recipes/synth.yaml"):
        monkeypatch.setattr(cmd.callback, "__doc__", f"Doc.\n\n    Examples\n\n      {bad}\n")
        with pytest.raises((AssertionError, Exception), match="tiny.safetensors|recipe not found"):
            test_every_help_example_names_files_that_exist_or_are_explained()
