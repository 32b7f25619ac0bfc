"""The serving replay with its pools apart and repeated small-pool events left out
(``splitreplay``, ``stepskip``, ``memory/smallpool.py``) gives what the plain replay of the
laid-out run gives, to the byte: on random event streams, on random runs of decoding steps
built as a serving run's are (decoder layers alike, sizes growing with the step), and on
serving plans."""

from __future__ import annotations

import random

import pytest

from tests.conftest import TINY_LLAMA
from vramcalc.memory.allocator import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    MIB,
    AllocatorConfig,
    CachingAllocator,
)
from vramcalc.memory.smallpool import SLOT_SHIFT, SmallPool
from vramcalc.serve_plan import serve_plan
from vramcalc.serving import splitreplay, stepskip
from vramcalc.serving.compactrun import DecodeSteps, Run
from vramcalc.serving.phasereplay import PlainReplay, observe_phases, replay, replay_run
from vramcalc.serving.servereplay import compact_run, simulate_serving, whole_run

SMALL_SIZES = (1, 512, 700, 4096, 65536, 163840, 492160, MIB - 100, MIB)


def _split(run: Run, config: AllocatorConfig | None = None):
    """The split replay of ``run`` (no loading events) and how many events it left out."""
    replayer = splitreplay.SplitReplay(run, config or AllocatorConfig())
    return observe_phases(replayer, len(run), run.markers, 0), replayer.skipped_events


def _plain(run: Run, config: AllocatorConfig | None = None):
    return replay(run.events(), run.markers, 0, config)


def _in_lockstep(run: Run, config: AllocatorConfig | None = None) -> None:
    """Every stretch (between two markers) of ``run`` replayed split and plain in turn: the
    same most allocated and reserved bytes, and the same allocated bytes after it."""
    config = config or AllocatorConfig()
    split = splitreplay.SplitReplay(run, config)
    plain = PlainReplay(CachingAllocator(config), run.events())
    cuts = sorted({0, len(run), *(i for _, i in run.markers)})
    for begin, stop in zip(cuts, cuts[1:], strict=False):
        assert split.replay(begin, stop) == plain.replay(begin, stop), (begin, stop)
        assert split.allocated_bytes == plain.allocated_bytes


@pytest.mark.parametrize("seed", range(6))
def test_the_small_pool_is_the_allocators_small_pool(seed):
    """Every event of a random stream of small requests: the same allocated and reserved
    bytes as ``CachingAllocator``; at the end, the same segments, block for block."""
    rng = random.Random(seed)
    allocator, pool = CachingAllocator(), SmallPool()
    live: dict[int, int] = {}
    for handle in range(1, 6000):
        draw = rng.random()
        if draw < 0.5 or not live:
            nbytes = rng.choice(SMALL_SIZES) if rng.random() < 0.7 else rng.randint(1, MIB)
            allocator.malloc(handle, nbytes)
            live[handle] = allocator.block_bytes(nbytes)
            pool.malloc(handle, live[handle])
        elif draw < 0.995:
            gone = rng.choice(list(live))
            allocator.free(gone)
            assert pool.free(gone) == live.pop(gone)
        else:
            allocator.empty_cache()
            pool.empty_cache()
        assert (pool.allocated_bytes, pool.reserved_bytes) == (
            allocator.allocated_bytes,
            allocator.reserved_bytes,
        )
    handle_at = {b.addr: h for h, b in allocator._live.items() if b is not None}
    theirs = [
        [(addr - seg.address, size, handle_at[addr] if used else None)
         for addr, size, _, used in seg.blocks]
        for seg in allocator.segment_states()
    ]  # fmt: skip
    segments = sorted({a >> SLOT_SHIFT for a in (*pool.free_at, *pool.owner)})
    assert theirs == [list(pool.segment_blocks(s)) for s in segments]


# -- random runs of decoding steps ------------------------------------------------------------
def _size(rng: random.Random, large: float) -> int:
    if rng.random() < large:
        return rng.choice((2 * MIB, 3 * MIB + 1000, 12 * MIB, 25 * MIB))
    if rng.random() < 0.05:
        return 0
    return rng.choice(SMALL_SIZES[1:-1]) + rng.choice((0, 0, 100))


