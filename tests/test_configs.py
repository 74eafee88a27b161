"""Typed configurations and the step loop: ``RunConfig`` / ``StudyConfig`` checked up front
(a typo fails before any work), built from nested dicts with one ``from_dict``, the command line
giving the same configuration as the Python API, ``config.json`` refusing a different resumed
run, and the step loop's ``--until``, resumption and timing."""
from __future__ import annotations

import dataclasses
import json

import pytest

from cca_fast.baselines.lora.train import LoRAConfig
from cca_fast.cli.main import build_parser, main
from cca_fast.cli.run import config_from_args
from cca_fast.cli.study import study_config_from_args
from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.evaluation.suites import SuiteConfig
from cca_fast.experiments.config import GenerationSettings, RunConfig
from cca_fast.experiments.recipes import DEFAULT_RECIPE, recipe_config
from cca_fast.experiments.pipeline import run_cca
from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps import STEP_NAMES, RunContext, outputs_through, run_steps
from cca_fast.experiments.study import SHARED_FILES, StudyConfig
from cca_fast.stages.localize.dcm import DCMConfig
from cca_fast.stages.traces import TraceConfig
from cca_fast.stages.update import UpdateConfig
from helpers import run_config as tiny_config


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


# ---- construction and from_dict -----------------------------------------------------------------------
def test_nested_from_dict_round_trip():
    cfg = RunConfig(seed=3, max_test_problems=20, prompt=PromptConfig(mode="chat", n_shots=2),
                    generation=GenerationSettings(max_new_tokens=50, batch_size=3), trace=TraceConfig(k=4),
                    dcm=DCMConfig(epochs=7, mode="full"), update=UpdateConfig(lr=1e-3, betas=(0.8, 0.9)),
                    selector="atp-fraction", select_fraction=0.1)
    d = json.loads(json.dumps(cfg.to_dict()))  # what config.json holds
    assert d["dcm"]["epochs"] == 7 and d["generation"] == {"max_new_tokens": 50, "batch_size": 3, "slots": 128,
                                                                "compute_dtype": "float32", "continuous": True}
    back = RunConfig.from_dict(d)
    assert back == cfg and isinstance(back.dcm, DCMConfig) and back.update.betas == (0.8, 0.9)
    study = StudyConfig(run=cfg, selectors=["dcm"], controls=["none", "lora"], lora=LoRAConfig(r=4),
                        suites=SuiteConfig(mmlu_limit=3, suites=("mmlu",)))
    assert StudyConfig.from_dict(json.loads(json.dumps(study.to_dict()))) == study
    # a partial dict is overrides of the defaults, nested dicts merged into the nested defaults
    partial = RunConfig.from_dict({"dcm": {"epochs": 4}, "seed": 2})
    assert partial == dataclasses.replace(RunConfig(seed=2), dcm=dataclasses.replace(RunConfig().dcm, epochs=4))


def test_child_seeds_follow_the_run_seed():
    cfg = RunConfig(seed=5)
    assert cfg.trace.seed == cfg.dcm.seed == 5
    assert dataclasses.replace(cfg, seed=6).dcm.seed == 6
    assert RunConfig.from_dict({"seed": 7}).trace.seed == 7


@pytest.mark.parametrize("data,message", [
    ({"dcm": {"epoch": 3}}, "RunConfig.dcm has no field 'epoch': did you mean 'epochs'"),
    ({"seeds": 1}, "RunConfig has no field 'seeds': did you mean 'seed'"),
    ({"update": {"optimizer": "adam"}}, "optimizer must be 'sgd' or 'adamw'"),
    ({"dcm": {"mode": "middle"}}, "DCMConfig.mode"),
    ({"trace": 3}, "RunConfig.trace must be a TraceConfig or a dict"),
    ({"max_val_problems": 0}, "RunConfig.max_val_problems"),
    ({"generation": {"batch_size": 0}}, "GenerationSettings.batch_size"),
    ({"selector": "atp-topk"}, "select_k"),
])
def test_run_config_refuses_typos_and_bad_values(data, message):
    with pytest.raises(CCAError, match=message.replace("(", r"\(")):
        RunConfig.from_dict(data)


def test_nested_dict_is_refused_by_the_constructor():
    with pytest.raises(CCAError, match=r"RunConfig.dcm must be a DCMConfig.*RunConfig.from_dict"):
        RunConfig(dcm={"epochs": 3})


def test_study_config_refuses_typos():
    with pytest.raises(CCAError, match="StudyConfig.lora has no field 'rank'"):
        StudyConfig.from_dict({"lora": {"rank": 8}})
    with pytest.raises(CCAError, match="StudyConfig.run.dcm has no field 'lamda_l1'"):
        StudyConfig.from_dict({"run": {"dcm": {"lamda_l1": 0.1}}})
    with pytest.raises(CCAError, match="select-k"):
        StudyConfig(selectors=["atp-topk"], random_like="atp-topk")


