"""Argument checks shared by the model's setters and generation: one ValueError naming the argument."""

from __future__ import annotations

import math
import numbers


def check_number(
    where: str,
    arg: str,
    value: object,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
    error: type[ValueError] = ValueError,
) -> None:
    """Raise `ValueError("<where>: <arg>: expected ..., got ...")` unless `value` is a finite number
    (an integer when `integer`; bools never count) within the bounds; `None` passes when `optional`.
    `error` picks the ValueError subclass (e.g. XLoraConfigError for config setters).

    Why so strict: NaN compares False with everything, so `x <= 0` checks let it through silently.
    """
    if value is None and optional:
        return
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    expected = "an integer" if integer else "a finite number"
    if bounds:
        expected += " " + " and ".join(bounds)
    if optional:
        expected += " or None"
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (high is None or value <= high)
        if low is not None:
            ok = ok and (value > low if low_open else value >= low)
    if not ok:
        raise error(f"{where}: {arg}: expected {expected}, got {value!r}")


def load_tensors_only(path: object) -> object:
    """`torch.load(weights_only=True)` on CPU, with a refusal or a read error as one line that names the
    file (torch's own text is several paragraphs and explains how to run the refused code)."""
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's multi-line UserWarnings about the refused object
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many kinds
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(
            r"WeightsUnpickler error: ([^\n]+)", text
        )
        if type(e).__name__ == "UnpicklingError" or found:
            what = f" ({found.group(1)})" if found else ""
            raise ValueError(
                f"{path}: holds code or objects other than tensors{what}; refused, nothing in it was run"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch tensor file ({first})") from None
