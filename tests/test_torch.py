"""The PyTorch bridge (instnorm_numba.torch) against PyTorch itself: the functional form over a
table of inputs, the zero-copy paths, the fallbacks, autograd (double backward included),
model conversion, the two client networks trained for several steps in both memory formats,
and torch.compile(fullgraph=True).

Tolerances: the bridge's results are *bit for bit* those of the NumPy API on the same arrays
(it only hands NumPy views to it), which test_forward.py / test_backward.py hold to the
accuracy guarantee. Against PyTorch (float32 arithmetic in its elementwise formulas) the
comparisons allow a few of the dtype's epsilons relative to the largest magnitude, more for
quantities that went through several layers and steps of training.
"""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import instnorm_numba  # noqa: E402
from instnorm_numba import _api, _networks  # noqa: E402
from instnorm_numba import torch as bridge  # noqa: E402
from instnorm_numba._networks import DynUNet  # noqa: E402

CL = {4: torch.channels_last, 5: torch.channels_last_3d}
EPS = {torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def close(ours, theirs, tol):
    """max |ours - theirs| <= tol * max(1, max |theirs|)."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    err = (ours - theirs).abs().max().item() if theirs.numel() else 0.0
    assert err <= tol * scale, f"error {err:.3g} > {tol:.3g} * {scale:.3g}"


def in_format(t, channels_last):
    return t.to(memory_format=CL[t.ndim]) if channels_last else t.contiguous()


def is_format(t, channels_last):
    if channels_last:
        return t.is_contiguous(memory_format=CL[t.ndim])
    return t.is_contiguous()


@pytest.fixture
def calls(monkeypatch):
    """Counts of the NumPy API calls made by the operators (proof that the kernels ran)."""
    counts = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            counts[name] += 1
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(bridge, "_np_instance_norm", counted("forward", bridge._np_instance_norm))
    monkeypatch.setattr(
        bridge,
        "_np_instance_norm_backward",
        counted("backward", bridge._np_instance_norm_backward),
    )
    return counts


def test_import_does_not_need_torch():
    import subprocess
    import sys

    code = (
        "import sys; import instnorm_numba, instnorm_numba.layers; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    result = doctest.testmod(bridge, optionflags=doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.attempted > 0 and result.failed == 0


def test_schema():
    schema = str(torch.ops.instnorm_numba.instance_norm.default._schema)
    assert "Tensor? running_mean" in schema and "!" not in schema  # functional
    assert "instance_norm_backward" in str(torch.ops.instnorm_numba.instance_norm_backward)


# --------------------------------------------------------------------------------------------
# the functional form over a table of inputs


def make_args(shape, dtype, affine, running, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    w = b = rm = rv = None
    if affine:
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    if running:
        rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
        rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, rm, rv


CASES = [
    (shape, dtype, cl)
    for shape in ((2, 3, 17), (2, 5, 6, 7), (1, 4, 3, 5, 6))
    for dtype in (torch.float32, torch.float64, torch.float16)
    for cl in ((False, True) if len(shape) > 3 else (False,))
]


@pytest.mark.parametrize("shape,dtype,cl", CASES)
@pytest.mark.parametrize("mode", ["plain", "affine", "train", "eval"])
def test_functional_against_torch_and_numpy(shape, dtype, cl, mode, calls):
    affine = mode != "plain"
    running = mode in ("train", "eval")
    use_input_stats = mode != "eval"
    x, w, b, rm, rv = make_args(shape, dtype, affine, running)
    x = in_format(x, cl)
    x0 = x.clone()
    args = dict(weight=w, bias=b, use_input_stats=use_input_stats, momentum=0.3, eps=1e-4)
    t_rm = t_rv = None
    if running:
        t_rm, t_rv = rm.clone(), rv.clone()
    n_rm, n_rv = (rm.numpy().copy(), rv.numpy().copy()) if running else (None, None)

    y = bridge.instance_norm(x, rm, rv, **args)
    assert calls["forward"] == 1
    assert y.dtype == x.dtype and y.shape == x.shape and is_format(y, cl)
    assert torch.equal(x, x0)  # the input is untouched

    # bit for bit the NumPy API on the same arrays
    ny = instnorm_numba.instance_norm(
        x.numpy(),
        None if w is None else w.numpy(),
        None if b is None else b.numpy(),
        eps=1e-4,
        momentum=0.3,
        use_input_stats=use_input_stats,
        **({"running_mean": n_rm, "running_var": n_rv} if running else {}),
    )
    np.testing.assert_array_equal(y.numpy(), ny)
    if running:
        np.testing.assert_array_equal(rm.numpy(), n_rm)
        np.testing.assert_array_equal(rv.numpy(), n_rv)

    # PyTorch (its float16 path rounds in float32 arithmetic: about one float16 ulp)
    ty = F.instance_norm(x, t_rm, t_rv, **args)
    close(y, ty, 4 * EPS[dtype])
    if running:
        close(rm, t_rm, 4 * EPS[dtype])
        close(rv, t_rv, 4 * EPS[dtype])
        if not use_input_stats:
            assert torch.equal(rm, t_rm) and torch.equal(rv, t_rv)  # nothing updated


@pytest.mark.parametrize("shape,dtype,cl", [c for c in CASES if c[1] != torch.float16])
@pytest.mark.parametrize("mode", ["plain", "affine", "no_bias", "eval"])
def test_gradients_against_torch(shape, dtype, cl, mode, calls):
    x, w, b, rm, rv = make_args(shape, dtype, mode != "plain", mode == "eval", seed=1)
    if mode == "no_bias":
        b = None
    x = in_format(x, cl)
    leaves = [t for t in (w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    grads = []
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    for fn in (bridge.instance_norm, F.instance_norm):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi, rm, rv, w, b, use_input_stats=mode != "eval")
        # PyTorch 2.13's CPU backward is wrong for N=1 with a channels-last grad_output (see
        # test_torch_channels_last_backward_bug): it gets dy channels-first, same values
        g = in_format(dy, cl and fn is bridge.instance_norm)
        grads.append(torch.autograd.grad(y, [xi, *leaves], g))
    ours, theirs = grads
    assert calls["backward"] == (1 if mode != "eval" else 0)  # eval: an elementwise product
    assert is_format(ours[0], cl) and ours[0].dtype == dtype
    for a, t in zip(ours, theirs, strict=True):
        close(a, t, 64 * EPS[dtype])  # sums over up to 126 elements in PyTorch's float32


@pytest.mark.parametrize("N", [1, 2])
def test_torch_channels_last_backward_bug(N):
    """PyTorch 2.13 on the CPU: ``F.instance_norm``'s input gradient is wrong when the batch
    has one sample and grad_output is channels-last (1x2x3x4 float64: off by 2.6 against
    values of order 1). Ours is the reference's in every memory format."""
    from instnorm_numba import reference as ref

    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 2, 3, 4, generator=g, dtype=torch.float64)
    dy = torch.randn(N, 2, 3, 4, generator=g, dtype=torch.float64)
    want, _, _ = ref.instance_norm_backward(dy.numpy(), x.numpy())
    for xf, gf in ((False, False), (False, True), (True, False), (True, True)):
        xi = in_format(x, xf).requires_grad_(True)
        (ours,) = torch.autograd.grad(bridge.instance_norm(xi), xi, in_format(dy, gf))
        np.testing.assert_allclose(ours.numpy(), want, rtol=0, atol=1e-14)
        xi = in_format(x, xf).requires_grad_(True)
        (theirs,) = torch.autograd.grad(F.instance_norm(xi), xi, in_format(dy, gf))
        torch_right = np.abs(theirs.numpy() - want).max() < 1e-12
        assert torch_right == (N > 1 or not gf), (N, xf, gf)  # the bug as it stands in 2.13


