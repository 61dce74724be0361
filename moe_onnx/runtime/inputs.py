"""Checks of what a caller feeds the model: token ids, masks, positions. One readable error each.

Legend: B batch, S new tokens, T past + new positions.
"""

from __future__ import annotations

import numpy as np

from moe_onnx.contract import positions_from_mask
from moe_onnx.errors import RuntimeInputError


def check_ids(input_ids, vocab_size: int) -> np.ndarray:
    """``input_ids`` as contiguous int64 ``[B, S]``, every id inside the vocabulary."""
    ids = np.asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise RuntimeInputError(f"input_ids must hold integers, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise RuntimeInputError(f"input_ids must be 2-D [batch, seq], got shape {ids.shape}")
    if ids.shape[1] == 0:
        raise RuntimeInputError("input_ids is empty: need at least one token")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise RuntimeInputError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_mask(attention_mask, ids_BS: np.ndarray, past: int) -> np.ndarray:
    """``attention_mask`` ``[B, past + S]`` as int64; all ones when None."""
    expected = (ids_BS.shape[0], past + ids_BS.shape[1])
    if attention_mask is None:
        return np.ones(expected, dtype=np.int64)
    mask = np.asarray(attention_mask)
    if mask.shape != expected or mask.dtype.kind not in "iub":
        raise RuntimeInputError(f"attention_mask must be integer {expected}, got {mask.dtype} {mask.shape}")
    return np.ascontiguousarray(mask, dtype=np.int64)


def check_positions(position_ids, mask_BT: np.ndarray, ids_BS: np.ndarray, max_positions: int) -> np.ndarray:
    """``position_ids`` ``[B, S]`` as int64 inside the model's positions; from the mask when None."""
    if position_ids is None:
        position_ids = positions_from_mask(mask_BT, ids_BS.shape[1])
    positions = np.asarray(position_ids)
    if positions.shape != ids_BS.shape or positions.dtype.kind not in "iu":
        raise RuntimeInputError(
            f"position_ids must be integer {ids_BS.shape}, got {positions.dtype} {positions.shape}")
    if positions.min() < 0 or positions.max() >= max_positions:
        raise RuntimeInputError(
            f"position {int(positions.max())} is outside the model's {max_positions} positions")
    return np.ascontiguousarray(positions, dtype=np.int64)
