"""The capacity plan of a config: which GPUs hold what, the memory of each in each phase, and whether it fits.

Layouts (cluster.placement):
  colocated      every trainer GPU also holds an engine (or one tensor-parallel shard of one): the engine reserves
                 rollout.gpu_memory_utilization of the card while the trainer's resident state (weights, master
                 weights, gradients, optimizer states, reference model) stays; during the update the engine sleeps
                 (vLLM sleep mode level 1) and the trainer's activations take the room. This assumes the trainer
                 hands its cached blocks back (torch.cuda.empty_cache()) before the engine wakes; otherwise the
                 rollout phase holds the update phase's peak too.
  disaggregated  trainer GPUs and engine GPUs apart.
Phases: rollout, update, and on GPU the weight sync between them (planning/sync_memory.py, by transport).
A phase fits when its terms sum to at most the card; the engine's own terms must also fit in its reservation.
`ngrpo plan` prints it; `ngrpo train` runs the same check first (enforced when trainer.use_gpu).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ngrpo_ray.config.schema import Config
from ngrpo_ray.core.mixing_spec import engine_width
from ngrpo_ray.distributed.placement import engines_on_trainer_gpus, weight_transport
from ngrpo_ray.planning.engine_memory import EngineSettings, asleep_term, engine_terms, outside_reservation_terms
from ngrpo_ray.planning.headroom import Headroom, format_headroom, max_tokens, utilization_max
from ngrpo_ray.planning.model_shape import ModelShape, read_model_shape
from ngrpo_ray.planning.sync_memory import sync_terms
from ngrpo_ray.planning.terms import DEFAULT_GPU_GIB, GIB, RESIDENT, SYNC, UPDATE, Term, dtype_bytes
from ngrpo_ray.planning.trainer_memory import TrainerSettings, activation_bytes_per_token, trainer_terms, update_peak

DEFAULT_GPUS = 8


@dataclass
class GpuKind:
    """GPUs that hold the same things: their terms and per-phase totals."""

    name: str
    count: int
    terms: list[Term]
    phases: dict[str, float]  # phase -> bytes at its peak


@dataclass
class MemoryPlan:
    layout: str
    gpu_bytes: float
    gpus_available: int
    gpus_needed: int
    enforced: bool  # trainer.use_gpu: the budget is a GPU's
    shape: ModelShape
    kinds: list[GpuKind]
    engine_terms: list[Term]
    engine_reservation: float
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    headroom: Headroom | None = None
    knobs_now: tuple[int | None, float] = (None, 0.0)  # (trainer.max_tokens_per_micro_batch, gpu_memory_utilization)
    trainer_update_bytes: float = 0.0  # one trainer rank's own update peak: its resident and transient terms
    trainer_sync_bytes: float = 0.0  # one trainer rank's own weight-sync peak (rank 0's where ranks differ)
    engine_batch_tokens: int = 0  # the KV cache tokens of one engine's rollout batch (what the KV term counts)

    @property
    def fits(self) -> bool:
        return not self.failures


def micro_batch_tokens(cfg: Config) -> tuple[int, int, str]:
    """(tokens, response tokens, how) of the largest micro-batch the trainer can build."""
    t = cfg.trainer
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if t.max_tokens_per_micro_batch is not None:
        tokens = max(t.max_tokens_per_micro_batch, longest)
        seqs = max(1, tokens // longest)
        how = f"token budget {t.max_tokens_per_micro_batch:,}" + (
            f", raised to one longest sequence {longest:,}" if tokens > t.max_tokens_per_micro_batch else "")
        return tokens, min(tokens, seqs * cfg.rollout.max_new_tokens), how
    b = t.micro_batch_size
    return b * longest, b * cfg.rollout.max_new_tokens, f"{b} sequences x {longest:,} tokens (padded)"


def plan_memory(cfg: Config, gpu_gib: float = DEFAULT_GPU_GIB, gpus: int = DEFAULT_GPUS,
                shape: ModelShape | None = None) -> MemoryPlan:
    t, r, m = cfg.trainer, cfg.rollout, cfg.mixing
    shape = shape or read_model_shape(cfg.model.path, cfg.model.cache_dir)
    b = dtype_bytes(cfg.model.dtype)
    card = gpu_gib * GIB
    notes: list[str] = []
    tp = r.tensor_parallel_size
    if cfg.cluster.placement == "colocated":
        # as distributed.placement seats them: engine ranks on the last trainer GPUs, the rest trainer-only
        gpus_needed, engines = t.num_workers, r.num_engines
        if engines * tp < gpus_needed:
            notes.append(f"colocated: {engines} engine(s) x TP {tp} share GPUs {gpus_needed - engines * tp}.."
                         f"{gpus_needed - 1}; the other {gpus_needed - engines * tp} GPU(s) hold a trainer rank only")
    else:
        engines = r.num_engines
        per_engine_gpus = max(r.engine_gpus, float(tp))
        gpus_needed = t.num_workers + math.ceil(engines * per_engine_gpus)
    tokens, response_tokens, how = micro_batch_tokens(cfg)
    trainer = trainer_terms(TrainerSettings(
        shape=shape, dtype_bytes=b, zero_stage=t.zero_stage, gpus=t.num_workers, micro_batch_tokens=tokens,
        micro_batch_response_tokens=response_tokens, logprob_chunk_tokens=t.logprob_chunk_tokens,
        gradient_checkpointing=t.gradient_checkpointing, ref_model=cfg.algorithm.beta > 0, micro_batch_note=how))
    sequences = math.ceil(t.prompts_per_iteration / engines) * r.group_size
    settings = EngineSettings(
        shape=shape, dtype_bytes=b, tensor_parallel=tp, sequences=sequences,
        sequence_tokens=cfg.data.max_prompt_tokens + r.max_new_tokens, strategy=m.strategy, k=engine_width(dataclasses.asdict(m)),
        table_slots=m.table_slots, max_num_seqs=256 if t.use_gpu else 64, enforce_eager=r.enforce_eager)
    engine = engine_terms(settings)
    outside = outside_reservation_terms(settings)
    beside = sum(x.bytes for x in outside)

    reservation = r.gpu_memory_utilization * card
    reserve = Term("engine", f"reservation ({r.gpu_memory_utilization:.2f} x card)", reservation, "rollout",
                   "rollout.gpu_memory_utilization x the card (holds the engine terms below)")
    resident = sum(x.bytes for x in trainer if x.phase == RESIDENT)
    peak = update_peak(trainer)
    transport = weight_transport(cfg.cluster.sync_backend, t.use_gpu,
                                 engines_on_trainer_gpus(cfg.cluster.placement, t.use_gpu))
    trainer_sync, engine_sync = sync_terms(shape, b, transport, cfg.cluster.sync_bucket_mb << 20, t.zero_stage == 3,
                                           tp)
    sync = resident + sum(x.bytes for x in trainer_sync)
    search = sum(x.bytes for x in outside if x.name == "neighbor search (weight load)")  # at every load
    loading = sum(x.bytes for x in engine_sync)
    on_sync = lambda total: {SYNC: total} if trainer_sync else {}  # noqa: E731 - gloo: host memory, no GPU phase
    kinds: list[GpuKind] = []
    if cfg.cluster.placement == "colocated":
        asleep = asleep_term(r.enforce_eager, outside)
        shared = min(gpus_needed, engines * tp)
        kinds.append(GpuKind("trainer rank + engine", shared, trainer + [reserve, *outside, asleep] + trainer_sync
                             + engine_sync, {"rollout": resident + reservation + beside,
                                             "update": resident + peak + asleep.bytes,
                                             **on_sync(sync + asleep.bytes + loading + search)}))
        if gpus_needed > shared:
            kinds.append(GpuKind("trainer rank", gpus_needed - shared, trainer + trainer_sync,
                                 {"update": resident + peak, **on_sync(sync)}))
    else:
        kinds.append(GpuKind("trainer rank", t.num_workers, trainer + trainer_sync,
                             {"update": resident + peak, **on_sync(sync)}))
        kept = sum(x.bytes for x in outside if x.name != "mixing hook step")  # the search included; no decode step
        kinds.append(GpuKind("engine", gpus_needed - t.num_workers, [reserve, *outside, *engine_sync],
                             {"rollout": reservation + beside, **on_sync(reservation + kept + loading)}))
    plan = MemoryPlan(cfg.cluster.placement, card, gpus, gpus_needed, t.use_gpu, shape, kinds, engine, reservation,
                      notes=notes, knobs_now=(t.max_tokens_per_micro_batch, r.gpu_memory_utilization),
                      trainer_update_bytes=resident + peak, trainer_sync_bytes=sync if trainer_sync else 0.0,
                      engine_batch_tokens=settings.sequences * settings.sequence_tokens)
    _check(plan)
    per_token = activation_bytes_per_token(shape, b, t.gradient_checkpointing)
    trainer_kinds = [k for k in kinds if "update" in k.phases]  # engine-only GPUs have no update phase
    engine_kinds = [k for k in kinds if "rollout" in k.phases]
    plan.headroom = Headroom(
        max_tokens=min((max_tokens(k.terms, card, per_token) for k in trainer_kinds), default=None),
        longest_sequence=cfg.data.max_prompt_tokens + r.max_new_tokens,
        utilization_min=sum(x.bytes for x in engine) / card if engine_kinds else None,
        utilization_max=min((utilization_max(_reservation_peak(k), reservation, card) for k in engine_kinds),
                            default=None))
    return plan


def _reservation_peak(kind: GpuKind) -> float:
    """The largest phase that holds the engine's whole reservation: the rollout, and on an engine's own GPU (awake
    through the load) the weight sync too; a colocated engine loads with its KV cache asleep."""
    return max(kind.phases["rollout"], kind.phases.get(SYNC, 0.0)) if kind.name == "engine" else kind.phases["rollout"]


def plan_params(plan: MemoryPlan) -> dict[str, str]:
    """The plan's figures (GiB) as MLflow params of the training run, beside what it measures: a trainer rank's own
    update peak is what `memory/update_peak_allocated_gib` measures on a GPU (training.peak_memory), its weight-sync
    peak what `memory/sync_peak_allocated_gib` does (GPU transports only); the per-GPU
    phase peaks add the colocated engine's share; the KV tokens of one engine's rollout batch face the engines'
    `engine.kv_cache_tokens` (vLLM's KV cache, sized from what its reservation left: fewer means preemptions)."""
    gib = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    params = {"memory_plan.card_gib": f"{plan.gpu_bytes / GIB:g}", "memory_plan.fits": str(plan.fits),
              "memory_plan.trainer_update_gib": gib(plan.trainer_update_bytes),
              "memory_plan.engine_reservation_gib": gib(plan.engine_reservation),
              "memory_plan.engine_terms_gib": gib(sum(x.bytes for x in plan.engine_terms)),
              "memory_plan.engine_batch_kv_tokens": str(plan.engine_batch_tokens)}
    if plan.trainer_sync_bytes:
        params["memory_plan.trainer_sync_gib"] = gib(plan.trainer_sync_bytes)
    for kind in plan.kinds:
        slug = kind.name.replace(" + ", "_and_").replace(" ", "_")
        params.update({f"memory_plan.{slug}.{phase}_gib": gib(total) for phase, total in kind.phases.items()})
    return params


def _largest(terms: list[Term], phase: str) -> Term:
    live = [x for x in terms if x.phase in (RESIDENT, phase)]
    return max(live, key=lambda x: x.bytes)


def _check(plan: MemoryPlan) -> None:
    card = plan.gpu_bytes / GIB
    if plan.gpus_needed > plan.gpus_available:
        plan.failures.append(f"GPUs: the layout needs {plan.gpus_needed} GPUs, {plan.gpus_available} available")
    for kind in plan.kinds:
        for phase, total in kind.phases.items():
            if total > plan.gpu_bytes:
                big = _largest(kind.terms, phase)
                plan.failures.append(
                    f"{kind.name}, {phase} phase: {total / GIB:.1f} GiB > {card:g} GiB; largest term: "
                    f"{big.owner} {big.name} {big.gib:.1f} GiB ({big.formula})")
    need = sum(x.bytes for x in plan.engine_terms)
    if need > plan.engine_reservation:
        big = max(plan.engine_terms, key=lambda x: x.bytes)
        plan.failures.append(
            f"engine: its terms need {need / GIB:.1f} GiB > its reservation {plan.engine_reservation / GIB:.1f} GiB "
            f"(rollout.gpu_memory_utilization x {card:g} GiB); largest term: {big.name} {big.gib:.1f} GiB "
            f"({big.formula})")


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    s = plan.shape
    card = plan.gpu_bytes / GIB
    lines = [f"memory plan{(' of ' + title) if title else ''}: {plan.layout}, {plan.gpus_needed} GPU(s) needed of "
             f"{plan.gpus_available} x {card:g} GiB",
             f"model: {s.params() / 1e9:.2f}B parameters, hidden {s.hidden}, intermediate {s.intermediate}, "
             f"{s.layers} layers, {s.heads} heads, {s.kv_heads} kv heads, vocab {s.vocab:,} ({s.source})"]
    lines += [f"note: {n}" for n in plan.notes]
    for kind in plan.kinds:
        lines.append("")
        lines.append(f"{kind.count} x GPU holding: {kind.name}")
        lines.append(f"  {'term':<42} {'GiB/GPU':>8}  {'phase':<9} how")
        for x in kind.terms:
            lines.append(f"  {x.owner + ' ' + x.name:<42} {x.gib:>8.2f}  {x.phase:<9} {x.formula}")
        for phase, total in kind.phases.items():
            ok = "fits" if total <= plan.gpu_bytes else "DOES NOT FIT"
            lines.append(f"  {phase + ' phase peak':<42} {total / GIB:>8.2f}  of {card:g} GiB: {ok}")
    lines.append("")
    lines.append(f"inside each engine's reservation ({plan.engine_reservation / GIB:.2f} GiB):")
    for x in plan.engine_terms:
        lines.append(f"  {'engine ' + x.name:<42} {x.gib:>8.2f}  {x.formula}")
    need = sum(x.bytes for x in plan.engine_terms)
    lines.append(f"  {'engine total':<42} {need / GIB:>8.2f}  of {plan.engine_reservation / GIB:.2f} GiB: "
                 f"{'fits' if need <= plan.engine_reservation else 'DOES NOT FIT'}")
    lines.append("")
    if plan.headroom is not None and plan.enforced:  # a CPU run has no card to fill
        lines += format_headroom(plan.headroom, *plan.knobs_now)
    if plan.fits:
        lines.append("plan: fits")
    else:
        lines += [f"does not fit: {f}" for f in plan.failures]
    if not plan.enforced:
        lines.append("(trainer.use_gpu is false: a CPU run; the GPU budget is not enforced)")
    return "\n".join(lines)