def test_backward_is_the_numpy_backward_bit_for_bit():
    x, w, b, _, _ = make_args((2, 3, 5, 6), torch.float32, True, False, seed=3)
    x = in_format(x, True).requires_grad_(True)
    w.requires_grad_(True)
    dy = in_format(torch.randn(2, 3, 5, 6), True)
    y = bridge.instance_norm(x, weight=w, bias=b)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    xn, wn = x.detach().numpy(), w.detach().numpy()
    _, mean, rstd = instnorm_numba.instance_norm(xn, wn, b.numpy(), return_stats=True)
    nx, nw, _ = instnorm_numba.instance_norm_backward(dy.numpy(), xn, mean, rstd, wn)
    np.testing.assert_array_equal(gx.numpy(), nx)
    np.testing.assert_array_equal(gw.numpy(), nw.astype(np.float32))


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_zero_copy(cl, dtype, monkeypatch):
    """The kernels read the tensor's own memory and write the result's: no copy either way."""
    seen = []
    canonicalize = _api.canonicalize

    def spy(x, axis, dt):
        lay = canonicalize(x, axis, dt)
        seen.append((lay.kind, lay.copied, lay.data.__array_interface__["data"][0]))
        return lay

    monkeypatch.setattr(_api, "canonicalize", spy)
    x = in_format(torch.randn(2, 8, 6, 5, dtype=dtype), cl)
    y = bridge.instance_norm(x)
    (kind, copied, ptr), *_ = seen
    assert (kind, copied) == ("cl" if cl else "cf", False)
    assert ptr == x.data_ptr()
    assert is_format(y, cl)


