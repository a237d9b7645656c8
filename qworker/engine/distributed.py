"""Tensor parallelism inside one engine: rank 0 drives, N-1 follower processes mirror it.

``start_tensor_parallel`` (rank 0, the engine's process) spawns ranks 1..N-1 with
``torch.multiprocessing`` and joins them in a process group: NCCL on CUDA (rank r on
``cuda:{first + r}``, NVLink multicast off), gloo on the CPU. Every rank loads its shard
(``qworker.model.parallel``) and builds a ``ModelRunner`` the same way, so the runners'
start-up forwards run their collectives in step; the ranks then agree on the smallest KV
pool. Rank 0 keeps the scheduler; its runner's model becomes a ``_Leader``, which
broadcasts each forward's inputs (and the hidden rows whose logits it wants) to the
followers, which run the same forward and lm_head on their shards. Each message is an
int64 header over a CPU gloo group (an idle follower blocks in a socket read, not in a
spinning GPU kernel), then tensors over the device group. Fail-stop: if any rank dies the
others exit (rank 0 with status 1); the supervisor restarts the worker. See
docs/scaling.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import threading
import time
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qworker.config import EngineConfig
from qworker.engine.runner import ModelRunner
from qworker.model.llama import AttentionMetadata, LlamaForCausalLM
from qworker.model.loader import LoadedModel, load_model
from qworker.model.parallel import TPContext

log = logging.getLogger(__name__)

_STOP, _FORWARD, _LOGITS = 0, 1, 2
_HEADER = 8                                    # op, then up to 7 sizes
_IDLE = timedelta(days=365)                    # followers wait this long for the next step
_COLLECTIVE = timedelta(minutes=30)


class TensorParallelGroup:
    """Rank 0's handle: the loaded shard, its runner (driving the followers), ``shutdown``."""

    def __init__(self, procs: list) -> None:
        self.procs = procs
        self.loaded: LoadedModel | None = None
        self.runner: ModelRunner | None = None
        self.ctrl = None                        # the gloo group of the step headers
        self.stopping = False
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def _watch(self) -> None:
        wait([p.sentinel for p in self.procs])
        if not self.stopping:
            dead = [f"rank {i + 1} (exit {p.exitcode})" for i, p in enumerate(self.procs)
                    if not p.is_alive()]
            log.critical("tensor-parallel %s died; the engine cannot continue, exiting",
                         ", ".join(dead))
            os._exit(1)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the followers (they leave their loop), then tear the groups down."""
        if self.stopping:
            return
        self.stopping = True
        atexit.unregister(self.shutdown)
        if self.ctrl is not None:               # else start-up failed: just terminate
            try:
                dist.broadcast(torch.zeros(_HEADER, dtype=torch.int64), 0, group=self.ctrl)
            except Exception as e:  # noqa: BLE001 - a dead group: terminate below
                log.warning("could not signal tensor-parallel followers: %s", e)
        _reap(self.procs, timeout if self.ctrl is not None else 0.0)
        if dist.is_initialized():
            dist.destroy_process_group()


def start_tensor_parallel(model_path: str | Path, config: EngineConfig, device: torch.device,
                          dtype: torch.dtype) -> TensorParallelGroup:
    """Spawn ranks 1..N-1 (N = ``config.tensor_parallel_size``) and build rank 0 here.

    Raises ``ValueError`` (before spawning anything) when the model's heads, MLP or
    vocabulary cannot be split N ways or there are not N devices.
    """
    size = config.tensor_parallel_size
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group: one "
                           "tensor-parallel engine per process")
    devices = _devices(device, size)
    _check_shapes(model_path, size)
    if not config.enforce_eager:        # CUDA graphs would capture rank 0's broadcasts
        config = dataclasses.replace(config, enforce_eager=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"   # multicast can take a shared host's GPUs down
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=_COLLECTIVE,
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower_main, daemon=True, name=f"qworker-tp{r}",
                         args=(r, size, store.port, backend, str(devices[r]), str(model_path),
                               config, dtype, os.getpid()))
             for r in range(1, size)]
    for p in procs:
        p.start()
    group = TensorParallelGroup(procs)
    try:
        tp, ctrl = _join(store, 0, size, backend, devices[0])
        group.loaded, group.runner = _build(model_path, config, devices[0], dtype, tp, ctrl)
    except BaseException:
        group.shutdown()
        raise
    group.ctrl = ctrl
    group.runner.model = _Leader(group.runner.model, ctrl)
    atexit.register(group.shutdown)
    return group


class _Leader:
    """Rank 0's model: announces each forward / logits call, then runs its own shard."""

    def __init__(self, model: LlamaForCausalLM, ctrl) -> None:
        self.model, self.ctrl = model, ctrl

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def _announce(self, op: int, *sizes: int) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:1 + len(sizes)] = torch.tensor([op, *sizes])
        dist.broadcast(header, 0, group=self.ctrl)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn: AttentionMetadata) -> torch.Tensor:
        tables = attn.block_tables                                     # [B, M]
        parts = [input_ids, positions, attn.slot_mapping, attn.query_start_loc,
                 attn.seq_lens, tables.flatten()]
        self._announce(_FORWARD, *(p.numel() for p in parts[:5]), *tables.shape)
        dist.broadcast(torch.cat([p.long() for p in parts]), 0)
        return self.model(input_ids, positions, attn)                  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._announce(_LOGITS, hidden.shape[0])
        dist.broadcast(hidden.contiguous(), 0)                         # [S, H]
        return self.model.compute_logits(hidden)                       # [S, V] fp32


