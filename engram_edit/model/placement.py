"""Where the Engram tables live while the model runs: row sources the Engram modules gather from.

gpu: a parameter on the model's device (trainable); host: CPU memory, the needed rows copied to
the device per forward; mmap: read from the memory file on demand. Reading the file is
memory.py's job, building the model checkpoint.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from engram_edit import dtypes
from engram_edit.errors import BadInputError

if TYPE_CHECKING:
    from engram_edit.memory import MemoryTable

PLACEMENTS = ("gpu", "host", "mmap")
FIT_FRACTION = 0.8  # of free device memory the float32 model may take; the rest is activations
CHUNK_BYTES = 64 << 20  # stored bytes per read while a host table is loaded


class RowSource:
    """Serves the rows of every Engram layer of one model.

    The model calls ``prefetch`` once per forward, with the row ids of every Engram layer,
    before the first layer runs; each Engram module then calls ``gather`` for its own layer.
    A source serves one forward at a time.
    """

    placement = ""

    @property
    def layer_ids(self) -> list[int]:
        """Layers with a table in this source, ascending."""
        raise NotImplementedError

    def shape(self, layer_id: int) -> tuple[int, int]:
        """``(rows, width)`` of one layer's table."""
        raise NotImplementedError

    def mismatches(self, want: dict[int, tuple[int, int]]) -> list[str]:
        """One line per layer whose table is missing or not ``want[layer]`` (rows, width)."""
        out = []
        for i, (rows, width) in sorted(want.items()):
            have = self.shape(i) if i in self.layer_ids else None
            if have != (rows, width):
                got = "no table" if have is None else f"{have[0]} x {have[1]}"
                out.append(f"layer {i}: the {self.placement} row source has {got}, the model "
                           f"needs {rows} x {width} (rows x width)")
        return out

    def prefetch(self, rows_by_layer: dict[int, torch.Tensor]) -> None:
        """Announce the row ids the coming gathers will ask for (layer id -> ``[B, T, C]``)."""

    def gather(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        """Row values ``[*rows.shape, width]``, float32 on ``rows.device``."""
        raise NotImplementedError


class DeviceRows(RowSource):
    """The tables are the Engram modules' ``embed`` parameters: on the model's device, in
    float32, trainable; ``gather`` calls ``module.embed(rows)``, gradient included.

    ``embed`` is looked up at every gather, so code that swaps a module's ``embed`` for
    another lookup (edit/distill.py does) is honoured.
    """

    placement = "gpu"

    def __init__(self, modules: dict[int, nn.Module]) -> None:
        self.modules = modules  # layer id -> its EngramModule

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.modules)

    def shape(self, layer_id: int) -> tuple[int, int]:
        return tuple(self.modules[layer_id].embed.weight.shape)

    def gather(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        return self.modules[layer_id].embed(rows)


@dataclass
class _HostLayer:
    dtype: str  # row dtype name (dtypes.ROW_DTYPES)
    data: torch.Tensor  # [rows, width] stored elements; float8 as their uint8 bits
    scale: torch.Tensor | None  # [rows, width / 32] uint8 E8M0 bytes, float8_e4m3 only

    def decode(self, data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """float32 values of stored rows (a selection of ``data`` and ``scale``)."""
        if scale is not None:
            data = data.view(dtypes.torch_dtype(self.dtype))
            scale = scale.view(getattr(torch, dtypes.SCALE_TORCH))
        return dtypes.decode_torch(self.dtype, data, scale)


@dataclass
class _Fetch:
    data: torch.Tensor  # the unique rows of a gather, stored elements, on the device
    scale: torch.Tensor | None
    inverse: torch.Tensor  # position in ``data`` of each row id asked for (flattened)
    ready: torch.cuda.Event  # recorded on the side stream after the copies


def _pinned_select(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.empty((len(index), *table.shape[1:]), dtype=table.dtype, pin_memory=True)
    return torch.index_select(table, 0, index, out=out)


class HostRows(RowSource):
    """The tables in CPU memory in their stored dtype (bfloat16 stays 2 bytes, FP8 1 byte plus
    scales), decoded on the device after the copy; not parameters, so not trained.

    On CUDA, ``prefetch`` records where the row ids are ready on the compute stream. Each
    layer's ``gather`` then, on a side stream that waits only for that point: finds the unique
    row ids, copies them to the host, selects those rows on the host into a pinned buffer and
    copies it to the device without blocking; the compute stream waits on an event for it. The
    only wait on the host is for the row ids, so the layers queued before an Engram layer keep
    the GPU busy while its rows are selected and copied. The table itself is not pinned: the
    GPU never reads it, only the pinned buffer of selected rows. On the CPU, ``gather`` is a
    plain lookup.
    """

    placement = "host"

    def __init__(self, layers: dict[int, _HostLayer]) -> None:
        self.layers = layers
        self._queued: dict[int, torch.Tensor] = {}
        self._ids_ready: torch.cuda.Event | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.layers)

    @classmethod
    def from_table(cls, table: MemoryTable) -> HostRows:
        """Every layer of ``table`` read into CPU memory, as stored (about 64 MB per read)."""
        layers = {}
        for i in table.layer_ids:
            n, width, name = table.num_rows(i), table.width(i), table.dtype(i)
            d = dtypes.row_dtype(name)
            data = torch.empty((n, width), dtype=torch.uint8 if d.scaled else
                               dtypes.torch_dtype(name))
            scale = torch.empty((n, width // dtypes.SCALE_BLOCK), dtype=torch.uint8
                                ) if d.scaled else None
            step = max(1, CHUNK_BYTES // (width * d.itemsize))
            for first in range(0, n, step):
                last = min(n, first + step)
                raw = table.read_raw(i, np.arange(first, last, dtype=np.int64))
                stored = dtypes.storage_to_torch(raw.data)
                data[first:last] = stored.view(torch.uint8) if d.scaled else stored
                if scale is not None:
                    scale[first:last] = torch.from_numpy(raw.scale)
            layers[i] = _HostLayer(name, data, scale)
        return cls(layers)

    def shape(self, layer_id: int) -> tuple[int, int]:
        return tuple(self.layers[layer_id].data.shape)

    def prefetch(self, rows_by_layer: dict[int, torch.Tensor]) -> None:
        self._queued = {i: r for i, r in rows_by_layer.items() if r.is_cuda}
        self._ids_ready = None
        if self._queued:
            device = next(iter(self._queued.values())).device
            self._ids_ready = torch.cuda.Event()
            self._ids_ready.record(torch.cuda.current_stream(device))

    def gather(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        lay = self.layers[layer_id]
        width = lay.data.shape[1]
        if not rows.is_cuda:
            flat = rows.reshape(-1)
            scale = None if lay.scale is None else lay.scale.index_select(0, flat)
            return lay.decode(lay.data.index_select(0, flat), scale).reshape(*rows.shape, width)
        queued = self._queued.pop(layer_id, None)
        compute = torch.cuda.current_stream(rows.device)
        after = self._ids_ready if queued is rows else None
        if after is None:  # not announced by prefetch: wait for everything queued so far
            after = torch.cuda.Event()
            after.record(compute)
        got = self._fetch(lay, rows, after)
        compute.wait_event(got.ready)
        for t in (got.data, got.scale, got.inverse):
            if t is not None:
                t.record_stream(compute)  # made on the side stream, used and freed on this one
        values = lay.decode(got.data, got.scale)
        return values[got.inverse].reshape(*rows.shape, width)

    def _fetch(self, lay: _HostLayer, rows: torch.Tensor, after: torch.cuda.Event) -> _Fetch:
        stream = self._streams.get(rows.device)
        if stream is None:
            stream = self._streams[rows.device] = torch.cuda.Stream(rows.device)
        with torch.cuda.stream(stream):
            stream.wait_event(after)
            unique, inverse = torch.unique(rows.reshape(-1), return_inverse=True)
            index = unique.cpu()  # the one host wait: for this stream, not the compute stream
            data = _pinned_select(lay.data, index).to(rows.device, non_blocking=True)
            scale = None if lay.scale is None else _pinned_select(lay.scale, index).to(
                rows.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return _Fetch(data, scale, inverse, ready)


class MmapRows(RowSource):
    """The tables stay in the memory file; each gather reads just the rows it needs
    (``MemoryTable.gather_torch``), so tables larger than RAM run. Not trained."""

    placement = "mmap"

    def __init__(self, table: MemoryTable) -> None:
        self.table = table

    @property
    def layer_ids(self) -> list[int]:
        return self.table.layer_ids

    def shape(self, layer_id: int) -> tuple[int, int]:
        return self.table.num_rows(layer_id), self.table.width(layer_id)

    def gather(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        return self.table.gather_torch(layer_id, rows)

    def __deepcopy__(self, memo: dict) -> MmapRows:
        return self  # a copied model reads the same file through the same open table


def _free_device_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def choose_placement(requested: str | None, device: torch.device, model_bytes: int) -> str:
    """The placement a model is built with.

    Args:
        requested (`str | None`): "gpu", "host" or "mmap"; None picks one.
        device (`torch.device`): where the model runs.
        model_bytes (`int`): the whole model in float32, tables included.

    Returns:
        `str`: ``requested`` when given. Otherwise "gpu" when the model runs on the CPU (the
        tables are parameters there, as without placements), or on CUDA when ``model_bytes``
        fit in 80% of the device's free memory; else "host".

    Raises:
        BadInputError: an unknown placement name.
    """
    if requested is not None:
        if requested not in PLACEMENTS:
            raise BadInputError(f"placement {requested!r}: expected one of "
                                f"{', '.join(PLACEMENTS)}")
        return requested
    if device.type != "cuda":
        return "gpu"
    return "gpu" if model_bytes <= FIT_FRACTION * _free_device_bytes(device) else "host"


def row_source(placement: str, table: MemoryTable) -> RowSource | None:
    """The row source of ``placement`` over ``table``; None for "gpu", whose tables the model
    makes its own parameters (DeviceRows). "host" reads the tables whole, "mmap" never does."""
    if placement == "host":
        return HostRows.from_table(table)
    if placement == "mmap":
        return MmapRows(table)
    if placement == "gpu":
        return None
    raise BadInputError(f"placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