def test_other_strides_are_copied_once_and_still_right():
    base = torch.randn(2, 4, 10, 12)
    x = base[:, ::2, 1:9:2, ::3]  # neither contiguous nor channels-last
    assert bridge.uses_kernels(x)
    y = bridge.instance_norm(x)
    close(y, F.instance_norm(x), 4 * EPS[torch.float32])
    assert y.is_contiguous()


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), "bfloat16"),
        (lambda: torch.randn(2, 3, 8, 8, dtype=torch.complex64), "complex"),
        (lambda: torch.empty(2, 3, 8, 8, device="meta"), "meta device"),
        (lambda: torch.randn(0, 3, 8, 8), "empty"),
    ],
)
def test_falls_back_to_torch(make, why, calls):
    x = make()
    assert not bridge.uses_kernels(x), why
    try:
        want = F.instance_norm(x)
    except RuntimeError as exc:  # what PyTorch does is the answer, error included
        with pytest.raises(type(exc)):
            bridge.instance_norm(x)
    else:
        got = bridge.instance_norm(x)
        assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
        if x.device.type == "cpu":
            assert torch.equal(got, want)
    assert calls["forward"] == 0


def test_bfloat16_parameters_fall_back():
    x = torch.randn(2, 3, 8, 8)
    w = torch.ones(3, dtype=torch.bfloat16)
    assert not bridge.uses_kernels(x, weight=w)


