"""Reference implementations the losses are measured against, and their memory cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NAIVE_TENSORS = 4  # live (n, n, d) tensors of the naive form, a lower bound
BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}
PROJ_OUT = 100  # ProjectedRKDLoss out_dim


def naive_bytes(n: int, d: int, dtype: str) -> int:
    """Analytic unchunked peak of the naive form: 4 live (n, n, d) tensors."""
    return NAIVE_TENSORS * n * n * d * BYTES[dtype]


def repdistiller_bytes(n: int, d: int, dtype: str) -> int:
    """Rough peak of RepDistiller's RKD with autograd: ~6 (n,n,d) + ~6 (n,n,n) tensors."""
    return 6 * (n * n * d + n**3) * BYTES[dtype]


def torch_references(torch: Any) -> dict[str, Callable[..., Any]]:
    """Pure-torch reference implementations (written here, not in the library)."""
    import torch.nn.functional as F

    def up(x: Any) -> Any:
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def comparative_native(s: Any, t: Any) -> Any:
        """ComparativeLoss in closed form: the centred residuals' sum of squares."""
        e = up(s) - up(t)
        n, d = e.shape
        c = e - e.mean(0, keepdim=True)
        return ((c * c).sum() * (2.0 / ((n - 1) * d))).to(s.dtype)

    def naive_part(s: Any, t: Any, rows: slice, p: Any = None) -> Any:
        """Brute force over ``rows``: the (rows, n, d) differences, projected by ``p``."""
        n, d = s.shape
        ds = s[rows, None, :] - s[None, :, :]
        dt = t[rows, None, :] - t[None, :, :]
        diff = ds - dt
        if p is not None:
            diff = diff @ p
        k = diff.shape[-1]
        return (diff**2).sum() / (n * (n - 1) * k)

    def projected_native(s: Any, t: Any, p: Any) -> Any:
        """ProjectedRKDLoss in closed form on the projected residuals."""
        e = (up(s) - up(t)) @ p
        n, k = e.shape
        c = e - e.mean(0, keepdim=True)
        return ((c * c).sum() * (2.0 / ((n - 1) * k))).to(s.dtype)

    def pdist(e: Any, eps: float = 1e-12) -> Any:
        """RepDistiller's pairwise Euclidean distances."""
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
        res = res.sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def repdistiller(s: Any, t: Any, w_d: float = 25.0, w_a: float = 50.0) -> Any:
        """RepDistiller's RKDLoss.forward (distiller_zoo/RKD.py), verbatim maths."""
        with torch.no_grad():
            t_d = pdist(t)
            t_d = t_d / t_d[t_d > 0].mean()
        d = pdist(s)
        d = d / d[d > 0].mean()
        loss_d = F.smooth_l1_loss(d, t_d)
        with torch.no_grad():
            td = t.unsqueeze(0) - t.unsqueeze(1)
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
        sd = s.unsqueeze(0) - s.unsqueeze(1)
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
        loss_a = F.smooth_l1_loss(s_angle, t_angle)
        return w_d * loss_d + w_a * loss_a

    def kd_native(s: Any, t: Any, temperature: float = 4.0) -> Any:
        """Hinton's KD: temperature-scaled KL divergence, batch mean."""
        log_ps = F.log_softmax(up(s) / temperature, dim=1)
        log_pt = F.log_softmax(up(t) / temperature, dim=1)
        kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        return (kl * temperature**2).to(s.dtype)

    def dist_native(s: Any, t: Any, tau: float = 4.0) -> Any:
        """DIST authors' code (cosine of centred rows / columns)."""

        def pearson(a: Any, b: Any) -> Any:
            a = a - a.mean(1, keepdim=True)
            b = b - b.mean(1, keepdim=True)
            return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

        ps = F.softmax(up(s) / tau, dim=1)
        pt = F.softmax(up(t) / tau, dim=1)
        inter = 1 - pearson(ps, pt).mean()
        intra = 1 - pearson(ps.t(), pt.t()).mean()
        return ((inter + intra) * tau**2).to(s.dtype)

    return {
        "comparative_native": comparative_native,
        "naive_part": naive_part,
        "projected_native": projected_native,
        "repdistiller": repdistiller,
        "kd_native": kd_native,
        "dist_native": dist_native,
    }
