"""Brute-force float64 NumPy oracles: one explicit loop per pair or triple.

Written independently of ``ckd_core``: no closed forms, no Gram matrices.
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
        for j in range(n):
            if i != j:
                diff = (s[i] - s[j]) - (t[i] - t[j])
                num += w[i] * w[j] * np.sum(diff**2)
                den += w[i] * w[j] * d
    return num / den if den > 0 else 0.0


def comparative_pairs(teacher, student, a, b):
    t, s = _f64(teacher, student)
    terms = [np.mean(((s[i] - s[j]) - (t[i] - t[j])) ** 2) for i, j in zip(a, b)]
    return float(np.mean(terms))


def comparative_groups(teacher, student, group_a, group_b):
    t, s = _f64(teacher, student)
    terms = []
    for ga, gb in zip(group_a, group_b):
        ds = s[list(ga)].mean(0) - s[list(gb)].mean(0)
        dt = t[list(ga)].mean(0) - t[list(gb)].mean(0)
        terms.append(np.mean((ds - dt) ** 2))
    return float(np.mean(terms))


def projected(teacher, student, projection):
    t, s, p = _f64(teacher, student, projection)
    n = s.shape[0]
    terms = [
        np.mean(((s[i] - s[j]) @ p - (t[i] - t[j]) @ p) ** 2)
        for i in range(n)
        for j in range(n)
        if i != j
    ]
    return float(np.mean(terms)) if terms else 0.0


def _smooth_l1(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def _distances(x):
    n = x.shape[0]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                dist[i, j] = max(np.sqrt(np.sum((x[i] - x[j]) ** 2)), 1e-6)
    return dist / (dist.sum() / (n * (n - 1)))


def rkd_distance(teacher, student):
    t, s = _f64(teacher, student)
    n = s.shape[0]
    if n < 2:
        return 0.0
    ds, dt = _distances(s), _distances(t)
    return float(np.mean([_smooth_l1(ds[i, j] - dt[i, j]) for i in range(n) for j in range(n)]))


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
            for k in range(n):
                total += _smooth_l1(_cosine(s, a, j, k) - _cosine(t, a, j, k))
    return total / n**3


def kd(teacher, student, temperature=4.0):
    t, s = _f64(teacher, student)
    total = 0.0
    for row_t, row_s in zip(t, s):
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
