"""The Engram language model (docs/engram.md sections 4-6); see model.py for the whole forward."""

from engram_edit.model.device import pick_device
from engram_edit.model.model import EngramModel, ModelOutput

__all__ = ["EngramModel", "ModelOutput", "pick_device"]
