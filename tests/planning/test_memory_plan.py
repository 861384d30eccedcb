"""`ngrpo plan`: the capacity plan of every preset (no Ray, no vLLM, no hub), its refusals, and its numbers checked
by hand, against a meta-device model, and against the peak measured on an H200 (shared/notes/gpu-facts.md)."""

import dataclasses
import json
import math

import pytest
import torch

from ngrpo_ray.cli import main
from ngrpo_ray.config import load_config
from ngrpo_ray.config.load import PRESET_DIR
from ngrpo_ray.planning import plan_memory, plan_params
from ngrpo_ray.planning.engine_memory import EngineSettings, outside_reservation_terms
from ngrpo_ray.planning.model_shape import SHAPES_DIR, ModelShape, read_model_shape
from ngrpo_ray.planning.terms import GIB
from ngrpo_ray.planning.trainer_memory import activation_bytes_per_token, update_peak

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
GPU_PRESETS = [p for p in PRESETS if load_config(p).trainer.use_gpu and p != "paper_base"]


def _terms(plan, owner=None):
    return {t.name: t for t in plan.kinds[0].terms if owner is None or t.owner == owner}


@pytest.mark.parametrize("preset", PRESETS)
def test_plan_runs_for_every_preset(preset, capsys):
    rc = main(["plan", "--config", preset])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "plan: fits" in out and "GiB/GPU" in out


def test_every_paper_preset_fits_one_node_of_8x80gb():
    """An 80 GB card as CUDA counts it: 79.15 GiB (H100; the A100's 79.35 GiB is more)."""
    assert len(GPU_PRESETS) >= 20
    for preset in GPU_PRESETS:
        plan = plan_memory(load_config(preset), gpu_gib=79.15, gpus=8)
        assert plan.fits and plan.gpus_needed <= 8, (preset, plan.failures)
        assert plan.layout == "colocated"
        for kind in plan.kinds:
            assert all(total <= 79.15 * GIB for total in kind.phases.values()), preset


def test_a_micro_batch_that_cannot_fit_is_refused_with_its_number(capsys):
    overrides = ["trainer.max_tokens_per_micro_batch=200000", "trainer.gradient_checkpointing=false"]
    rc = main(["plan", "--config", "r1_distill_1p5b_ngrpo", *overrides])
    captured = capsys.readouterr()
    assert rc == 1
    shape = read_model_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    activations = 200_000 * activation_bytes_per_token(shape, 2, checkpointing=False) / GIB
    assert f"largest term: trainer activations {activations:.1f} GiB" in captured.out
    assert f"{activations:.1f} GiB" in captured.err and "refused" in captured.err
    # `ngrpo train` runs the same check first and starts nothing (it would need Ray and the model otherwise)
    assert main(["train", "--config", "r1_distill_1p5b_ngrpo", *overrides]) == 1
    assert "refused" in capsys.readouterr().err


def test_a_bigger_card_or_checkpointing_makes_it_fit():
    big = ["trainer.max_tokens_per_micro_batch=200000", "trainer.gradient_checkpointing=false"]
    assert not plan_memory(load_config("r1_distill_1p5b_ngrpo", big)).fits
    assert plan_memory(load_config("r1_distill_1p5b_ngrpo", big), gpu_gib=700).fits
    assert plan_memory(load_config("r1_distill_1p5b_ngrpo", big[:1])).fits  # the preset's checkpointing


def test_nine_gpus_do_not_fit_a_node():
    plan = plan_memory(load_config("r1_distill_1p5b_ngrpo", ["cluster.placement=disaggregated",
                                                                "rollout.num_engines=1"]), gpus=8)
    assert plan.gpus_needed == 9 and any("needs 9 GPUs, 8 available" in f for f in plan.failures)


