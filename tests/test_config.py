"""Settings resolve defaults -> recipe -> flags, and recipe mistakes name the file and key."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from cirkit.config import resolve, to_jsonable
from cirkit.errors import CirkitError


@dataclass
class Cfg:
    lr: float = 0.1
    steps: int = 10
    out: Path = Path("x")
    name: str = "a"


def test_precedence(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("# header\ntrain:\n  lr: 1\n  steps: 5\n  out: runs/y\n")
    c = resolve(Cfg, r, {"steps": 7, "name": None}, section="train")
    assert (c.lr, c.steps, c.out, c.name) == (1.0, 7, Path("runs/y"), "a")
    assert to_jsonable(c)["out"] == "runs/y"


def test_unknown_key_is_named(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("learning-rate: 3\n")
    with pytest.raises(CirkitError, match=r"r.yaml: unknown setting 'learning-rate'"):
        resolve(Cfg, r)


def test_wrong_type_is_named(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("steps: many\n")
    with pytest.raises(CirkitError, match=r"setting 'steps' expects int"):
        resolve(Cfg, r)


def test_missing_recipe(tmp_path):
    with pytest.raises(CirkitError, match="recipe not found"):
        resolve(Cfg, tmp_path / "none.yaml")


@dataclass
class ListCfg:
    modes: list[str] | None = None
    layers: list[int] = None  # type: ignore[assignment]


def test_list_settings_pass_through(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("modes: [image, text]\nlayers: [0, 2]\n")
    c = resolve(ListCfg, r)
    assert c.modes == ["image", "text"] and c.layers == [0, 2]


# -- one home per setting -----------------------------------------------------------------------
import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from cirkit.config import (  # noqa: E402
    MAX_RECIPE_BYTES,
    UsageError,
    check_settings,
    default_of,
    help_text,
    problem,
    resume_keys,
    setting,
    spec,
)


def _configs():
    from cirkit.caption import CaptionConfig
    from cirkit.embed import EmbedConfig
    from cirkit.evaluate import EvaluateConfig
    from cirkit.index import IndexConfig
    from cirkit.query import QueryConfig
    from cirkit.reformulate import ReformulateConfig
    from cirkit.synth import SynthConfig
    from cirkit.train.config import TrainConfig

    return [SynthConfig, CaptionConfig, ReformulateConfig, EmbedConfig, IndexConfig, QueryConfig, EvaluateConfig,
            TrainConfig]


CONFIGS = _configs()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_setting_and_its_default_passes_its_own_checks(cls):
    for f in dataclasses.fields(cls):
        assert "cirkit" in f.metadata, f"{cls.__name__}.{f.name}: declare it with setting(...)"
        assert spec(f).help.strip(), f"{cls.__name__}.{f.name}: no help text"
        default = default_of(f)
        if default is not dataclasses.MISSING:
            assert problem(f, default, f.name) is None, f"{cls.__name__}.{f.name}: default fails its own range"


def test_train_config_is_torch_free_and_replaces_extra():
    code = ("import sys; from cirkit.train.config import TrainConfig; TrainConfig(); "
            "heavy = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    from cirkit.train.config import TrainConfig
    from cirkit.train.plugin import TrainConfig as Reexported

    assert Reexported is TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert "extra" not in names and {"gate_init", "templates"} <= names


# The hand-written list train/loop.py used to keep; every one must still be compared.
OLD_RESUME_KEYS = ("backbone", "stage", "data", "init", "model", "pretrained", "max_steps", "epochs", "batch_size",
                   "grad_accum", "lr", "weight_decay", "warmup_steps", "scheduler", "seed", "temperature",
                   "learn_temperature", "cross_attn", "cross_attn_layers", "ema", "ema_momentum", "lora_r",
                   "lora_alpha", "lora_dropout", "lora_target_modules", "full_finetune", "freeze_vision",
                   "target_image_loss", "max_length")


def test_resume_keys_come_from_the_field_metadata():
    from cirkit.train.config import TrainConfig
    from cirkit.train.config import resume_keys as train_resume_keys

    keys = train_resume_keys()
    assert set(OLD_RESUME_KEYS) <= set(keys)
    # Settings that change the result but were missing from the hand list, or hidden in `extra`.
    assert {"gate_init", "templates", "max_grad_norm", "train_text_encoder", "predictor_hidden"} <= set(keys)
    # Where and how a run is written or logged does not change what it learns.
    assert not {"output", "resume", "num_workers", "log_every", "save_every", "merge", "allow_pickle"} & set(keys)
    assert keys == resume_keys(TrainConfig)


def test_a_new_result_changing_setting_is_compared_on_resume_with_no_other_edit(tmp_path):
    import json

    from cirkit.config import to_jsonable
    from cirkit.train.config import TrainConfig

    @dataclasses.dataclass
    class WithKnob(TrainConfig):
        knob: int = setting(3, ge=0, resume=True, help="A new setting that changes the result.")

    pytest.importorskip("torch")
    from cirkit.train.loop import _check_resume

    (tmp_path / "train_args.json").write_text(json.dumps({**to_jsonable(WithKnob(output=tmp_path)), "processes": 1}))
    _check_resume(WithKnob(output=tmp_path, resume=True), tmp_path, 1)
    with pytest.raises(CirkitError, match=r"knob: 3 -> 4"):
        _check_resume(WithKnob(output=tmp_path, resume=True, knob=4), tmp_path, 1)
    with pytest.raises(CirkitError, match=r"--knob must be at least 0, got -1"):
        WithKnob(knob=-1)


def test_help_text_carries_the_default_and_choices():
    from cirkit.train.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert help_text(fields["lr"]).endswith("(default 0.0001)")
    assert help_text(fields["learn_temperature"]).endswith("(default --learn-temperature)")
    assert help_text(fields["cross_attn_layers"]).endswith("(default all)")
    assert "One of: vit, mllm, reformulator." in help_text(fields["backbone"])
    assert "(default" not in help_text(fields["init"])  # None says nothing


# -- recipe values are type-checked ------------------------------------------------------------
@dataclass
class Typed:
    steps: int = setting(10, ge=1, help="Steps.")
    lr: float = setting(0.1, gt=0, help="Rate.")
    switch: bool = setting(False, help="Switch.")
    out: Path = setting(Path("x"), help="Where.")
    name: str = setting("a", choices=("a", "b", "1"), help="Name.")
    layers: list[int] | None = setting(None, help="Layers.")
    names: tuple[str, ...] | list[str] = setting(("p", "q"), help="Names.")
    table: dict[str, str] | None = setting(None, cli=False, help="A mapping.")

    def __post_init__(self):
        check_settings(self)


@pytest.mark.parametrize("body, message", [
    ("steps: [1, 2]", "setting 'steps' expects int, got a list [1, 2]"),
    ("steps: {a: 1}", "setting 'steps' expects int, got a mapping"),
    ("steps: true", "setting 'steps' expects int, got True"),
    ("steps: 2.5", "setting 'steps' expects int, got 2.5"),
    ("lr: '0.1'", "setting 'lr' expects float, got '0.1'"),
    ("switch: 'false'", "setting 'switch' expects true or false, got 'false' (write true or false without quotes)"),
    ("switch: 0", "setting 'switch' expects true or false, got 0"),
    ("out: [a, b]", "setting 'out' expects a path, got a list"),
    ("out: 5", "setting 'out' expects a path, got 5"),
    ("name: {x: y}", "setting 'name' expects str, got a mapping"),
    ("layers: {a: 1}", "setting 'layers' expects a list, got a mapping"),
    ("layers: [1, x]", "setting 'layers' item expects int, got 'x'"),
    ("table: [a]", "setting 'table' expects a mapping, got ['a']"),
    ("table: {a: [1]}", "setting 'table' key 'a' expects str, got a list"),
    ("steps: 0", "steps must be at least 1, got 0"),
    ("lr: -1", "lr must be greater than 0, got -1.0"),
    ("lr: .nan", "lr must be a number, got nan"),
    ("name: c", "unknown name 'c'; choose one of a, b, 1"),
])
def test_wrong_recipe_values_are_one_line_errors_naming_recipe_and_setting(tmp_path, body, message):
    r = tmp_path / "r.yaml"
    r.write_text(body + "\n")
    with pytest.raises(CirkitError) as e:
        resolve(Typed, r)
    assert str(e.value).startswith(f"{r}: {message}") and "\n" not in str(e.value)


def test_unambiguous_recipe_values_are_converted(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("steps: 3.0\nlr: 1\nout: a/b\nname: 1\nlayers: 2\nnames: [x]\ntable: {a: b}\n")
    c = resolve(Typed, r)
    assert (c.steps, c.lr, c.out, c.name, c.layers, c.names, c.table) == (3, 1.0, Path("a/b"), "1", [2], ("x",),
                                                                          {"a": "b"})


def test_flags_are_range_checked_with_the_flag_named():
    with pytest.raises(CirkitError, match=r"^--steps must be at least 1, got 0$"):
        resolve(Typed, None, {"steps": 0})
    with pytest.raises(CirkitError, match=r"^--steps must be at least 1, got -3$"):
        Typed(steps=-3)


def test_a_missing_required_setting_is_a_usage_error():
    from cirkit.synth import SynthConfig

    with pytest.raises(UsageError, match=r"missing OUT \(or --output\)") as e:
        resolve(SynthConfig, None, {})
    assert e.value.exit_code == 2


def test_an_old_recipe_key_is_accepted_with_a_warning(tmp_path, caplog):
    from cirkit.caption import CaptionConfig

    r = tmp_path / "r.yaml"
    r.write_text("caption:\n  dtype: float32\n")
    with caplog.at_level("WARNING", logger="cirkit"):
        cfg = resolve(CaptionConfig, r, section="caption")
    assert cfg.precision == "float32" and "now called 'precision'" in caplog.text


def test_the_removed_extra_key_says_where_its_settings_went(tmp_path):
    from cirkit.train.config import TrainConfig

    r = tmp_path / "r.yaml"
    r.write_text("train:\n  extra: {templates: {end: ''}}\n")
    with pytest.raises(CirkitError, match=r"unknown setting 'extra'; its settings are top-level now"):
        resolve(TrainConfig, r, section="train")


# -- recipes are read with bounded size and alias expansion ------------------------------------
BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


def test_a_yaml_alias_bomb_is_refused_quickly_without_building_it(tmp_path):
    r = tmp_path / "bomb.yaml"
    r.write_text('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB)
    assert len(r.read_bytes()) < 700  # expands to 9**9 values
    start = time.process_time()
    with pytest.raises(CirkitError, match=r"bomb.yaml: its aliases expand to more than 100000 values"):
        resolve(Cfg, r)
    assert time.process_time() - start < 2


def test_a_few_aliases_are_fine(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("base: &n 4\nmodes: &m [image, text]\n")
    data = __import__("cirkit.config", fromlist=["load_recipe"]).load_recipe(r)
    assert data == {"base": 4, "modes": ["image", "text"]}


@pytest.mark.parametrize("content, message", [
    (b"a: &a [*a]\n", "an alias refers to the value that contains it"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply to be a recipe"),
    (b"steps: caf\xe9\n", "not UTF-8 text (byte 10)"),
    (b"steps: [1\n", "invalid YAML"),
    (b"- 1\n- 2\n", "a recipe must be a mapping of setting: value"),
    (b"1: 2\n", "setting names must be text, got 1"),
    (b"steps: !!python/object/apply:os.system [echo hi]\n", "invalid YAML"),
])
def test_malformed_recipes_are_one_line_errors(tmp_path, content, message):
    r = tmp_path / "r.yaml"
    r.write_bytes(content)
    with pytest.raises(CirkitError) as e:
        resolve(Cfg, r)
    assert str(e.value).startswith(f"{r}: ") and message in str(e.value)
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)


def test_a_huge_recipe_is_refused_before_parsing(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_bytes(b"# " + b"x" * MAX_RECIPE_BYTES + b"\nsteps: 1\n")
    with pytest.raises(CirkitError, match=r"larger than 1 MB"):
        resolve(Cfg, r)


def test_a_recipe_that_is_a_folder(tmp_path):
    with pytest.raises(CirkitError, match=r"a recipe must be a YAML file, not a folder"):
        resolve(Cfg, tmp_path)


def test_a_huge_value_is_not_repeated_into_the_message(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: [" + ", ".join(["x" * 1000] * 500) + "]\n")
    with pytest.raises(CirkitError) as e:
        resolve(Cfg, r)
    assert len(str(e.value)) < 300
