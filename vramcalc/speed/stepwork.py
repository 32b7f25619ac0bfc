"""One optimizer step of a plan as work: stretches of ops between host-device syncs.

``opprofile.py`` counts the ops of one micro-batch and one optimizer step of the
recipe (two traced decoder layers, sizes as coefficients). ``step_work`` lays
them out for the plan's batch, sequence and number of layers, in program order,
cut where the host waits for the GPU (a *sync*: Trainer reading the loss,
bitsandbytes' int8 outlier check, a bitsandbytes optimizer after each tensor):

* the run of ops of the repeated decoder layer is done ``num_layers - 1`` times;
  with syncs inside it, the stretch between the last sync of one layer and the
  first of the next is counted once per seam;
* ``grad_accum`` micro-batches, each after the first also adding its gradients
  into ``.grad`` (autograd's ``AccumulateGrad``: one in-place add per trainable
  tensor, read 2 and write 1 gradient);
* the optimizer step (clipping + the torch optimizer as traced; a bitsandbytes
  optimizer as one launch and sync per tensor); under a sharded strategy each GPU
  steps ``1/num_gpus`` of the states (the collectives between GPUs are
  ``communication.py``'s).

``phase_work`` lays out one micro-batch's forward and backward (recompute included) on
their own: the compute a multi-GPU plan's collectives can hide behind.

Nothing here depends on the GPU: ``throughput.py`` prices the work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vramcalc.inventory import ModelInventory
from vramcalc.memory.gradients import gradient_bytes
from vramcalc.speed.opprofile import Op, OpProfile, Run, int8_outlier_columns
from vramcalc.trace.oprecorder import LAUNCH, MEMORY
from vramcalc.training_plan import TrainingPlan

SHARDED_STRATEGIES = ("fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3")
#: the micro-batch phases collectives overlap with, and the traced phases each holds
MICRO_BATCH_PHASES = {"forward": ("forward",), "backward": ("recompute", "backward")}


@dataclass(frozen=True)
class Kernel:
    """Kernels of one kind in a stretch, added up: ``kind`` prices the FLOPs."""

    kind: str  # opprofile kinds except LAUNCH
    count: float
    flops: float
    bytes: float


@dataclass(frozen=True)
class Stretch:
    """Ops between two syncs, done ``times`` times per step."""

    times: float
    python_calls: float  # Python-level torch calls (each costs Python overhead)
    dispatches: float  # ops through the dispatcher (kernels and views alike)
    memory_bytes: float  # bytes of the bandwidth-bound kernels
    memory_kernels: float
    compute: tuple[Kernel, ...]  # matmuls and attention, one per distinct op (max() per op)


@dataclass(frozen=True)
class StepWork:
    """A plan's optimizer step on one GPU as stretches, plus the serial bitsandbytes steps."""

    plan: TrainingPlan
    stretches: tuple[Stretch, ...]
    bnb_tensors: float  # tensors stepped one by one with a sync each (bitsandbytes)
    bnb_bytes: float  # their bytes
    syncs: float  # host waits per step

    @property
    def tokens(self) -> int:
        """Tokens of one optimizer step on one GPU."""
        return self.plan.seq_len * self.plan.batch_size * self.plan.grad_accum

    def total(self, field: str) -> float:
        return sum(s.times * getattr(s, field) for s in self.stretches)

    @property
    def kernels(self) -> float:
        compute = sum(s.times * k.count for s in self.stretches for k in s.compute)
        return self.total("memory_kernels") + compute + self.bnb_tensors

    @property
    def matmul_flops(self) -> float:
        """FLOPs of every matmul and attention kernel the step runs (recompute included)."""
        return sum(s.times * k.flops for s in self.stretches for k in s.compute)

    @property
    def memory_bytes(self) -> float:
        compute = sum(s.times * k.bytes for s in self.stretches for k in s.compute)
        return self.total("memory_bytes") + compute + self.bnb_bytes

    def to_dict(self) -> dict[str, float]:
        return {
            "python_calls": self.total("python_calls"),
            "dispatches": self.total("dispatches") + self.bnb_tensors,
            "kernels": self.kernels,
            "syncs": self.syncs,
            "matmul_flops": self.matmul_flops,
            "memory_bytes": self.memory_bytes,
        }


class _Builder:
    """Accumulates ops into the open stretch; a sync closes it."""

    def __init__(self) -> None:
        self.closed: list[Stretch] = []
        self.python = self.dispatches = self.mem_bytes = self.mem_kernels = 0.0
        self.compute: dict[tuple[str, float, float], float] = {}
        self.syncs = 0.0

    def add(self, ops: list[tuple[Op, float, float]], times: float) -> None:
        """``ops``: (op, FLOPs, bytes) of one op each; ``times`` how often they run."""
        for op, flops, nbytes in ops:
            n = op.count * times
            self.python += op.python * n
            self.dispatches += op.host * n
            if op.kind == MEMORY:
                self.mem_bytes += nbytes * n
                self.mem_kernels += op.host * n if op.host else 0.0
            elif op.kind != LAUNCH:
                key = (op.kind, flops, nbytes)
                self.compute[key] = self.compute.get(key, 0.0) + n

    def state(self) -> tuple:
        """What the open stretch holds so far."""
        return (self.python, self.dispatches, self.mem_bytes, self.mem_kernels, dict(self.compute))

    def close(self, times: float = 1.0) -> None:
        compute = tuple(
            Kernel(kind, n, flops * n, nbytes * n)
            for (kind, flops, nbytes), n in self.compute.items()
        )
        if self.python or self.dispatches or self.mem_bytes or compute:
            self.closed.append(
                Stretch(
                    times, self.python, self.dispatches, self.mem_bytes, self.mem_kernels, compute
                )
            )
        self.syncs += times
        self.python = self.dispatches = self.mem_bytes = self.mem_kernels = 0.0
        self.compute = {}


