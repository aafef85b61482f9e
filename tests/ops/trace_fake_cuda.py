"""Helper for test_decompose.py, run in a subprocess without TRITON_INTERPRET: trace ``fused_moe`` on fake CUDA
tensors through AOTAutograd (as torch.compile does), on a machine without a GPU, and print what the graph holds
as JSON. A stand-in Triton driver names an sm90 target so that torch can analyze which buffers each kernel writes.

``python -m tests.ops.trace_fake_cuda '[["none", 1, false], ["fp8_block", 24, true]]'``
"""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class _Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")

    def is_active(self):
        return True


triton.runtime.driver.set_active(_Sm90Driver())

import torch_moe_ops as moe  # noqa: E402
from torch._dynamo.source import ConstantSource  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402
from torch_moe_ops._kernels import configs  # noqa: E402
from torch_moe_ops._platform import COMPILE_ENV  # noqa: E402

configs.device_name = lambda index: "NVIDIA H100 80GB HBM3"  # no GPU to ask
E, K, H, I = 60, 6, 256, 128
FP8 = torch.float8_e4m3fn


def _weights(scheme):
    """Fake weights and scale shapes of ``scheme`` (docs/design.md §3)."""
    e = lambda *s, dt=torch.float32: torch.empty(*s, device="cuda", dtype=dt)  # noqa: E731
    if scheme == "none":
        return e(E, 2 * I, H, dt=torch.bfloat16), e(E, H, I, dt=torch.bfloat16), {}
    if scheme == "fp8_block":
        return e(E, 2 * I, H, dt=FP8), e(E, H, I, dt=FP8), dict(w13_scale=e(E, 2, 2), w2_scale=e(E, 2, 1))
    if scheme == "fp8_channel":
        return e(E, 2 * I, H, dt=FP8), e(E, H, I, dt=FP8), dict(w13_scale=e(E, 2 * I), w2_scale=e(E, H))
    if scheme == "int4_w4a16":
        return (e(E, 2 * I, H // 2, dt=torch.uint8), e(E, H, I // 2, dt=torch.uint8),
                dict(w13_scale=e(E, 2 * I, H // 128), w2_scale=e(E, H, I // 128), block_shape=[1, 128]))
    raise ValueError(scheme)


def trace(scheme: str, T: int, symbolic: bool, mode: str = "triton", subclass: bool = False) -> dict:
    """``subclass``: hidden_states wrapped in torch's test subclass ``TwoTensor`` (which runs each op twice)."""
    os.environ[COMPILE_ENV] = mode  # read at trace time
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    if symbolic:
        T = env.create_symintnode(env.create_symbol(T, ConstantSource("T")), hint=T)
    with mode:
        x = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(T, E, device="cuda", dtype=torch.bfloat16)
        w13, w2, kw = _weights(scheme)
        if subclass:
            from torch.testing._internal.two_tensor import TwoTensor

            x = TwoTensor(x, x.clone())
    seen = {}
    name = str(T.node.expr) if symbolic else None

    def compiler(gm, example_inputs):
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        nodes, cloned_inputs, tensor_args = [], [], []
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            nodes.append(str(n.target))
            if str(n.target).endswith("_inference.default"):  # plans: the lean twin's call (no keyword)
                seen["twin"] = dict(kwargs=sorted(n.kwargs), options=n.args[-1], n_args=len(n.args))
            if "triton_kernel_wrapper_functional" in str(n.target):
                args = n.kwargs["kwargs"]
                cloned_inputs += [a for a in n.kwargs["tensors_to_clone"]
                                  if getattr(args[a], "name", None) in inputs]
                tensor_args.append(sorted(k for k, v in args.items() if isinstance(v, torch.fx.Node)))
        seen.update(nodes=nodes, cloned_inputs=cloned_inputs, tensor_args=tensor_args, guards=[str(g.expr).replace(name, "T") if name else str(g.expr)
                                                           for g in env.guards])
        raise _Done

    class _Done(Exception):
        pass

    try:
        with mode:
            aot_function(lambda *a: moe.fused_moe(*a, K, quant_scheme=scheme, **kw), fw_compiler=compiler)(
                x, logits, w13, w2)
    except _Done:
        pass
    return seen


if __name__ == "__main__":
    print(json.dumps([trace(*case) for case in json.loads(sys.argv[1])]))
