"""The `tune` command: ls, cp, cat, validate, run (in-process and torchrun), registry discovery."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinytune.cli import main as cli_main
from tinytune.cli.main import main
from tinytune.config import registry

FIXTURES = Path(__file__).parent / "fixtures" / "cli"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry with one recipe (tiny_recipe) and configs in two families."""
    recipes = tmp_path / "pkg" / "recipes"
    configs = tmp_path / "pkg" / "configs"
    (configs / "tiny").mkdir(parents=True)
    (configs / "other").mkdir()
    recipes.mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny_recipe.py", recipes / "tiny_recipe.py")
    (recipes / "__init__.py").write_text("")
    (recipes / "_helpers.py").write_text("")
    shutil.copy(FIXTURES / "tiny.yaml", configs / "tiny" / "tiny.yaml")
    (configs / "tiny" / "tiny_adam.yaml").write_text(
        (FIXTURES / "tiny.yaml").read_text().replace("torch.optim.SGD", "torch.optim.Adam")
    )
    (configs / "other" / "orphan.yaml").write_text("# recipe: not_written_yet\nseed: 1\n")
    (configs / "other" / "headless.yaml").write_text("seed: 1\n")
    monkeypatch.setattr(registry, "recipes_dir", lambda: recipes)
    monkeypatch.setattr(registry, "configs_dir", lambda: configs)
    return tmp_path


# ---------------------------------------------------------------------------------------------- registry


def test_registry_discovers_recipes_and_configs(fake_registry):
    assert list(registry.list_recipes()) == ["tiny_recipe"]  # __init__ and _helpers skipped
    configs = registry.list_configs()
    assert sorted(configs) == ["other/headless", "other/orphan", "tiny/tiny", "tiny/tiny_adam"]
    assert configs["tiny/tiny"].recipe == "tiny_recipe"
    assert configs["other/headless"].recipe is None


def test_registry_resolution_errors_suggest(fake_registry):
    with pytest.raises(Exception, match="Did you mean 'tiny_recipe'"):
        registry.resolve_recipe("tiny_recipee")
    with pytest.raises(Exception, match="Did you mean 'tiny/tiny_adam'"):
        registry.resolve_config("tiny/tiny_adamw")
    assert registry.resolve_recipe(str(FIXTURES / "tiny_recipe.py")) == FIXTURES / "tiny_recipe.py"


def test_real_registry_is_consistent():
    """Every shipped config names a shipped recipe in its '# recipe:' header."""
    recipes = registry.list_recipes()
    for name, entry in registry.list_configs().items():
        assert entry.recipe is not None, f"{entry.path}: line 1 must be '# recipe: <name>'"
        assert entry.recipe in recipes, f"{entry.path}: recipe '{entry.recipe}' not found in {sorted(recipes)}"


# ---------------------------------------------------------------------------------------------- main / ls / cat


def test_help_does_not_import_torch():
    code = "import sys; from tinytune.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "a tune subcommand module imports torch at import time"


def test_missing_subcommand_module_is_skipped(monkeypatch):
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", ("ls", "no_such_subcommand"))
    parser = cli_main.build_parser()
    assert parser.parse_args(["ls"]).command == "ls"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "<command>" in capsys.readouterr().out


