"""Issue 12, done-when 1: log-probs + entropy + backward in bounded memory, and the same values as the unchunked
computation.

A tiny Qwen2 (hidden 64, 1 layer) with the real R1 / Qwen vocabulary size V = 151,936. Unchunked, one 4,096-token
response would need its fp32 logits (2.5 GB), a log-softmax copy (2.5 GB) and the kept entropy logits; chunked it
must stay under 1.5 GB of extra peak RSS. The memory is measured in a fresh subprocess: the kernel's high-water
mark (VmHWM), reset just before the call (/proc/self/clear_refs), minus the RSS at that moment. Not ru_maxrss: Linux
carries the parent's peak across fork and exec into it, so late in a CI session (pytest at about 2.3 GB) the same
call read 1.47 GiB instead of 0.76.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ngrpo_ray.training.logprobs import response_logprobs

V, TEMP = 151_936, 0.7

_SETUP = f"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from ngrpo_ray.core.records import ResponseRecord

V, TEMP = {V}, {TEMP}


def tiny_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def batch(prompt_len, response_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixed = torch.rand(response_len, generator=g) < 0.2
    record = ResponseRecord(response_ids=torch.randint(2, V, (response_len,), generator=g),
                            logprobs=torch.zeros(response_len), mixed_mask=mixed,
                            cand_ids=torch.randint(2, V, (response_len, 3), generator=g),
                            alpha=torch.softmax(torch.randn(response_len, 3, generator=g), -1))
    return [torch.randint(2, V, (prompt_len,), generator=g)], [record]
"""

_MEASURE = """
import json
from ngrpo_ray.training.logprobs import response_logprobs


def status_bytes(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)


torch.set_num_threads(2)
model = tiny_model().train()
warm_p, warm_r = batch(8, 8, seed=1)
tb = response_logprobs(model, warm_p, warm_r, TEMP, with_entropy=True)  # kernels, allocator pools
tb.logp.sum().backward()
model.zero_grad(set_to_none=False)  # the gradient buffers exist before the measured call, as in training
prompts, records = batch(64, 4096)
reset_peak()
before = status_bytes("VmRSS")
tb = response_logprobs(model, prompts, records, TEMP, with_entropy=True)
(tb.logp * tb.mask).sum().backward()
peak = status_bytes("VmHWM")
print(json.dumps({"extra_peak_bytes": peak - before, "entropy_mean": float(tb.entropy[tb.mask].mean()),
                  "grad_norm": float(model.get_input_embeddings().weight.grad.norm())}))
"""


