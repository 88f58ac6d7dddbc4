"""Which torch device the model runs on: CUDA when present, unless the caller says otherwise."""

from __future__ import annotations

import torch

from engram_edit.errors import BadInputError


def pick_device(requested: str | None = None) -> torch.device:
    """``None`` or ``"auto"``: cuda if available, else cpu; anything else is taken as given.

    Raises BadInputError for a name torch does not know or a CUDA device that is not there.
    """
    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise BadInputError(f"device {requested!r}: not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device {requested!r}: CUDA is not available; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"device {requested!r}: only {torch.cuda.device_count()} "
                                f"CUDA device(s) present")
    return device