def test_ls_table(fake_registry, capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    assert lines[1].split() == ["tiny_recipe", "tiny/tiny"]
    assert lines[2].split() == ["tiny/tiny_adam"]
    text = "\n".join(lines)
    assert "not_written_yet (missing recipe)" in text and "(no recipe header)" in text


def test_ls_real_registry_runs(capsys):
    assert main(["ls", "-v"]) == 0


def test_cat(fake_registry, capsys):
    assert main(["cat", "tiny/tiny"]) == 0
    assert capsys.readouterr().out == (FIXTURES / "tiny.yaml").read_text()
    assert main(["cat", "tiny/tiny", "output_dir=/o", "optimizer.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "log_dir: /o/logs" in out and "lr: 0.5" in out


def test_user_errors_exit_2_with_message(fake_registry, capsys):
    assert main(["cat", "tiny/tinny"]) == 2
    err = capsys.readouterr().err
    assert "tiny/tiny" in err and "Traceback" not in err
    assert main(["run", "tiny_recipee", "--config", "tiny/tiny"]) == 2
    assert "Did you mean 'tiny_recipe'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- cp + run


def test_cp_recipe_and_config_then_run_the_copies(fake_registry, tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["cp", "tiny_recipe", str(work / "my_recipe")]) == 0  # .py added
    assert main(["cp", "tiny/tiny", str(work / "my.yaml")]) == 0
    assert (work / "my_recipe.py").read_text() == (FIXTURES / "tiny_recipe.py").read_text()
    assert main(["cp", "tiny/tiny", str(work / "my.yaml")]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["cp", "tiny/tiny", str(work / "my.yaml"), "--force"]) == 0
    os.makedirs(work / "dir")
    assert main(["cp", "tiny/tiny_adam", str(work / "dir")]) == 0
    assert (work / "dir" / "tiny_adam.yaml").exists()

    out = tmp_path / "out"
    rc = main(
        ["run", str(work / "my_recipe.py"), "--config", str(work / "my.yaml"), f"output_dir={out}", "optimizer.lr=0.25"]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lr"] == 0.25 and report["log_dir"] == f"{out}/logs"


def test_run_by_registry_names_in_process(fake_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv_before = list(sys.argv)
    assert main(["run", "tiny_recipe", "--config", "tiny/tiny_adam", f"output_dir={tmp_path}/o"]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["lr"] == 0.1
    assert sys.argv == argv_before  # restored after the in-process run


def test_run_accepts_config_before_recipe(fake_registry, tmp_path):
    assert main(["run", "--config", "tiny/tiny", "tiny_recipe", f"output_dir={tmp_path}/o"]) == 0
    assert (tmp_path / "o" / "report.json").exists()


def test_run_reports_recipe_config_errors(fake_registry, tmp_path, capsys):
    rc = main(["run", "tiny_recipe", "--config", "tiny/tiny", "optimzer.lr=1"])
    assert rc == 2
    assert "optimizer.lr" in capsys.readouterr().err


def test_run_warns_on_recipe_mismatch(fake_registry, tmp_path, capsys):
    (registry.configs_dir() / "tiny" / "mismatch.yaml").write_text(
        (FIXTURES / "tiny.yaml").read_text().replace("# recipe: tiny_recipe", "# recipe: other_recipe")
    )
    assert main(["run", "tiny_recipe", "--config", "tiny/mismatch", f"output_dir={tmp_path}/o"]) == 0
    assert "declares '# recipe: other_recipe'" in capsys.readouterr().err


def test_launcher_args():
    from tinytune.cli.run import launcher_args

    parser = cli_main.build_parser()
    ns = parser.parse_args(["run", "--nproc_per_node", "2", "x.py", "--config", "c", "--nnodes", "3"])
    assert launcher_args(ns) == ["--nproc_per_node", "2", "--standalone"]
    assert ns.recipe_args == ["--config", "c", "--nnodes", "3"]  # after the recipe: the recipe's own args
    ns = parser.parse_args(["run", "--nnodes", "2", "--node-rank", "1", "--rdzv_endpoint", "h:29400", "x.py"])
    assert launcher_args(ns) == ["--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", "h:29400"]
    ns = parser.parse_args(["run", "--nproc_per_node", "2", "--master_port", "29999", "x.py"])
    assert "--standalone" not in launcher_args(ns)
    assert launcher_args(parser.parse_args(["run", "x.py"])) == []


def test_run_torchrun_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "tinytune.cli.main",
        "run",
        "--nproc_per_node",
        "2",
        str(FIXTURES / "dist_recipe.py"),
        "--config",
        str(FIXTURES / "dist.yaml"),
        f"output_dir={tmp_path}",
        "tag=hello",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "2 3 0 hello"
    assert (tmp_path / "rank1.txt").read_text() == "2 3 1 hello"


# ---------------------------------------------------------------------------------------------- validate


def _all_configs():
    """Every registered config (others add theirs over time) plus the test fixtures."""
    names = list(registry.list_configs())
    return names + [str(FIXTURES / "tiny.yaml"), str(FIXTURES / "dist.yaml")]


@pytest.mark.parametrize("config", _all_configs())
def test_validate_every_config(config, capsys):
    rc = main(["validate", config])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "OK" in captured.out


def test_validate_reports_problems_with_keys(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  _component_: torch.nn.Linear\n  in_featurs: 4\n"
        "optimizer:\n  _component_: torch.optim.SGDD\nlog_dir: ${nope}\n"
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "log_dir" in err  # interpolation failure is reported first (load stage)
    bad.write_text(
        "model:\n  _component_: torch.nn.Linear\n  in_featurs: 4\noptimizer:\n  _component_: torch.optim.SGDD\n"
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "model: " in err and "'in_features'" in err
    assert "optimizer: " in err and "torch.optim.SGD" in err


def test_validate_all(fake_registry, capsys):
    assert main(["validate", "--all"]) == 1  # other/orphan and other/headless are broken
    out, err = capsys.readouterr()
    assert "tiny/tiny: OK" in out and "tiny/tiny_adam: OK" in out
    assert "other/orphan: 1 problem(s)" in err and "other/headless: 1 problem(s)" in err
    assert main(["validate"]) == 2


def test_validate_checks_registry_headers(fake_registry, capsys):
    assert main(["validate", "other/orphan"]) == 1
    assert "not_written_yet" in capsys.readouterr().err
    assert main(["validate", "other/headless"]) == 1
    assert "# recipe:" in capsys.readouterr().err
    assert main(["validate", "tiny/tiny"]) == 0
