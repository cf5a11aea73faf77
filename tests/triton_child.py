"""The Triton kernels on the CPU under triton's interpreter, started by tests/test_triton.py.

    TRITON_INTERPRET=1 python tests/triton_child.py CASES_JSON   # prints one JSON object

A separate process because triton 3.9 reads TRITON_INTERPRET when a jit function is decorated,
its own library (tl.zeros, tl.cdiv, ...) included, i.e. when triton is imported - which the test
process did long before (torch and transformers import it). Here it is set first, the routing's
device list is widened to the CPU, and each case runs a GroupedPointwiseBlock's forward and
backward through the same op and autograd as on a GPU. Per case it reports which kernels ran and
the error of y, dx and every parameter gradient against the float64 dense map (to_dense) and the
autograd of the two-bmm reference on the same rounded inputs, as max |error| / max |reference|.
"""

import copy
import json
import os
import sys

import torch

torch.set_num_threads(1)  # tiny tensors; the machine is shared

from gpconv.layers import GroupedPointwiseBlock  # noqa: E402
from gpconv.layers.cuda import triton_route  # noqa: E402
from gpconv.layers.ops import io_reference  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Spy:
    """The kernels module, counting calls."""

    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def io_forward(self, *args):
        self.calls.append("forward")
        return self.mod.io_forward(*args)

    def io_grads(self, *args):
        self.calls.append("grads")
        return self.mod.io_grads(*args)


def block(n_in, n_out, g, variant, bias, dtype, seed=0):
    torch.manual_seed(seed)
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=bias, rank=3 if variant == "hybrid" else 0,
                              permuted=variant != "io")
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)  # the low-rank B starts at zero: make every term count
        if b.input_perm is not None:
            b.input_perm.copy_(torch.randperm(n_in))
    return b.to(dtype)


def reference(b, x, dy):
    """float64 y (the dense matrix), dx and parameter gradients (autograd of the two-bmm form)."""
    params = {n: p.detach().double().requires_grad_() for n, p in b.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    lowrank = (params["lowrank_a"], params["lowrank_b"]) if "lowrank_a" in params else None
    y = io_reference(x64, params["weight"], params.get("bias"), b.input_perm, lowrank)
    y.backward(dy.double())
    dense = x64.detach() @ copy.deepcopy(b).double().to_dense().t()  # summed in float64 too
    if b.bias is not None:
        dense = dense + params["bias"].detach()
    assert torch.allclose(y.detach(), dense)  # the reference is the dense map
    return dense, x64.grad, {n: p.grad for n, p in params.items()}


def err(got, want) -> float:
    return (got.detach().double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def run_case(spy, n_in, n_out, g, variant, bias, tokens, dtype_name):
    dtype = DTYPES[dtype_name]
    spy.calls.clear()
    b = block(n_in, n_out, g, variant, bias, dtype)
    x = torch.randn(tokens, n_in).to(dtype).requires_grad_()
    dy = torch.randn(tokens, n_out).to(dtype)
    y = b(x)
    y.backward(dy)
    y_ref, dx_ref, grads_ref = reference(b, x, dy)
    errors = {"y": err(y, y_ref), "dx": err(x.grad, dx_ref)}
    errors.update({f"d{n}": err(p.grad, grads_ref[n]) for n, p in b.named_parameters()})
    return dict(calls=list(spy.calls), dtypes=[str(y.dtype), str(x.grad.dtype)], errors=errors)


def run_strided(mod):
    """The wrappers alone, on x read at a row stride (a slice of a wider activation), with a perm."""
    torch.manual_seed(1)
    wide = torch.randn(17, 80)
    x, weight, dy = wide[:, 8:56], torch.randn(4, 6, 24), torch.randn(17, 24)  # x (17, 48), row stride 80
    perm = torch.randperm(48)
    out = {"y": err(mod.io_forward(x, weight, None, perm), io_reference(x.double(), weight.double(), None, perm))}
    xp = x.index_select(1, perm)
    xr, wr = xp.double().requires_grad_(), weight.double().requires_grad_()
    io_reference(xr, wr, None).backward(dy.double())
    dx, dw = mod.io_grads(dy, xp, weight)
    out.update(dx=err(dx, xr.grad), dweight=err(dw, wr.grad))
    return out


def run_routes(spy):
    """Inference calls the op's implementation directly (forward kernel only); under autocast the
    block computes in autocast's dtype on the kernels, and the gradient reaches the fp32 weight."""
    spy.calls.clear()
    b = block(32, 48, 4, "hybrid", True, torch.float32)
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = b(x)
    out = {"inference_calls": list(spy.calls), "inference_y": err(y, reference(b, x, torch.zeros(5, 48))[0])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["autocast_dtype"] = str(triton_route.eager_dtype(x, b.weight))
        y16 = b(x.requires_grad_())
    y16.float().sum().backward()
    out.update(autocast_calls=list(spy.calls), autocast_y=str(y16.dtype), weight_grad=str(b.weight.grad.dtype))
    return out


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    mod = triton_route.kernels()
    spy = Spy(mod)
    triton_route.DEVICES = ("cuda", "cpu")
    triton_route.kernels = lambda: spy
    kernels = (mod._io_forward_kernel, mod._io_dx_kernel, mod._io_dw_kernel)
    result = {
        "interpreted": [type(k.fn).__name__ for k in kernels],
        "configs": [len(k.configs) for k in kernels],
        "cases": [run_case(spy, *case) for case in json.loads(sys.argv[1])],
        "strided": run_strided(mod),
        "routes": run_routes(spy),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