def test_torch_errors_are_torch_errors():
    # one spatial element while using input statistics: PyTorch's ValueError, PyTorch's text
    x = torch.randn(2, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        bridge.instance_norm(x)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        F.instance_norm(x)
    # use_input_stats=False without running statistics
    x = torch.randn(2, 3, 4)
    with pytest.raises(Exception) as ours:
        bridge.instance_norm(x, use_input_stats=False)
    with pytest.raises(Exception) as theirs:
        F.instance_norm(x, use_input_stats=False)
    assert type(ours.value) is type(theirs.value)


def test_double_backward_falls_back_to_torch_ops(calls):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    w0 = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    b0 = torch.randn(3, generator=g, dtype=torch.float64)
    out = []
    for fn in (bridge.instance_norm, F.instance_norm):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = fn(x, weight=w, bias=b0)
        gx, gw = torch.autograd.grad((y**3).sum(), (x, w), create_graph=True)
        if fn is bridge.instance_norm:
            assert calls["backward"] == 0  # create_graph: PyTorch ops, so that a graph exists
        hx, hw = torch.autograd.grad((gx**2).sum() + (gw**2).sum(), (x, w))
        if fn is bridge.instance_norm:  # the path through dy = 3 y**2: a first-order backward
            assert calls["backward"] == 1
        out.append((gx, gw, hx, hw))
    for a, t in zip(*out, strict=True):
        close(a, t, 1e-12)


def test_second_order_gradcheck():
    x = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return bridge.instance_norm(x, None, None, w, b)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_input_modified_after_forward_is_caught():
    x = torch.randn(2, 3, 8, requires_grad=True)
    h = x * 1.0
    y = bridge.instance_norm(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_running_stats_update_bumps_the_version():
    rm, rv = torch.zeros(3), torch.ones(3)
    v0 = rm._version
    bridge.instance_norm(torch.randn(2, 3, 8), rm, rv)
    assert rm._version > v0 and rv._version > v0


# --------------------------------------------------------------------------------------------
# modules and conversion


def test_modules_are_the_torch_modules():
    pairs = [
        (getattr(bridge, f"InstanceNorm{d}d"), getattr(nn, f"InstanceNorm{d}d")) for d in (1, 2, 3)
    ]
    for ours, theirs in pairs:
        m = ours(4, affine=True, bias=False, track_running_stats=True, momentum=0.2, eps=1e-3)
        t = theirs(4, affine=True, bias=False, track_running_stats=True, momentum=0.2, eps=1e-3)
        assert isinstance(m, theirs)
        assert repr(m) == repr(t)
        assert (
            list(m.state_dict())
            == list(t.state_dict())
            == [
                "weight",
                "running_mean",
                "running_var",
                "num_batches_tracked",
            ]
        )


def test_unbatched_input_and_channel_mismatch_like_torch():
    m = bridge.InstanceNorm2d(3)
    t = nn.InstanceNorm2d(3)
    x = torch.randn(3, 5, 6)
    close(m(x), t(x), 4 * EPS[torch.float32])
    with pytest.warns(UserWarning, match="does not match num_features"):
        m(torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match="expected 3D or 4D input"):
        m(torch.randn(5, 6))


class Nest(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.InstanceNorm1d(3, affine=True)
        self.seq = nn.Sequential(
            nn.Conv2d(3, 4, 1),
            nn.InstanceNorm2d(4, affine=True, track_running_stats=True, momentum=None),
            nn.ModuleList([nn.InstanceNorm3d(2, affine=True, bias=False), nn.ReLU()]),
        )


def test_convert_and_revert_keep_everything():
    net = Nest()
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.5, 1.5)
    net.seq[1].running_mean.fill_(0.25)
    net.seq[1].eval()
    before = net.state_dict()
    ptrs = {k: v.data_ptr() for k, v in before.items()}
    params = list(net.parameters())
    hook_calls = []
    net.seq[1].register_forward_hook(lambda *a: hook_calls.append(1))

    ours = bridge.convert(net)
    assert ours is net
    assert type(net.a) is bridge.InstanceNorm1d
    assert type(net.seq[1]) is bridge.InstanceNorm2d
    assert type(net.seq[2][0]) is bridge.InstanceNorm3d
    assert type(net.seq[0]) is nn.Conv2d and type(net.seq[2][1]) is nn.ReLU
    assert [k for k in net.state_dict()] == list(before)
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == ptrs  # the same tensors
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert net.seq[1].training is False and net.a.training is True
    assert net.seq[1].momentum is None and net.seq[2][0].bias is None
    net.seq[1](torch.randn(1, 4, 3, 3))
    assert hook_calls == [1]

    # checkpoints load both ways
    fresh = bridge.convert(Nest())
    fresh.load_state_dict(before)
    plain = Nest()
    plain.load_state_dict(net.state_dict())
    for k, v in before.items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(plain.state_dict()[k], v)

    back = bridge.revert(net)
    assert type(back.a) is nn.InstanceNorm1d and type(back.seq[1]) is nn.InstanceNorm2d
    assert type(back.seq[2][0]) is nn.InstanceNorm3d
    assert {k: v.data_ptr() for k, v in back.state_dict().items()} == ptrs


def test_convert_root_subclasses_and_bad_arguments():
    root = nn.InstanceNorm2d(3)
    assert type(bridge.convert(root)) is bridge.InstanceNorm2d

    class Custom(nn.InstanceNorm2d):
        pass

    c = Custom(3)
    assert bridge.convert(c) is c and type(c) is Custom  # a subclass may change the forward
    with pytest.raises(TypeError, match="module must be a torch.nn.Module; got int"):
        bridge.convert(3)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module; got str"):
        bridge.revert("net")


# --------------------------------------------------------------------------------------------
# the two client networks (instnorm_numba._networks, shared with scripts/bench_torch.py),
# small, with running statistics in some norms


def UNet3d(width=4):
    """A MONAI DynUNet-style 3-D U-Net of three levels; the first norm of every block tracks
    running statistics (MONAI's default tracks none)."""
    return DynUNet(cin=1, cout=2, widths=(width, 2 * width, 4 * width), track_first=True)


def StyleNet(width=8, blocks=2):
    """Johnson et al.'s network, narrow; the upsampling norms track running statistics."""
    return _networks.StyleNet(width=width, blocks=blocks, track_up=True)


def norms(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]


def randomize(net, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in norms(net):
            m.weight.uniform_(0.5, 1.5)
            if m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)


def train_steps(net, xs, steps, cl, lr=0.05):
    """SGD on a squared error; per step the output, input and parameter gradients, and the
    buffers; then an eval-mode output."""
    net = net.to(memory_format=CL[xs.ndim - 1]) if cl else net
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    record = []
    for i in range(steps):
        x = in_format(xs[i % len(xs)].clone(), cl).requires_grad_(True)
        y = net(x)
        loss = (y**2).mean()
        opt.zero_grad()
        loss.backward()
        record.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                **{"grad/" + n: p.grad.clone() for n, p in net.named_parameters()},
                **{"buf/" + n: b.clone() for n, b in net.named_buffers()},
            }
        )
        opt.step()
    net.eval()
    with torch.no_grad():
        record.append({"eval": net(in_format(xs[0], cl))})
    return record


