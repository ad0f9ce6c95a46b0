"""Launch configurations of the recurrent kernels: the config type, the heuristic default, the
space the autotuner searches and its on-disk cache."""
import functools
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton

# tl.dot needs every dimension of a tile to be at least 16.
MIN_TILE = 16


# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are JIT functions,
# several microseconds a call from the host.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class KernelConfig:
    """How one layer's recurrence is split over programs (forward and backward kernels alike;
    fused_gates only concerns the forward).

    hidden_block: hidden units per program (all gates of those units); programs per direction
        and batch tile = ceil(H / hidden_block).
    batch_block: batch rows per program; batch tiles = ceil(B / batch_block).
    k_block: chunk of the recurrent matmul's reduction over H; None keeps the program's whole
        slice of W_hh on-chip for all steps, a smaller power of two streams it in chunks.
    fused_gates: LSTM/GRU compute all gates of the slice in one dot (N = 4 * hidden_block; GRU's
        fourth gate is zeros) instead of one dot per gate (N = hidden_block each).
    persistent: one launch for all timesteps with a grid barrier (True), one launch per step
        (False), or the launcher's choice (None): persistent whenever the grid is co-resident.
    num_stages: software-pipelining depth of the K-chunk loop (streamed W_hh only). Triton 3.6
        overlaps nothing at 2 (it issues chunk i+1's copies after chunk i's dot and waits for
        them first thing in the next iteration: async_wait num=0); 3 (4) keeps one (two) chunks
        in flight during each dot (async_wait num=3, 6), sm_90 compiles. The time loop is never
        pipelined: that could hoist the next step's load of h above the grid barrier.
    split_k: the forward's resident reduction split this many ways among the warps, one part per
        warp, summed across warps each step (kernels.forward._preacts): a chain of dependent MMAs
        split_k times shorter and fewer MMAs per warp, for one cross-warp sum a step (LSTM bf16
        H=512 HB4 BB16, 8 warps, split 8 ways: loop mma.sync per warp 32 to 8, bar.sync 10 to 13;
        sm_90 compiles). A tuning candidate. (The backward always splits: backward_piece_split.)
    """

    hidden_block: int
    batch_block: int
    k_block: int | None = None
    fused_gates: bool = False
    num_warps: int = 4
    persistent: bool | None = None
    num_stages: int = 1
    split_k: int = 1

    def __post_init__(self):
        for name, least in (("hidden_block", 4), ("batch_block", MIN_TILE), ("k_block", MIN_TILE)):
            value = getattr(self, name)
            if value is None and name == "k_block":
                continue
            if value < least or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {least}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two up to 16, got {self.num_warps}")
        if self.num_stages not in (1, 2, 3, 4):
            raise ValueError(f"num_stages must be 1 to 4, got {self.num_stages}")
        if self.split_k not in (1, 2, 4, 8, 16):
            raise ValueError(f"split_k must be a power of two up to 16, got {self.split_k}")


def is_resident(cfg: KernelConfig, reduction: int) -> bool:
    """Whether cfg keeps a kernel's W_hh slice on-chip: no K chunk smaller than its padded
    ``reduction`` (H for the forward, G*H for the backward)."""
    return cfg.k_block is None or cfg.k_block >= reduction


def check_stages(cfg: KernelConfig, reduction: int):
    """num_stages pipelines the K-chunk loop, which only a streamed W_hh has."""
    if cfg.num_stages > 1 and is_resident(cfg, reduction):
        raise ValueError(f"num_stages={cfg.num_stages} pipelines the K-chunk loop of a streamed W_hh; this "
                         f"partition keeps W_hh resident (set k_block below the padded reduction)")