@pytest.mark.parametrize("path", sorted(p.stem.replace("--", "/") for p in SHAPES_DIR.glob("*.json")))
def test_parameter_count_equals_the_model_built_on_the_meta_device(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((SHAPES_DIR / f"{path.replace('/', '--')}.json").read_text())
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(raw).params() == sum(p.numel() for p in model.parameters())


def test_terms_by_hand_r1_1p5b():
    """R1-Distill-Qwen-1.5B (1,777,088,000 parameters, untied head) on 8 GPUs, ZeRO-2, bf16, colocated."""
    plan = plan_memory(load_config("r1_distill_1p5b_ngrpo"))
    P = 1_777_088_000
    assert plan.shape.params() == P
    t = _terms(plan, "trainer")
    assert t["weights"].bytes == P * 2
    assert t["fp32 master weights"].bytes == P * 4 / 8
    assert t["optimizer states (AdamW)"].bytes == P * 8 / 8
    assert t["gradients"].bytes == P * 4 / 8 + 5e8 * 2  # accumulated in fp32, reduced in bf16
    assert t["reference model"].bytes == P * 2  # beta 0.001
    assert t["log-softmax chunk"].bytes == 1024 * 151_936 * 14
    # checkpointed: each layer's input (2 x 1536 B) for 28 layers + one layer recomputed + the final norm
    layer = 2 * 6 * 1536 + 2 * (3 * 12 * 128 + 2 * 2 * 128) + 4 * 12 + 4 * 2 * 8960
    assert layer == 100_400
    assert t["activations"].bytes == 69_632 * (28 * 2 * 1536 + layer + 6 * 1536)
    e = {x.name: x for x in plan.engine_terms}
    # 64 prompts / 8 engines x 4 samples = 32 sequences of 4,096 + 8,192 tokens; K and V: 28 x 2 x 2 heads x 128 x 2 B
    assert e["KV cache (rollout batch)"].bytes == 32 * 12_288 * 28 * 2 * 2 * 128 * 2
    assert e["weights"].bytes == P * 2
    slots = (1 << 20) + 1
    assert e["mixing hook tables"].bytes == slots * (8 + 12 * 4 + 12)  # buffers of the embedding: vLLM counts them
    # allocated at install, after vLLM sized its KV cache: on the card beside the reservation
    g = _terms(plan, "engine")
    assert g["neighbor table"].bytes == 151_936 * 4 * 8
    assert g["neighbor search (weight load)"].bytes == 151_936 * 1536 * 4 + 512 * 151_936 * 4  # fp32 keys + a chunk
    # temperature 0.7: the tempered fp32 logits of 256 rows and their normaliser's pass, which vLLM's profile misses
    assert g["mixing hook step"].bytes == 2 * 256 * 151_936 * 4
    assert g["asleep (context, graphs, neighbors)"].bytes == GIB + 151_936 * 4 * 8  # the table stays, the keys go
    resident = sum(x.bytes for x in plan.kinds[0].terms if x.phase == "resident")
    card = 79.15 * GIB  # an H100 80 GB as CUDA counts it
    assert plan.gpu_bytes == card
    assert plan.kinds[0].phases["rollout"] == (resident + 0.6 * card + 151_936 * 4 * 8 + 151_936 * 2048 * 4
                                               + 2 * 256 * 151_936 * 4)
    # the weight sync (vLLM's ipc, colocated): each rank's one IPC buffer holds the largest tensor, the embedding
    # (above the 64 MiB bucket); the engine wakes its weights, clones a chunk and materializes one module at a time
    embedding = 151_936 * 1536 * 2
    assert t["weight-sync IPC buffer"].bytes == embedding and "ZeRO-3 gather (sync)" not in t  # ZeRO-2: whole
    assert g["weights (woken for the load)"].bytes == P * 2
    assert g["weight load"].bytes == embedding + embedding
    assert plan.kinds[0].phases["sync"] == (resident + embedding + GIB + 151_936 * 4 * 8 + P * 2 + 2 * embedding
                                            + 151_936 * 2048 * 4)  # + the sleeping engine, the neighbor search
    assert plan.trainer_sync_bytes == resident + embedding


def test_plan_params_are_the_figures_a_run_measures_against_r1_1p5b():
    """What a training run logs to MLflow beside its measured memory/* metrics and vLLM's KV cache size."""
    plan = plan_memory(load_config("r1_distill_1p5b_ngrpo"))
    (shared,) = plan.kinds  # every GPU holds a trainer rank and an engine
    assert shared.count == 8
    trainer = [x for x in shared.terms if x.owner == "trainer"]
    own = sum(x.bytes for x in trainer if x.phase == "resident") + update_peak(trainer)
    assert plan.trainer_update_bytes == own
    asleep = {x.name: x for x in shared.terms}["asleep (context, graphs, neighbors)"]
    assert shared.phases["update"] == own + asleep.bytes  # the sleeping engine's share beside the rank's own
    assert plan_params(plan) == {
        "memory_plan.card_gib": "79.15", "memory_plan.fits": "True",
        "memory_plan.trainer_update_gib": f"{own / GIB:.2f}",
        "memory_plan.engine_reservation_gib": f"{0.6 * 79.15:.2f}",
        "memory_plan.engine_terms_gib": f"{sum(x.bytes for x in plan.engine_terms) / GIB:.2f}",
        "memory_plan.engine_batch_kv_tokens": str(32 * 12_288),  # the KV term's 32 sequences of 4,096 + 8,192
        "memory_plan.trainer_rank_and_engine.rollout_gib": f"{shared.phases['rollout'] / GIB:.2f}",
        "memory_plan.trainer_rank_and_engine.update_gib": f"{shared.phases['update'] / GIB:.2f}",
        # what `memory/sync_peak_allocated_gib` measures: the rank's resident state and its IPC buffer
        "memory_plan.trainer_sync_gib": f"{plan.trainer_sync_bytes / GIB:.2f}",
        "memory_plan.trainer_rank_and_engine.sync_gib": f"{shared.phases['sync'] / GIB:.2f}"}
    cpu = plan_memory(load_config("cpu_default"))  # ngrpo_gloo moves host memory: no GPU sync phase
    assert "memory_plan.trainer_sync_gib" not in plan_params(cpu) and all("sync" not in k.phases for k in cpu.kinds)


def test_a_tensor_parallel_rank_holds_the_gathered_embedding_beside_its_reservation():
    """Each TP rank searches neighbors in the whole matrix (engine.embedding_patch.full_weight): V x h x b per rank."""
    shape = read_model_shape("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    settings = EngineSettings(shape=shape, dtype_bytes=2, tensor_parallel=2, sequences=40, sequence_tokens=12_288,
                              strategy="neighbor_mix", k=3, table_slots=1 << 20, max_num_seqs=256, enforce_eager=False)
    t = {x.name: x.bytes for x in outside_reservation_terms(settings)}
    assert t["neighbor table"] == 152_064 * 4 * 8 + 152_064 * 3584 * 2  # 1.02 GiB: the gathered copy
    plain = dataclasses.replace(settings, strategy="sample")  # GRPO: no neighbors, the hook's step still runs
    assert {x.name: x.bytes for x in outside_reservation_terms(plain)} == {"mixing hook step": 2 * 256 * 152_064 * 4}
    soft = dataclasses.replace(settings, strategy="soft_thinking")  # one more [rows, V] pass for the top-K
    assert {x.name: x.bytes for x in outside_reservation_terms(soft)} == {"mixing hook step": 3 * 256 * 152_064 * 4}


def test_stht_allocates_the_noise_table():
    plain = {x.name: x.bytes for x in plan_memory(load_config("r1_distill_1p5b_grpo")).engine_terms}
    stht = {x.name: x.bytes for x in plan_memory(load_config("baseline_stht_1p5b")).engine_terms}
    slots = (1 << 20) + 1
    assert stht["mixing hook tables"] - plain["mixing hook tables"] == slots * 1536 * 2


def test_zero3_shards_the_weights_of_the_7b():
    plan = plan_memory(load_config("r1_distill_7b_ngrpo"))
    t = _terms(plan, "trainer")
    assert t["weights"].bytes == plan.shape.params() * 2 / 8
    assert t["reference model"].bytes == plan.shape.params() * 2 / 8  # partitioned like the policy
    assert plan.shape.params() == 7_615_616_512
    assert plan.engine_reservation == 0.6 * 79.15 * GIB and plan.fits


def test_disaggregated_sync_by_hand_7b_zero3_nccl():
    """7B, ZeRO-3, 4 trainer GPUs and 4 engine GPUs (vLLM's nccl): trainer rank 0 holds two packed chunks in flight
    (a chunk stops once past the 64 MiB bucket: below bucket + the embedding) and the gathered tensors of the one it
    packs; the engine, awake with its whole reservation, receives two chunks and materializes one module at a time.
    Its sync phase can pass its rollout phase, so the utilization headroom counts it."""
    plan = plan_memory(load_config("r1_distill_7b_ngrpo", ["cluster.placement=disaggregated", "trainer.num_workers=4",
                                                           "rollout.num_engines=4"]))
    trainer, engine = plan.kinds
    assert (trainer.name, engine.name) == ("trainer rank", "engine")
    chunk = (64 << 20) + 152_064 * 3584 * 2
    t = {x.name: x.bytes for x in trainer.terms}
    assert t["weight-sync chunks (rank 0)"] == 2 * chunk and t["ZeRO-3 gather (sync)"] == chunk
    resident = sum(x.bytes for x in trainer.terms if x.phase == "resident")
    assert trainer.phases["sync"] == plan.trainer_sync_bytes == resident + 3 * chunk
    e = {x.name: x.bytes for x in engine.terms}
    assert e["weight load"] == 2 * chunk + 152_064 * 3584 * 2  # the embedding: the largest module
    reservation = 0.6 * 79.15 * GIB
    assert engine.phases["sync"] == reservation + e["neighbor table"] + e["neighbor search (weight load)"] \
        + e["weight load"]
    assert engine.phases["sync"] > engine.phases["rollout"]  # 3.2 GiB of received chunks, a 0.3 GiB decode step
    assert plan.headroom.utilization_max == pytest.approx(1 - (engine.phases["sync"] - reservation) / (79.15 * GIB))


def test_plan_matches_the_peak_measured_on_an_h200():
    """gpu-facts.md: ZeRO-2, bf16, one GPU, Qwen2.5-1.5B's shape, 4 x (512 + 8,192) tokens, 2 per micro-batch, no
    chunking, no checkpointing: peak 117.6 GB (torch's max allocated: no CUDA context). The plan, with the chunk as
    long as the micro-batch's response tokens, comes within 10%."""
    cfg = load_config("r1_distill_1p5b_ngrpo", [
        "model.path=Qwen/Qwen2.5-1.5B", "trainer.num_workers=1", "trainer.micro_batch_size=2",
        "trainer.max_tokens_per_micro_batch=null", "trainer.gradient_checkpointing=false",
        "trainer.logprob_chunk_tokens=16384", "data.max_prompt_tokens=512", "rollout.max_new_tokens=8192",
        "algorithm.beta=0", "trainer.prompts_per_iteration=4", "rollout.group_size=1", "cluster.placement=disaggregated"])
    plan = plan_memory(cfg, gpu_gib=139)
    assert plan.kinds[0].name == "trainer rank"
    peak = plan.kinds[0].phases["update"] - _terms(plan)["CUDA context, NCCL"].bytes
    peak -= plan.shape.params() * 2  # that run accumulated its gradients in bf16 (DeepSpeed's default then), not fp32
    assert abs(peak / 1e9 - 117.6) / 117.6 < 0.10, peak / 1e9  # 110.1 GB: 94% of the measured peak
    # the old path also kept a [B, T, V] fp32 copy of the logits for the entropy: with it, 120.1 GB (+2.1%; +1.7%
    # before the head's gradient, one [V, h] copy with one chunk, was counted)
    assert abs((peak + 16_384 * 151_936 * 4) / 1e9 - 117.6) / 117.6 < 0.025


def test_the_grpo_soft_thinking_eval_reads_the_best_checkpoint_the_grpo_run_writes():
    from pathlib import Path

    from ngrpo_ray.planning.model_shape import producing_preset
    from ngrpo_ray.training.run_state import BEST, checkpoint_root

    cfg = load_config("baseline_grpo_soft_thinking_eval_1p5b")
    assert producing_preset(cfg.model.path) == ("r1_distill_1p5b_grpo", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    grpo = load_config("r1_distill_1p5b_grpo")
    assert Path(cfg.model.path) == checkpoint_root(grpo.trainer.output_dir) / BEST / "trainer" / "hf"


@pytest.mark.parametrize("preset", ["r1_distill_1p5b_ngrpo", "r1_distill_7b_ngrpo", "qwen3_1p7b_base_ngrpo"])
def test_headroom_is_where_the_plan_stops_fitting(preset):
    """The printed headroom, checked against the plan itself: the largest token budget fits and 1 GiB of activations
    more does not; the utilization range's ends fit and a step beyond either fails."""
    plan = plan_memory(load_config(preset))
    h = plan.headroom
    cfg = load_config(preset)
    per_token = activation_bytes_per_token(plan.shape, 2, cfg.trainer.gradient_checkpointing)
    assert plan_memory(load_config(preset, [f"trainer.max_tokens_per_micro_batch={h.max_tokens}"])).fits
    over = h.max_tokens + int(GIB / per_token)
    assert not plan_memory(load_config(preset, [f"trainer.max_tokens_per_micro_batch={over}"])).fits
    low, high = math.ceil(h.utilization_min * 100) / 100, math.floor(h.utilization_max * 100) / 100
    for u, fits in ((low, True), (high, True), (low - 0.02, False), (high + 0.02, False)):
        assert plan_memory(load_config(preset, [f"rollout.gpu_memory_utilization={u}"])).fits == fits, (u, fits)


def test_headroom_by_hand_r1_1p5b(capsys):
    """r1_distill_1p5b_ngrpo on 79.15 GiB: the colocated GPU's update phase without its activations holds the resident
    state (11.87 GiB), the log-softmax chunk, the head's gradient and the sleeping engine."""
    plan = plan_memory(load_config("r1_distill_1p5b_ngrpo"))
    t = _terms(plan)
    fixed = sum(x.bytes for x in plan.kinds[0].terms if x.phase == "resident") + t["log-softmax chunk"].bytes \
        + t["head gradient (backward)"].bytes + t["asleep (context, graphs, neighbors)"].bytes
    per_token = t["activations"].bytes / 69_632
    assert plan.headroom.max_tokens == int((79.15 * GIB - fixed) // per_token)
    rollout_rest = plan.kinds[0].phases["rollout"] - 0.6 * 79.15 * GIB
    assert plan.headroom.utilization_max == pytest.approx(1 - rollout_rest / (79.15 * GIB))
    assert plan.headroom.utilization_min == pytest.approx(sum(x.bytes for x in plan.engine_terms) / (79.15 * GIB))
    assert main(["plan", "--config", "r1_distill_1p5b_ngrpo"]) == 0
    out = capsys.readouterr().out
    assert f"trainer.max_tokens_per_micro_batch up to {plan.headroom.max_tokens:,}; now 69,632" in out