NETS = {
    "unet3d": (UNet3d, (2, 2, 1, 16, 16, 16)),  # (steps or inputs, N, C, D, H, W)
    "style": (StyleNet, (2, 2, 3, 32, 32)),
}


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(NETS))
def test_client_network_training_matches_torch(name, cl, calls):
    make, shape = NETS[name]
    torch.manual_seed(0)
    theirs = make()
    randomize(theirs, 1)
    ours = bridge.convert(copy.deepcopy(theirs))
    assert all(type(m).__module__ == "instnorm_numba.torch" for m in norms(ours))
    formats = []
    for m in norms(ours):
        m.register_forward_hook(
            lambda mod, inp, out: formats.append(
                (is_format(inp[0], cl), is_format(out, cl), out.dtype)
            )
        )
    xs = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    steps = 3
    r_ours = train_steps(ours, xs, steps, cl)
    r_theirs = train_steps(theirs, xs, steps, cl)
    n_norms = len(norms(ours))
    assert calls["forward"] == n_norms * (steps + 1)  # every layer, every step, and eval
    assert calls["backward"] == n_norms * steps
    assert all(f[0] == f[1] for f in formats)  # the output in the input's memory format
    if cl:
        assert sum(f[1] for f in formats) >= n_norms  # channels-last really reached the norms
    assert any(k.startswith("buf/") and k.endswith("running_mean") for k in r_ours[0])
    for step, (a, t) in enumerate(zip(r_ours, r_theirs, strict=True)):
        assert a.keys() == t.keys()
        for k in a:
            # float32 through a dozen layers and up to three SGD steps
            tol = 2e-4 if k in ("y", "eval") else 1e-3
            try:
                close(a[k], t[k], tol)
            except AssertionError as exc:
                raise AssertionError(f"step {step}, {k}: {exc}") from None
    # the last step's running statistics moved away from their initial values
    last = r_ours[steps - 1]
    moved = [k for k in last if k.endswith("running_var")]
    assert moved and not any(torch.equal(last[k], torch.ones_like(last[k])) for k in moved)


