"""Train the race's byte-level language model data-parallel, with any optimizer of the suite.

The example to copy. On CPU (gloo) or N GPUs (nccl), from the repository root after
``make demo`` or ``make test`` (which create ``.venv``)::

    .venv/bin/torchrun --standalone --nproc_per_node=2 --max-restarts=3 \\
        -m benchmarks.train_distributed \\
        --optimizer Shampoo --steps 200 --checkpoint-dir ckpt/shampoo --checkpoint-every 50
    .venv/bin/tensorboard --logdir runs   # if tensorboard is installed

A rank that dies (killed, out of memory, a lost machine) ends the attempt; ``torchrun`` starts
every rank again (up to ``--max-restarts`` times) and the run resumes by itself from the newest
*complete* checkpoint, continuing the same trajectory (bitwise on CPU in float64: batches are
drawn from ``(seed, step, rank)``; ``--dtype float64`` for exact comparisons). Restarts work
with gloo on torch 2.13 because the ranks join through
:func:`secondorder.distributed.elastic.init_process_group` (torch's own
``init_process_group`` under ``torchrun`` fails to reconnect after a restart unless the
launch sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``). A rank that freezes (stopped, deadlocked)
makes the others fail after ``--timeout`` seconds (default 300) with a message naming the
cause, instead of the 30 minutes of torch's default. ``--resume`` continues a run started
earlier (also at another number of processes: the optimizer state is resharded).

What it shows:

* ``torch.distributed.init_process_group`` (gloo on CPU, nccl on GPU) and a DDP model, or
  with ``--fsdp`` FSDP2 (``fully_shard`` on every transformer block, then the root; see the
  README for what each optimizer preconditions then);
* the optimizer built by name from the race's registry (``benchmarks/registry.py``), given
  ``distributor=True`` when it accepts one: each rank then owns a cost-balanced share of the
  preconditioner blocks, and one all-gather per step shares the updates, exactly (in the
  parameters' dtype; ``--communication-dtype bfloat16`` compresses them); torch optimizers,
  e.g. ``AdamW``, run replicated as usual;
* capture-based optimizers (EKFAC, AdaFisher, SINGD) get ``model=`` the *unwrapped* module
  (their hooks must see the layers, not DDP);
* every rank draws its own batch (global batch = ``world_size × --batch``) from a generator
  seeded by ``(seed, step, rank)``, so a resumed run sees exactly the batches it would have;
* TensorBoard scalars from rank 0 (loss averaged over ranks, learning rate, step time) under
  ``--logdir`` (default ``runs/<optimizer>-ws<N>``);
* before training, the checkpoint folder is checked (writable, room for ``--keep-last`` + 1
  checkpoints); a DCP checkpoint (model + optimizer + step) every ``--checkpoint-every``
  steps into ``--checkpoint-dir/step_<n>``, written atomically
  (:mod:`secondorder.distributed.checkpoint`), keeping the ``--keep-last`` newest (default 3).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) it runs in one process.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from benchmarks.registry import REGISTRY, build_optimizer, resolve_target
from benchmarks.workloads import WORKLOADS, evaluate, lr_factor
from secondorder.distributed.checkpoint import (
    check_checkpoint_dir,
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from secondorder.distributed.elastic import init_process_group, is_peer_failure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="Shampoo", help=f"registry name ({', '.join(REGISTRY)})")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--full", action="store_true", help="the race's full-size model (default: quick size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default=None, help="TensorBoard directory (default runs/<optimizer>)")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (newest complete ones)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint (automatic after a torchrun restart)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a collective waits for a lost or frozen rank before this rank fails",
    )
    parser.add_argument(
        "--kill-rank-at-step",
        type=int,
        default=None,
        metavar="STEP",
        help="fault injection for tests: the last rank SIGKILLs itself before STEP, first attempt only",
    )
    parser.add_argument(
        "--freeze-rank-at-step",
        type=int,
        default=None,
        metavar="STEP",
        help="fault injection for tests: the last rank SIGSTOPs itself before STEP, first attempt only",
    )
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="model dtype")
    parser.add_argument(
        "--communication-dtype",
        choices=("exact", "float32", "bfloat16"),
        default="exact",
        help="dtype of the all-gathered updates (default: each block's own dtype, lossless)",
    )
    args = parser.parse_args(argv)
    if args.optimizer not in REGISTRY:
        parser.error(f"unknown optimizer {args.optimizer!r}")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    if args.keep_last < 1:
        parser.error("--keep-last must be >= 1")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    return args


def setup(timeout: float = 300.0) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; returns ``(rank, world_size, device)``.

    ``timeout``: seconds any collective waits for its peers before raising (a lost or frozen
    rank), instead of torch's default 30 minutes.
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cpu")
    use_cuda = torch.cuda.is_available()
    # A bounded wait for lost or frozen peers, and a rendezvous that survives torchrun restarts.
    init_process_group("nccl" if use_cuda else "gloo", timeout)
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def make_optimizer(
    name: str,
    model: torch.nn.Module,
    world_size: int,
    communication_dtype: torch.dtype | None,
    full: bool = False,
) -> torch.optim.Optimizer:
    """The registry's optimizer for W2 (its full-size settings with ``full``), distributed when
    it takes ``distributor=``."""
    entry = REGISTRY[name]
    overrides = {}
    accepts = entry.build is None and "distributor" in inspect.signature(resolve_target(entry.target)).parameters
    if world_size > 1 and accepts:
        from secondorder.distributed import AllGatherDistributor

        overrides["distributor"] = AllGatherDistributor(communication_dtype=communication_dtype)
    return build_optimizer(name, model, "W2", quick=not full, **overrides)


def main(argv: list[str] | None = None) -> int:
    """Train; returns 0. Every rank runs this function."""
    args = parse_args(argv)
    rank, world_size, device = setup(args.timeout)
    try:
        train(args, rank, world_size, device)
        # The model, DDP and optimizer are freed by now: destroying the process group while DDP
        # still held it left a rank hanging at exit now and then (gloo, torch 2.13).
        if world_size > 1:
            dist.barrier()  # no rank leaves (and closes its connections) while a peer still works
            dist.destroy_process_group()
        return 0
    except Exception as error:
        if world_size > 1 and is_peer_failure(error):
            print(
                f"rank {rank}: a collective failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                f"a peer rank was lost or froze (waited at most --timeout {args.timeout:g} s). "
                "Under torchrun --max-restarts the job restarts from the newest complete checkpoint.",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from error
        raise


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> int:
    """The training loop proper (every rank runs it); returns 0."""
    entry = REGISTRY[args.optimizer]
    task = WORKLOADS["W2"].setup(not args.full, args.steps)
    if args.batch > task.meta["batch"]:
        raise ValueError(f"Invalid --batch: at most {task.meta['batch']} sequences per rank for this model size")
    torch.manual_seed(args.seed)
    model = task.make_model().to(device=device, dtype=getattr(torch, args.dtype))
    sharded = args.fsdp and world_size > 1
    if sharded:  # before the optimizer is built: it must see the sharded (DTensor) parameters
        mesh = init_device_mesh(device.type, (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = make_optimizer(
        args.optimizer,
        model,
        world_size,
        None if args.communication_dtype == "exact" else getattr(torch, args.communication_dtype),
        args.full,
    )
    wrapped = DistributedDataParallel(model) if world_size > 1 and not sharded else model
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    logdir = os.path.abspath(args.logdir or os.path.join("runs", f"{args.optimizer}-ws{world_size}"))
    if args.checkpoint_dir:
        # Before any training: the folder is writable and has room (the model alone now; the
        # optimizer state is checked again after the first step, once it exists).
        check_checkpoint_dir(args.checkpoint_dir, (args.keep_last + 1) * checkpoint_bytes(model))
    start = 0
    if (args.resume or restarted) and args.checkpoint_dir:
        found = latest_checkpoint(args.checkpoint_dir)
        if found is not None:
            extra = load_checkpoint(found, wrapped, optimizer, extra={"step": torch.tensor(0)})
            start = int(extra["step"])
            if rank == 0:
                print(f"resumed from {found} at step {start}", flush=True)
        elif rank == 0:
            print(f"no complete checkpoint in {os.path.abspath(args.checkpoint_dir)}: starting at step 0", flush=True)
    if rank == 0:
        where = os.path.abspath(args.checkpoint_dir) if args.checkpoint_dir else "nowhere (no --checkpoint-dir)"
        print(
            f"TensorBoard logs: {logdir}\ncheckpoints: {where}"
            + (
                f" (every {args.checkpoint_every} steps, the newest {args.keep_last} kept)"
                if args.checkpoint_dir
                else ""
            ),
            flush=True,
        )

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(logdir, purge_step=start + 1 if start else None)
    for step in range(start, args.steps):
        if rank == world_size - 1 and not restarted:
            if args.kill_rank_at_step == step + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.freeze_rank_at_step == step + 1:
                os.kill(os.getpid(), signal.SIGSTOP)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world_size + rank)
        inputs, targets = task.train_batch(generator)
        inputs, targets = inputs[: args.batch].to(device), targets[: args.batch].to(device)
        if entry.schedule:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=False):
                group["lr"] = base * lr_factor(step, args.steps, task.warmup)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(wrapped(inputs), targets)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - began
        loss = loss.detach()
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
        if writer is not None:
            writer.add_scalar("train/loss", float(loss), step + 1)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step + 1)
            writer.add_scalar("train/step_seconds", elapsed, step + 1)
        evaluating = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
        # An FSDP2 forward is collective: every rank evaluates (rank 0 reports).
        if evaluating and (rank == 0 or sharded):
            metrics = evaluate(model, task) if device.type == "cpu" else {}
        if evaluating and rank == 0:
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, step + 1)
            print(
                f"step {step + 1}: loss {float(loss):.4f} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                flush=True,
            )
        if args.checkpoint_dir and step == start:
            check_checkpoint_dir(args.checkpoint_dir, (args.keep_last + 1) * checkpoint_bytes(wrapped, optimizer))
        if args.checkpoint_dir and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps):
            save_checkpoint(
                os.path.join(args.checkpoint_dir, f"step_{step + 1}"),
                wrapped,
                optimizer,
                extra={"step": torch.tensor(step + 1)},
                keep_last=args.keep_last,
            )
    if writer is not None:
        writer.close()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without running interpreter and C++ static teardown: after a finished FSDP2 run a
    # rank now and then aborted there ("terminate called without an active exception", gloo,
    # torch 2.13) and turned a complete run into a failed one. Everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
