"""Brute-force float64 NumPy oracles: one explicit loop per pair or triple.

Written independently of ``ckd_core``: no closed forms, no Gram matrices.
For speed, the innermost loop is vectorized in a few places, always over
explicit per-pair (or per-triple) differences ``x_j - x_i``.
"""

from __future__ import annotations

import numpy as np


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def comparative(teacher, student, weights=None):
    """Mean over ordered pairs i != j (weight w_i w_j) and dims."""
    t, s = _f64(teacher, student)
    n, d = s.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    num = den = 0.0
    for i in range(n):
        others = np.arange(n) != i  # all j != i at once
        diff = (s[i] - s[others]) - (t[i] - t[others])  # (n - 1, d) pair differences
        num += w[i] * np.sum(w[others] * np.sum(diff**2, axis=1))
        den += w[i] * np.sum(w[others]) * d
    return num / den if den > 0 else 0.0


def comparative_pairs(teacher, student, a, b, weights=None):
    """Mean over the listed pairs (a[m], b[m]) and dims; pair weight w_a w_b."""
    t, s = _f64(teacher, student)
    n, d = s.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    num = den = 0.0
    for i, j in zip(a, b, strict=True):
        diff = (s[i] - s[j]) - (t[i] - t[j])
        num += w[i] * w[j] * np.sum(diff**2)
        den += w[i] * w[j] * d
    return num / den if den > 0 else 0.0


def comparative_groups(teacher, student, group_a, group_b):
    t, s = _f64(teacher, student)
    terms = []
    for ga, gb in zip(group_a, group_b, strict=True):
        ds = s[list(ga)].mean(0) - s[list(gb)].mean(0)
        dt = t[list(ga)].mean(0) - t[list(gb)].mean(0)
        terms.append(np.mean((ds - dt) ** 2))
    return float(np.mean(terms))


def projected(teacher, student, projection, weights=None):
    """Mean over ordered pairs i != j (weight w_i w_j) of the projected MSE."""
    t, s, p = _f64(teacher, student, projection)
    n = s.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    num = den = 0.0
    for i in range(n):
        others = np.arange(n) != i
        diff = (s[i] - s[others]) @ p - (t[i] - t[others]) @ p  # (n - 1, k)
        num += w[i] * np.sum(w[others] * np.mean(diff**2, axis=1))
        den += w[i] * np.sum(w[others])
    return num / den if den > 0 else 0.0


def _smooth_l1(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def _distances(x):
    n = x.shape[0]
    dist = np.zeros((n, n))
    for i in range(n):
        # ||x_i - x_j|| for every j, clamped at 1e-6 (RepDistiller's 1e-12 on squares)
        dist[i] = np.maximum(np.sqrt(np.sum((x[i] - x) ** 2, axis=1)), 1e-6)
        dist[i, i] = 0.0
    return dist / (dist.sum() / (n * (n - 1)))


def rkd_distance(teacher, student):
    t, s = _f64(teacher, student)
    n = s.shape[0]
    if n < 2:
        return 0.0
    ds, dt = _distances(s), _distances(t)
    return float(np.mean([_smooth_l1(ds[i, j] - dt[i, j]) for i in range(n) for j in range(n)]))


def _smooth_l1_array(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x * x, x - 0.5)


def _cosines_at(x, a, j):
    """Cosines of the angles (j, a, k) for every k, from explicit differences."""
    u = x[j] - x[a]
    v = x - x[a]  # x_k - x_a for every k
    nu, nv = np.linalg.norm(u), np.linalg.norm(v, axis=1)
    ok = (nv > 0) & (nu > 0)
    out = np.zeros(x.shape[0])
    out[ok] = (v[ok] @ u) / (nu * nv[ok])
    return out


def _cosine(x, a, j, k):
    u, v = x[j] - x[a], x[k] - x[a]
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return 0.0
    return float(u @ v / (nu * nv))


def rkd_angle(teacher, student):
    t, s = _f64(teacher, student)
    n = s.shape[0]
    if n < 2:
        return 0.0
    total = 0.0
    for a in range(n):
        for j in range(n):
            # innermost loop over k vectorized; per-triple explicit differences
            total += np.sum(_smooth_l1_array(_cosines_at(s, a, j) - _cosines_at(t, a, j)))
    return total / n**3


def rkd_angle_loops(teacher, student):
    """:func:`rkd_angle` with all three loops explicit (slow; cross-checks it)."""
    t, s = _f64(teacher, student)
    n = s.shape[0]
    if n < 2:
        return 0.0
    total = 0.0
    for a in range(n):
        for j in range(n):
            for k in range(n):
                total += _smooth_l1(_cosine(s, a, j, k) - _cosine(t, a, j, k))
    return total / n**3


def kd(teacher, student, temperature=4.0):
    t, s = _f64(teacher, student)
    total = 0.0
    for row_t, row_s in zip(t, s, strict=True):
        zt, zs = row_t / temperature, row_s / temperature
        log_pt = zt - zt.max() - np.log(np.sum(np.exp(zt - zt.max())))
        log_ps = zs - zs.max() - np.log(np.sum(np.exp(zs - zs.max())))
        total += np.sum(np.exp(log_pt) * (log_pt - log_ps))
    return temperature**2 * total / len(t)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _pearson(u, v, eps=1e-8):
    u, v = u - u.mean(), v - v.mean()
    return float(u @ v / (np.sqrt(u @ u) * np.sqrt(v @ v) + eps))


def dist(teacher, student, beta=1.0, gamma=1.0, tau=4.0):
    t, s = _f64(teacher, student)
    ps, pt = _softmax(s / tau), _softmax(t / tau)
    rows = np.mean([_pearson(ps[i], pt[i]) for i in range(ps.shape[0])])
    cols = np.mean([_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return tau**2 * (beta * (1 - rows) + gamma * (1 - cols))
