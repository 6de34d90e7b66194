"""Typed job configuration: TOML or YAML files in ``jobs/`` plus ``--section.key=value`` overrides.

Every problem (unknown key, wrong type, impossible value) is reported at once, each naming the key and the fix, as
one ``ConfigError``; nothing is written before a config validates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distgpt.config_files import ConfigWarning as ConfigWarning  # re-exported: job-file warnings
from distgpt.config_files import as_written, merge, migrate, parse_overrides, read_file
from distgpt.config_schema import ConfigError, build
from distgpt.model.config import GPTConfig
from distgpt.model.presets import PRESETS, preset
from distgpt.planner.cost import Workload
from distgpt.planner.plan import Plan
from distgpt.rl.config import RLSection, rl_problems

MOVED = {("train", "micro_batch_size"): ("plan", "micro_batch_size"), ("train", "dtype"): ("plan", "dtype")}
"""Keys that moved (old section, key) → (new section, key): the Plan owns how a batch is cut and its precision.
Job files that still set the old keys are migrated with a ``ConfigWarning``; errors name the key as written."""


@dataclass
class RunSection:
    """Identity and output of a run."""

    name: str = "run"
    """Run name; also the default output directory runs/<name>."""
    out_dir: str = ""
    """Where logs and checkpoints go (default: runs/<name>)."""
    seed: int = 1337
    """Seed for initialisation, dropout and the data order."""


@dataclass
class ModelSection:
    """The model: a preset plus any field of GPTConfig to override (unset fields keep the preset's)."""

    preset: str = "tiny"
    """One of: tiny, small, gpt2-124m, gpt2-350m, gpt2-1.3b, 6.7b, 13b."""
    vocab_size: int = 0
    """0: the tokenizer's vocabulary size."""
    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    ffn_mult: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    pos_encoding: Literal["learned", "sinusoidal", "rotary"] | None = None
    activation: Literal["gelu", "relu"] | None = None
    tie_embeddings: bool | None = None


@dataclass
class DataSection:
    """The corpus and how it is tokenized and cut into samples."""

    sources: list[str] = field(default_factory=lambda: ["builtin:python-stdlib"])
    """Files, directories or URIs (.txt/.md/.py, .jsonl, .parquet); 'builtin:python-stdlib' for Python's own source."""
    prepared: str = ""
    """Where the prepared dataset lives (default: data/<run.name>). Prepared on first use if missing."""
    tokenizer: Literal["bpe", "byte"] = "bpe"
    """Byte-level BPE trained on the corpus, or plain UTF-8 bytes."""
    vocab_size: int = 4096
    """BPE vocabulary size (ignored for 'byte', which has 257)."""
    seq_len: int = 0
    """Tokens per training sample; at most model.block_size (0: model.block_size)."""
    val_fraction: float = 0.05
    """Share of the token stream (its tail) held out for validation."""
    text_field: str = "text"
    """Field holding the text in .jsonl objects and .parquet columns."""
    max_bytes: int = 0
    """Read at most this many bytes of text (0: everything)."""
    shard_samples: int = 100_000
    """Samples per Arrow shard."""
    format: Literal["text", "chat"] = "text"
    """'text': documents joined into one token stream; 'chat': conversations (.jsonl/.parquet with 'messages' or
    'prompt'/'response', or builtin:chatterbot/<language>) rendered with the chat template, one row each."""
    packing: bool = False
    """chat: pack several conversations per row (attention and positions stay inside each) instead of padding."""
    mix: dict[str, float] = field(default_factory=dict)
    """Other prepared datasets (their data.prepared) → the share of every global batch drawn from each, e.g.
    {"data/demo" = 0.2} replays 20% of the original language while continuing pre-training on a new one. Same
    seq_len and columns; the job's own dataset gets the rest. Validation reports a loss per dataset."""


@dataclass
class TrainSection:
    """Optimisation and the training loop."""

    max_steps: int = 1000
    """Optimizer steps to run."""
    global_batch_size: int = 32
    """Samples per optimizer step, summed over data-parallel ranks and micro-batches."""
    lr: float = 6e-4
    """Peak learning rate (reached after warm-up)."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (never applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    eval_interval: int = 200
    """Evaluate on the validation split every this many steps (0: only at the end)."""
    eval_batches: int = 10
    """Validation batches (of global_batch_size samples) per evaluation."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files next to the JSONL log."""
    progress: bool = True
    """Show a progress bar on the terminal."""
    save_final: bool = True
    """Write the final model directory (<out_dir>/final) at the end. A tune's trials measure and write nothing."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU (0: look up the GPU, or measure a matmul on CPU)."""
    threads: int = 0
    """torch intra-op threads on CPU (0: torch's default)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', or 'cuda'."""
    attention: str = "auto"
    """Attention kernels: 'auto' (PyTorch SDPA's choice: flash / memory-efficient where the device has them),
    'flash' (only kernels that never store the T×T scores), 'math' (the explicit kernel, which stores them). The
    planner's memory model follows it ('auto': the device type's ``flash_attention``)."""


@dataclass
class ObjectiveSection:
    """What training minimises: the objective says what a batch holds (tokens, targets, loss mask, weights) and
    its loss. The engines shard, step and reduce whatever loss it defines."""

    kind: str = "lm"
    """'lm' (next-token prediction on every position), 'sft' (conversations: loss on the assistant's tokens), 'pg'
    (reinforcement learning: policy gradient on the rollouts of [rl]), or
    'package.module:Class' for your own objective (a subclass of distgpt.train.objectives.base.Objective)."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """sft: which targets count — the assistant's tokens, or every token of the conversation."""
    kl_coef: float = 0.02
    """pg: β of the KL penalty against the frozen reference model (the init.from weights); 0: no penalty."""
    clip_eps: float = 0.2
    """pg: PPO clip of the importance ratio π/π_old to [1 − ε, 1 + ε] (0: no clip)."""


@dataclass
class InitSection:
    """Start from a trained model instead of random weights (fine-tuning, continued pre-training)."""

    from_: str = ""
    """Written ``from``: a checkpoint root (its latest commit), a run's final/ directory or an export, any URI.
    Weights load into any Plan; the optimizer and schedule start fresh; data is tokenized with the model's
    tokenizer. A larger vocabulary (new special or language tokens) gets new rows: the mean of the old ones."""


@dataclass
class SampleSection:
    """The text sample printed after training."""

    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95


@dataclass
class CheckpointSection:
    """Sharded checkpoints (any pyarrow URI: s3://, gs://, file://, a path)."""

    uri: str = ""
    """Checkpoint root (default: <out_dir>/checkpoints)."""
    interval: int = 0
    """Save every this many steps (0: never)."""
    keep_last: int = 3
    """Committed checkpoints to keep."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from the latest committed checkpoint under uri, if any."""
    fallback: bool = False
    """On a corrupt latest checkpoint, load the previous good one instead of stopping."""
    async_save: bool = True
    """Snapshot to host memory and upload in the background while training continues (one save in flight)."""
    async_upload: Literal["process", "thread"] = "process"
    """Who serialises and uploads an async save: 'process', a background process per rank (shares no GIL with
    training; stages one copy of the rank's state in /dev/shm), or 'thread', a thread of the training process."""
    outage_wait_s: float = 600.0
    """How long a run waits for unreachable checkpoint storage at start-up and on resume (saying so) before failing.
    A save that fails — after its retries — fails that save only: training goes on and the next save tries again."""
    trust_pickled_metadata: bool = False
    """Resume from a checkpoint an earlier distgpt wrote, whose index is DCP's pickle (unpickling runs any code the
    file holds: only for checkpoints you trust). Saves always write the index as JSON."""


@dataclass
class ClusterSection:
    """Where and how the job runs when launched on Ray (ignored under torchrun or with launcher='local')."""

    launcher: Literal["auto", "ray", "local"] = "auto"
    """'auto': plain processes under torchrun, else Ray; 'ray': always Ray; 'local': this one process."""
    address: str = ""
    """Ray cluster to join ('' → $RAY_ADDRESS, else an embedded local cluster on 127.0.0.1)."""
    plan: Literal["job", "auto"] = "job"
    """'job': the [plan] section as written; 'auto': the planner picks one for the cluster Ray reports; or a Plan
    JSON file (`distgpt plan --save`, a tune's best_plan.json): that Plan replaces the [plan] section."""
    max_failures: int = 3
    """Recoveries (restart or re-plan) allowed before the run fails."""
    hang_timeout_s: float = 300.0
    """Watchdog: a step that makes no progress for this long counts as a hang (a stuck collective)."""
    start_timeout_s: float = 300.0
    """How long to wait for resources (the autoscaler may be adding nodes) before saying what is missing."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per rank (on CPU clusters a rank is one CPU slot)."""
    embedded_cpus: int = 0
    """Logical CPUs of the embedded local cluster (0: this machine's core count)."""
    inject: list[str] = field(default_factory=list)
    """Fault injection for drills and tests: 'kill@STEP:RANK', 'hang@STEP:RANK', 'preempt@STEP:RANK'."""
    node_types: str = "auto"
    """The autoscaler's node types: a cluster-launcher YAML or KubeRay RayCluster manifest. With them, the plan is
    made for the cluster those types can grow to (``cluster.plan = "auto"``), checked to fit them before anything is
    reserved, and its placement groups ask for their device types even before such a node exists. 'auto': the
    launcher's ``~/ray_bootstrap_config.yaml`` when the driver runs on a launched head; 'none': only the nodes up."""
    grow: Literal["ignore", "replan"] = "ignore"
    """Nodes that join during a run: 'replan' re-plans onto the larger cluster at the next checkpoint when the
    planner predicts a faster plan there (with ``cluster.plan = "auto"``); 'ignore' keeps the running plan."""
    grow_check_s: float = 10.0
    """How often the controller looks for joined nodes (with grow = 'replan')."""
    grow_min_gain: float = 0.1
    """Re-plan on growth only if the planner predicts at least this much more throughput (0.1: 10 %)."""


@dataclass
class JobConfig:
    """A whole job file."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    init: InitSection = field(default_factory=InitSection)
    plan: Plan = field(default_factory=Plan)
    """How the job is sharded over ranks (see distgpt/planner/plan.py); the default is one process."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    rl: RLSection = field(default_factory=RLSection)
    """Reinforcement-learning fine-tuning (used by ``objective.kind = "pg"``)."""

    @property
    def checkpoint_uri(self) -> str:
        """Resolved checkpoint root."""
        return self.checkpoint.uri or f"{self.out_dir}/checkpoints"

    @property
    def out_dir(self) -> str:
        """Resolved output directory."""
        return self.run.out_dir or f"runs/{self.run.name}"

    @property
    def prepared_dir(self) -> str:
        """Resolved prepared-data location."""
        return self.data.prepared or f"data/{self.run.name}"

    @property
    def seq_len(self) -> int:
        """Resolved tokens per sample."""
        return self.data.seq_len or self.gpt_config().block_size

    def workload(self) -> Workload:
        """What the planner needs of this job: model shape, global batch, sequence length, precision."""
        vocab = self.model.vocab_size or (257 if self.data.tokenizer == "byte" else self.data.vocab_size)
        flash = {"flash": True, "math": False}.get(self.train.attention)
        return Workload(self.gpt_config(vocab), self.train.global_batch_size, self.seq_len, self.plan.dtype, flash)

    def gpt_config(self, tokenizer_vocab: int | None = None) -> GPTConfig:
        """The model's GPTConfig: the preset, the overrides, and the tokenizer's vocabulary where vocab_size is 0."""
        over = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)}
        over = {k: v for k, v in over.items() if v is not None and k != "preset"}
        if over.get("vocab_size", 0) == 0:
            over.pop("vocab_size", None)
            if tokenizer_vocab is not None:
                over["vocab_size"] = tokenizer_vocab
        return preset(self.model.preset, **over)


