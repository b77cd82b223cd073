"""SIGReg: the sketched Epps-Pulley test against N(0, I), shared by the image and world objectives.

Pure tensors in, a scalar out (see docs/method.md sections 3-4):

    s = sigreg(z, step=step)   # z: (..., N, K) projector outputs; the mean statistic over directions
    ep = epps_pulley(z @ a)    # (N, M) samples -> (M,): the statistic of each direction, one process

SIGReg is computed in float32 even under autocast and costs O(N K M + N M T) time; beside
the (N, M) projections it holds only a bounded scratch block (the plain formula holds
N x M x T complex exponentials). In a torchrun job it equals the statistic of one process
holding the global batch (the empirical characteristic function is averaged across ranks).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lejepa_cli import dist

# Elements (rows x samples) per block of the ECF kernel, which needs about 100 bytes of
# scratch per element (about 20 (A + B) bytes with direct powers, below). On CPU a block then stays
# in cache (larger blocks measured no faster); on an accelerator the bound caps the scratch
# memory while keeping kernels large.
_BLOCK_ELEMS = {"cpu": 1 << 16}
_BLOCK_ELEMS_DEFAULT = 1 << 21
# Powers of exp(i dt p) straight from their angles (`_direct`): a kernel count per
# block that does not grow with the number of knots. Off on CPUs, where the products are cheaper.
_DIRECT_POWERS = {"cpu": False}


def random_directions(
    dim: int, num_slices: int, *, step: int, device: torch.device | str | None = None
) -> Tensor:
    """Unit-norm random directions (dim, num_slices), a pure function of `step` and the device type.

    Seeded by the global step so every rank and every view of one step share them, and a
    resumed run draws the same ones (CPU and CUDA generators give different draws).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(step))
    a = torch.randn(dim, num_slices, generator=gen, device=device, dtype=torch.float32)
    return a / a.norm(dim=0, keepdim=True)


