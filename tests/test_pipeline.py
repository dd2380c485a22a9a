"""The pipeline on the `ten` plugin: the exported ONNX, ORT vs torch, validate, artifacts and
every user error (one line, non-zero exit, nothing lost)."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli

from seqdeploy import pipeline
from seqdeploy.artifacts import Artifact, atomic_write, sha256_file
from seqdeploy.checkpoint import load_checkpoint, save_checkpoint
from seqdeploy.errors import ArtifactError, InputError
from seqdeploy.plugins import load_registry

ROOT_ARGS = ["--device", "cpu"]


def art(root):
    return Artifact.load(root / "ten" / "tiny")


# -- the exported ONNX ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.onnx", "model.fp16.onnx"])
def test_onnx_has_one_custom_node_per_layer_and_a_standard_fallback(ten_artifact, name):
    model = onnx.load(str(art(ten_artifact).path(name)))
    nodes = model.graph.node
    custom = [n for n in nodes if n.domain == "seqdeploy"]
    assert [n.op_type for n in custom] == ["EigenScan", "EigenScan"]        # n_layers = 2
    for n in custom:
        attrs = {a.name: a.s.decode() for a in n.attribute}
        assert attrs == {"plugin_namespace": "seqdeploy", "plugin_version": "1"}
    assert not [n for n in nodes if n.op_type in ("Loop", "Scan")]
    functions = {(f.domain, f.name): f for f in model.functions}
    fn = functions[("seqdeploy", "EigenScan")]
    fn_domains = {n.domain for n in fn.node}
    assert fn_domains <= {"", "ai.onnx"}                 # standard ops only
    assert "Scan" in [n.op_type for n in fn.node]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims[0] == ["batch", "seq"]
    assert [o.name for o in model.graph.output] == ["logits", "h_re_out", "h_im_out"]
    onnx.checker.check_model(model, full_check=True)


def test_plain_onnxruntime_runs_the_model_without_seqdeploy(ten_artifact):
    """A fresh interpreter that imports only onnxruntime and numpy."""
    path = art(ten_artifact).path("model.onnx")
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        for b, t in [(1, 1), (3, 37)]:
            feeds = {{"input_ids": np.random.randint(0, 256, (b, t)).astype(np.int64),
                      "h_re": np.zeros((b, 2, 16), np.float32), "h_im": np.zeros((b, 2, 16), np.float32)}}
            logits, hr, hi = s.run(None, feeds)
            assert logits.shape == (b, t, 256) and np.isfinite(logits).all()
        assert not any(m.startswith("seqdeploy") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("precision,limit", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_ort_equals_torch(ten_artifact, precision, limit):
    from seqdeploy.parity import compare
    from seqdeploy.precision import cast_inputs

    registry = load_registry()
    artifact = art(ten_artifact)
    arch = registry.architecture("ten")
    inputs = arch.make_inputs(artifact.manifest["config"], 2, 50, seed=11)
    torch_s = pipeline.open_session(registry, artifact, "torch", precision, "cpu")
    ort_s = pipeline.open_session(registry, artifact, "ort", precision, "cpu")
    inputs = cast_inputs(inputs, torch_s.input_specs, precision)
    a, b = torch_s.run(inputs), ort_s.run(inputs)
    for name in a:
        assert b[name].dtype == a[name].dtype
        assert compare(a[name], b[name]).rel_l2 < limit, name


# -- validate ------------------------------------------------------------------------------
def test_validate_passes_with_fp16_limits_at_4096(ten_copy, capsys):
    code, out, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "validate", "ten", "--preset", "tiny"], capsys)
    assert code == 0, err
    report = json.loads((ten_copy / "ten" / "tiny" / "parity.json").read_text())
    cases = {c["case"] for c in report["checks"]}
    assert cases == {"B1-T1", "B2-T63", "B2-T256", "B1-T4096", "B2-T256-split129"}
    long16 = [c for c in report["checks"] if c["case"] == "B1-T4096" and c["precision"] == "fp16"]
    assert {c["engine"] for c in long16} == {"torch", "ort", "ort-onnx"}
    for c in long16:
        assert c["passed"] and c["metrics"]["rel_l2"] <= 5e-3 and c["metrics"]["cosine"] >= 0.9999
    for c in report["checks"]:
        if c["precision"] == "fp32":
            assert c["metrics"]["rel_l2"] <= 1e-5


def _edit_onnx_weight(root):
    """Change one weight of model.onnx and rewrite the manifest so the checksums match."""
    artifact = art(root)
    path = artifact.path("model.onnx")
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "mixers.0.coupling")
    array = onnx.numpy_helper.to_array(init).copy()
    array.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))
    artifact.manifest["files"]["model.onnx"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    artifact.save_manifest()


def test_validate_catches_a_wrong_model(ten_copy, capsys):
    _edit_onnx_weight(ten_copy)
    code, out, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "validate", "ten", "--preset", "tiny",
                              "--engine", "ort", "--precision", "fp32"], capsys)
    assert code == 1
    assert "FAIL ten ort fp32" in err and "output logits diverged" in err
    report = json.loads((ten_copy / "ten" / "tiny" / "parity.json").read_text())
    assert not report["passed"]


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_checksum_refuses_damaged_files(ten_copy, capsys, damage):
    path = ten_copy / "ten" / "tiny" / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + b"\x00")
    code, out, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "validate", "ten", "--preset", "tiny",
                              "--engine", "ort"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "checksum mismatch" in err and "model.onnx" in err and "Traceback" not in err


def test_corrupt_and_missing_manifest(ten_copy, capsys, tmp_path):
    code, _, err = run_cli(["--out", tmp_path / "none", *ROOT_ARGS, "validate", "ten", "--preset", "tiny"], capsys)
    assert code == 2 and "manifest.json missing" in err
    (ten_copy / "ten" / "tiny" / "manifest.json").write_text("{ not json")
    code, _, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "bench", "ten", "--preset", "tiny"], capsys)
    assert code == 2 and "corrupt manifest" in err


# -- inputs --------------------------------------------------------------------------------
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("engine", ["torch", "ort"])
def test_predict_checks_inputs(ten_copy, tmp_path, capsys, engine):
    ids = np.random.randint(0, 256, (2, 9)).astype(np.int64)
    h = np.zeros((2, 2, 16), np.float32)
    base = ["--out", ten_copy, *ROOT_ARGS, "predict", "ten", "--preset", "tiny", "--engine", engine]
    good = _npz(tmp_path / "good.npz", input_ids=ids, h_re=h, h_im=h)
    code, out, err = run_cli([*base, "--inputs", good, "--output", tmp_path / "out.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as result:
        assert result["logits"].shape == (2, 9, 256)
    cases = {
        "shape": (dict(input_ids=ids[None], h_re=h, h_im=h), "input input_ids: expected shape [batch, seq]"),
        "state": (dict(input_ids=ids, h_re=h[:, :1], h_im=h), "input h_re: expected shape"),
        "batch": (dict(input_ids=ids, h_re=h[:1], h_im=h[:1]), "batch is 1 but input_ids has 2"),
        "nan": (dict(input_ids=ids, h_re=h + np.nan, h_im=h), "input h_re: contains NaN or Inf"),
        "dtype": (dict(input_ids=ids.astype(np.int32), h_re=h, h_im=h), "expected dtype int64, got int32"),
        "range": (dict(input_ids=ids + 300, h_re=h, h_im=h), "values must lie in [0, 256)"),
        "missing": (dict(input_ids=ids, h_re=h), "missing input(s) h_im"),
    }
    for name, (arrays, message) in cases.items():
        path = _npz(tmp_path / f"{name}.npz", **arrays)
        code, out, err = run_cli([*base, "--inputs", path], capsys)
        assert code == 2, name
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)


def test_session_rejects_bad_inputs_directly(ten_artifact):
    registry = load_registry()
    session = pipeline.open_session(registry, art(ten_artifact), "torch", "fp32", "cpu")
    with pytest.raises(InputError, match="NaN"):
        session.run({"input_ids": torch.zeros(1, 3, dtype=torch.long),
                     "h_re": torch.full((1, 2, 16), float("nan")), "h_im": torch.zeros(1, 2, 16)})


# -- engines that cannot run -----------------------------------------------------------------
def test_trt_says_why_in_one_line(ten_copy, capsys):
    code, out, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "bench", "ten", "--preset", "tiny",
                              "--engine", "trt"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "tensorrt is not installed" in lines[0] or "CUDA device" in lines[0] \
        or "compute capability" in lines[0]


def test_cuda_device_missing_is_one_line(ten_copy, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = run_cli(["--out", ten_copy, "--device", "cuda", "validate", "ten", "--preset", "tiny"], capsys)
    assert code == 2 and err.strip() == "error: no CUDA device (asked for --device cuda)"


# -- checkpoints and atomic writes -------------------------------------------------------------
def test_checkpoint_roundtrip_and_errors(tmp_path, registry):
    arch = registry.architecture("ten")
    config = arch.config("tiny")
    model = arch.build(config)
    save_checkpoint(model, tmp_path / "w.safetensors")
    other = arch.build(config)
    load_checkpoint(other, tmp_path / "w.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "w.safetensors"))
    missing = dict(state)
    missing.pop("mixers.0.nu")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ArtifactError, match="missing key.*mixers.0.nu"):
        load_checkpoint(arch.build(config), tmp_path / "missing.safetensors")
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ArtifactError, match="unexpected key.*extra.weight"):
        load_checkpoint(arch.build(config), tmp_path / "extra.safetensors")
    save_file({**state, "mixers.0.nu": torch.zeros(3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ArtifactError, match=r"shape mismatch for mixers.0.nu: checkpoint \[3\], model \[16\]"):
        load_checkpoint(arch.build(config), tmp_path / "shape.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_checkpoint(arch.build(config), tmp_path / "junk.safetensors")


def test_export_from_checkpoint_uses_its_weights(tmp_path, registry, capsys):
    arch = registry.architecture("ten")
    torch.manual_seed(123)
    model = arch.build(arch.config("tiny"))
    save_checkpoint(model, tmp_path / "w.safetensors")
    code, _, err = run_cli(["--out", tmp_path / "ex", *ROOT_ARGS, "export", "ten", "--preset", "tiny",
                            "--checkpoint", tmp_path / "w.safetensors"], capsys)
    assert code == 0, err
    exported = load_checkpoint(arch.build(arch.config("tiny")),
                               art(tmp_path / "ex").path("model.safetensors"))
    assert torch.equal(exported.mixers[0].nu, model.mixers[0].nu)
    bad = {k: v for k, v in model.state_dict().items() if k != "embed.weight"}
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "bad.safetensors"))
    code, _, err = run_cli(["--out", tmp_path / "ex2", *ROOT_ARGS, "export", "ten", "--preset", "tiny",
                            "--checkpoint", tmp_path / "bad.safetensors"], capsys)
    assert code == 2 and "missing key(s) embed.weight" in err
    assert not (tmp_path / "ex2" / "ten" / "tiny" / "model.onnx").exists()


def test_interrupted_write_leaves_nothing_that_loads(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old and good")

    def dies(path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert target.read_bytes() == b"old and good"
    assert os.listdir(tmp_path) == ["model.onnx"]


def _write_many(directory, tag, n, start):
    artifact = Artifact.load(directory)
    start.wait()
    for i in range(n):
        artifact.write(f"{tag}{i}.txt", lambda p, i=i: p.write_text(f"{tag} {i}"),
                       records={"notes": f"{tag}{i}"})


def test_concurrent_runs_keep_every_manifest_entry(tmp_path):
    """Two processes writing into one folder at once (as validate and bench in two shells):
    every file each records ends up in the manifest, with its side records, and loads."""
    directory = tmp_path / "x" / "tiny"
    Artifact.create(directory, "x", "tiny", {})
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(directory, tag, 40, start)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    loaded = Artifact.load(directory)
    names = {f"{t}{i}.txt" for t in "ab" for i in range(40)}
    assert set(loaded.manifest["files"]) == names
    assert loaded.manifest["notes"] == {n: n[:-4] for n in names}
    for n in names:
        assert loaded.path(n).read_text() == f"{n[0]} {n[1:-4]}"


def test_a_run_on_a_folder_exported_anew_records_nothing(tmp_path):
    directory = tmp_path / "x" / "tiny"
    stale = Artifact.create(directory, "x", "tiny", {})
    Artifact.create(directory, "x", "tiny", {})                  # exported again meanwhile
    with pytest.raises(ArtifactError, match="exported anew while this run used it"):
        stale.write("late.txt", lambda p: p.write_text("late"))
    fresh = Artifact.load(directory)
    assert not fresh.has("late.txt")
    with pytest.raises(ArtifactError, match="late.txt is not part of this artifact"):
        fresh.path("late.txt")


def test_artifacts_are_readable_by_others_under_the_umask(ten_copy):
    mode = (ten_copy / "ten" / "tiny" / "model.onnx").stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


@pytest.mark.parametrize("args,message", [
    (["bench", "ten", "--preset", "tiny", "--batch", "0"], "Invalid value for '--batch'"),
    (["validate", "ten", "--preset", "tiny", "--long-seq", "-5"], "Invalid value for '--long-seq'"),
    (["export", "ten", "--preset", "tiny", "--seed", "abc"], "Invalid value for '--seed'"),
])
def test_usage_errors_are_one_line(ten_copy, capsys, args, message):
    code, out, err = run_cli(["--out", ten_copy, *ROOT_ARGS, *args], capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_unwritable_output_and_foreign_files_are_one_line(ten_copy, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["--out", blocker / "sub", *ROOT_ARGS, "export", "ten", "--preset", "tiny"],
                           capsys)
    assert code == 2 and err.startswith("error: cannot write") and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "plain.npy", np.zeros(3))
    code, _, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "predict", "ten", "--preset", "tiny",
                            "--inputs", tmp_path / "plain.npy"], capsys)
    assert code == 2 and "not an .npz archive" in err
    manifest = ten_copy / "ten" / "tiny" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["arch"] = "cfc"
    manifest.write_text(json.dumps(data))
    code, _, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "bench", "ten", "--preset", "tiny"], capsys)
    assert code == 2 and "the manifest says cfc/tiny" in err
    manifest.write_text(json.dumps({**data, "files": {"model.onnx": {"bytes": 1}}}))
    code, _, err = run_cli(["--out", ten_copy, *ROOT_ARGS, "bench", "ten", "--preset", "tiny"], capsys)
    assert code == 2 and "corrupt manifest (entry for 'model.onnx')" in err


def test_file_not_in_manifest_is_refused(ten_copy):
    artifact = art(ten_copy)
    del artifact.manifest["files"]["model.fp16.onnx"]
    artifact.save_manifest()
    with pytest.raises(ArtifactError, match="not part of this artifact"):
        art(ten_copy).path("model.fp16.onnx")


# -- the whole pipeline through the installed console script -------------------------------------
def test_run_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["seqdeploy", "--out", str(tmp_path), "run", "ten", "--preset", "tiny",
                          "--long-seq", "512"], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "ten" / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "model.onnx", "model.fp16.onnx",
                                      "model.step.onnx", "model.step.fp16.onnx",
                                      "parity.json", "bench.json", "bench.png"}
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"]
    assert {(c["engine"], c["precision"]) for c in parity["checks"]} == \
        {("torch", "fp32"), ("torch", "fp16"), ("ort", "fp32"), ("ort", "fp16"),
         ("ort-onnx", "fp32"), ("ort-onnx", "fp16")}
    stepped = {(c["engine"], c["precision"]) for c in parity["checks"] if c["case"].endswith("-steps")}
    assert stepped == {("torch", "fp32"), ("torch", "fp16"), ("ort", "fp32"), ("ort", "fp16"),
         ("ort-onnx", "fp32"), ("ort-onnx", "fp16")}
    bench = json.loads((folder / "bench.json").read_text())
    assert {r["engine"] for r in bench["engines"]} == {"torch-ref", "torch", "ort", "ort-onnx"}
    assert all(r["tokens_per_s"] > 0 for r in bench["engines"])
    assert "skipping engine trt" in out.stderr
