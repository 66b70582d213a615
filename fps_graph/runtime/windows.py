"""Exact window sums for Conv and ConvTranspose: each kernel tap's input summed over the positions it meets.

The graph reduces a Conv input over the batch and along its last axis (graph/observe.py, cols observers:
``conv_col_window_sums`` finishes from there), or, for ConvTranspose and the host oracle, over the batch only (a
[C, *spatial] map: ``conv_window_sums``, ``conv_transpose_window_sums``); the window sums that FPS needs per kernel
tap are then taken here on the host, exactly (zero padding, stride, dilation, auto_pad), in float64.
"""
from __future__ import annotations

import itertools

import numpy as np

from fps_graph.errors import DataError

__all__ = ["conv_pads", "conv_window_sums", "conv_col_window_sums", "conv_transpose_crop",
           "conv_transpose_window_sums"]


def conv_pads(conv: dict, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """(begin, end) zero padding per spatial axis, auto_pad resolved against the actual input size."""
    auto = conv.get("auto_pad", "NOTSET")
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    n = len(spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(n):
            out = -(-spatial[i] // s[i])
            total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return pads
    if auto == "VALID":
        return [(0, 0)] * n
    p = conv["pads"]
    return [(int(p[i]), int(p[i + n])) for i in range(n)]


def _conv_outs(conv: dict, spatial: tuple[int, ...], pads: list[tuple[int, int]]) -> list[int]:
    """Output size per spatial axis; a DataError when the input is smaller than the kernel."""
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    outs = []
    for i, size in enumerate(spatial):
        o = (size + pads[i][0] + pads[i][1] - d[i] * (k[i] - 1) - 1) // s[i] + 1
        if o <= 0:
            raise DataError(f"conv input of spatial size {tuple(spatial)} is smaller than its kernel {tuple(k)}")
        outs.append(o)
    return outs


def _tap_ranges(size: int, k: int, s: int, d: int, pad: int, out: int) -> list[tuple[int, int]]:
    """Per kernel tap along one axis: (first input position it reads, how many positions inside the input).

    Tap t reads first + s*j for the output positions j whose input position is not padding (a strided range)."""
    ranges = []
    for t in range(k):
        first = t * d - pad                                   # input index of output position 0 for this tap
        lo = -(first // s) if first < 0 else 0                # first output position inside the input
        hi = min(out - 1, (size - 1 - first) // s)            # last one
        ranges.append((first + lo * s, max(0, hi - lo + 1)))
    return ranges


def conv_window_sums(summed: np.ndarray, conv: dict) -> tuple[np.ndarray, int]:
    """Sum over output positions of each kernel tap's input, from the batch-summed map [C, *spatial].

    Returns ([C, *kernel] sums, number of output positions). This equals summing torch.nn.functional.unfold's
    columns over positions (zero padding included, stride and dilation respected). The positions a tap reads form
    a grid, one strided range per axis (padding reads zeros and is left out), so the sum is taken one axis at a
    time, and along an axis about once over the map for all taps together (``_axis_tap_sums``): a batch of one
    image of a conv net spent more time here than in ONNX Runtime (bench/README.md).
    """
    spatial = summed.shape[1:]
    pads = conv_pads(conv, spatial)
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    outs = _conv_outs(conv, spatial, pads)
    acc = summed
    for i, size in enumerate(spatial):
        acc = _axis_tap_sums(acc, i + 1, size, k[i], s[i], d[i], pads[i][0], outs[i])
    return acc, int(np.prod(outs))


def _axis_tap_sums(acc: np.ndarray, axis: int, size: int, k: int, s: int, d: int, pad: int, out: int) -> np.ndarray:
    """Along one axis: for each of the k taps, the float64 sum of the input positions it reads (``acc`` with that
    axis replaced by k).

    Tap t reads positions t*d - pad + j*s for the output positions j whose position is inside the input: a run of
    consecutive positions of one residue class modulo s. Taps of the same class share most of their run, so the
    class's common part is summed once and each tap adds only its own few positions at either end: about one pass
    over the map for all taps, instead of one per tap (3x3 convs: 3 passes per axis)."""
    runs: dict[int, list[tuple[int, int, int]]] = {}       # residue -> [(tap, first, last) in the class's indices]
    for t, (start, n) in enumerate(_tap_ranges(size, k, s, d, pad, out)):
        if n:
            runs.setdefault(start % s, []).append((t, start // s, start // s + n - 1))
    shape = list(acc.shape)
    shape[axis] = k
    result = np.zeros(shape, dtype=np.float64)

    def part(view: np.ndarray, a: int, b: int) -> np.ndarray:     # sum of class indices a..b (b < a: nothing)
        sl = [slice(None)] * acc.ndim
        sl[axis] = slice(a, b + 1)
        return view[tuple(sl)].sum(axis=axis, dtype=np.float64)

    for r, taps in runs.items():
        sl = [slice(None)] * acc.ndim
        sl[axis] = slice(r, None, s)
        view = acc[tuple(sl)]                              # the residue class r, consecutive indices
        a, b = max(t[1] for t in taps), min(t[2] for t in taps)
        common = part(view, a, b) if len(taps) > 1 and b >= a else None
        for t, first, last in taps:
            idx = [slice(None)] * acc.ndim
            idx[axis] = t
            if common is None:
                result[tuple(idx)] = part(view, first, last)
            else:
                result[tuple(idx)] = common + part(view, first, a - 1) + part(view, b + 1, last)
    return result


def conv_col_window_sums(reduced: np.ndarray, shape: tuple[int, ...], conv: dict, cols: tuple[int, int, int]
                         ) -> tuple[np.ndarray, int]:
    """``conv_window_sums`` from what a cols observer leaves the graph with (graph/observe.py ``_col_nodes``).

    reduced: [C, *spatial[:-1], q] float32: along the last axis (width W) the sums over the first W - W % stride
    columns of each residue class mod stride, then the first min(left, W) and the last min(right, W) columns one
    by one; shape: the observed input's [N, C, *spatial]. Each tap's columns are one residue class less the few at
    either end that its windows leave out, which lie in those border columns (``observe.col_borders``): its sum is
    the class sum plus the class's trailing columns (width % stride) minus the left-out ones, in float64 (all
    terms non-negative: no cancellation beyond float32's rounding of the class sum). The other axes are then
    summed per tap as in ``conv_window_sums``. Returns ([C, *kernel] float64 sums, output positions per sample).
    """
    spatial = tuple(int(v) for v in shape[2:])
    pads = conv_pads(conv, spatial)
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    outs = _conv_outs(conv, spatial, pads)
    stride, left, right = cols
    width = spatial[-1]
    nl, nr = min(left, width), min(right, width)
    red = np.asarray(reduced, dtype=np.float64)
    if red.shape[-1] != stride + nl + nr or stride != s[-1]:
        raise DataError(f"conv statistics of shape {red.shape} do not fit an input of shape {tuple(shape)}")
    known = {j: red[..., stride + j] for j in range(nl)}
    known.update({width - nr + j: red[..., stride + nl + j] for j in range(nr)})
    whole = width - width % stride                       # the residue sums cover columns [0, whole)
    taps = []
    for start, n in _tap_ranges(width, k[-1], stride, d[-1], pads[-1][0], outs[-1]):
        if n == 0:
            taps.append(np.zeros(red.shape[:-1], dtype=np.float64))
            continue
        reads = range(start, start + (n - 1) * stride + 1, stride)
        if len(known) == width:                          # a narrow input: every column came one by one
            taps.append(np.sum([known[c] for c in reads], axis=0))
            continue
        rho, end = start % stride, start + (n - 1) * stride
        if (start - stride >= nl and start >= stride) or (end + stride < width - nr and end + stride < width):
            # col_borders guarantees this never happens; a wrong cols tuple must not give wrong sums silently
            raise DataError(f"conv statistics: columns left out by a tap of {conv['kernel']} were not kept")
        total = red[..., rho].copy()                     # the class over [0, whole)
        for c, v in known.items():
            if c % stride != rho:
                continue
            read = start <= c <= end
            if c < whole and not read:                   # left out by this tap: taken off the class sum
                total -= v
            elif c >= whole and read:                    # a trailing column the class sum does not hold
                total += v
        taps.append(total)
    # taps lead, the axis being summed is last (numpy sums a last axis ~10x faster than a middle one):
    # [k_last, C, *spatial[:-1]] -> ... -> [k_0, ..., k_last, C]
    acc = np.stack(taps, axis=0)
    for i in range(len(spatial) - 2, -1, -1):
        acc = np.moveaxis(_axis_tap_sums(acc, acc.ndim - 1, spatial[i], k[i], s[i], d[i], pads[i][0], outs[i]), -1, 0)
    return np.ascontiguousarray(np.moveaxis(acc, -1, 0)), int(np.prod(outs))


def conv_transpose_crop(conv: dict, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first kept position, kept size) of a ConvTranspose output per spatial axis, in the coordinates of the full
    output ``q = p * stride + tap * dilation`` (p an input position), as ONNX Runtime computes them: ``output_shape``
    when given (explicit pads are then ignored), else ``auto_pad`` SAME_* (output = input * stride), VALID, or the
    explicit ``pads``. A computed total pad is split as the ONNX spec says (ONNX Runtime 1.31 agrees; older releases
    swapped the two): SAME_UPPER puts the odd one at the end, anything else at the beginning."""
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    adj = conv.get("output_padding") or [0] * len(spatial)
    auto = conv.get("auto_pad", "NOTSET")
    shape = list(conv.get("output_shape") or [])
    n = len(spatial)
    out = []
    for i, size in enumerate(spatial):
        full = (size - 1) * s[i] + adj[i] + (k[i] - 1) * d[i] + 1
        if shape or auto in ("SAME_UPPER", "SAME_LOWER"):
            target = (shape[i] if len(shape) == n else shape[i + 2]) if shape else size * s[i]
            total = max(0, full - target)
            head = total // 2 if auto == "SAME_UPPER" else total - total // 2
            size_out = target if shape else full - total
        elif auto == "VALID":
            head, size_out = 0, full
        else:
            head, tail = int(conv["pads"][i]), int(conv["pads"][i + n])
            size_out = full - head - tail
        if size_out <= 0:
            raise DataError(f"ConvTranspose input of spatial size {tuple(spatial)} gives an empty output")
        out.append((head, size_out))
    return out


def conv_transpose_window_sums(summed: np.ndarray, conv: dict) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose: for every (input channel, kernel tap), the sum of the batch-summed map over the input
    positions whose product with that tap lands in a kept output position; and how many such positions each tap
    has (per sample), shaped like the sums.

    ConvTranspose adds x[c, p] * W[c, o, tap] into output position p * stride + tap * dilation - pad_begin: every
    input position meets every tap, except the products that fall outside the output (cropped by pads, or beyond
    an output_shape). Per axis the kept positions of one tap are an interval of p, so each tap's set is a box.
    This is the adjoint of Conv's im2col: the (input, tap) pairs of the Conv that computes ConvTranspose's input
    gradient, without the zeros that Conv view inserts between input positions (W never multiplies those).
    """
    spatial = summed.shape[1:]
    crop = conv_transpose_crop(conv, tuple(spatial))
    k, s, d = conv["kernel"], conv["strides"], conv["dilations"]
    bounds = []            # per axis, per tap: [lo, hi) of input positions kept
    for i, size in enumerate(spatial):
        head, out = crop[i]
        axis = []
        for t in range(k[i]):
            lo = max(0, -((t * d[i] - head) // s[i]))          # ceil((head - t*d) / s)
            hi = min(size, (head + out - 1 - t * d[i]) // s[i] + 1)
            axis.append((lo, max(lo, hi)))
        bounds.append(axis)
    result = np.zeros((summed.shape[0], *k), dtype=np.float64)
    per_tap = np.zeros(tuple(k), dtype=np.float64)
    sp_axes = tuple(range(1, 1 + len(spatial)))
    for offs in itertools.product(*[range(kk) for kk in k]):
        box = [bounds[i][t] for i, t in enumerate(offs)]
        per_tap[offs] = float(np.prod([hi - lo for lo, hi in box]))
        if per_tap[offs]:
            sl = tuple(slice(lo, hi) for lo, hi in box)
            result[(slice(None), *offs)] = summed[(slice(None), *sl)].sum(axis=sp_axes, dtype=np.float64)
    return result, np.broadcast_to(per_tap, result.shape).copy()