def test_typo_fails_before_any_work(tmp_path):
    """A configuration broken after construction is refused by run_cca before the run directory,
    config.json or the model exist."""
    out = tmp_path / "run"
    cfg = RunConfig(output=str(out), model=str(tmp_path / "no-model"))
    cfg.selector = "dcmm"
    with pytest.raises(CCAError, match="unknown selector 'dcmm'"):
        run_cca(cfg, progress=False)
    cfg = RunConfig(output=str(out))
    cfg.dcm = {"epoch": 3}  # type: ignore[assignment]
    with pytest.raises(CCAError, match="RunConfig.dcm must be a DCMConfig"):
        run_cca(cfg, progress=False)
    with pytest.raises(CCAError, match="unknown step"):
        run_cca(RunConfig(output=str(out)), until="pivot", progress=False)
    assert not out.exists()


def test_cli_typo_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--output", str(out), "--max-val-problems", "-2", "--quiet"]) == 2
    assert "RunConfig.max_val_problems (--max-val-problems) must be a positive integer" in capsys.readouterr().err
    assert main(["run", "--output", str(out), "--update-steps", "0", "--quiet"]) == 2
    assert "--update-steps" in capsys.readouterr().err
    assert not out.exists()


# ---- the command line maps flags to fields --------------------------------------------------------------
def test_cli_and_python_api_give_the_same_config():
    assert config_from_args(_parse("run", "--recipe", "paper", "--seed", "1")) == RunConfig(seed=1)
    assert config_from_args(_parse("run", "--recipe", "paper")) == RunConfig()
    # no --recipe: the default recipe, flags on top
    assert config_from_args(_parse("run")) == recipe_config(DEFAULT_RECIPE)
    assert config_from_args(_parse("run", "--seed", "1")) == dataclasses.replace(recipe_config(DEFAULT_RECIPE), seed=1)
    argv = ["run", "--recipe", "paper", "--seed", "2", "--dcm-epochs", "4", "--lr", "0.01", "--batch-size", "3", "--n-shots", "1",
            "--max-test-problems", "0", "--max-train-problems", "5", "--selector", "random", "--select-count", "7",
            "--k", "6", "--dcm-mode", "full", "--output", "x"]
    expected = RunConfig(output="x", seed=2, max_train_problems=5, max_test_problems=None,
                         prompt=PromptConfig(n_shots=1), generation=GenerationSettings(batch_size=3),
                         trace=TraceConfig(k=6), dcm=DCMConfig(epochs=4, mode="full", reuse_prefix_cache=False),
                         update=dataclasses.replace(RunConfig().update, lr=0.01), selector="random", select_count=7)
    assert config_from_args(_parse(*argv)) == expected
    # a flag not given leaves its field at the dataclass default (no second copy of the defaults)
    assert config_from_args(_parse("run", "--dcm-lambda", "0.1")).dcm.reuse_prefix_cache is True


def test_study_cli_defaults_are_the_study_config_defaults(tmp_path):
    assert study_config_from_args(_parse("study")) == StudyConfig()
    s = study_config_from_args(_parse("study", "--seed", "1", "--mmlu-limit", "0", "--controls", "none",
                                      "--lora-r", "4", "--no-side-effects", "--side-data", str(tmp_path)))
    assert s.run == dataclasses.replace(StudyConfig().run, seed=1)
    assert s.suites.mmlu_limit is None and s.suites.data_root == str(tmp_path.resolve())
    assert s.controls == ["none"] and s.lora.r == 4 and s.side_effects is False


def test_help_shows_the_dataclass_defaults(capsys):
    # cca run shows the default recipe's values (fisher-sft: 10 AdamW steps), the rest RunConfig()'s
    for argv, expected in ((["run", "--help"], {"--update-steps": 10, "--optimizer": "adamw", "--n-per-template": 8,
                                                "--batch-size": 8}),
                           (["study", "--help"], {"--update-steps": 10, "--n-per-template": 15, "--dcm-epochs": 100,
                                                  "--mmlu-limit": 114, "--max-val-problems": 0})):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for flag, value in expected.items():
            after = text[text.rindex(flag + " "):]  # its entry in the options (after the usage)
            assert f"(default: {value})" in after[: after.index(" --", 3)], flag


