# make_golden.py -- generates the golden vectors of the normalization family in
# this folder: LayerNorm and RMSNorm, with and without a gamma offset, plain and
# pre-norm (fused residual add).
#
# What it does: for each case below it draws inputs in float64 from a fixed
# per-case torch.Generator seed, runs PyTorch's CPU implementation in float64
# and writes inputs and outputs as little-endian float64 ('<f8') C-order .npy
# files into ./<case>/ (next to this script):
#   h       : x + residual for a pre-norm case, else x
#   forward : LayerNorm: torch.ops.aten.native_layer_norm(h, [n], w, beta, eps)
#             -> y, mean, rstd (mean/rstd flattened to shape (rows,))
#             RMSNorm: torch.nn.functional.rms_norm(h, (n,), w, eps) (+ beta),
#             rstd from torch.ops.aten._fused_rms_norm(h, [n], w, eps), the op
#             behind it (the functional returns no statistics)
#             w = gamma, or offset + gamma for a gamma offset (Gemma's RMSNorm,
#             Megatron's apply_layernorm_1p: F.rms_norm(x, (n,), 1 + w))
#   backward: autograd of (y * dy).sum() (+ (h * dh).sum() with an upstream
#             dh) -> dx (= d residual), dgamma, dbeta
# It also asserts that torch.nn.functional.layer_norm gives the same y as the
# aten op, that torch.ops.aten.native_layer_norm_backward (plus dh) gives the
# same gradients as autograd, that F.rms_norm agrees with _fused_rms_norm and
# its gradients with autograd through the textbook formula, that x and
# residual get the same gradient, and that y/mean/rstd match the textbook
# formulas.
#
# `python3 make_golden.py --check` writes nothing: it re-evaluates every case
# with 60-digit mpmath arithmetic from the committed inputs and prints how far
# the committed outputs are from it (the basis of the tolerances in README.md).
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
import sys

import numpy as np
import torch

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))


def normal(g, shape, mean=0.0, std=1.0):
    return torch.randn(shape, generator=g, dtype=F64) * std + mean


def case_inputs(name, seed, rows, n, eps, affine, bias, x_fn=None, kind="layer_norm",
                offset=0.0, residual=False, dh=False):
    """Draws x, gamma, beta, dy (in that order), then residual and dh.

    With a gamma offset, gamma is drawn around 0 (the zero-centred weight), so
    that offset + gamma is near 1 as for the plain cases."""
    g = torch.Generator().manual_seed(seed)
    x = x_fn(g, rows, n) if x_fn else normal(g, (rows, n))
    gamma = normal(g, (n,), 1.0 - offset, 0.1) if affine else None
    beta = normal(g, (n,), 0.0, 0.1) if bias else None
    dy = normal(g, (rows, n))
    r = normal(g, (rows, n), 0.0, 2.0) if residual else None
    dh_t = normal(g, (rows, n)) if dh else None
    return dict(name=name, x=x, gamma=gamma, beta=beta, dy=dy, eps=eps, kind=kind,
                offset=offset, residual=r, dh=dh_t)


def large_mean(g, rows, n):
    return 1e4 + normal(g, (rows, n))


def constant_rows(g, rows, n):
    vals = torch.tensor([3.25, -1.5], dtype=F64)[:rows]
    return vals[:, None].expand(rows, n).clone()


MIXED_SCALES = [1e-3, 1.0, 1e3, 1e6, 1e-6]  # last row: var ~ 1e-12 ~ eps


def mixed_scale(g, rows, n):
    s = torch.tensor(MIXED_SCALES[:rows], dtype=F64)
    return normal(g, (rows, n)) * s[:, None]


def zero_rows(g, rows, n):
    # rows 0 and 2 all zero: r = 1/sqrt(eps), x_hat = 0, y = beta
    x = normal(g, (rows, n))
    x[0::2] = 0.0
    return x