def _knots(t_max: float, num_knots: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Knots t_1..t_{T-1} of the even grid on [0, t_max] and their integration weights.

    Knot 0 is dropped: there cos = 1 and sin = 0 exactly, so its error term is 0. Weights are
    trapezoid x Gaussian weight exp(-t^2/2) x 2 (the integrand is even: [0, t] stands for [-t, t]).
    """
    t = torch.linspace(0.0, t_max, num_knots, dtype=like.dtype, device=like.device)[1:]  # (T-1,)
    trap = torch.full_like(t, t_max / (num_knots - 1))
    trap[-1] /= 2
    return t, 2.0 * trap * torch.exp(-0.5 * t * t)


def _split(num_knots: int) -> tuple[int, int]:
    """(A, B), A * B >= num_knots, A + B small: knot j = a * B + b with 0 <= a < A, 1 <= b <= B."""
    b = math.ceil(math.sqrt(num_knots))
    return math.ceil(num_knots / b), b


def _doubling(x: Tensor, out: Tensor) -> Tensor:
    """Fill out (R, P, N) with x^1 .. x^P, x (R, N), in ceil(log2 P) products (each one kernel)."""
    out[:, 0] = x
    filled = 1
    while filled < out.shape[1]:
        count = min(filled, out.shape[1] - filled)
        # x^(filled + 1 .. filled + count) = x^(1 .. count) * x^filled
        torch.mul(out[:, :count], out[:, filled - 1 : filled], out=out[:, filled : filled + count])
        filled += count
    return out


def _phasor(x: Tensor) -> Tensor:
    """exp(i x) as a complex tensor (torch.polar and exp of a complex are slower on CPU)."""
    return torch.complex(torch.cos(x), torch.sin(x))


def _ladder(e: Tensor, na: int, nb: int) -> tuple[Tensor, Tensor]:
    """e (R, N) -> low (R, B, N) = e^1 .. e^B and high (R, A, N) = e^0, e^B, .., e^((A-1)B),
    by complex products, each kernel doubling the exponents done: O(log A + log B) kernels."""
    low = _doubling(e, torch.empty(e.shape[0], nb, e.shape[1], dtype=e.dtype, device=e.device))
    high = torch.empty(e.shape[0], na, e.shape[1], dtype=e.dtype, device=e.device)
    high[:, 0] = 1
    if na > 1:
        _doubling(low[:, -1], high[:, 1:])
    return low, high


def _direct(p: Tensor, dt: float, na: int, nb: int) -> tuple[Tensor, Tensor]:
    """p (R, N) -> the same (low, high) as `_ladder` of exp(i dt p), each power from its own
    angle: one broadcast product, one cos, one sin and one complex, whatever the number of knots."""
    k = torch.cat([torch.arange(1, nb + 1), torch.arange(na) * nb]).to(p)  # (B + A,)
    e = _phasor(p.unsqueeze(1) * (dt * k).unsqueeze(-1))  # (R, B + A, N)
    return e[:, :nb], e[:, nb:]


class _ECF(torch.autograd.Function):
    """p (R, N) real -> ECF mean_n exp(i t_j p[r, n]) at t_j = j * dt, j = 1..J, as (R, J, 2).

    The plain formula materialises (R, N, J) complex exponentials. Here, with e = exp(i dt p)
    and j = a B + b, exp(i t_j p) = (e^B)^a e^b (angle addition), so a sample needs only the
    powers e^1..e^B and e^0, e^B, .., e^((A-1)B), and the sums over samples of all A x B
    products are one batched matmul. Rows go in blocks, which bounds the scratch memory.
    Backward recomputes the powers and evaluates sum_j w_j e^j = sum_a (e^B)^a (sum_b w_ab e^b)
    by a batched matmul and one weighted sum over a.

    The powers: `direct` evaluates each from its angle, so the kernels per block do not grow
    with J (accelerators, launch-bound: 2 sqrt(J) cos/sin per sample cost them little);
    otherwise one cos/sin per sample, for all rows at once, and products in blocks (CPUs, where
    a cos/sin costs several complex products).
    """

    @staticmethod
    def forward(ctx, p: Tensor, dt: float, num_knots: int, block_rows: int, direct: bool) -> Tensor:
        r, n = p.shape
        na, nb = _split(num_knots)
        cdtype = torch.complex128 if p.dtype == torch.float64 else torch.complex64
        ecf = torch.empty(r, na, nb, dtype=cdtype, device=p.device)  # knot a * B + b at [a, b - 1]
        e = None if direct else _phasor(dt * p)  # (R, N)
        for r0 in range(0, r, block_rows):
            rows = slice(r0, r0 + block_rows)
            low, high = _direct(p[rows], dt, na, nb) if direct else _ladder(e[rows], na, nb)  # (rb, B|A, N)
            torch.bmm(high, low.transpose(1, 2), out=ecf[rows])
        ctx.save_for_backward(p)
        ctx.dt, ctx.num_knots, ctx.block_rows, ctx.direct = dt, num_knots, block_rows, direct
        return torch.view_as_real(ecf.view(r, na * nb)[:, :num_knots] / n)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (p,) = ctx.saved_tensors
        dt, num_knots, block_rows, direct = ctx.dt, ctx.num_knots, ctx.block_rows, ctx.direct
        r, n = p.shape
        na, nb = _split(num_knots)
        t = dt * torch.arange(1, num_knots + 1, dtype=p.dtype, device=p.device)  # (J,)
        # d/dp of (gc * mean cos(tp) + gs * mean sin(tp)) = t/n * Re(exp(itp) * (gs + i gc)),
        # and gs + i gc = i * conj(gc + i gs).
        g = torch.view_as_complex(grad.contiguous())  # (R, J)
        w = torch.zeros(r, na * nb, dtype=g.dtype, device=p.device)
        w[:, :num_knots] = (1j / n) * t * g.conj()
        w = w.view(r, na, nb)
        dp = torch.empty_like(p)
        e = None if direct else _phasor(dt * p)  # (R, N)
        for r0 in range(0, r, block_rows):
            rows = slice(r0, r0 + block_rows)
            low, high = _direct(p[rows], dt, na, nb) if direct else _ladder(e[rows], na, nb)  # (rb, B|A, N)
            part = torch.bmm(w[rows], low)  # (rb, A, N): sum_b w_ab e^b
            torch.sum((part * high).real, dim=1, out=dp[rows])  # Re sum_a (e^B)^a part_a
        return dp, None, None, None, None


def _ecf(p: Tensor, t_max: float, num_knots: int) -> Tensor:
    """Rows p (R, N) of 1-D samples -> their ECF at knots t_1..t_{T-1} of [0, t_max], (R, T - 1, 2)."""
    rows = max(1, _BLOCK_ELEMS.get(p.device.type, _BLOCK_ELEMS_DEFAULT) // p.shape[-1])
    direct = _DIRECT_POWERS.get(p.device.type, True)
    return _ECF.apply(p, t_max / (num_knots - 1), num_knots - 1, rows, direct)


def _statistic(ecf: Tensor, n: int, t_max: float, num_knots: int) -> Tensor:
    """ECF (..., T - 1, 2) of samples of size n -> the Epps-Pulley statistic against N(0, 1), (...)."""
    t, weight = _knots(t_max, num_knots, ecf)
    c, s = ecf.unbind(-1)  # (..., T - 1) each
    err = (c - torch.exp(-0.5 * t * t)).square() + s.square()
    return n * (err * weight).sum(-1)


def _check_knots(num_knots: int, what: str) -> None:
    if num_knots < 2:
        raise ValueError(f"{what} needs num_knots >= 2, got {num_knots}")


def epps_pulley(p: Tensor, *, t_max: float = 3.0, num_knots: int = 17) -> Tensor:
    """Epps-Pulley statistic of each column of p (N, M) against N(0, 1) -> (M,).

    The per-direction statistic `sigreg` averages (with p = z @ directions), of this process's
    samples only. Computed in float32 (float64 stays float64), autocast off; differentiable, and
    cheap under torch.no_grad().
    """
    _check_knots(num_knots, "epps_pulley")
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=p.device.type, enabled=False):
        rows = p.to(dtype).T.contiguous()  # (M, N): one direction's sample per row
        return _statistic(_ecf(rows, t_max, num_knots), p.shape[0], t_max, num_knots)


def sigreg(
    z: Tensor,
    *,
    step: int,
    num_slices: int = 1024,
    t_max: float = 3.0,
    num_knots: int = 17,
    directions: Tensor | None = None,
) -> Tensor:
    """SIGReg: Epps-Pulley statistic of z's projections on random directions, averaged; a scalar.

    z: (N, K), or (V, N, K) for the mean over views of per-view SIGReg (all views share the
    directions). Directions: drawn from `step` (see `random_directions`), or `directions`
    (K, M) used as given. Computed in float32 (float64 inputs stay float64), autocast off.
    In a process group, N is the local batch and the result is the statistic of the global
    batch of N x world_size samples. About 1 for i.i.d. N(0, 1) rows, ~0.40 N for collapse.
    """
    if z.dim() not in (2, 3):
        raise ValueError(f"sigreg expects z of shape (N, K) or (V, N, K), got {tuple(z.shape)}")
    _check_knots(num_knots, "sigreg")
    views = z if z.dim() == 3 else z.unsqueeze(0)  # (V, N, K)
    v, n, k = views.shape
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        if directions is None:
            a = random_directions(k, num_slices, step=step, device=z.device)
        elif directions.dim() != 2 or directions.shape[0] != k:
            shape = tuple(directions.shape)
            raise ValueError(f"directions must be ({k}, M) for z of {k} features, got {shape}")
        else:
            a = directions
        a = a.to(device=z.device, dtype=dtype)  # (K, M)
        # Projections laid out (M x V, N): each row is one direction's 1-D sample of one view.
        p = a.T @ views.to(dtype).reshape(v * n, k).T  # (M, V * N)
        ecf = _ecf(p.view(-1, n), t_max, num_knots).view(-1, v, num_knots - 1, 2)  # (M, V, J, 2)
        # Average the ECF, not the statistic: the result is then the global batch's statistic.
        ecf = dist.all_reduce_mean(ecf)
        return _statistic(ecf, n * dist.world_size(), t_max, num_knots).mean()  # mean over (M, V)


def sigreg_reference(
    z: Tensor,
    *,
    step: int,
    num_slices: int = 1024,
    t_max: float = 3.0,
    num_knots: int = 17,
    directions: Tensor | None = None,
) -> Tensor:
    """`sigreg` written plainly (one complex exponential per sample, direction and knot).

    Single process only; O(N M T) memory. The readable definition that tests and the
    benchmark hold the fast version to.
    """
    views = z if z.dim() == 3 else z.unsqueeze(0)  # (V, N, K)
    n, k = views.shape[1:]
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    a = random_directions(k, num_slices, step=step, device=z.device) if directions is None else directions
    p = views.to(dtype) @ a.to(device=z.device, dtype=dtype)  # (V, N, M)
    t = torch.linspace(0.0, t_max, num_knots, dtype=dtype, device=z.device)  # (T,)
    ecf = torch.exp(1j * t * p.unsqueeze(-1)).mean(dim=1)  # (V, M, T)
    phi = torch.exp(-0.5 * t * t)
    err = (ecf - phi).abs().square()
    ep = 2 * n * torch.trapezoid(err * phi, t, dim=-1)  # (V, M)
    return ep.mean()
