"""ONNX Runtime's own per-call floor on the CUDA EP, the way the `ort` engine calls it.

    python benchmarks/ort_floor.py [--json out.json]

For each cfc seed point (fp16, B x T x H) it times a one-node graph (``Identity`` of a
``[B, T, H]`` input) through the same path as ``seqdeploy.engines.ort`` on CUDA: a fresh
IO binding per call, inputs and outputs bound to torch device memory, the current stream
synchronised, ``run_with_iobinding``. No model can run faster than this on that path, so it
bounds the ratios the ``ort`` engine can reach against ``torch`` and ``ort-onnx`` at the
same shapes (times from ``seqdeploy.bench.time_fn``, CUDA events, this run only).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from seqdeploy.bench import time_fn

POINTS = [(32, 10, 256), (64, 50, 256), (128, 100, 256)]   # the cfc seed's (B, T, H)


def identity_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["B", "T", "H"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["B", "T", "H"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "floor", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10   # onnxruntime 1.30/1.31 refuse the IR 14 that onnx 1.23 writes
    return model.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("ort_floor: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
        return 1
    session = ort.InferenceSession(identity_model(), providers=["CUDAExecutionProvider"])
    device_id = torch.cuda.current_device()
    rows = []
    print(f"onnxruntime {ort.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'B x T x H':>12} {'floor ms':>9} {'p90 ms':>8}")
    for B, T, H in POINTS:
        x = torch.randn(B, T, H, device="cuda", dtype=torch.float16)
        y = torch.empty_like(x)

        def call():
            binding = session.io_binding()
            binding.bind_input("x", "cuda", device_id, np.float16, list(x.shape), x.data_ptr())
            binding.bind_output("y", "cuda", device_id, np.float16, list(y.shape), y.data_ptr())
            torch.cuda.current_stream().synchronize()
            session.run_with_iobinding(binding)

        call()
        if not torch.equal(x, y):
            print("ort_floor: the Identity session did not copy its input")
            return 1
        timing = time_fn(call, "cuda")
        rows.append({"batch": B, "seq_len": T, "hidden": H, **timing.summary()})
        print(f"{f'{B}x{T}x{H}':>12} {timing.median_ms:9.4f} {timing.percentile(90):8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "onnxruntime": ort.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