def _layer(rng: random.Random, allocs: int, large: float, keep_to_end: float):
    """One decoder layer's events, as (op, local allocation, fate): an ALLOC's fate is
    freed later in the layer, by the next layer, by the same layer of the next step, or at
    the end of the step; FREEs come as ("free", fate, index)."""
    ops: list[tuple] = []
    pending: list[int] = []
    fates = []
    for i in range(allocs):
        draw = rng.random()
        fate = (
            "end" if draw < keep_to_end else
            "next_layer" if draw < keep_to_end + 0.15 else
            "next_step" if draw < keep_to_end + 0.25 else "layer"
        )  # fmt: skip
        fates.append(fate)
        ops.append(("alloc", i, _size(rng, large)))
        if fate == "layer":
            pending.append(i)
        while pending and rng.random() < 0.5:
            ops.append(("free", "layer", pending.pop(rng.randrange(len(pending)))))
    ops += [("free", "layer", i) for i in pending]
    # what the layer before left (``next_layer``) and the previous step's (``next_step``)
    for fate in ("next_layer", "next_step"):
        for i in (i for i, f in enumerate(fates) if f == fate):
            ops.insert(rng.randrange(len(ops) + 1), ("free", fate, i))
    return ops, fates


def _decode_run(seed: int, layers: int = 9, steps: int = 14, traced: int = 5) -> Run:
    """A run shaped as a serving run's: long-lived blocks, then traced decoding steps laid
    out and the rest as a ``DecodeSteps`` piece, then the rest freed. A step is a prefix (a
    block that grows with the step, the previous step's freed), ``layers`` decoder layers
    alike and the end of the step."""
    rng = random.Random(seed)
    large = rng.choice((0.0, 0.1, 0.3))
    keep_to_end = rng.choice((0.0, 0.0, 0.05))
    layer_ops, fates = _layer(rng, rng.randint(3, 9), large, keep_to_end)
    grows = rng.choice((128, 16, 0, 4096, -128))
    # the template: (1, size at step K, slope) / (0, back, ordinal); ordinals by layer
    entries: list[tuple] = [(1, 40000 + rng.randrange(0, 600), grows), (0, 1, 0)]
    if rng.random() < 0.5:  # the step frees first (its small bytes fall below its start's)
        entries.reverse()
    tags = [-1, -1]  # a growing block, and the previous step's freed
    ordinal_of: dict[tuple[int, int], int] = {}
    for layer in range(layers):
        for op in layer_ops:
            if op[0] == "alloc":
                ordinal_of[(layer, op[1])] = len(ordinal_of) + 1
                grow = rng.choice((0, 512)) if layer == layers - 1 and op[2] >= 8192 else 0
                entries.append((1, op[2], grow))
            elif op[1] == "next_layer" and layer == 0:
                continue
            else:  # freed in its layer, the layer before's, or the step before's
                back, made = (1, layer) if op[1] == "next_step" else (0, layer)
                made -= op[1] == "next_layer"
                entries.append((0, back, (made, op[2])))
            tags.append(layer)
    template = [(0, e[1], ordinal_of[e[2]]) if isinstance(e[2], tuple) else e for e in entries]
    count = len(ordinal_of) + 1
    for layer in range(layers):  # the end of the step
        for i, fate in enumerate(fates):
            if fate == "end" or (fate == "next_layer" and layer == layers - 1):
                template.append((0, 0, ordinal_of[(layer, i)]))
                tags.append(-1)
    return _run_of(rng, template, tags, count, steps, traced)