def check_split(cfg: KernelConfig, reduction: int):
    """split_k divides a resident forward's reduction (H padded) into parts of a dot tile or more."""
    if cfg.split_k == 1:
        return
    why = "streams W_hh" if not is_resident(cfg, reduction) else (
        "has too few rows" if reduction // cfg.split_k < MIN_TILE else None)
    if why:
        raise ValueError(f"split_k={cfg.split_k} splits a resident W_hh's {reduction} reduction rows into parts of "
                         f"at least {MIN_TILE}; this partition {why}")


def k_block(hidden_size: int) -> int:
    """H padded to a power of two (at least one dot tile): the recurrent matmul's whole reduction."""
    return max(MIN_TILE, next_pow2(hidden_size))


# What one forward program keeps on-chip for all steps when it runs resident: its W_hh slice and its
# h tile (bytes). Larger slices stream W_hh in K chunks of STREAM_K. Source: `python -m
# scripts.compile_check --bounds` (Triton 3.6, sm_90, compiled as the JIT launches it, 2026-11-25):
# at 8 warps every fused LSTM slice within both bounds compiled without spills, in bf16 and fp32
# alike (the bounds are bytes), in at most 196 KiB of shared memory (H=1024 HB16 BB16 bf16: 231
# registers, 160 KiB; H=512 HB32 BB64 bf16: 252, 192 KiB); every 128 KiB h tile spilled, and
# 256 KiB slices overflow shared memory.
RESIDENT_WEIGHT_BYTES = 128 * 1024
RESIDENT_H_BYTES = 64 * 1024
# The whole layer goes to one program per group (no grid barrier at all) up to this slice: the
# bound of the earlier (unspecialised) compiles, kept until a GPU times one program against a
# grid; tuning tries the whole layer up to RESIDENT_WEIGHT_BYTES.
WHOLE_LAYER_BYTES = 48 * 1024
# The backward keeps its columns of W_hh resident (all gates within RESIDENT_WEIGHT_BYTES) with
# 16-row batch tiles and 8 warps, and reduces against them one piece at a time: [16, PK] of the
# exchanged gradients against a [PK, HB] piece of one gate's columns, PK rows within this many
# bytes of gradients. Each dot holds both operands' fragments whole in every warp, so registers
# grow with PK. Source: `python -m scripts.compile_check --bounds --kernel bwd` and single
# variants (Triton 3.6, sm_90, as launched, 2026-11-25), LSTM, HB16 BB16 8 warps: a whole gate per
# dot spilled from 32 KiB (bf16 H=1024: 64 B; fp32 H=512: 80 B), pieces of 16 KiB still spilled
# (80 B), pieces of 8 KiB did not (bf16 H=1024: 254 registers, 136 KiB shared; fp32 H=512: 250;
# bf16 H=512: 234). At 4 warps resident slices spilled from bf16 H=256 HB32 (32 B), at 32- and
# 64-row tiles from 16 KiB (bf16 H=256 HB32 BB32: 224 B).
BACKWARD_GRADIENT_CHUNK_BYTES = 8 * 1024
STREAM_K = 64
# A streamed W_hh pipelines its K chunks this deep: the shallowest depth that overlaps (num_stages).
PIPELINE_STAGES = 3
H100_SMS = 132

# (hidden size, batch) pairs whose defaults scripts/compile_check.py verifies and the autotuner's
# sweep covers by default.
TUNED_SIZES = [(H, B) for H in (64, 128, 200, 256, 512, 768, 1024, 2048) for B in (1, 16, 64, 512)]


@functools.lru_cache(maxsize=4096)  # pure; on every launch's host path
def default_forward_config(hidden_size: int, batch: int, gates: int, elt_size: int, interpreting: bool,
                           directions: int = 1, sms: int = H100_SMS) -> KernelConfig:
    """Heuristic partition for one layer of ``gates`` gates with weights of ``elt_size`` bytes.

    On a GPU: batch tiles of 16 to 64 rows; then the fewest hidden units per program that still
    spread each (direction, batch tile) over the SMs, so the whole grid is co-resident (one
    program per SM) and runs persistently. LSTM/GRU fuse their gates into one dot (4 units per
    program at least), an RNN needs 16. A slice and h tile within the resident bounds stay
    on-chip (no per-step reload of W_hh from L2); otherwise W_hh streams in chunks. A small
    layer goes whole to one program per group, which needs no grid barrier. Under the
    interpreter every program costs a Python pass per step, so the whole layer goes to one
    program (fewest passes; it also runs persistently there).
    """
    full_k = k_block(hidden_size)
    if interpreting:
        batch_block = min(64, max(MIN_TILE, next_pow2(max(batch, 1))))
        return KernelConfig(hidden_block=full_k, batch_block=batch_block)
    fused = gates > 1
    width = 4 if fused else 1  # dot columns per hidden unit
    batch_block = 16 if batch <= 16 else (32 if batch <= 32 else 64)
    groups = directions * cdiv(max(batch, 1), batch_block)
    max_programs = max(1, sms // groups)
    hidden_block = max(MIN_TILE // width, next_pow2(cdiv(hidden_size, max_programs)))
    hidden_block = min(hidden_block, max(MIN_TILE // width, next_pow2(hidden_size)))
    if batch_block == 16 and _fits_resident(width * full_k, hidden_size, batch_block, elt_size, WHOLE_LAYER_BYTES):
        hidden_block = full_k  # the whole layer in one program per group: no grid barrier at all
    if _fits_resident(width * hidden_block, hidden_size, batch_block, elt_size):
        k = None
    else:
        k = STREAM_K if full_k > STREAM_K else None
        # Wider streamed slices spill; H not a multiple of 16 (no aligned rows) spills sooner (LSTM
        # fp32 H=200 HB16 BB64 on packed input: 12 B; HB8 none; sm_90 compiles).
        widest = 32 if batch_block == 16 else (16 if hidden_size % 16 == 0 else max(8, MIN_TILE // width))
        hidden_block = min(hidden_block, widest)
    tiny = batch_block == 16 and k is None and width * hidden_block * full_k <= 4096
    # ptxas spills a streamed single-gate 16-bit slice at 8 warps but not at 4 (sm_90 compiles)
    narrow_stream = k is not None and width == 1 and elt_size < 4
    # Pipelined chunks of a 64-row tile spill where H is not a multiple of 16 (fp32 H=200: 8 to
    # 1348 B; the same at H=256 and H=512 does not; sm_90 compiles): those load chunk by chunk.
    stages = _default_stages(k is not None and not (hidden_size % 16 and batch_block >= 64), elt_size)
    return KernelConfig(hidden_block=hidden_block, batch_block=batch_block, k_block=k, fused_gates=fused,
                         num_warps=4 if tiny or narrow_stream else 8, num_stages=stages)


def _default_stages(streamed: bool, elt_size: int) -> int:
    """A default's K-chunk pipelining: PIPELINE_STAGES for a streamed W_hh, except fp64 (exact
    checks, not speed), which spilled pipelined (LSTM backward H=64 B=8: 16-32 B, sm_90)."""
    return PIPELINE_STAGES if streamed and elt_size < 8 else 1


def _fits_resident(columns: int, hidden_size: int, batch_block: int, elt_size: int,
                   weight_bound: int = RESIDENT_WEIGHT_BYTES) -> bool:
    """Whether a [K, columns] slice of W_hh and the [batch_block, K] h tile (K: H padded) can
    stay on-chip for all steps: the bounds above, which hold for H a multiple of 16 (the JIT
    then knows every row 16-byte aligned). Other H (H=200) spilled with every 64-row tile and
    stay resident with 16-row tiles only; 64-row tiles that also save for backward spilled past
    half the slice bound (fp32 H=256 HB32 BB64: 24 B) (compile_check, sm_90, 2026-11-25)."""
    full_k = k_block(hidden_size)
    if hidden_size % 16 and batch_block > 16:
        return False
    if batch_block >= 64:
        weight_bound = min(weight_bound, RESIDENT_WEIGHT_BYTES // 2)
    weight_bytes, h_bytes = columns * full_k * elt_size, batch_block * full_k * elt_size
    return weight_bytes <= weight_bound and h_bytes <= RESIDENT_H_BYTES


@functools.lru_cache(maxsize=4096)  # pure; on every launch's host path
def default_backward_config(hidden_size: int, batch: int, gates: int, elt_size: int, interpreting: bool,
                            directions: int = 1, sms: int = H100_SMS, packed: bool = False) -> KernelConfig:
    """Heuristic partition of the backward kernel (fused_gates unused). A program owns hidden
    units and holds their columns of W_hh across all gates ([G*H, HB]); its recurrent product
    reduces over G*H: one dot per on-chip piece of a gate's columns (backward_piece_rows), or
    k_block chunks of the stacked gates streamed. The dot's width is the hidden block, so at least 16 units per
    program; otherwise the same rules as the forward default. ``packed``: for packed sequences,
    whose per-row offsets take registers: resident slices spilled there (LSTM bf16 H=256 to 768
    HB16: 32-64 B; sm_90 compiles), so they stream."""
    full_k = backward_reduction(hidden_size, gates)
    if interpreting:
        batch_block = min(64, max(MIN_TILE, next_pow2(max(batch, 1))))
        return KernelConfig(hidden_block=k_block(hidden_size), batch_block=batch_block)
    batch_block = 16 if batch <= 16 else 32  # wider tiles spill here
    groups = directions * cdiv(max(batch, 1), batch_block)
    hidden_block = max(MIN_TILE, next_pow2(cdiv(hidden_size, max(1, sms // groups))))
    hidden_block = min(hidden_block, k_block(hidden_size))
    if full_k <= STREAM_K or (not packed and _fits_backward_resident(hidden_block, hidden_size, gates, batch_block,
                                                                     elt_size, 8)):
        k = None
    else:
        # Streamed in chunks of the stacked gates: 2*STREAM_K (STREAM_K for wide batch tiles)
        # compile without spills (sm_90 compiles).
        k = 2 * STREAM_K if batch_block == 16 else STREAM_K
        hidden_block = min(hidden_block, 32 if batch_block == 16 else 16)
    return KernelConfig(hidden_block=hidden_block, batch_block=batch_block, k_block=k, num_warps=8,
                        num_stages=_default_stages(bool(k) and k < full_k, elt_size))


def _fits_backward_resident(hidden_block: int, hidden_size: int, gates: int, batch_block: int, elt_size: int,
                            warps: int) -> bool:
    """Whether the backward can keep a program's columns of W_hh on-chip for all steps (the
    bounds noted at BACKWARD_GRADIENT_CHUNK_BYTES). These also spilled, sm_90 compiles: H not a
    multiple of 16 (LSTM bf16 H=200 HB16: 48-240 B), a gate's column past 4 KiB (RNN fp32 H=2048
    HB16: 8-56 B), fp64 (LSTM H=64 HB16: 144 B; exact checks, not speed)."""
    full_k = k_block(hidden_size)
    return (batch_block == MIN_TILE and warps >= 8 and hidden_size % MIN_TILE == 0 and elt_size <= 4
            and full_k * elt_size <= 4096 and gates * full_k * hidden_block * elt_size <= RESIDENT_WEIGHT_BYTES)


def backward_piece_rows(hidden_size: int, batch_block: int, elt_size: int) -> int:
    """Rows of W_hh per on-chip piece of a resident backward (see BACKWARD_GRADIENT_CHUNK_BYTES):
    H padded, halved until a piece of the gradient tile fits."""
    rows = k_block(hidden_size)
    while rows > MIN_TILE and batch_block * rows * elt_size > BACKWARD_GRADIENT_CHUNK_BYTES:
        rows //= 2
    return rows


def backward_piece_split(rows: int, num_warps: int) -> int:
    """Ways the backward splits the rows of each on-chip piece (or streamed chunk) of W_hh's
    columns among its warps (_recurrent_grad): one part per warp, each at least a dot tile deep.
    Split 8 ways, the step loop's mma.sync per warp fell 8x and its bar.sync from 69 to 41 (LSTM
    bf16 H=1024 HB16 BB16 resident, 8 warps: 512 to 64 mma.sync, 255 registers, no spill;
    streamed H=2048 KB128: bar.sync in the kernel 56 to 23, registers 194 to 163; sm_90 compiles
    as launched, 2026-11-25)."""
    ways = 1
    while 2 * ways <= num_warps and rows // (2 * ways) >= MIN_TILE:
        ways *= 2
    return ways


def candidate_configs(hidden_size: int, batch: int, gates: int, elt_size: int, directions: int = 1,
                      sms: int = H100_SMS) -> list[KernelConfig]:
    """The autotuning space of one shape: the default, then its neighbours (half and double the
    hidden block, the other K mode, the other gate layout, the other warp count, and a streamed
    W_hh with its chunk loads pipelined PIPELINE_STAGES deep, or 4 for the default), the whole
    layer in one program per group, half the batch tile with twice the hidden block, and the
    default's partition with its reduction split among its warps (split_k); resident slices only
    within the resident bounds (past them they spill or overflow shared memory)."""
    base = default_forward_config(hidden_size, batch, gates, elt_size, False, directions, sms)
    full_k = k_block(hidden_size)
    fused_options = (True, False) if gates > 1 else (False,)
    out = [base]

    def add(hb, bb, k, fused, warps, stages=1, split=1):
        columns = hb * (4 if fused else gates)  # of the whole slice, every gate
        if hb * (4 if fused else 1) < MIN_TILE or hb > max(MIN_TILE, next_pow2(hidden_size)):
            return
        if k is None and not _fits_resident(columns, hidden_size, bb, elt_size):
            return
        cfg = KernelConfig(hb, bb, k_block=k, fused_gates=fused, num_warps=warps, num_stages=stages, split_k=split)
        if cfg not in out:
            out.append(cfg)

    for hb in (base.hidden_block // 2, base.hidden_block, base.hidden_block * 2):
        for k in (None, STREAM_K) if full_k > STREAM_K else (None,):
            for fused in fused_options:
                for warps, stages in itertools.product((4, 8), (1, PIPELINE_STAGES) if k else (1,)):
                    add(hb, base.batch_block, k, fused, warps, stages)
    if base.k_block:
        add(base.hidden_block, base.batch_block, base.k_block, base.fused_gates, base.num_warps, 4)
    add(full_k, base.batch_block, None, gates > 1, 8)  # no grid barrier at all
    if base.batch_block > MIN_TILE:
        add(2 * base.hidden_block, base.batch_block // 2, None, gates > 1, 8)
    split = min(base.num_warps, full_k // MIN_TILE)
    if split > 1 and _fits_split(split, base, gates, elt_size):
        # the default's partition, resident, its reduction split among its warps
        add(base.hidden_block, base.batch_block, None, base.fused_gates, base.num_warps, split=split)
    return out


# A split forward reduction (split_k) holds one [split_k, BB, N] accumulator in place of [BB, N]:
# within this many bytes a thread every split candidate compiled without spills; from 256 B a
# third of them spilled (8 to 2172 B) or overflowed shared memory (`python -m scripts.compile_check
# --space --kernel fwd --match=-k`, sm_90 as launched, 2026-11-25).
SPLIT_ACC_BYTES_PER_THREAD = 128


def _fits_split(split: int, cfg: KernelConfig, gates: int, elt_size: int) -> bool:
    """Whether cfg's reduction split ``split`` ways keeps its accumulator within the bound above."""
    columns = cfg.hidden_block * (4 if cfg.fused_gates and gates > 1 else 1)  # of one dot
    acc_bytes = 8 if elt_size == 8 else 4
    return split * cfg.batch_block * columns * acc_bytes <= SPLIT_ACC_BYTES_PER_THREAD * 32 * cfg.num_warps


def backward_reduction(hidden_size: int, gates: int) -> int:
    """The backward's recurrent product reduces over every gate (G*H), padded to a power of two."""
    return max(MIN_TILE, next_pow2(gates * hidden_size))


def candidate_backward_configs(hidden_size: int, batch: int, gates: int, elt_size: int, directions: int = 1,
                               sms: int = H100_SMS) -> list[KernelConfig]:
    """The backward kernel's autotuning space: its default, then half and double the hidden
    block, W_hh's columns resident (within _fits_backward_resident's bounds) or streamed in
    chunks of STREAM_K or 2*STREAM_K (pipelined PIPELINE_STAGES deep or not), 4 or 8 warps."""
    base = default_backward_config(hidden_size, batch, gates, elt_size, False, directions, sms)
    full_k = backward_reduction(hidden_size, gates)
    out = [base]
    for hb in (base.hidden_block // 2, base.hidden_block, base.hidden_block * 2):
        if hb < MIN_TILE or hb > k_block(hidden_size):
            continue
        for k in (None, STREAM_K, 2 * STREAM_K):
            if k is not None and k >= full_k:
                continue
            for warps, stages in itertools.product((4, 8), (1, PIPELINE_STAGES) if k else (1,)):
                if k is None and full_k > STREAM_K and not _fits_backward_resident(hb, hidden_size, gates,
                                                                                  base.batch_block, elt_size, warps):
                    continue  # past what stays on-chip: it only spills
                cfg = KernelConfig(hb, base.batch_block, k_block=k, num_warps=warps, num_stages=stages)
                if cfg not in out:
                    out.append(cfg)
    return out


def describe(cfg: KernelConfig) -> str:
    """A short name of a config, for reports and logs."""
    return (f"HB{cfg.hidden_block}-BB{cfg.batch_block}-KB{cfg.k_block or 'all'}"
            f"{'-fused' if cfg.fused_gates else ''}-w{cfg.num_warps}"
            f"{f'-s{cfg.num_stages}' if cfg.num_stages > 1 else ''}{f'-k{cfg.split_k}' if cfg.split_k > 1 else ''}")


CACHE_FORMAT = 1


# The sources a winner was timed on: the kernels, their launchers and this config space.
FINGERPRINTED = ("forward.py", "backward.py", "cells.py", "barrier.py", "packing.py", "configs.py")


@functools.lru_cache(maxsize=None)
def code_fingerprint(folder: str = str(Path(__file__).parent)) -> str:
    """A short hash of the FINGERPRINTED files: part of every tuning key, so that a winner tuned
    for other code (an earlier version of this project) is never reused."""
    digest = hashlib.sha256()
    for name in FINGERPRINTED:
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return digest.hexdigest()[:12]


def tuning_key(kernel: str, cell: str, hidden_size: int, batch: int, dtype: str, directions: int, device: str,
               triton_version: str, code: str | None = None) -> str:
    """What a tuned config depends on. The batch enters as its power-of-two bucket, so nearby
    batch sizes share one tuning; T never enters (it changes no code). ``code``: the kernels'
    fingerprint (default: this checkout's code_fingerprint())."""
    bucket = next_pow2(max(batch, 1))
    return (f"{kernel}|{cell}|H={hidden_size}|B<={bucket}|{dtype}|D={directions}|{device}"
            f"|triton={triton_version}|code={code or code_fingerprint()}")


class AutotuneCache:
    """Winning configs by tuning key, in one JSON file.

    A missing, unreadable or malformed file, one of another format, or an entry that is no longer
    a valid config counts as absent: that shape is tuned again, never a crash. Writes go to a
    temporary file renamed over the cache (atomic), under an exclusive lock, so concurrent writers
    merge their entries and a reader never sees half a file.
    """

    def __init__(self, path: str):
        self.path = path
        self._entries = None

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def get(self, key: str) -> KernelConfig | None:
        if self._entries is None:
            self._entries = self._read()
        entry = self._entries.get(key)
        try:
            return KernelConfig(**entry["config"])
        except (TypeError, KeyError, ValueError):
            return None

    def put(self, key: str, config: KernelConfig, timings_ms: dict | None = None):
        """Record a winner (and, for reference, each candidate's time per step)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        entry = {"config": asdict(config), "timings_ms_per_step": timings_ms or {}}
        with _locked(self.path + ".lock"):
            entries = self._read()
            entries[key] = entry
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", prefix=".autotune-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        self._entries = entries


class _locked:
    """An exclusive advisory lock on a side file (no-op where fcntl is missing)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            import fcntl
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
