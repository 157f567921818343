"""The numba kernels of :mod:`hatnorm._fused`, imported by its first use of them (numba takes about a second).

They are module-level functions so that numba caches their machine code beside this file (or in its
user cache where that is not writable) and a new process loads it instead of compiling again.
"""

import numba
import numpy as np
from numba import prange

#: numba's floating-point flags: reassociation lets LLVM vectorise the row sums; no flag that assumes
#: finite values, so NaN and inf propagate as in ATen
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

serial = numba.njit(fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)
jit = numba.njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True, nogil=True)
# Each row is read through its own 1-d view and each loop does one thing: LLVM vectorises loops of
# that form (2-d indexing or a loop that also updates the column sums ran 2-4x slower). Constants
# take eps's type, so float32 rows are computed in float32, as ATen does.


@serial
def gated_affine(scale, weight, bias, gate):  # pragma: no cover - compiled
    # γ ⊙ a and β ⊙ a, zero when no feature is selected (Σ m/k = 0)
    selected = scale.sum() > 0
    w, b = np.empty_like(weight), np.empty_like(bias)
    for c in range(w.shape[0]):
        w[c] = weight[c] * gate[c] if selected else 0
        b[c] = bias[c] * gate[c] if selected else 0
    return selected, w, b


@jit
def forward(x, scale, weight, bias, gate, eps, out, mean, rstd):  # pragma: no cover - compiled
    _, w, b = gated_affine(scale, weight, bias, gate)
    features = x.shape[1]
    zero = eps * np.float32(0)
    one = zero + np.float32(1)
    for n in prange(x.shape[0]):
        x_row, out_row = x[n], out[n]
        mu = zero
        for c in range(features):
            mu += x_row[c] * scale[c]
        var = zero
        for c in range(features):
            d = x_row[c] - mu
            var += d * d * scale[c]
        r = one / np.sqrt(var + eps)
        mean[n] = mu
        rstd[n] = r
        for c in range(features):
            out_row[c] = (x_row[c] - mu) * r * w[c] + b[c]


@jit
def backward(dy, x, mean, rstd, scale, weight, bias, gate, zero, dx, sums,
             d_gate, d_weight, d_bias):  # pragma: no cover - compiled
    # sums[0, p] = Σ dy·x̂ and sums[1, p] = Σ dy over part p of the rows (one part per thread); x̂ is
    # recomputed as the forward computed it, so it is the same number
    selected, w, _ = gated_affine(scale, weight, bias, gate)
    rows, features = dy.shape
    parts = sums.shape[1]
    per_part = (rows + parts - 1) // parts
    for p in prange(parts):
        dy_x_hat, dy_sum = sums[0, p], sums[1, p]
        x_hat = np.empty_like(dy_x_hat)
        for c in range(features):
            dy_x_hat[c] = zero
            dy_sum[c] = zero
        for n in range(p * per_part, min(rows, (p + 1) * per_part)):
            dy_row, x_row, dx_row = dy[n], x[n], dx[n]
            mu, r = mean[n], rstd[n]
            for c in range(features):
                x_hat[c] = (x_row[c] - mu) * r
            g_sum = zero
            g_x_hat = zero
            for c in range(features):
                g = dy_row[c] * w[c]
                g_sum += g
                g_x_hat += g * x_hat[c]
            for c in range(features):
                dx_row[c] = r * (dy_row[c] * w[c] - scale[c] * (g_sum + x_hat[c] * g_x_hat))
            for c in range(features):
                dy_x_hat[c] += dy_row[c] * x_hat[c]
            for c in range(features):
                dy_sum[c] += dy_row[c]
    for c in range(features):  # γ·a + β·a's gradients: a's through γ and β, γ's and β's through a
        dgx, dgs = zero, zero
        for p in range(parts):
            dgx += sums[0, p, c]
            dgs += sums[1, p, c]
        d_gate[c] = dgx * weight[c] + dgs * bias[c] if selected else zero
        d_weight[c] = dgx * gate[c] if selected else zero
        d_bias[c] = dgs * gate[c] if selected else zero
