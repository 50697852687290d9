"""Checks and listings of the files weights and checkpoints are kept in (safetensors, torch zips,
sharded folders), reading headers and directories only, never the tensors. Shared by the
backends' checkpoint verbs and the engine's check of a model folder before any process starts."""
from __future__ import annotations

import re
from pathlib import Path

from backends.errors import EngineError

# bitsandbytes' 4-bit weights (QLoRA's base) are stored packed, two values a byte, with their
# quantization state beside them under these suffixes of the weight's name
QUANT_STATE = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$")

# bytes per element of the safetensors dtypes (a dtype not listed is not size-checked)
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                      "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


def index_shards(index: Path, where: str) -> list[Path]:
    import json
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"{where}: sharded-checkpoint index {index} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no weight_map'})") from None
    shards = [index.parent / n for n in names]
    for shard in shards:
        if not shard.is_file():
            raise EngineError(f"{where}: shard {shard.name} named in {index.name} is missing")
    return shards


def bin_shards(folder: Path, where: str) -> list[Path]:
    """The torch .bin shards of a sharded checkpoint folder (a ColossalAI Booster's): those its
    index names (each must exist), else every .bin in it."""
    index = next(iter(sorted(Path(folder).glob("*.index.json"))), None)
    return index_shards(index, where) if index is not None else sorted(Path(folder).glob("*.bin"))


def check_safetensors(path: Path, where: str) -> None:
    import json
    import math

    def corrupt(reason: str) -> EngineError:
        return EngineError(f"{where}: weights file {path} is corrupt ({reason}); re-download or re-save it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise corrupt(f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise EngineError(f"{where}: cannot read weights file {path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise corrupt("its JSON header does not parse") from None
    if not isinstance(header, dict):
        raise corrupt("its JSON header is not an object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(x) for x in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has no valid dtype/shape/data_offsets") from None
        if not 0 <= begin <= end <= data_size:
            raise corrupt(f"tensor {name!r} at bytes {begin}-{end} lies past the {data_size} bytes of data")
        if dtype in SAFETENSORS_DTYPES and end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise corrupt(f"tensor {name!r} {dtype}{shape} does not fit its {end - begin} bytes")


def check_torch_file(path: Path, where: str) -> None:
    import zipfile
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"PK":  # torch.save's zip format: the central directory must be complete
            with zipfile.ZipFile(path) as z:
                z.infolist()
    except zipfile.BadZipFile as e:
        raise EngineError(f"{where}: weights file {path} is corrupt ({e}); re-download or re-save it") from None
    except OSError as e:
        raise EngineError(f"{where}: cannot read weights file {path}: {e.strerror}") from None


def files_problem(paths, where: str) -> str | None:
    """A backend's checkpoint_problem answer for these files, in order (.safetensors headers, torch
    zips otherwise): the first damage found, worded without the leading `where: `; None when all read."""
    try:
        for path in paths:
            (check_safetensors if Path(path).suffix == ".safetensors" else check_torch_file)(Path(path), where)
    except EngineError as e:
        return str(e).removeprefix(where + ": ")
    return None


def load_torch_file(path: Path, where: str, **kwargs):
    """torch.load on CPU, a damaged or truncated file as one line (its pickle raises many kinds)."""
    import torch
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as e:  # noqa: BLE001
        raise EngineError(f"{where}: file {path} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