def _run_of(rng, template, tags, count, steps, traced) -> Run:
    """Loading-like blocks, traced steps 1..K laid out from ``template``, steps K+1..N as a
    piece, then every block still live freed (some of the loading first)."""
    run = Run()
    handle = 0
    weights = []
    for _ in range(rng.randint(20, 200) if rng.random() < 0.8 else 0):
        handle += 1
        run.add((ALLOC, handle, rng.choice((*SMALL_SIZES, 5 * MIB, 40 * MIB))))
        weights.append(handle)
    for h in rng.sample(weights, len(weights) // 4):
        run.add((FREE, h, 0))
        weights.remove(h)
    if rng.random() < 0.5:
        run.add((EMPTY_CACHE, 0, 0))
    run.mark("inputs")
    allocs: dict[int, tuple[int, ...]] = {}
    sizes: dict[int, tuple[int, ...]] = {}
    live: set[int] = set()
    for step in range(1, traced + 1):
        run.mark(f"g1.s{step}")
        handles, made = [], []
        for is_alloc, a, b in template:
            if is_alloc:
                handle += 1
                nbytes = a + (step - traced) * b
                run.add((ALLOC, handle, nbytes))
                handles.append(handle)
                made.append(nbytes)
                live.add(handle)
            elif a == 0:
                run.add((FREE, handles[b], 0))
                live.discard(handles[b])
            elif step - a >= 1:
                run.add((FREE, allocs[step - a][b], 0))
                live.discard(allocs[step - a][b])
        allocs[step], sizes[step] = tuple(handles), tuple(made)
    piece = DecodeSteps(tuple(template), tuple(tags), traced, traced + steps, handle, count,
                        allocs, sizes)  # fmt: skip
    run.markers += [(f"g1.s{s}", len(run) + (s - traced - 1) * len(template))
                    for s in range(traced + 1, traced + steps + 1)]  # fmt: skip
    run.extend([piece])
    run.mark(f"g1.s{traced + steps + 1}")
    laid_out = run.events()
    for op, h, _ in laid_out[len(laid_out) - len(piece) :]:
        (live.add if op == ALLOC else live.discard)(h)
    for h in rng.sample(sorted(live), len(live)):
        run.add((FREE, h, 0))
    run.mark("after")
    for h in weights:
        run.add((FREE, h, 0))
    run.mark("end")
    return run


def test_random_decoding_runs_replay_as_laid_out():
    """Random runs shaped as serving runs (layers alike; small blocks that grow with the
    step; blocks freed by the next layer or the next step; some left to the step's end): the
    split replay gives the plain replay's peaks, and leaves events out of most of them."""
    skipped_runs = 0
    for seed in range(40):
        run = _decode_run(seed)
        split, skipped = _split(run)
        assert split == _plain(run), seed
        _in_lockstep(run)
        skipped_runs += skipped > 0
    assert skipped_runs >= 10


def test_a_skip_is_taken_and_changes_nothing():
    """A run whose small pool repeats every layer: most of each step's small-pool events are
    left out, with the plain replay's peaks; the same run laid out as literal events
    (nothing left out) agrees too."""
    run = _decode_run(3, layers=16, steps=20)
    split, skipped = _split(run)
    assert skipped > 0
    assert split == _plain(run)
    literal = Run()
    literal.extend([run.events()])
    literal.markers = run.markers
    assert _split(literal) == (split, 0)


def test_no_skip_where_the_pool_does_not_repeat():
    """Each layer keeps a small block to the end of the step, and each step one to the end
    of the run, so the pool grows from layer to layer and from step to step and never
    repeats: nothing is left out, and the peaks are the plain replay's."""
    template = [(1, 1000, 0), (1, 4096, 0), (0, 0, 1)]  # layer 0: one kept, one freed
    tags = [0, 0, 0]
    for layer in range(1, 12):
        ordinal = 2 * layer
        template += [(1, 1000, 0), (1, 4096, 0), (0, 0, ordinal + 1)]
        tags += [layer] * 3
    template += [(0, 0, 2 * layer) for layer in range(12)] + [(1, 2048, 0)]
    tags += [-1] * 13
    run = _run_of(random.Random(0), template, tags, 25, steps=10, traced=5)
    split, skipped = _split(run)
    assert skipped == 0
    assert split == _plain(run)


def test_a_step_that_frees_more_than_it_allocates():
    """A step that first frees the block of the step before, then allocates a smaller one:
    its most allocated is below the bytes at its start, and still counts (nothing in the
    large pool to lift it), stretch by stretch as in the plain replay."""
    template = [(0, 1, 1), (1, 4096, 0), (0, 0, 0), (1, 65536, -1024)]
    run = Run()
    run.extend([[(ALLOC, 1, 65536 + 5 * 1024)]])  # stands for traced step 1..K's
    piece = DecodeSteps(tuple(template), (-1,) * 4, 1, 12, 1, 2, {1: (0, 1)}, {1: (0, 70656)})
    run.markers = [(f"g1.s{s}", 1 + (s - 2) * 4) for s in range(2, 13)]
    run.extend([piece, [(FREE, piece.handle(12, 1), 0)]])
    run.mark("after")
    _in_lockstep(run)
    assert _split(run)[0] == _plain(run)


def test_a_resized_plan_is_the_plan_made_whole():
    """A step whose growing block crossed a multiple of 512 bytes: its plan, made from the
    first plan by resizing, is the plan made from its sizes."""
    run = _decode_run(5)
    (piece,) = run.pieces_of_steps()
    block_bytes = CachingAllocator().block_bytes
    skipper = stepskip.Skipper(piece, block_bytes, stepskip.Plans())
    plans = {s: skipper.plan(s) for s in range(piece.traced + 1, piece.wanted + 1)}
    resized = [p for p in plans.values() if p.base is not None]
    assert resized
    for plan in resized:
        step = next(s for s, p in plans.items() if p is plan)
        fresh = stepskip.Skipper(piece, block_bytes, stepskip.Plans()).plan(step)
        for name in ("large_ops", "large_sums", "gap_peaks", "small_ops", "shape", "signed"):
            assert getattr(plan, name) == getattr(fresh, name), name


# -- serving plans ----------------------------------------------------------------------------
TWELVE_LAYERS = dict(TINY_LLAMA, num_hidden_layers=12)


def _tiny_plan(**options):
    # a batch whose KV cache is in the large pool (1 MiB a layer): the small pool repeats
    defaults = dict(quant="none", adapters=2, rank=4, batch=64, prompt_tokens=300,
                    new_tokens=16, mode="multi")  # fmt: skip
    return serve_plan("tiny", **{**defaults, **options})


@pytest.mark.slow
def test_a_serving_plan_skips_and_replays_as_laid_out():
    """A 12-layer model's serving run: the split replay leaves small-pool events out and
    gives the plain replay's peaks, and ``simulate_serving`` answers them. (A batch of a few
    sequences keeps the KV cache in the small pool, where each layer frees its cache of the
    step before: nothing repeats there, and nothing is left out.)"""
    plan = _tiny_plan()
    run, loading = compact_run(TWELVE_LAYERS, plan)
    replayer = splitreplay.SplitReplay(run, AllocatorConfig())
    split = observe_phases(replayer, len(run), run.markers, loading)
    assert replayer.skipped_events > 0
    events, markers, loading_again = whole_run(TWELVE_LAYERS, plan)
    assert (events, markers, loading_again) == (run.events(), run.markers, loading)
    plain = replay(events, markers, loading)
    assert split == plain
    simulated = simulate_serving(TWELVE_LAYERS, plan, use_cache=False).to_dict()
    simulated.pop("trace_seconds")
    assert simulated == {**plain, "events": len(events)}


@pytest.mark.parametrize("expandable", [False, True], ids=["capacity", "expandable"])
def test_a_capped_or_expandable_allocator_replays_the_run_laid_out(expandable):
    """With a capacity the pools meet (a failed cudaMalloc releases both) and expandable
    segments map pages, not 2 MiB segments: the run is laid out and replayed whole."""
    run = _decode_run(1)
    peak = _plain(run)["peak_reserved_bytes"]
    config = (
        AllocatorConfig(expandable_segments=True)
        if expandable
        else AllocatorConfig(capacity_bytes=peak)
    )
    assert not splitreplay.splits(config)
    with pytest.raises(ValueError):
        splitreplay.SplitReplay(Run(), config)
    assert replay_run(run, 0, config) == _plain(run, config)


@pytest.mark.parametrize(
    "config",
    [
        AllocatorConfig(max_split_size_bytes=32 * MIB),
        AllocatorConfig(roundup_power2_divisions=(4,) * 16),
        AllocatorConfig(large_segment_bytes=32 * MIB),
    ],
    ids=["max-split", "divisions", "large-segment"],
)
def test_other_settings_split_and_replay_as_laid_out(config):
    """Settings that do not make the pools meet: split, with the plain replay's peaks."""
    assert splitreplay.splits(config)
    for seed in range(8):
        run = _decode_run(seed)
        assert _split(run, config)[0] == _plain(run, config), seed