RMS = "rms_norm"
CASES = [
    case_inputs("basic_4x8", 1, 4, 8, 1e-5, True, True),
    case_inputs("no_affine_3x5", 2, 3, 5, 1e-5, False, False),
    case_inputs("gamma_only_2x16", 3, 2, 16, 1e-12, True, False),
    case_inputs("large_mean_4x32", 4, 4, 32, 1e-5, True, True, large_mean),
    case_inputs("n1_3x1", 5, 3, 1, 1e-5, True, True),
    case_inputs("constant_rows_2x7", 6, 2, 7, 1e-5, True, True, constant_rows),
    case_inputs("mixed_scale_5x13", 7, 5, 13, 1e-12, True, True, mixed_scale),
    # RMSNorm (F.rms_norm)
    case_inputs("rms_basic_4x8", 8, 4, 8, 1e-6, True, False, kind=RMS),
    case_inputs("rms_no_weight_3x5", 9, 3, 5, 1e-6, False, False, kind=RMS),
    case_inputs("rms_beta_3x7", 10, 3, 7, 1e-5, True, True, kind=RMS),
    case_inputs("rms_gemma_offset_2x16", 11, 2, 16, 1e-6, True, False, kind=RMS, offset=1.0),
    case_inputs("rms_mixed_scale_5x13", 12, 5, 13, 1e-12, True, False, mixed_scale, kind=RMS),
    case_inputs("rms_zero_rows_3x6", 13, 3, 6, 1e-6, True, True, zero_rows, kind=RMS),
    case_inputs("rms_n1_3x1", 14, 3, 1, 1e-6, True, False, kind=RMS),
    # LayerNorm with a zero-centred weight (F.layer_norm(x, (n,), 1 + w, b))
    case_inputs("ln_offset_3x8", 15, 3, 8, 1e-5, True, True, offset=1.0),
    # pre-norm: h = x + residual, then the norm of h; dh flows into h from later layers
    case_inputs("prenorm_ln_4x16", 16, 4, 16, 1e-5, True, True, residual=True, dh=True),
    case_inputs("prenorm_ln_no_dh_2x8", 17, 2, 8, 1e-5, True, True, residual=True),
    case_inputs("prenorm_rms_4x16", 18, 4, 16, 1e-6, True, False, kind=RMS, residual=True,
                dh=True),
    case_inputs("prenorm_rms_gemma_3x32", 19, 3, 32, 1e-6, True, False, kind=RMS, offset=1.0,
                residual=True, dh=True),
]


def save(d, fname, t):
    a = np.ascontiguousarray(t.detach().cpu().numpy().astype("<f8"))
    np.save(os.path.join(d, fname), a)


def close(a, b, rel, name):
    assert torch.allclose(a, b, rtol=rel, atol=rel * (1 + b.abs().max())), name


def forward(kind, h, n, w, beta, eps):
    """y (and mean, rstd for the statistics files) of one case."""
    rows = h.shape[0]
    if kind == "layer_norm":
        y, mean, rstd = torch.ops.aten.native_layer_norm(h, [n], w, beta, eps)
        return y, mean.reshape(rows), rstd.reshape(rows)
    y = torch.nn.functional.rms_norm(h, (n,), w, eps)
    with torch.no_grad():
        # the aten op behind F.rms_norm also returns the statistic
        y2, rstd = torch.ops.aten._fused_rms_norm(h, [n], w, eps)
        assert torch.allclose(y2, y, rtol=0, atol=1e-15 * (1 + y.abs().max()))
        rstd = rstd.reshape(rows)
        assert torch.allclose(rstd, 1.0 / torch.sqrt((h * h).mean(dim=1) + eps), rtol=1e-14, atol=0)
    if beta is not None:
        y = y + beta
    return y, None, rstd


