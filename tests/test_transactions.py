"""Re-exports never destroy a good artifact: an export interrupted while it replaces a
complete artifact (SIGINT or SIGKILL, at several points) leaves the old model or the new one,
whole, never a mix; files derived from the old model never describe the new one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import onnxruntime
import pytest
import torch
from conftest import run_cli

from seqdeploy import pipeline
from seqdeploy.artifacts import Artifact
from seqdeploy.errors import ArtifactError
from seqdeploy.plugins import load_registry


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """ten/tiny exported with seed 0 and every derived file: fp16 graphs and parity.json."""
    root = tmp_path_factory.mktemp("complete")
    registry = load_registry()
    artifact = pipeline.export(registry, "ten", "tiny", root, seed=0, streaming=True)
    pipeline.optimize_fp16(registry, artifact)
    artifact.write_json("parity.json", {"passed": True, "note": "describes seed 0"})
    return root


def _expected(seed: int, inputs):
    registry = load_registry()
    arch = registry.architecture("ten")
    torch.manual_seed(seed)
    model = arch.build(arch.config("tiny")).eval()
    with torch.no_grad():
        return model(*(inputs[s.name] for s in arch.input_specs(arch.config("tiny"))))[0]


def _check_whole(folder) -> int:
    """The folder loads, every recorded file matches its checksum, and weights and ONNX are
    those of one seed's model; returns that seed."""
    artifact = Artifact.load(folder)
    for name in artifact.manifest["files"]:
        artifact.path(name)                       # raises on a missing or mixed-in file
    seed = artifact.manifest["seed"]
    registry = load_registry()
    arch = registry.architecture("ten")
    inputs = arch.make_inputs(artifact.manifest["config"], 2, 9, seed=4)
    expected = _expected(seed, inputs)
    got = pipeline.open_session(registry, artifact, "torch", "fp32", "cpu").run(inputs)["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ort = onnxruntime.InferenceSession(str(artifact.path("model.onnx")))
    onnx_out = ort.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-4)
    if seed == 1:   # the new export: nothing derived from the old model came along
        assert not any(n in artifact.manifest["files"] for n in
                       ("model.fp16.onnx", "model.step.fp16.onnx", "parity.json"))
        assert not (folder / "parity.json").exists() and not (folder / "model.fp16.onnx").exists()
    else:
        assert json.loads(artifact.path("parity.json").read_text())["note"] == "describes seed 0"
    return seed


@pytest.mark.parametrize("sig,marker,delay", [
    (signal.SIGINT, "writing weights", 0.0),
    (signal.SIGINT, "exporting fp32 ONNX", 1.0),
    (signal.SIGKILL, "exporting fp32 ONNX", 0.0),
    (signal.SIGKILL, "exporting fp32 ONNX", 2.5),
    (signal.SIGKILL, "one-step graph", 1.5),
])
def test_interrupted_reexport_leaves_one_whole_model(complete, tmp_path, sig, marker, delay):
    root = tmp_path / "exported"
    shutil.copytree(complete, root, symlinks=True)
    folder = root / "ten" / "tiny"
    assert _check_whole(folder) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "seqdeploy", "export", "ten", "--preset", "tiny",
                             "--seed", "1", "--streaming", "--out", str(root), "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = []
    for line in proc.stderr:                       # progress lines arrive as the export moves on
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            proc.send_signal(sig)
            break
    proc.stderr.close()
    proc.wait(timeout=300)
    assert any(marker in line for line in seen), "".join(seen)
    assert _check_whole(folder) in (0, 1)
    leftovers = [p.name for p in folder.parent.iterdir() if p.name != "tiny"]
    assert len(leftovers) <= 2, leftovers           # the live version, at most one crashed one
    # and a later export over it works and sweeps what a SIGKILL left
    registry = load_registry()
    pipeline.export(registry, "ten", "tiny", root, seed=1)
    assert _check_whole(folder) == 1


def test_a_finished_reexport_replaces_the_artifact_whole(complete, tmp_path, capsys):
    root = tmp_path / "exported"
    shutil.copytree(complete, root, symlinks=True)
    code, out, err = run_cli(["export", "ten", "--preset", "tiny", "--seed", "1",
                              "--out", root, "--device", "cpu"], capsys)
    assert code == 0, err
    assert _check_whole(root / "ten" / "tiny") == 1
    assert [p.name for p in (root / "ten").iterdir() if not p.name.startswith(".")] == ["tiny"]
    assert len(list((root / "ten").iterdir())) == 2          # the link and its one version


def test_a_manifest_whose_io_no_longer_matches_is_refused(complete, tmp_path, capsys):
    root = tmp_path / "exported"
    shutil.copytree(complete, root, symlinks=True)
    folder = root / "ten" / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["io"]["inputs"][1]["dtype"] = "float"          # as an older plugin wrote it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run_cli(["--out", root, "--device", "cpu", "predict", "ten", "--preset",
                              "tiny", "--inputs", tmp_path / "none.npz"], capsys)
    assert code != 0 and err.strip().count("\n") == 0 and "no longer match" in err
    with pytest.raises(ArtifactError, match="no longer match"):
        pipeline.open_session(load_registry(), Artifact.load(folder), "torch", "fp32", "cpu")


def test_a_checkpoint_with_nan_is_refused_and_nothing_is_replaced(complete, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root = tmp_path / "exported"
    shutil.copytree(complete, root, symlinks=True)
    folder = root / "ten" / "tiny"
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("nu"))
    state[key][0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    code, out, err = run_cli(["--out", root, "--device", "cpu", "export", "ten", "--preset",
                              "tiny", "--checkpoint", bad], capsys)
    assert code != 0 and "NaN or Inf" in err and err.strip().count("\n") == 0
    assert _check_whole(folder) == 0


def test_a_folder_of_the_users_is_never_replaced(tmp_path, capsys):
    folder = tmp_path / "exported" / "ten" / "tiny"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    code, out, err = run_cli(["--out", tmp_path / "exported", "--device", "cpu", "export", "ten",
                              "--preset", "tiny"], capsys)
    assert code != 0 and "holds no seqdeploy artifact" in err
    assert (folder / "notes.txt").read_text() == "mine"
