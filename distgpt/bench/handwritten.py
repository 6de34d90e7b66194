"""Hand-written training loops, one per strategy, written the way a user would write them with PyTorch / DeepSpeed
directly: the references ``distgpt bench parallel`` holds each distgpt path against.

Each does the same work as distgpt's path for the same job: the same model and data, micro-batches of
``plan.micro_batch_size`` accumulated into one optimizer step over the rank's share, gradient clipping at
``train.grad_clip``, AdamW. Each builder returns a ``step()`` that runs one optimizer step. Nothing here is used by
distgpt's own training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from distgpt.data.loader import DataLoader, TokenDataset, load_tokenizer
from distgpt.model.gpt import GPT
from distgpt.train.objectives.lm import lm_loss

Step = Callable[[], None]


def _model(job) -> GPT:
    torch.manual_seed(job.run.seed)
    return GPT(job.gpt_config(load_tokenizer(job.prepared_dir).vocab_size))


def _loader(job, replicas: int, replica: int) -> DataLoader:
    data = TokenDataset(job.prepared_dir, "train")
    share = job.train.global_batch_size // replicas
    return DataLoader(data, job.train.global_batch_size, job.run.seed, replica, [share] * replicas)


def _groups(model: nn.Module, job, not_decayed: tuple[nn.Parameter, ...] = ()) -> list[dict]:
    """The usual two AdamW groups, written out as a user would: matrices decay; norms, biases and embeddings (and
    ``not_decayed``: a pipeline stage's copy of a tied head) do not. The job asks for this, so a reference with one
    group would do different work (and DeepSpeed flattens and steps each group on its own)."""
    keep = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} | {id(p) for p in not_decayed}
    params = list(model.parameters())  # a tied weight appears once
    decay = [p for p in params if p.dim() >= 2 and id(p) not in keep]
    rest = [p for p in params if not (p.dim() >= 2 and id(p) not in keep)]
    return [{"params": decay, "weight_decay": job.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _adamw(groups: list[dict], job) -> torch.optim.Optimizer:
    t = job.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _accumulating(job, model: nn.Module, opt, loader: DataLoader, no_sync) -> Step:
    """Micro-batches with ``no_sync`` (a context factory) on all but the last, clip, step."""
    micro = job.plan.micro_batch_size

    def step() -> None:
        x, y = loader.next_batch()
        n = -(-len(x) // micro)
        for i in range(n):
            with no_sync() if i < n - 1 else contextlib.nullcontext():
                (lm_loss(model(x[i * micro:(i + 1) * micro]), y[i * micro:(i + 1) * micro]) / n).backward()
        nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ddp(job) -> Step:
    """``DistributedDataParallel`` with ``no_sync`` accumulation."""
    model = nn.parallel.DistributedDataParallel(_model(job))
    return _accumulating(job, model, _adamw(_groups(model, job), job), _loader(job, dist.get_world_size(),
                                                                           dist.get_rank()), model.no_sync)


def fsdp(job) -> Step:
    """``fully_shard`` per block and the root; gradient sync off for all but the last micro-batch."""
    from torch.distributed.fsdp import fully_shard

    model = _model(job)
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        yield
        model.set_requires_gradient_sync(True)

    return _accumulating(job, model, _adamw(_groups(model, job), job), _loader(job, dist.get_world_size(),
                                                                           dist.get_rank()), no_sync)


def zero(job, stage: int) -> Step:
    """``deepspeed.initialize`` with ZeRO ``stage``; DeepSpeed accumulates and steps."""
    import deepspeed

    t, world = job.train, dist.get_world_size()
    micro = job.plan.micro_batch_size
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": t.global_batch_size // world
              // micro, "train_batch_size": t.global_batch_size, "gradient_clipping": t.grad_clip,
              "zero_optimization": {"stage": stage}, "steps_per_print": 2**31 - 1,
              "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2],
                                                        "weight_decay": t.weight_decay, "torch_adam": True}}}
    model = _model(job)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_groups(model, job), config=config,
                                           dist_init_required=False)
    loader = _loader(job, world, dist.get_rank())

    def step() -> None:
        x, y = loader.next_batch()
        for i in range(0, len(x), micro):
            engine.backward(lm_loss(engine(x[i:i + micro]), y[i:i + micro]))
            engine.step()

    return step


def tp(job) -> Step:
    """Megatron-style TP with ``parallelize_module`` over all ranks, vocabulary-parallel head and loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

    mesh = init_device_mesh("cpu" if not torch.cuda.is_available() else "cuda", (dist.get_world_size(),))
    model = _model(job)
    parallelize_module(model, mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        **{f"layers.{k}.{name}": style for k in model.layers for name, style in (
            ("attn.q_proj", ColwiseParallel()), ("attn.k_proj", ColwiseParallel()),
            ("attn.v_proj", ColwiseParallel()), ("attn.o_proj", RowwiseParallel()),
            ("mlp.fc1", ColwiseParallel()), ("mlp.fc2", RowwiseParallel()))},
    })
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    opt = _adamw(_groups(model, job), job)
    loader, micro = _loader(job, 1, 0), job.plan.micro_batch_size

    def step() -> None:
        x, y = loader.next_batch()
        n = -(-len(x) // micro)
        for i in range(n):
            with loss_parallel():
                (lm_loss(model(x[i * micro:(i + 1) * micro]), y[i * micro:(i + 1) * micro]) / n).backward()
        # clip_grad_norm_ takes no mix of DTensor and plain gradients (the norms and position table stay plain)
        groups = [[p for p in model.parameters() if isinstance(p, DTensor) == d] for d in (True, False)]
        norms = [nn.utils.get_total_norm([p.grad for p in g]) for g in groups]
        total = (norms[0].full_tensor() ** 2 + norms[1] ** 2).sqrt()
        for g in groups:
            nn.utils.clip_grads_with_norm_(g, job.train.grad_clip, total)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def pp(job, schedule: str) -> Step:
    """Two stages of ``torch.distributed.pipelining`` (first half of the blocks + embedding, the rest + head), the
    loss on the last stage; the tied head's gradient summed between the two."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(job)
    n = model.cfg.n_layer
    keep = range(rank * n // world, (rank + 1) * n // world)
    for key in list(model.layers):
        if int(key) not in keep:
            del model.layers[key]
    tied = model.cfg.tie_embeddings
    if rank > 0:
        model.tok_emb = model.pos_emb = None
        if tied:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    if rank < world - 1:
        model.norm = model.lm_head = None
    micro, share = job.plan.micro_batch_size, job.train.global_batch_size
    t = job.data.seq_len
    hidden = torch.empty(micro, t, model.cfg.n_embd, device="meta")
    meta = {"input_args": torch.empty(micro, t, dtype=torch.long, device="meta") if rank == 0 else hidden}
    if rank < world - 1:
        meta["output_args"] = hidden
    stage = PipelineStage(model, rank, world, torch.device("cpu"), **meta)
    n_micro = share // micro
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = kind(stage, n_micro, loss_fn=lambda out, y: lm_loss(out, y) / n_micro, scale_grads=False)
    head = (model.lm_head.weight,) if tied and rank == world - 1 else ()
    opt = _adamw(_groups(model, job, head), job)
    loader = _loader(job, 1, 0)
    pair = dist.new_group([0, world - 1]) if tied else None
    shared = model.tok_emb.weight if rank == 0 else model.lm_head.weight if rank == world - 1 else None

    def step() -> None:
        x, y = loader.next_batch()
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y)
        else:
            sched.step()
        if pair is not None and shared is not None:
            dist.all_reduce(shared.grad, group=pair)
        norm = torch.stack([p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None]).sum()
        dist.all_reduce(norm)  # (the tied copy counted twice: a reference loop would not bother either)
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), job.train.grad_clip, norm.sqrt())
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


REFERENCES: dict[str, Callable[[object], Step]] = {
    "ddp": ddp, "fsdp": fsdp, "zero1": lambda j: zero(j, 1), "zero2": lambda j: zero(j, 2),
    "zero3": lambda j: zero(j, 3), "tp": tp, "pp-gpipe": lambda j: pp(j, "gpipe"), "pp-1f1b": lambda j: pp(j, "1f1b"),
}
"""Reference name → builder, for the strategies ``bench parallel`` pairs with them."""