def _sized(op: Op, tokens: int, seq: int) -> tuple[Op, float, float]:
    c = int8_outlier_columns(op.outlier_in, op.outlier_p, tokens) if op.outlier_in else 0.0
    features = (1.0, tokens, tokens * seq, c, tokens * c)
    flops = sum(a * f for a, f in zip(op.flops, features, strict=True))
    nbytes = sum(a * f for a, f in zip(op.bytes, features, strict=True))
    return op, flops, nbytes


def _pieces(run: Run, tokens: int, seq: int) -> list[list[tuple[Op, float, float]]]:
    """A run cut after each sync: every piece but the last ends with a sync."""
    pieces: list[list[tuple[Op, float, float]]] = [[]]
    for op in run.ops:
        pieces[-1].append(_sized(op, tokens, seq))
        if op.sync:
            pieces.append([])
    return pieces


def _lay_out(builder: _Builder, runs: tuple[Run, ...], layers: int, tokens: int, seq: int) -> None:
    for run in runs:
        times = max(layers - 1, 0) if run.repeat == "layers" else 1
        if not times:
            continue
        pieces = _pieces(run, tokens, seq)
        if len(pieces) == 1:
            builder.add(pieces[0], times)
            continue
        head, middle, tail = pieces[0], pieces[1:-1], pieces[-1]
        builder.add(head, 1)
        builder.close()
        for piece in middle:
            builder.add(piece, 1)
            builder.close(times)
        if times > 1:  # the tail of one layer and the head of the next
            builder.add(tail + head, 1)
            builder.close(times - 1)
        builder.add(tail, 1)


#: micro-batches laid out one by one; from the third on each repeats the one before (the
#: same stretches, the same open state after it), so a longer step repeats the last one's
#: stretches for the rest instead of laying out, say, a million micro-batches one by one
LAID_OUT_MICRO_BATCHES = 64


def _repeat_rest(builder: _Builder, laid_out: list[tuple[int, float, tuple]], total: int) -> bool:
    """Add micro-batches ``len(laid_out)`` to ``total - 1`` as copies of the last one laid
    out, when it repeated the one before it exactly; False (nothing added) otherwise."""
    (start_1, syncs_1, state_1), (start_2, syncs_2, state_2) = laid_out[-2:]
    before, last = builder.closed[start_1:start_2], builder.closed[start_2:]
    if before != last or syncs_1 != syncs_2 or state_1 != state_2:
        return False
    rest = total - len(laid_out)
    builder.closed += [replace(stretch, times=stretch.times * rest) for stretch in last]
    builder.syncs += syncs_2 * rest
    return True


def step_work(profile: OpProfile, inventory: ModelInventory, plan: TrainingPlan) -> StepWork:
    """The stretches of one optimizer step of ``plan`` (module docstring)."""
    layers, tokens, seq = inventory.num_layers, plan.batch_size * plan.seq_len, plan.seq_len
    builder = _Builder()
    trainable = profile.tensor_count(layers, trainable=True)
    grads = gradient_bytes(inventory, plan)
    laid_out: list[tuple[int, float, tuple]] = []  # per micro-batch: stretches, syncs, state
    for micro in range(plan.grad_accum):
        if micro == LAID_OUT_MICRO_BATCHES and _repeat_rest(builder, laid_out, plan.grad_accum):
            break
        closed, syncs = len(builder.closed), builder.syncs
        _lay_out(builder, profile.micro_batch, layers, tokens, seq)
        if micro:  # AccumulateGrad: .grad += new gradient, one add per trainable tensor
            builder.dispatches += trainable
            builder.mem_kernels += trainable
            builder.mem_bytes += 3 * grads
        laid_out.append((closed, builder.syncs - syncs, builder.state()))
    shard = plan.num_gpus if plan.strategy in SHARDED_STRATEGIES and plan.num_gpus > 1 else 1
    optimizer = _Builder()
    _lay_out(optimizer, profile.optimizer, layers, 0, 0)
    optimizer.mem_bytes /= shard
    builder.python += optimizer.python
    builder.dispatches += optimizer.dispatches
    builder.mem_bytes += optimizer.mem_bytes
    builder.mem_kernels += optimizer.mem_kernels
    for key, n in optimizer.compute.items():
        builder.compute[key] = builder.compute.get(key, 0.0) + n
    bnb_tensors = bnb_bytes = 0.0
    for p in profile.bnb_params:
        times = max(layers - 1, 0) if p.repeat == "layers" else 1
        bnb_tensors += times
        bnb_bytes += times * p.numel * p.bytes_per_element / shard
    builder.close()  # the step ends with the harness's (and any trainer's) synchronize
    return StepWork(
        plan, tuple(builder.closed), bnb_tensors, bnb_bytes, builder.syncs + bnb_tensors
    )


def phase_work(
    profile: OpProfile, inventory: ModelInventory, plan: TrainingPlan
) -> dict[str, StepWork]:
    """One micro-batch's ops of each of ``MICRO_BATCH_PHASES``, laid out alone (syncs of the
    phase kept, the step's fixed parts left out)."""
    layers, tokens, seq = inventory.num_layers, plan.batch_size * plan.seq_len, plan.seq_len
    out = {}
    for name, phases in MICRO_BATCH_PHASES.items():
        runs = tuple(
            Run(r.repeat, tuple(o for o in r.ops if o.phase in phases)) for r in profile.micro_batch
        )
        builder = _Builder()
        _lay_out(builder, runs, layers, tokens, seq)
        builder.close()
        out[name] = StepWork(plan, tuple(builder.closed), 0.0, 0.0, builder.syncs)
    return out