# --------------------------------------------------------------------------------------------
# torch.compile (slow: a compilation takes tens of seconds on 2 cores)

#: inductor itself (torch 2.13) touches torch.jit.script_method, which warns; not our code
INDUCTOR_WARNING = "ignore:.torch.jit.script_method. is deprecated:DeprecationWarning"


@pytest.mark.slow
@pytest.mark.filterwarnings(INDUCTOR_WARNING)
def test_compile_training_step_fullgraph(calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    theirs = StyleNet(width=4, blocks=1)
    randomize(theirs, 2)
    ours = bridge.convert(copy.deepcopy(theirs))
    compiled = torch.compile(ours, fullgraph=True)
    xs = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    results = []
    for net in (compiled, theirs):
        per_step = []
        for i in range(2):
            x = xs[i].clone().requires_grad_(True)
            y = net(x)
            (y**2).mean().backward()
            per_step.append((y.detach(), x.grad.clone()))
        params = (ours if net is compiled else theirs).named_parameters()
        grads = {n: p.grad.clone() for n, p in params}
        results.append((per_step, grads))
    n_norms = len(norms(ours))
    assert calls["forward"] == 2 * n_norms and calls["backward"] == 2 * n_norms
    (s_ours, g_ours), (s_theirs, g_theirs) = results
    for (y, dx), (ty, tdx) in zip(s_ours, s_theirs, strict=True):
        close(y, ty, 2e-4)
        close(dx, tdx, 1e-3)
    for k in g_theirs:
        close(g_ours[k], g_theirs[k], 1e-3)
    for k, v in theirs.named_buffers():
        close(dict(ours.named_buffers())[k], v, 1e-5)
    assert any(k.endswith("running_mean") for k, _ in theirs.named_buffers())


@pytest.mark.slow
@pytest.mark.filterwarnings(INDUCTOR_WARNING)
def test_compile_inference_channels_last_3d(calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    theirs = UNet3d(width=2).eval()
    randomize(theirs, 3)
    for m in norms(theirs):
        if m.track_running_stats:
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    ours = bridge.convert(copy.deepcopy(theirs)).to(memory_format=torch.channels_last_3d)
    compiled = torch.compile(ours, fullgraph=True)
    x = in_format(torch.randn(1, 1, 16, 16, 16), True)
    with torch.no_grad():
        y = compiled(x)
        ty = theirs(x)
    assert calls["forward"] == len(norms(ours))
    close(y, ty, 2e-4)


# --------------------------------------------------------------------------------------------
# the measuring script (scripts/bench_torch.py) runs: tiny shapes, eager only


def test_bench_script_quick(tmp_path, monkeypatch):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_torch.py"
    spec = importlib.util.spec_from_file_location("bench_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import numba

    threads, nb_threads = torch.get_num_threads(), numba.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        res = mod.main(["--quick", "--budget", "0", "--budget-net", "0", "--json", str(out)])
    finally:  # the script sets both thread counts for its process
        torch.set_num_threads(threads)
        numba.set_num_threads(nb_threads)
    assert json.loads(out.read_text())["meta"]["threads"] == 2
    assert len(res["layers"]) == 4 and len(res["networks"]) == 4
    for row in res["layers"] + res["networks"]:
        assert row["max_abs_diff"] < 1e-4, row
        assert all(v > 0 for v in row["ms"].values())


@pytest.mark.parametrize("cl", [False, True])
def test_large_outputs_keep_the_memory_format(cl):
    """Outputs from 4 MiB up are allocated with a huge-page hint: same strides and results."""
    x = in_format(torch.randn(1, 8, 64, 64, 64), cl)  # 8 MiB
    assert x.numel() * x.element_size() >= bridge.HUGEPAGE_MIN_BYTES
    y = bridge._empty_like(x)
    assert y.stride() == torch.empty_like(x).stride() and y.dtype == x.dtype
    out = bridge.instance_norm(x)
    assert out.stride() == x.stride()
    close(out, F.instance_norm(x), 4 * EPS[torch.float32])
