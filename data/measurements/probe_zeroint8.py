"""Probe (not a measurement): what int8 weights are under DeepSpeed ZeRO-3 in the real run.

Runs one case of a case list in this process, as the harness's worker runs it (rank 0 of a
fake world, accelerate's DeepSpeed launch env, Trainer), after its checkpoint exists (the
harness run of the same list prepares it), and writes into OUT_DIR:

* ``<case_id>.stacks.json.gz``: the allocator's trace with each allocation's Python stack
  (frames of deepspeed / bitsandbytes / peft / transformers / accelerate / torch's autograd
  and checkpointing, innermost first, at most 8), markers at ``deepspeed.initialize``, each
  forward, ``engine.backward`` and ``engine.step``;
* ``<case_id>.int8.json``: what bitsandbytes' ``Int8Params`` (``weight.data``, ``weight.CB``),
  ``Linear8bitLt.state.CB`` and ZeRO-3's partition (``ds_tensor``) are after
  ``deepspeed.initialize`` and around the first forwards of a few linears (storage sizes and
  pointers, so one can tell which tensors share storage).

Usage (GPU machine, as device_run_2026-12-06.sh sets PYTHONPATH):
    python3 data/measurements/probe_zeroint8.py LIST.yaml INDEX OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any

KEEP = (
    "deepspeed/",
    "bitsandbytes/",
    "peft/",
    "transformers/",
    "accelerate/",
    "torch/autograd/",
    "torch/utils/checkpoint",
    "vramcalc_harness/",
)


def short(frame: dict[str, Any]) -> str | None:
    name = str(frame.get("filename", ""))
    for key in KEEP:
        at = name.find(key)
        if at >= 0:
            return f"{name[at:]}:{frame.get('line')}:{frame.get('name')}"
    return None


def tensor_info(t: Any) -> Any:
    if t is None:
        return None
    try:
        storage = t.untyped_storage()
        return {
            "shape": list(t.shape),
            "dtype": str(t.dtype),
            "device": str(t.device),
            "ptr": t.data_ptr(),
            "storage_ptr": storage.data_ptr(),
            "storage_bytes": storage.nbytes(),
        }
    except Exception as err:  # noqa: BLE001 - a probe reports what it finds
        return repr(err)


def main() -> int:
    list_path, index, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path("/tmp/vramcalc-scratch")
    from vramcalc_harness.build import checkpoint_dir
    from vramcalc_harness.caselist import load_cases
    from vramcalc_harness.distributed import NVLS_OFF_ENV, write_launch_configs
    from vramcalc_harness.simworld import simulated_launch_env

    case = load_cases(list_path)[index]
    launch = write_launch_configs(case, "cuda", scratch / "probe" / case.case_id)
    os.environ.update(NVLS_OFF_ENV)
    os.environ.update(simulated_launch_env(case, "cuda", launch["accelerate_config_file"]))
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)

    import bitsandbytes as bnb
    import deepspeed
    import torch

    import vramcalc_harness.worker as worker
    from vramcalc_harness.alloc_trace import AllocationTrace

    log: dict[str, Any] = {"case_id": case.case_id, "forwards": [], "after_initialize": None}
    tracer: list[Any] = []

    def mark(label: str) -> None:
        if tracer:
            tracer[0].mark(label)

    class StackTrace(AllocationTrace):
        def __enter__(self) -> StackTrace:
            torch.cuda.memory._record_memory_history(
                enabled="all", context="alloc", stacks="python", max_entries=3_000_000
            )
            tracer.append(self)
            return self

        def mark(self, label: str) -> None:
            self.markers.append((label, len(self._entries())))

        def __exit__(self, *exc: object) -> None:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            entries = (snapshot.get("device_traces") or [[]])[0]
            table: dict[str, int] = {}
            rows = []
            for e in entries:
                frames = [s for s in (short(f) for f in e.get("frames") or []) if s][:8]
                key = " | ".join(frames)
                rows.append(
                    [
                        e.get("action"),
                        int(e.get("addr", 0)),
                        int(e.get("size", 0)),
                        int(e.get("stream", 0)),
                        table.setdefault(key, len(table)),
                    ]
                )
            data = {
                "case_id": self.case_id,
                "columns": ["action", "addr", "size", "stream", "stack"],
                "entries": rows,
                "stacks": sorted(table, key=table.get),
                "markers": self.markers + [("end", len(entries))],
            }
            with gzip.open(self.path, "wt") as f:
                json.dump(data, f, separators=(",", ":"))

    worker.case_trace = lambda case, device, path: StackTrace(
        out_dir / f"{case.case_id}.stacks.json.gz", case.case_id
    )

    def int8_state(model: Any) -> dict[str, Any]:
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        first = layers[0] if layers else None
        seen: dict[int, int] = {}
        totals = {"weight_data": 0, "weight_CB": 0, "state_CB": 0, "ds_tensor": 0}
        for m in layers:
            w = m.weight
            for key, t in (
                ("weight_data", w.data),
                ("weight_CB", getattr(w, "CB", None)),
                ("state_CB", m.state.CB),
                ("ds_tensor", getattr(w, "ds_tensor", None)),
            ):
                if t is not None and t.is_cuda:
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen[storage.data_ptr()] = storage.nbytes()
                        totals[key] += storage.nbytes()
        return {
            "layers": len(layers),
            "unique_cuda_storage_bytes_by_first_holder": totals,
            "first": None
            if first is None
            else {
                "class": type(first.weight).__name__,
                "weight_data": tensor_info(first.weight.data),
                "weight_CB": tensor_info(getattr(first.weight, "CB", None)),
                "weight_SCB": tensor_info(getattr(first.weight, "SCB", None)),
                "state_CB": tensor_info(first.state.CB),
                "ds_tensor": tensor_info(getattr(first.weight, "ds_tensor", None)),
                "ds_numel": getattr(first.weight, "ds_numel", None),
                "ds_shape": str(getattr(first.weight, "ds_shape", None)),
                "ds_status": str(getattr(first.weight, "ds_status", None)),
            },
            "memory_allocated": torch.cuda.memory_allocated(),
        }

    initialize = deepspeed.initialize

    def traced_initialize(*args: Any, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        log["before_initialize"] = int8_state(model) if model is not None else None
        mark("ds_initialize")
        out = initialize(*args, **kwargs)
        mark("ds_initialize_end")
        log["after_initialize"] = int8_state(model) if model is not None else None
        return out

    deepspeed.initialize = traced_initialize

    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in ("forward", "backward", "step"):
        original = getattr(DeepSpeedEngine, name)

        def wrapped(
            self: Any, *args: Any, _original: Any = original, _name: str = name, **kw: Any
        ) -> Any:
            mark(_name)
            return _original(self, *args, **kw)

        setattr(DeepSpeedEngine, name, wrapped)

    forward = bnb.nn.Linear8bitLt.forward
    calls: dict[int, int] = {}

    def logged_forward(self: Any, x: Any) -> Any:
        n = calls.get(id(self), 0)
        calls[id(self)] = n + 1
        keep = len(calls) <= 3 and n < 6
        if keep:
            before = {
                "weight_data": tensor_info(self.weight.data),
                "weight_CB": tensor_info(getattr(self.weight, "CB", None)),
                "state_CB": tensor_info(self.state.CB),
                "ds_status": str(getattr(self.weight, "ds_status", None)),
                "allocated": torch.cuda.memory_allocated(),
            }
        out = forward(self, x)
        if keep:
            log["forwards"].append(
                {
                    "module": id(self),
                    "call": n,
                    "grad_enabled": torch.is_grad_enabled(),
                    "before": before,
                    "after": {
                        "weight_data": tensor_info(self.weight.data),
                        "weight_CB": tensor_info(getattr(self.weight, "CB", None)),
                        "state_CB": tensor_info(self.state.CB),
                        "ds_status": str(getattr(self.weight, "ds_status", None)),
                        "allocated": torch.cuda.memory_allocated(),
                    },
                }
            )
        return out

    bnb.nn.Linear8bitLt.forward = logged_forward

    record = worker.run_case(case, "cuda", checkpoint_dir(case.plan, scratch), trace_path=None)
    log["record"] = {
        k: record.get(k)
        for k in (
            "status",
            "error",
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "loaded_allocated_bytes",
            "device_total_bytes",
        )
    }
    (out_dir / f"{case.case_id}.int8.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log["record"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