def _run(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_4096_token_response_stays_under_1p5_gb_extra_peak():
    got = _run(_SETUP + _MEASURE)
    print(f"\nextra peak RSS for 64 + 4,096 tokens, V {V}: {got['extra_peak_bytes'] / 2**30:.3f} GiB")
    assert got["extra_peak_bytes"] < 1.5e9, got
    assert got["grad_norm"] > 0 and 0 < got["entropy_mean"] <= float(torch.log(torch.tensor(float(V))))


def _unchunked(model, prompts, records):
    """The computation before chunking: every response position's fp32 logits at once, log_softmax, gather."""
    from ngrpo_ray.core.records import align_records, rebuild_inputs_embeds

    al = align_records(prompts, records, 0)
    embeds = rebuild_inputs_embeds(al.input_ids, model.get_input_embeddings().weight, al.mixed_mask, al.cand_ids,
                                   al.alpha)
    hidden = model.model(inputs_embeds=embeds, attention_mask=al.attention_mask,
                         position_ids=al.position_ids).last_hidden_state
    P, T = int(prompts[0].numel()), len(records[0])
    logits = model.lm_head(hidden[0, P - 1: P + T - 1]).float() / TEMP
    logprobs = torch.log_softmax(logits, -1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, records[0].response_ids[:, None]).squeeze(-1), entropy


def test_chunked_logprobs_equal_the_unchunked_reference_within_1e_6():
    namespace: dict = {}
    exec(_SETUP, namespace)  # the same model and batch builders as the subprocess
    model = namespace["tiny_model"]().eval()
    prompts, records = namespace["batch"](64, 1024)
    with torch.no_grad():
        ref_logp, ref_entropy = _unchunked(model, prompts, records)
        for chunk in (1024, 300):  # one chunk, and uneven chunks
            tb = response_logprobs(model, prompts, records, TEMP, with_entropy=True, chunk_tokens=chunk)
            assert float((tb.logp[0] - ref_logp).abs().max()) < 1e-6, chunk
            assert float((tb.entropy[0] - ref_entropy).abs().max()) < 1e-5, chunk
    # the gradient through the chunks (checkpointed, recomputed) equals the unchunked one
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(len(records[0]), generator=g)
    grads = []
    for chunk in (None, 300):
        model.zero_grad(set_to_none=True)
        if chunk is None:
            logp, _ = _unchunked(model, prompts, records)
        else:
            logp = response_logprobs(model, prompts, records, TEMP, chunk_tokens=chunk).logp[0]
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    num = sum(float((grads[1][n] - grads[0][n]).square().sum()) for n in grads[0])
    den = sum(float(grads[0][n].square().sum()) for n in grads[0])
    assert (num / den) ** 0.5 < 1e-5


def test_records_with_hand_logits_give_hand_logprobs():
    """A head whose logits are known: log_softmax([0, ln 3] / 1) = [ln 1/4, ln 3/4] at every position."""
    import math

    class Head(torch.nn.Module):
        def forward(self, h):
            return torch.stack([torch.zeros(h.shape[0]), torch.full((h.shape[0],), math.log(3.0))], -1)

    from ngrpo_ray.core.token_logprobs import chunked_token_logprobs

    hidden = torch.zeros(5, 4)
    logp, entropy = chunked_token_logprobs(Head(), hidden, torch.tensor([0, 1, 1, 0, 1]), 1.0, chunk_tokens=2,
                                           with_entropy=True)
    expected = [math.log(0.25), math.log(0.75), math.log(0.75), math.log(0.25), math.log(0.75)]
    assert torch.allclose(logp, torch.tensor(expected), atol=1e-7)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert torch.allclose(entropy, torch.full((5,), h), atol=1e-7)


def test_bf16_logits_are_divided_by_the_temperature_in_fp32():
    """bf16 logits at T 0.7 over the R1 vocabulary: the log-probs and their gradient equal log_softmax(logits.float()
    / T) exactly; dividing in bf16 first (what ``div(bf16, T, out=fp32)`` does) is off by up to ~0.1."""
    from ngrpo_ray.core.token_logprobs import chunked_token_logprobs

    g = torch.Generator().manual_seed(0)
    V, n, d, T = 151_936, 6, 16, 0.7
    head = torch.nn.Linear(d, V, bias=False).bfloat16()
    with torch.no_grad():
        head.weight.copy_((torch.randn(V, d, generator=g) * 1.5).bfloat16())
    hidden = torch.randn(n, d, generator=g).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (n,), generator=g)
    logp, _ = chunked_token_logprobs(head, hidden, targets, T, chunk_tokens=4)
    with torch.no_grad():
        logits = head(hidden.detach())
    expected = torch.log_softmax(logits.float() / T, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.equal(logp.detach(), expected)
    rounded = torch.log_softmax((logits / T).float(), -1).gather(1, targets[:, None]).squeeze(1)
    assert float((rounded - expected).abs().max()) > 1e-3  # the bf16 division would have shown
    logp.sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(head(ref_hidden).float() / T, -1).gather(1, targets[:, None]).sum()
    head.zero_grad()
    ref.backward()
    assert torch.allclose(hidden.grad.float(), ref_hidden.grad.float(), rtol=0.02, atol=1e-2)