# ---- config.json ------------------------------------------------------------------------------------------
def test_config_json_refuses_a_different_run_and_accepts_the_same(tmp_path):
    rd = RunDir(tmp_path / "run")
    cfg = RunConfig(output=str(rd.path), dcm=DCMConfig(epochs=4))
    rd.check_config(cfg)
    saved = json.loads(rd.config.read_text())
    assert saved["dcm"]["epochs"] == 4 and saved["prompt"]["n_shots"] == 8  # nested
    rd.check_config(RunConfig.from_dict(saved))  # the identical configuration resumes
    rd.check_config(dataclasses.replace(cfg, output="elsewhere"))  # output may differ
    with pytest.raises(CCAError, match=r"differs in: dcm\.epochs"):
        rd.check_config(dataclasses.replace(cfg, dcm=DCMConfig(epochs=5)))
    with pytest.raises(CCAError, match=r"differs in: dcm\.seed, seed, trace\.seed"):
        rd.check_config(dataclasses.replace(cfg, seed=1))
    # a nested field the saved file lacks (added since) counts at its default
    del saved["update"]["min_shared_prefix"]
    rd.config.write_text(json.dumps(saved))
    rd.check_config(cfg)


# ---- the step loop ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Result:
    value: str

    def message(self) -> str:
        return f"done {self.value}"


class _FakeStep:
    """Writes one file; complete once the file exists."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.outputs, self.calls = name, (f"{name}.txt",), calls

    def load(self, ctx):
        f = ctx.rd / self.outputs[0]
        return _Result(f.read_text()) if f.exists() else None

    def run(self, ctx):
        self.calls.append(self.name)
        (ctx.rd / self.outputs[0]).write_text(self.name + "".join(r.value for r in ctx.results.values()))
        return self.load(ctx)


def test_step_loop_until_resume_and_timing(tmp_path, capsys):
    calls: list[str] = []
    steps = [_FakeStep(n, calls) for n in ("a", "b", "c")]
    ctx = RunContext(RunConfig(output=str(tmp_path)), RunDir(tmp_path))
    assert run_steps(steps, ctx, until="b") is None
    assert calls == ["a", "b"] and not (tmp_path / "c.txt").exists()
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"a", "b"}
    assert "done ba" in capsys.readouterr().out
    # resume: finished steps are loaded, not run (nor timed again)
    ctx = RunContext(RunConfig(output=str(tmp_path)), RunDir(tmp_path))
    assert run_steps(steps, ctx) == _Result("caba")
    assert calls == ["a", "b", "c"]
    assert set(json.loads((tmp_path / "stages.json").read_text())) == {"a", "b", "c"}
    assert run_steps(steps, ctx, until="c") == _Result("caba")  # until the last step: its result
    with pytest.raises(CCAError, match="unknown step 'd'"):
        run_steps(steps, ctx, until="d")


def test_run_dir_owns_the_file_names():
    assert STEP_NAMES == ("data", "base_eval", "traces", "pivots", "examples", "localize", "diagnostics", "update",
                           "cca_eval", "report")
    assert SHARED_FILES == outputs_through("pivots") == (
        "data/train.jsonl", "data/val.jsonl", "data/test.jsonl", RunDir.BASE_TRAIN, RunDir.BASE_TEST,
        RunDir.TRAINING_SET, RunDir.TRACES, RunDir.PIVOTS)


def test_until_stops_the_real_pipeline(workdir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = tiny_config(workdir, out)
    assert run_cca(cfg, until="data", progress=False) is None
    assert all((out / RunDir.split_name(s)).exists() for s in ("train", "val", "test"))
    assert not (out / RunDir.BASE_TRAIN).exists() and not (out / RunDir.TRACES).exists()
    assert set(json.loads((out / "stages.json").read_text())) == {"data"}  # the data step needs no model
    assert RunConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg


def test_saved_config_with_an_empty_nested_entry_resumes(tmp_path):
    """A study whose variants include ``paper`` (``{}``, an empty nested dict) must resume: the
    default ``variants = {}`` may not fill in beside the saved ``variants.paper``."""
    from cca_fast.experiments.recipes import study_variants
    from cca_fast.io import check_or_write_config

    cfg = StudyConfig(variants=study_variants(["paper", "circuit-sft"])).to_dict()
    path = tmp_path / "study_config.json"
    check_or_write_config(path, cfg, StudyConfig().to_dict(), "study")
    check_or_write_config(path, cfg, StudyConfig().to_dict(), "study")  # the resume: no error
    other = StudyConfig(variants=study_variants(["paper"])).to_dict()
    with pytest.raises(CCAError, match="variants.circuit-sft"):
        check_or_write_config(path, other, StudyConfig().to_dict(), "study")
    # a field added since (absent from the saved file) still counts at its default
    saved = json.loads(path.read_text())
    del saved["run"]["seed"]
    path.write_text(json.dumps(saved))
    check_or_write_config(path, cfg, StudyConfig().to_dict(), "study")
