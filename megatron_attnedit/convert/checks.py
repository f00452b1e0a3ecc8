"""What the converters read is checked against what the config implies before it is trusted.

Every tensor a conversion reads -- an HF safetensors tensor, a torch_dist chunk, a legacy rank
file's shard -- must have the shape the config implies (a transposed tensor with the same number
of elements included: an element count proves nothing), a floating dtype, and finite values.
A failure names the tensor and the file and raises ``CheckpointError`` (one line, exit 2).

Shapes and dtypes come from file headers and are checked before anything is written. Values are
checked per tensor as it streams through: one ``sum`` over the tensor (a vectorised read with no
copy, tens of GB/s on one core: far below the disk), and only when that sum is not finite a
block-wise search that names the first bad element.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from megatron_attnedit.errors import CheckpointError

# block size (elements) of the exact search for non-finite values: bounds its temporary memory
_BLOCK = 1 << 24


def check_dtype(dtype: torch.dtype, name: str, where: str) -> None:
    """Model weights are floating point; an integer or boolean tensor is not a weight."""
    if not dtype.is_floating_point:
        raise CheckpointError(
            f"{name} in {where} has dtype {str(dtype).replace('torch.', '')}, which is not a weight dtype "
            "(float32, bfloat16, float16); the file is damaged or not a model checkpoint"
        )


def shape_mismatch(name: str, where: str, got: Sequence[int], want: Sequence[int], implied_by: str) -> CheckpointError:
    got, want = tuple(got), tuple(want)
    how = " (it is stored transposed)" if len(got) == 2 and got == want[::-1] else ""
    return CheckpointError(f"{name} in {where} has shape {got}, {implied_by} implies {want}{how}; the weights do not match the config")


def check_shape(got: Sequence[int], want: Sequence[int], name: str, where: str, implied_by: str = "the config") -> None:
    if tuple(got) != tuple(want):
        raise shape_mismatch(name, where, got, want, implied_by)


def vocab_rows_mismatch(name: str, where: str, rows: int, vocab_size: int, config: str) -> CheckpointError:
    """The one shape mismatch users meet most: a vocab_size that is not the embedding's rows."""
    return CheckpointError(
        f"{config} has vocab_size {vocab_size} but {name} in {where} has {rows} rows; converting would "
        f"{'drop' if rows > vocab_size else 'add'} {abs(rows - vocab_size)} vocabulary rows: set vocab_size to {rows} "
        "(or use the config that came with these weights)"
    )


def check_finite(t: torch.Tensor, name: str, where: str) -> None:
    """Refuse NaN / Inf values, naming the tensor and the first bad element."""
    if t.numel() == 0:
        return
    try:
        total = t.sum()  # NaN and Inf propagate; one pass, no copy
    except (RuntimeError, NotImplementedError):  # dtypes without a CPU sum (float8): exact check only
        total = torch.tensor(float("nan"))
    if bool(torch.isfinite(total)):
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _BLOCK):
        block = flat[start : start + _BLOCK]
        bad = ~torch.isfinite(block.float() if block.dtype.itemsize == 1 else block)
        if bool(bad.any()):
            i = start + int(bad.nonzero()[0, 0])
            index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), tuple(t.shape)))
            count = sum(int((~torch.isfinite(flat[s : s + _BLOCK].float())).sum()) for s in range(start, flat.numel(), _BLOCK))
            raise CheckpointError(
                f"{name} in {where} holds {count} non-finite value(s) ({float(flat[i])} at {list(index)}); "
                "NaN / Inf cannot be weights: the file is damaged or the model diverged; use another checkpoint"
            )
    # the sum overflowed on large finite values: nothing to refuse


def check_tensor(t: torch.Tensor, want_shape: Tuple[int, ...], name: str, where: str, implied_by: str = "the config") -> None:
    """Shape, dtype and values of one tensor as read."""
    check_shape(tuple(t.shape), want_shape, name, where, implied_by)
    check_dtype(t.dtype, name, where)
    check_finite(t, name, where)
