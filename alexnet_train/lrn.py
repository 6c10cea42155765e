"""Local response normalisation across channels in one pass, with a closed-form backward.

Usage::

    y = lrn(x, size=5, alpha=5e-4, beta=0.75, k=2.0)   # == F.local_response_norm(x, 5, 5e-4, 0.75, 2.0)

The paper's formula (section 3.3), with ``alpha`` as ``torch.nn.LocalResponseNorm`` takes it
(the paper's alpha times ``size``), ``a = alpha / size``, and the window
``W(i) = [i - size // 2, i + (size - 1) // 2]`` clipped to the channels::

    d_i = k + a * sum_{j in W(i)} x_j^2          y_i = x_i * d_i^(-beta)
    dL/dx_m = g_m * d_m^(-beta) - 2 * a * beta * x_m * sum_{i : m in W(i)} g_i * y_i / d_i

``F.local_response_norm`` builds this from nine kernels forward (square, pad, a 3-D average
pool, scale, add, pow, divide, plus the float32 casts) and seventeen backward, and autograd
keeps six float32 tensors per layer.  Here the forward reads ``x`` and writes ``y``, and the
backward recomputes the window sums from the one tensor saved, the input in its own dtype:

* on CUDA, Triton kernels (:func:`_fwd_kernel`; :func:`_bwd_kernel5` for the paper's window
  of 5, :func:`_bwd_kernel` for any other), one element per lane, the neighbouring channels
  read through the cache; NCHW and channels_last alike (the channel of a flat offset is
  ``offset // channel_stride % C`` in both);
* elsewhere (the CPU, or CUDA without Triton), the same formula in plain torch: the window
  sum is ``size`` in-place adds of shifted channel slices, no padded copy, no pooling.

Both compute in float32 whatever the input's dtype (float64 stays float64), so fp16's
overflow of ``x**2`` (activations above 256 on the 0-255 input scale) cannot happen, and
return the input's dtype.  TorchScript, tracing and the ONNX exporters get
``F.local_response_norm`` itself (see :class:`alexnet_train.model.LocalResponseNorm`).
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with torch's CUDA wheels on Linux; without it CUDA takes the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 1024  # elements per Triton program
# ALEXNET_LRN=torch forces the plain-torch path on CUDA too (benchmarks; a Triton that misbehaves).
FORCE_TORCH = os.environ.get("ALEXNET_LRN", "") == "torch"


def window_sum(sq: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``out[:, c] = sum(sq[:, c - before : c + after + 1])`` over channels, zeros past the edges.

    ``before + after + 1`` in-place adds of shifted channel slices into one new tensor (the
    layout of ``sq``: channels_last stays channels_last); no padded copy."""
    out = sq.clone()
    channels = sq.shape[1]
    for shift in range(1, before + 1):
        if shift < channels:
            out[:, shift:].add_(sq[:, :-shift])
    for shift in range(1, after + 1):
        if shift < channels:
            out[:, :-shift].add_(sq[:, shift:])
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward_torch(x: torch.Tensor, size: int, a: float, beta: float, k: float) -> torch.Tensor:
    xf = x.to(_compute_dtype(x))
    d = window_sum(xf * xf, size // 2, (size - 1) // 2).mul_(a).add_(k)
    return d.pow_(-beta).mul_(xf).to(x.dtype)


def _backward_torch(x: torch.Tensor, g: torch.Tensor, size: int, a: float, beta: float, k: float) -> torch.Tensor:
    dtype = _compute_dtype(x)
    xf, gf = x.to(dtype), g.to(dtype)
    d = window_sum(xf * xf, size // 2, (size - 1) // 2).mul_(a).add_(k)
    p = d.pow(-beta)                                  # d^-beta
    t = d.reciprocal_().mul_(p).mul_(xf).mul_(gf)     # g_i * x_i * d_i^(-beta-1) = g_i * y_i / d_i
    # Sum over the windows that contain m: the same window, mirrored.
    s = window_sum(t, (size - 1) // 2, size // 2).mul_(-2.0 * a * beta).mul_(xf)
    return p.mul_(gf).add_(s).to(g.dtype)


if triton is not None:
    @triton.jit
    def _fwd_kernel(X, Y, total, C, CSTRIDE, A, BETA, K,
                    BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < total
        c = (offs // CSTRIDE) % C
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(0, BEFORE + AFTER + 1):
            cc = c + (o - BEFORE)
            ok = live & (cc >= 0) & (cc < C)
            v = tl.load(X + offs + (o - BEFORE) * CSTRIDE, mask=ok, other=0.0).to(tl.float32)
            s += v * v
        x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
        d = K + A * s
        y = x * tl.exp2(-BETA * tl.log2(d))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=live)

    @triton.jit
    def _bwd_kernel(X, G, DX, total, C, CSTRIDE, A, BETA, K,
                    BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < total
        c = (offs // CSTRIDE) % C
        x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=live, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        dm = tl.zeros([BLOCK], dtype=tl.float32)
        # Every i whose window holds this channel m: i in [m - AFTER, m + BEFORE].
        for o in tl.static_range(0, BEFORE + AFTER + 1):
            di = o - AFTER
            ci = c + di
            ok_i = live & (ci >= 0) & (ci < C)
            s = tl.zeros([BLOCK], dtype=tl.float32)
            for q in tl.static_range(0, BEFORE + AFTER + 1):
                dj = di + q - BEFORE
                cj = c + dj
                ok_j = ok_i & (cj >= 0) & (cj < C)
                v = tl.load(X + offs + dj * CSTRIDE, mask=ok_j, other=0.0).to(tl.float32)
                s += v * v
            d = K + A * s
            if di == 0:
                dm = d
            xi = tl.load(X + offs + di * CSTRIDE, mask=ok_i, other=0.0).to(tl.float32)
            gi = tl.load(G + offs + di * CSTRIDE, mask=ok_i, other=0.0).to(tl.float32)
            acc += gi * xi * tl.exp2((-BETA - 1.0) * tl.log2(d))
        dx = g * tl.exp2(-BETA * tl.log2(dm)) - 2.0 * A * BETA * x * acc
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=live)


    @triton.jit
    def _sq(X, offs, c, live, C, CSTRIDE, D: tl.constexpr):
        """x**2 of channel c + D (0 past the channels), in float32."""
        ok = live & (c + D >= 0) & (c + D < C)
        v = tl.load(X + offs + D * CSTRIDE, mask=ok, other=0.0).to(tl.float32)
        return v * v

    @triton.jit
    def _bwd_kernel5(X, G, DX, total, C, CSTRIDE, A, BETA, K, BLOCK: tl.constexpr):
        """_bwd_kernel for the paper's window of 5 (2 on each side): the 9 squares the five
        windows around a channel need are read once (14 loads an element instead of 37)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < total
        c = (offs // CSTRIDE) % C
        s_4 = _sq(X, offs, c, live, C, CSTRIDE, -4)
        s_3 = _sq(X, offs, c, live, C, CSTRIDE, -3)
        s_2 = _sq(X, offs, c, live, C, CSTRIDE, -2)
        s_1 = _sq(X, offs, c, live, C, CSTRIDE, -1)
        s0 = _sq(X, offs, c, live, C, CSTRIDE, 0)
        s1 = _sq(X, offs, c, live, C, CSTRIDE, 1)
        s2 = _sq(X, offs, c, live, C, CSTRIDE, 2)
        s3 = _sq(X, offs, c, live, C, CSTRIDE, 3)
        s4 = _sq(X, offs, c, live, C, CSTRIDE, 4)
        mid = s_1 + s0 + s1
        d0 = K + A * (s_2 + mid + s2)
        acc = _term(X, G, offs, c, live, C, CSTRIDE, K + A * (s_4 + s_3 + s_2 + s_1 + s0), BETA, -2)
        acc += _term(X, G, offs, c, live, C, CSTRIDE, K + A * (s_3 + s_2 + mid), BETA, -1)
        acc += _term(X, G, offs, c, live, C, CSTRIDE, d0, BETA, 0)
        acc += _term(X, G, offs, c, live, C, CSTRIDE, K + A * (mid + s2 + s3), BETA, 1)
        acc += _term(X, G, offs, c, live, C, CSTRIDE, K + A * (s0 + s1 + s2 + s3 + s4), BETA, 2)
        x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=live, other=0.0).to(tl.float32)
        dx = g * tl.exp2(-BETA * tl.log2(d0)) - 2.0 * A * BETA * x * acc
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=live)

    @triton.jit
    def _term(X, G, offs, c, live, C, CSTRIDE, d, BETA, D: tl.constexpr):
        """g_i * x_i * d_i^(-beta-1) for i = c + D (0 past the channels)."""
        ok = live & (c + D >= 0) & (c + D < C)
        xi = tl.load(X + offs + D * CSTRIDE, mask=ok, other=0.0).to(tl.float32)
        gi = tl.load(G + offs + D * CSTRIDE, mask=ok, other=0.0).to(tl.float32)
        return gi * xi * tl.exp2((-BETA - 1.0) * tl.log2(d))


def _dense(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t in NCHW or channels_last, dense; the stride between channels)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t, 1
    t = t.contiguous()
    return t, int(t.stride(1))


def triton_usable(x: torch.Tensor) -> bool:
    """Whether :func:`lrn` runs the Triton kernels on ``x`` (CUDA, 4-D, float32/16/bf16, < 2**31 elements)."""
    return (triton is not None and not FORCE_TORCH and x.device.type == "cuda" and x.dim() == 4
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.numel() < 2**31)


def _forward_triton(x: torch.Tensor, size: int, a: float, beta: float, k: float) -> torch.Tensor:
    x, cstride = _dense(x)
    y = torch.empty_like(x)  # a dense x's layout, NCHW or channels_last
    total = x.numel()
    _fwd_kernel[(triton.cdiv(total, BLOCK),)](x, y, total, x.shape[1], cstride, a, beta, k,
                                              BEFORE=size // 2, AFTER=(size - 1) // 2, BLOCK=BLOCK)
    return y


def _backward_triton(x: torch.Tensor, g: torch.Tensor, size: int, a: float, beta: float, k: float) -> torch.Tensor:
    x, cstride = _dense(x)
    # The gradient in x's layout, so one offset addresses both.
    g = g.contiguous(memory_format=torch.channels_last if cstride == 1 and x.dim() == 4 else torch.contiguous_format)
    dx = torch.empty_like(x)
    total = x.numel()
    grid = (triton.cdiv(total, BLOCK),)
    if size == 5:
        _bwd_kernel5[grid](x, g, dx, total, x.shape[1], cstride, a, beta, k, BLOCK=BLOCK)
    else:
        _bwd_kernel[grid](x, g, dx, total, x.shape[1], cstride, a, beta, k,
                          BEFORE=size // 2, AFTER=(size - 1) // 2, BLOCK=BLOCK)
    return dx


class _LRN(torch.autograd.Function):
    """Saves only the input; the backward recomputes the window sums."""

    @staticmethod
    def forward(ctx, x, size, a, beta, k, use_triton):
        ctx.save_for_backward(x)
        ctx.params = (size, a, beta, k, use_triton)
        with torch.autocast(x.device.type, enabled=False):
            if use_triton:
                return _forward_triton(x, size, a, beta, k)
            return _forward_torch(x, size, a, beta, k)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        size, a, beta, k, use_triton = ctx.params
        with torch.autocast(x.device.type, enabled=False):
            if use_triton:
                dx = _backward_triton(x, g, size, a, beta, k)
            else:
                dx = _backward_torch(x, g, size, a, beta, k)
        return dx, None, None, None, None, None


def lrn(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
        use_triton: bool | None = None) -> torch.Tensor:
    """``F.local_response_norm(x, size, alpha, beta, k)`` for a 2-D+ input, in one pass.

    ``use_triton``: None chooses (:func:`triton_usable`); True forces the Triton kernels (tests
    run them on the CPU under ``TRITON_INTERPRET=1``); False forces plain torch."""
    if x.dim() < 2:
        raise ValueError(f"lrn: expected an input of 2+ dimensions (N, C, ...), got {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"lrn: size must be >= 1, got {size}")
    if use_triton is None:
        # Under torch.compile Inductor fuses the torch formulation itself (and saves what the
        # Function saves: the input alone); a kernel launch inside a traced Function is not its business.
        use_triton = triton_usable(x) and not torch.compiler.is_compiling()
    if use_triton and triton is None:
        raise RuntimeError("lrn: use_triton=True, but Triton is not installed")
    return _LRN.apply(x, int(size), float(alpha) / size, float(beta), float(k), bool(use_triton))