def _follower_main(rank: int, size: int, port: int, backend: str, device: str,
                   model_path: str, config: EngineConfig, dtype: torch.dtype,
                   leader_pid: int) -> None:
    """Rank ``rank``: build the shard, then mirror rank 0's forwards until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C stops rank 0, which stops us
    threading.Thread(target=_exit_with_leader, args=(leader_pid,), daemon=True).start()
    dev = torch.device(device)
    try:
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=_COLLECTIVE)
        tp, ctrl = _join(store, rank, size, backend, dev)
        loaded, runner = _build(model_path, config, dev, dtype, tp, ctrl)
        _serve(loaded.model, runner.kv_caches, ctrl, dev, dtype)
    except Exception:
        if _leader_gone(leader_pid, wait_s=2.0):
            os._exit(1)                 # rank 0 died first: its closed sockets broke us
        raise
    dist.destroy_process_group()


def _serve(model: LlamaForCausalLM, kv_caches: list, ctrl, dev: torch.device,
           dtype: torch.dtype) -> None:
    """The follower loop: one header, then that message's tensors, until ``_STOP``."""
    header = torch.empty(_HEADER, dtype=torch.int64)
    with torch.inference_mode():
        while True:
            dist.broadcast(header, 0, group=ctrl)
            op, *sizes = header.tolist()
            if op == _STOP:
                return
            if op == _FORWARD:
                t, n_qsl, n_lens, b, m = sizes[0], sizes[3], sizes[4], sizes[5], sizes[6]
                payload = torch.empty(3 * t + n_qsl + n_lens + b * m, dtype=torch.int64,
                                      device=dev)
                dist.broadcast(payload, 0)
                ids, pos, slots, qsl, lens, tables = payload.split(
                    [t, t, t, n_qsl, n_lens, b * m])
                attn = AttentionMetadata(slots, qsl.int(), lens.int(),
                                         tables.int().view(b, m), kv_caches)
                model(ids, pos, attn)                                  # [T, H]
            elif op == _LOGITS:
                rows = torch.empty(sizes[0], model.hidden_size, dtype=dtype, device=dev)
                dist.broadcast(rows, 0)                                # [S, H]
                model.compute_logits(rows)                             # rank 0 keeps these


def _join(store, rank: int, size: int, backend: str, device: torch.device):
    """Join the device group (the default group) and the CPU control group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=_COLLECTIVE,
                            device_id=device if device.type == "cuda" else None)
    ctrl = dist.new_group(backend="gloo", timeout=_IDLE)
    return TPContext(rank, size), ctrl


def _build(model_path, config: EngineConfig, device: torch.device, dtype: torch.dtype,
           tp: TPContext, ctrl) -> tuple[LoadedModel, ModelRunner]:
    loaded = load_model(model_path, device, dtype, config.load_format, tp)
    runner = ModelRunner(loaded, config, device, dtype)
    n = torch.tensor([runner.num_kv_blocks], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MIN, group=ctrl)              # same pool everywhere
    if int(n) < runner.num_kv_blocks:
        runner.num_kv_blocks = int(n)
        runner.kv_caches = [(k[:int(n)], v[:int(n)]) for k, v in runner.kv_caches]
    return loaded, runner


def _devices(device: torch.device, size: int) -> list[torch.device]:
    if device.type == "cpu":
        return [device] * size
    if device.type != "cuda":
        raise ValueError(f"tensor parallelism runs on cuda or cpu, not {device}")
    first, count = device.index or 0, torch.cuda.device_count()
    if first + size > count:
        raise ValueError(f"tensor_parallel_size {size} from cuda:{first} needs {first + size} "
                         f"GPUs, {count} visible (CUDA_VISIBLE_DEVICES)")
    return [torch.device("cuda", first + r) for r in range(size)]


def _check_shapes(model_path, size: int) -> None:
    """Build rank 0's shard on the meta device: every split check, no memory."""
    from transformers import AutoConfig

    with torch.device("meta"):
        LlamaForCausalLM(AutoConfig.from_pretrained(model_path), TPContext(0, size))


def _exit_with_leader(leader_pid: int) -> None:
    while os.getppid() == leader_pid:
        time.sleep(1.0)
    os._exit(1)


def _leader_gone(leader_pid: int, wait_s: float) -> bool:
    """Whether rank 0 has exited (we were re-parented), waiting up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while os.getppid() == leader_pid:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5.0)
