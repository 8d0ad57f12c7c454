# make_golden.py -- generates the LayerNorm golden vectors in this folder.
#
# What it does: for each case below it draws inputs in float64 from a fixed
# per-case torch.Generator seed, runs PyTorch's CPU LayerNorm in float64 and
# writes inputs and outputs as little-endian float64 ('<f8') C-order .npy files
# into ./<case>/ (next to this script):
#   forward : torch.ops.aten.native_layer_norm(x, [n], gamma, beta, eps)
#             -> y, mean, rstd (mean/rstd flattened to shape (rows,))
#   backward: autograd of (y * dy).sum() -> dx, dgamma, dbeta
# It also asserts that torch.nn.functional.layer_norm gives the same y, that
# torch.ops.aten.native_layer_norm_backward gives the same gradients as
# autograd, and that y/mean/rstd match the textbook formula (biased variance,
# rstd = 1/sqrt(var + eps)).
#
# Generated with: PyTorch 2.15.0 (wheel 2.15.0+cu132 from PyPI, run on CPU),
#                 numpy 2.4.6, Python 3.11.7.
#
# Rerun (from the repository root):
#   python3 -m venv /tmp/torchenv
#   /tmp/torchenv/bin/pip install torch==2.15.0 numpy
#   /tmp/torchenv/bin/python crates/layernorm-core/tests/golden/make_golden.py
import os
import shutil

import numpy as np
import torch

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))


def normal(g, shape, mean=0.0, std=1.0):
    return torch.randn(shape, generator=g, dtype=F64) * std + mean


def case_inputs(name, seed, rows, n, eps, affine, bias, x_fn=None):
    g = torch.Generator().manual_seed(seed)
    x = x_fn(g, rows, n) if x_fn else normal(g, (rows, n))
    gamma = normal(g, (n,), 1.0, 0.1) if affine else None
    beta = normal(g, (n,), 0.0, 0.1) if bias else None
    dy = normal(g, (rows, n))
    return dict(name=name, x=x, gamma=gamma, beta=beta, dy=dy, eps=eps)


def large_mean(g, rows, n):
    return 1e4 + normal(g, (rows, n))


def constant_rows(g, rows, n):
    vals = torch.tensor([3.25, -1.5], dtype=F64)[:rows]
    return vals[:, None].expand(rows, n).clone()


MIXED_SCALES = [1e-3, 1.0, 1e3, 1e6, 1e-6]  # last row: var ~ 1e-12 ~ eps


def mixed_scale(g, rows, n):
    s = torch.tensor(MIXED_SCALES[:rows], dtype=F64)
    return normal(g, (rows, n)) * s[:, None]


CASES = [
    case_inputs("basic_4x8", 1, 4, 8, 1e-5, True, True),
    case_inputs("no_affine_3x5", 2, 3, 5, 1e-5, False, False),
    case_inputs("gamma_only_2x16", 3, 2, 16, 1e-12, True, False),
    case_inputs("large_mean_4x32", 4, 4, 32, 1e-5, True, True, large_mean),
    case_inputs("n1_3x1", 5, 3, 1, 1e-5, True, True),
    case_inputs("constant_rows_2x7", 6, 2, 7, 1e-5, True, True, constant_rows),
    case_inputs("mixed_scale_5x13", 7, 5, 13, 1e-12, True, True, mixed_scale),
]


def save(d, fname, t):
    a = np.ascontiguousarray(t.detach().cpu().numpy().astype("<f8"))
    np.save(os.path.join(d, fname), a)


def run(c):
    x, dy, eps = c["x"], c["dy"], c["eps"]
    rows, n = x.shape
    x = x.clone().requires_grad_(True)
    gamma = c["gamma"].clone().requires_grad_(True) if c["gamma"] is not None else None
    beta = c["beta"].clone().requires_grad_(True) if c["beta"] is not None else None

    y, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], gamma, beta, eps)
    mean, rstd = mean.reshape(rows), rstd.reshape(rows)
    (y * dy).sum().backward()

    with torch.no_grad():
        # functional API agrees with the aten op
        y_f = torch.nn.functional.layer_norm(x, [n], gamma, beta, eps)
        assert torch.allclose(y_f, y, rtol=0, atol=1e-15 * (1 + y.abs().max())), c["name"]
        # textbook formula agrees (loose: different summation order)
        m_ref = x.mean(dim=1)
        v_ref = ((x - m_ref[:, None]) ** 2).mean(dim=1)
        r_ref = 1.0 / torch.sqrt(v_ref + eps)
        y_ref = (x - m_ref[:, None]) * r_ref[:, None]
        if gamma is not None:
            y_ref = y_ref * gamma
        if beta is not None:
            y_ref = y_ref + beta
        assert torch.allclose(mean, m_ref, rtol=1e-12, atol=0), c["name"]
        assert torch.allclose(rstd, r_ref, rtol=1e-9, atol=0), c["name"]
        assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-9), c["name"]
        # explicit backward op agrees with autograd
        dx2, dg2, db2 = torch.ops.aten.native_layer_norm_backward(
            dy, x, [n], mean.reshape(rows, 1), rstd.reshape(rows, 1), gamma, beta,
            [True, gamma is not None, beta is not None])
        assert torch.allclose(dx2, x.grad, rtol=1e-12, atol=1e-12), c["name"]
        if gamma is not None:
            assert torch.allclose(dg2, gamma.grad, rtol=1e-12, atol=1e-12), c["name"]
        if beta is not None:
            assert torch.allclose(db2, beta.grad, rtol=1e-12, atol=1e-12), c["name"]

    d = os.path.join(HERE, c["name"])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    save(d, "x.npy", x)
    save(d, "dy.npy", dy)
    save(d, "eps.npy", torch.tensor([eps], dtype=F64))
    save(d, "y.npy", y)
    save(d, "mean.npy", mean)
    save(d, "rstd.npy", rstd)
    save(d, "dx.npy", x.grad)
    if gamma is not None:
        save(d, "gamma.npy", gamma)
        save(d, "dgamma.npy", gamma.grad)
    if beta is not None:
        save(d, "beta.npy", beta)
        save(d, "dbeta.npy", beta.grad)
    print(f"{c['name']}: rows={rows} n={n} eps={eps} gamma={gamma is not None} beta={beta is not None}")


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    for c in CASES:
        run(c)