def textbook(kind, h, w, beta, eps):
    if kind == "layer_norm":
        m = h.mean(dim=1, keepdim=True)
        v = ((h - m) ** 2).mean(dim=1, keepdim=True)
        y = (h - m) / torch.sqrt(v + eps)
    else:
        y = h / torch.sqrt((h * h).mean(dim=1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    if beta is not None:
        y = y + beta
    return y


def run(c):
    x, dy, eps, kind, offset = c["x"], c["dy"], c["eps"], c["kind"], c["offset"]
    name, rows, n = c["name"], x.shape[0], x.shape[1]
    leaf = lambda t: t.clone().requires_grad_(True) if t is not None else None  # noqa: E731
    x, r, gamma, beta = leaf(x), leaf(c["residual"]), leaf(c["gamma"]), leaf(c["beta"])
    dh = c["dh"]

    h = x + r if r is not None else x
    w = offset + gamma if (gamma is not None and offset != 0.0) else gamma
    y, mean, rstd = forward(kind, h, n, w, beta, eps)
    loss = (y * dy).sum()
    if dh is not None:
        loss = loss + (h * dh).sum()
    loss.backward()

    with torch.no_grad():
        if kind == "layer_norm":
            # functional API agrees with the aten op
            y_f = torch.nn.functional.layer_norm(h, [n], w, beta, eps)
            assert torch.allclose(y_f, y, rtol=0, atol=1e-15 * (1 + y.abs().max())), name
            # textbook formula agrees (loose: different summation order)
            m_ref = h.mean(dim=1)
            v_ref = ((h - m_ref[:, None]) ** 2).mean(dim=1)
            assert torch.allclose(mean, m_ref, rtol=1e-12, atol=0), name
            assert torch.allclose(rstd, 1.0 / torch.sqrt(v_ref + eps), rtol=1e-9, atol=0), name
            assert torch.allclose(y, textbook(kind, h, w, beta, eps), rtol=1e-9, atol=1e-9), name
            # explicit backward op agrees with autograd (plus dh on the residual stream)
            dx2, dg2, db2 = torch.ops.aten.native_layer_norm_backward(
                dy, h, [n], mean.reshape(rows, 1), rstd.reshape(rows, 1), w, beta,
                [True, gamma is not None, beta is not None])
            if dh is not None:
                dx2 = dx2 + dh
            grads2 = (dx2, dg2, db2)
        else:
            close(y, textbook(kind, h, w, beta, eps), 1e-12, name)

    if kind != "layer_norm":
        # F.rms_norm's gradients against autograd through the textbook formula
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
                  for t in (x, r, gamma, beta)]
        x2, r2, g2, b2 = leaves
        h2 = x2 + r2 if r2 is not None else x2
        w2 = offset + g2 if (g2 is not None and offset != 0.0) else g2
        loss2 = (textbook(kind, h2, w2, b2, eps) * dy).sum()
        if dh is not None:
            loss2 = loss2 + (h2 * dh).sum()
        loss2.backward()
        grads2 = (x2.grad, g2.grad if g2 is not None else None,
                  b2.grad if b2 is not None else None)

    with torch.no_grad():
        close(grads2[0], x.grad, 1e-12, name)
        if gamma is not None:
            close(grads2[1], gamma.grad, 1e-12, name)
        if beta is not None:
            close(grads2[2], beta.grad, 1e-12, name)
        if r is not None:
            # h = x + residual: both get the one gradient of h
            assert torch.equal(x.grad, r.grad), name

    d = os.path.join(HERE, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    save(d, "x.npy", x)
    save(d, "dy.npy", dy)
    save(d, "eps.npy", torch.tensor([eps], dtype=F64))
    save(d, "y.npy", y)
    if mean is not None:
        save(d, "mean.npy", mean)
    save(d, "rstd.npy", rstd)
    save(d, "dx.npy", x.grad)
    if gamma is not None:
        save(d, "gamma.npy", gamma)
        save(d, "dgamma.npy", gamma.grad)
    if beta is not None:
        save(d, "beta.npy", beta)
        save(d, "dbeta.npy", beta.grad)
    if kind != "layer_norm":
        with open(os.path.join(d, "kind.txt"), "w") as f:
            f.write(kind + "\n")
    if offset != 0.0:
        save(d, "offset.npy", torch.tensor([offset], dtype=F64))
    if r is not None:
        save(d, "residual.npy", r)
        save(d, "h.npy", h)
    if dh is not None:
        save(d, "dh.npy", dh)
    print(f"{name}: {kind} rows={rows} n={n} eps={eps} gamma={gamma is not None} "
          f"beta={beta is not None} offset={offset} residual={r is not None} dh={dh is not None}")


def check():
    """Distance of the committed outputs from a 60-digit evaluation of the formulas.

    Each output is measured as the Rust test measures it: |a - b| / max(1, max|b|) over each
    row of a (rows, n) array, over each value of a vector; rstd relative to itself."""
    import mpmath as mp

    mp.mp.dps = 60

    def load(d, f):
        p = os.path.join(d, f)
        return np.load(p) if os.path.exists(p) else None

    def err(got, want, per_row):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        shape = (got.shape[0], -1) if per_row else (-1, 1)
        worst = 0.0
        for ga, wa in zip(got.reshape(shape), want.reshape(shape)):
            scale = max(1.0, float(np.abs(wa).max()))
            worst = max(worst, float(np.abs(ga - wa).max()) / scale)
        return worst

    print(f"{'case':24} {'y':>9} {'stats':>9} {'dx':>9} {'dgamma':>9} {'dbeta':>9}")
    for name in sorted(os.listdir(HERE)):
        d = os.path.join(HERE, name)
        if not os.path.isdir(d):
            continue
        kind = open(os.path.join(d, "kind.txt")).read().strip() if os.path.exists(
            os.path.join(d, "kind.txt")) else "layer_norm"
        x, dy, eps = load(d, "x.npy"), load(d, "dy.npy"), float(load(d, "eps.npy")[0])
        gamma, beta, off = load(d, "gamma.npy"), load(d, "beta.npy"), load(d, "offset.npy")
        r, dh = load(d, "residual.npy"), load(d, "dh.npy")
        offset = mp.mpf(float(off[0])) if off is not None else mp.mpf(0)
        rows, n = x.shape
        h = x + r if r is not None else x  # float64 sum, as stored
        # w = offset + gamma rounded to float64, as PyTorch (and the reference) form it
        w = [mp.mpf(float(np.float64(float(offset)) + gamma[j])) if gamma is not None
             else mp.mpf(1) for j in range(n)]
        b = [mp.mpf(float(beta[j])) if beta is not None else mp.mpf(0) for j in range(n)]
        y = np.zeros((rows, n))
        dx = np.zeros((rows, n))
        stats = np.zeros(rows)
        mean = np.zeros(rows)
        dg, db = [mp.mpf(0)] * n, [mp.mpf(0)] * n
        for i in range(rows):
            hr = [mp.mpf(float(v)) for v in h[i]]
            if kind == "layer_norm":
                mu = mp.fsum(hr) / n
                var = mp.fsum((v - mu) ** 2 for v in hr) / n
            else:
                mu = mp.mpf(0)
                var = mp.fsum(v * v for v in hr) / n
            rs = 1 / mp.sqrt(var + mp.mpf(eps))
            xh = [(v - mu) * rs for v in hr]
            g = [mp.mpf(float(dy[i, j])) * w[j] for j in range(n)]
            c1 = mp.fsum(g[j] * xh[j] for j in range(n)) / n
            c2 = mp.fsum(g) / n if kind == "layer_norm" else mp.mpf(0)
            for j in range(n):
                y[i, j] = float(xh[j] * w[j] + b[j])
                dx[i, j] = float(rs * (g[j] - c2 - xh[j] * c1)
                                 + (mp.mpf(float(dh[i, j])) if dh is not None else 0))
                dg[j] += mp.mpf(float(dy[i, j])) * xh[j]
                db[j] += mp.mpf(float(dy[i, j]))
            stats[i], mean[i] = float(rs), float(mu)
        e_stats = max(abs(a - b) / b for a, b in zip(load(d, "rstd.npy"), stats))
        if kind == "layer_norm":
            e_stats = max(e_stats, err(load(d, "mean.npy"), mean, False))
        cols = [err(load(d, "y.npy"), y, True), e_stats, err(load(d, "dx.npy"), dx, True)]
        for f, want in (("dgamma.npy", dg), ("dbeta.npy", db)):
            got = load(d, f)
            cols.append(err(got, np.array([float(v) for v in want]), False)
                        if got is not None else None)
        print(f"{name:24} " + " ".join(f"{c:9.1e}" if c is not None else f"{'-':>9}"
                                        for c in cols))


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
        sys.exit(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    for c in CASES:
        run(c)
