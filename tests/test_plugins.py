"""Extension points: built-ins and third-party plugins load the same way; broken plugins are
reported by name and everything else keeps working."""
from __future__ import annotations

import inspect
from pathlib import Path
import json

import pluggy
import pytest
from conftest import run_cli

from seqdeploy import hookspecs
from seqdeploy.plugins import load_registry


def test_builtins_arrive_through_the_entry_point_group(registry):
    assert "ten" in registry.architectures
    assert "eigen_scan" in registry.ops
    assert {"torch", "torch-ref", "ort", "trt"} <= set(registry.engines)
    sources = {p.name: p.source for p in registry.plugins}
    assert sources["ten"] == "entry-point"          # no special case for built-ins


def test_every_hook_is_documented_typed_and_used():
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(fn, "seqdeploy_spec")]
    assert sorted(specs) == ["register_architectures", "register_commands", "register_engines",
                             "register_ops"]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in specs:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and fn.__annotations__, name
        assert f"{name}(" in readme, f"{name} missing from README"


def test_third_party_plugin_via_env(monkeypatch, capsys):
    monkeypatch.setenv("SEQDEPLOY_PLUGINS", "seqdeploy_toy")
    code, out, _ = run_cli(["list", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert "toy" in [a["name"] for a in data["architectures"]]
    assert {"name": "seqdeploy_toy", "source": "env/cli"}.items() <= \
        next(p for p in data["plugins"] if p["name"] == "seqdeploy_toy").items()
    code, out, _ = run_cli(["toy-hello"], capsys)
    assert (code, out.strip()) == (0, "hello from toy")


def test_broken_plugin_is_named_and_the_rest_works(capsys):
    code, out, _ = run_cli(["--plugin", "seqdeploy_broken", "list"], capsys)
    assert code == 0
    assert "seqdeploy_broken" in out and "FAILED" in out and "broken on purpose" in out
    assert "ten" in out
    code, out, _ = run_cli(["--plugin", "seqdeploy_broken", "doctor"], capsys)
    assert code == 0 and "broken on purpose" in out


def test_plugin_whose_hook_raises_is_recorded(monkeypatch):
    import types

    bad = types.ModuleType("bad_hooks")

    @hookspecs.hookimpl
    def register_architectures(register):
        raise ValueError("cannot register")

    bad.register_architectures = register_architectures
    monkeypatch.setitem(__import__("sys").modules, "bad_hooks", bad)
    registry = load_registry(["bad_hooks"])
    assert [(f.name, "cannot register" in f.error) for f in registry.failures] == [("bad_hooks", True)]
    assert "ten" in registry.architectures


def test_autoload_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SEQDEPLOY_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = load_registry()
    assert "ten" not in registry.architectures and "torch" in registry.engines
    registry = load_registry(["seqdeploy_ten"])          # explicit loading still works
    assert "ten" in registry.architectures


def test_each_registry_is_fresh():
    a, b = load_registry(), load_registry()
    assert a.pm is not b.pm and isinstance(a.pm, pluggy.PluginManager)


def test_unknown_architecture_is_one_line(capsys):
    code, out, err = run_cli(["export", "nosuch"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown architecture 'nosuch'" in err


@pytest.mark.parametrize("args", [["validate", "ten", "--precision", "fp8"],
                                  ["bench", "ten", "--engine", "nosuch"]])
def test_bad_options_are_one_line(args, ten_copy, capsys):
    code, out, err = run_cli(["--out", ten_copy, "--device", "cpu", *args, "--preset", "tiny"], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    assert [line for line in lines if line.startswith("error")] == [lines[-1]]


def test_seqdeploy_alone_prints_help_and_exits_0(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 0 and "Usage:" in out and "export" in out and not err


def test_out_and_device_work_after_the_command(tmp_path, capsys):
    code, out, err = run_cli(["export", "ten", "--preset", "tiny", "--out", tmp_path / "x",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "x" / "ten" / "tiny" / "model.onnx").is_file()
    code, out, err = run_cli(["list", "--device", "nosuch"], capsys)
    assert code != 0 and err.strip().startswith("error:")


def test_a_broken_plugin_is_named_on_stderr_by_every_command(capsys):
    for args in (["list"], ["doctor"], ["export", "nosuch"]):
        code, out, err = run_cli(["--plugin", "seqdeploy_broken", *args], capsys)
        assert "plugin seqdeploy_broken failed to load" in err, args