def public_dict(job: JobConfig) -> dict[str, Any]:
    """The job as plain dicts with every URI redacted (no query strings or user info): safe for logs and metadata."""
    from distgpt.config_schema import to_dict
    from distgpt.storage import redact

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return redact(v) if isinstance(v, str) and "://" in v else v

    return clean(to_dict(job))


def load_job(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:  # type: ignore[assignment]
    """Load, override and validate a job. Raises ConfigError listing every problem."""
    source = str(path) if path else "defaults"
    problems: list[str] = []
    moved: dict[str, str] = {}
    data = migrate(read_file(Path(path)) if path else {}, MOVED, source, problems, moved)
    data = merge(data, migrate(parse_overrides(list(overrides)), MOVED, "overrides", problems, moved))
    job = _build_job(data, problems)
    problems += validate(job)
    if problems:
        raise ConfigError([as_written(p, moved) for p in problems], source)
    return job


def _build_job(data: dict[str, Any], problems: list[str]) -> JobConfig:
    known = [f.name for f in dataclasses.fields(JobConfig)]
    for key in data:
        if key not in known:
            problems.append(f"{key}: unknown section — sections are {', '.join(known)}")
    plan = data.get("plan")
    if plan == "auto" or (isinstance(plan, dict) and plan.pop("__auto__", False)):
        # shorthand: plan = "auto" ≡ [cluster] plan = "auto" (keys moved into [plan] still apply: the planner
        # keeps the job's precision)
        plan = {} if plan == "auto" else plan
        data = {**data, "plan": plan, "cluster": {**data.get("cluster", {}), "plan": "auto"}}
    data = _plan_file(data, problems)
    sections = {}
    hints = {"run": RunSection, "model": ModelSection, "data": DataSection, "train": TrainSection,
             "sample": SampleSection, "objective": ObjectiveSection, "init": InitSection, "plan": Plan,
             "checkpoint": CheckpointSection, "cluster": ClusterSection, "rl": RLSection}
    for name, cls in hints.items():
        sections[name] = build(cls, data.get(name, {}), name, problems)
    return JobConfig(**sections)


def _plan_file(data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """``cluster.plan = "path.json"``: the file's Plan becomes the [plan] section (and cluster.plan 'job')."""
    cluster = data.get("cluster")
    name = cluster.get("plan") if isinstance(cluster, dict) else None
    if not isinstance(name, str) or name in ("job", "auto"):
        return data
    try:
        plan = json.loads(Path(name).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(f"cluster.plan: {name!r} is not 'job', 'auto' or a readable Plan JSON file ({e}) — write one "
                        f"with `distgpt plan JOB --inventory … --save FILE` or `distgpt tune JOB` (best_plan.json)")
        return {**data, "cluster": {**cluster, "plan": "job"}}
    if not isinstance(plan, dict):
        problems.append(f"cluster.plan: {name} holds no Plan (a JSON object) — write one with `distgpt plan --save`")
        plan = {}
    return {**data, "plan": plan, "cluster": {**cluster, "plan": "job"}}


def validate(job: JobConfig) -> list[str]:
    """Impossible values and inconsistencies between sections, each as 'key: problem — fix'."""
    p: list[str] = []
    t, d = job.train, job.data
    if job.model.preset not in PRESETS:
        p.append(f"model.preset: unknown preset {job.model.preset!r} — choose one of {', '.join(PRESETS)}")
        return p
    vocab = 257 if d.tokenizer == "byte" else d.vocab_size
    gpt = job.gpt_config(vocab)
    p += [f"model.{msg}" for msg in gpt.problems()]
    if job.model.vocab_size and job.model.vocab_size < vocab:
        p.append(f"model.vocab_size: {job.model.vocab_size} is smaller than the tokenizer's {vocab} — use 0 (auto)")
    positive = {"train.max_steps": t.max_steps, "train.global_batch_size": t.global_batch_size,
                "train.eval_batches": t.eval_batches, "train.log_interval": t.log_interval,
                "data.shard_samples": d.shard_samples, "sample.max_new_tokens": job.sample.max_new_tokens}
    p += [f"{k}: must be ≥ 1, got {v}" for k, v in positive.items() if v < 1]
    if d.seq_len < 0:
        p.append(f"data.seq_len: must be ≥ 0 (0: model.block_size), got {d.seq_len}")
    if d.seq_len > gpt.block_size:
        p.append(f"data.seq_len: {d.seq_len} exceeds model.block_size {gpt.block_size} — lower data.seq_len "
                 f"or raise model.block_size")
    if t.lr <= 0 or not 0 <= t.min_lr <= t.lr:
        p.append(f"train.lr / train.min_lr: need 0 ≤ min_lr ≤ lr and lr > 0, got lr={t.lr}, min_lr={t.min_lr}")
    if t.warmup_steps < 0 or t.eval_interval < 0 or t.weight_decay < 0 or t.grad_clip < 0:
        p.append("train.warmup_steps / eval_interval / weight_decay / grad_clip: must not be negative")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            p.append(f"train.{name}: must be in [0, 1), got {getattr(t, name)}")
    if t.device not in ("auto", "cpu", "cuda"):
        p.append(f"train.device: {t.device!r} — use 'auto', 'cpu' or 'cuda'")
    if t.attention not in ("auto", "flash", "math"):
        p.append(f"train.attention: {t.attention!r} — use 'auto', 'flash' or 'math'")
    if not 0 <= d.val_fraction <= 0.5:
        p.append(f"data.val_fraction: must be in [0, 0.5], got {d.val_fraction}")
    if d.tokenizer == "bpe" and d.vocab_size < 258:
        p.append(f"data.vocab_size: BPE needs at least 258 tokens, got {d.vocab_size}")
    if any(not 0 < f < 1 for f in d.mix.values()) or sum(d.mix.values()) >= 1:
        p.append(f"data.mix: shares {d.mix} must each be in (0, 1) and leave a share for the job's own data")
    if not d.sources:
        p.append("data.sources: empty — name at least one file, directory, URI or 'builtin:python-stdlib'")
    p += [f"plan.{msg}" for msg in job.plan.problems(gpt, None, t.global_batch_size)]
    p += _objective_problems(job)
    p += rl_problems(job)
    c = job.checkpoint
    if c.interval < 0 or c.keep_last < 1 or c.keep_every < 0:
        p.append("checkpoint: need interval ≥ 0 (0: off), keep_last ≥ 1, keep_every ≥ 0")
    p += _cluster_problems(job.cluster)
    if job.sample.temperature < 0 or not 0 < job.sample.top_p <= 1 or job.sample.top_k < 0:
        p.append("sample: need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0")
    return p


def _objective_problems(job: JobConfig) -> list[str]:
    from distgpt.train.objectives import NAMES

    o, p = job.objective, []
    if not (o.kind in NAMES or (":" in o.kind and all(part.strip() for part in o.kind.split(":", 1)))):
        p.append(f"objective.kind: unknown objective {o.kind!r} — use one of {', '.join(NAMES)}, or "
                 f"'package.module:Class' for your own")
    if o.kind == "sft" and job.data.format != "chat":
        p.append("objective.kind: 'sft' trains on conversations — set data.format = 'chat'")
    if job.data.packing and job.data.format != "chat":
        p.append("data.packing: packs conversations — set data.format = 'chat' (text is already one stream)")
    if job.data.packing and job.plan.pp > 1:
        p.append("data.packing: pipeline stages pass only hidden states, not the segments of packed rows — set "
                 "data.packing = false or plan.pp = 1")
    return p


def _cluster_problems(c: ClusterSection) -> list[str]:
    from distgpt.recovery.faults import FaultError, parse_faults

    p = []
    if c.max_failures < 0 or c.hang_timeout_s <= 0 or c.start_timeout_s <= 0 or c.cpus_per_worker <= 0:
        p.append("cluster: need max_failures ≥ 0 and positive hang_timeout_s, start_timeout_s, cpus_per_worker")
    if c.grow_check_s <= 0 or c.grow_min_gain < 0:
        p.append("cluster: need grow_check_s > 0 and grow_min_gain ≥ 0")
    try:
        parse_faults(c.inject)
    except FaultError as e:
        p.append(f"cluster.inject: {e}")
    return p
