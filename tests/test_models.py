"""Models in and out (docs/models.md): strict reference loading, the Hugging Face export, the reference-layout
export, MoE -> CoE upcycling and `train --init-from`.

Independent sides: transformers' own Mixtral / OLMoE / Qwen2-MoE implementations (tiny random models built
from their config classes, no download) for the import; the exported directory loaded by transformers'
AutoModelForCausalLM (its own loader, our standalone modeling file) against the project's forward and
`coe-dist generate` for the export; key lists written out in the tests for the layouts.
One 2-rank launch serves the run-based tests: a Qwen2-MoE upcycled to C = 2 with a tokenizer of its own,
trained 1 step at ep 2 from `--init-from` (module fixture `run`).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from coe_dist.cli import main
from coe_dist.config import ModelConfig, MoEConfig, RunConfig
from coe_dist.model import CoETransformer
from coe_dist.model.coe import CoELayer, StateDictMismatch
from coe_dist.train.checkpoint import load_model

from trainrun import run_train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add overhead

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, EXPERTS, WIDTH = 256, 32, 2, 4, 2, 4, 48


def hf_moe(family: str, seed: int = 0, tied: bool = False):
    """A tiny random transformers MoE of `family` with non-trivial norm weights (ones would hide a mix-up)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=128, num_experts_per_tok=2,
                  tie_word_embeddings=tied)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, num_local_experts=EXPERTS, intermediate_size=WIDTH))
    elif family == "olmoe":
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **common, num_experts=EXPERTS, intermediate_size=WIDTH, eos_token_id=0, pad_token_id=1))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, num_experts=EXPERTS, moe_intermediate_size=WIDTH, shared_expert_intermediate_size=40,
            intermediate_size=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def tiny_tokenizer(path):
    """A 200-id BPE with <|endoftext|>, trained here on arithmetic text (the embedded corpus's kind)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [f"Tom has {a} apples and gets {b} more, so he has {a + b} apples." for a in range(30) for b in range(9)]
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------- strict loading

def _layer(**kw) -> CoELayer:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, **kw)
    return CoELayer(cfg, 16, seed=1)


def test_strict_load_refuses_a_dict_with_more_iterations_or_shared_experts():
    c3 = _layer(iterations=3, num_shared_experts=1).hf_state_dict()
    with pytest.raises(StateDictMismatch, match=r"unexpected \['gate\.2\.weight'\]"):
        _layer(iterations=2, num_shared_experts=1).load_hf_state_dict(c3)
    s1 = _layer(iterations=2, num_shared_experts=1).hf_state_dict()
    s0 = _layer(iterations=2, num_shared_experts=0)
    before = s0.hf_state_dict()
    with pytest.raises(StateDictMismatch, match="shared_experts.down_proj.weight"):
        s0.load_hf_state_dict(s1)
    assert all(torch.equal(before[k], v) for k, v in s0.hf_state_dict().items())  # nothing copied


def test_lenient_load_returns_missing_and_unexpected():
    c3 = _layer(iterations=3, num_shared_experts=1).hf_state_dict()
    layer = _layer(iterations=2, num_shared_experts=0)
    del c3["gate.1.weight"]
    missing, unexpected = layer.load_hf_state_dict(c3, strict=False)
    assert missing == ["gate.1.weight"]
    assert unexpected == ["gate.2.weight", "shared_experts.down_proj.weight", "shared_experts.gate_proj.weight",
                          "shared_experts.up_proj.weight"]
    assert torch.equal(layer.routers[0].weight, c3["gate.0.weight"])
    assert torch.equal(layer.experts.w_down_EDF[3], c3["experts.3.down_proj.weight"])


# ----------------------------------------------------------------------------- import (upcycling)

def _import(tmp_path, family: str, *args: str, tied: bool = False):
    src = tmp_path / family
    hf = hf_moe(family, tied=tied)
    hf.save_pretrained(src)
    out = tmp_path / f"{family}-coe"
    assert main(["convert", "import", "--from-hf", str(src), "--output", str(out), *args]) == 0
    return hf, out


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "mixtral-tied"])
def test_upcycled_moe_at_c1_equals_transformers(tmp_path, family):
    hf, out = _import(tmp_path, family.removesuffix("-tied"), tied=family.endswith("-tied"))
    cfg, ours, _ = load_model(out)
    assert cfg.model.tie_embeddings == family.endswith("-tied")
    assert (cfg.moe.iterations, cfg.moe.top_k, cfg.moe.num_experts) == (1, 2, EXPERTS)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens).logits
    assert expected.abs().max() > 0.1  # not a trivially small output
    assert (got - expected).abs().max() < 1e-4


def test_upcycled_routers_are_copies_with_noise(tmp_path):
    _, out = _import(tmp_path, "mixtral", "--iterations", "3", "--router-noise", "0.01", "--top-k", "1")
    cfg, ours, _ = load_model(out)
    assert (cfg.moe.iterations, cfg.moe.top_k, cfg.moe.inner_residual, cfg.moe.outer_residual) == (3, 1, True, True)
    saved = load_file(str(tmp_path / "mixtral" / "model.safetensors"))  # what the import read: w1 = gate_proj
    src = saved["model.layers.1.block_sparse_moe.gate.weight"]
    routers = ours.layers[1].ffn.routers
    assert torch.equal(routers[0].weight, src)
    for r in routers[1:]:
        delta = (r.weight - src).std() / src.std()
        assert 0.005 < delta < 0.02
    assert not torch.equal(routers[1].weight, routers[2].weight)
    assert torch.equal(ours.layers[1].ffn.experts.w_gate_up_E2FD[2, :WIDTH],
                       saved["model.layers.1.block_sparse_moe.experts.2.w1.weight"])
    assert torch.equal(ours.layers[1].ffn.experts.w_down_EDF[2],
                       saved["model.layers.1.block_sparse_moe.experts.2.w2.weight"])


def _saved_moe(tmp_path) -> tuple[RunConfig, CoETransformer]:
    """A coe-dist MoE (C = 1, K = 2, aux-free biases as if trained) saved as a checkpoint."""
    from coe_dist.train import checkpoint

    cfg = RunConfig(model=ModelConfig(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, init_std=0.2),
                    moe=MoEConfig(num_experts=4, top_k=2, iterations=1, expert_hidden_size=16,
                                  expert_bias_rate=0.01))
    model = CoETransformer(cfg.model, cfg.moe, seed=3).eval()
    with torch.no_grad():
        for router in (r for layer in model.coe_layers() for r in layer.routers):
            router.expert_bias.copy_(torch.randn(router.expert_bias.shape) * 0.2)
    checkpoint.save(tmp_path / "moe", 0, model, None, {"config": cfg.to_dict(), "optimizer_step": 0}, keep_last=1)
    return cfg, model


def test_upcycle_a_coe_dist_moe_into_a_chain(tmp_path, capsys):
    cfg, moe = _saved_moe(tmp_path)
    assert main(["convert", "import", "--from-checkpoint", str(tmp_path / "moe"), "--iterations", "2", "--top-k", "1",
                 "--output", str(tmp_path / "coe")]) == 0
    assert "C=1, K=2) to C=2, K=1" in capsys.readouterr().out
    got_cfg, got, _ = load_model(tmp_path / "coe")
    assert (got_cfg.moe.iterations, got_cfg.moe.top_k, got_cfg.moe.inner_residual) == (2, 1, True)
    # Independently: the chain built from the config, its second router a copy of the MoE's, by hand.
    want_moe = MoEConfig(**{**cfg.to_dict()["moe"], "iterations": 2, "top_k": 1, "inner_residual": True})
    want = CoETransformer(cfg.model, want_moe, seed=0).eval()
    state = moe.state_dict()
    state.update({k.replace("routers.0.", "routers.1."): v for k, v in state.items() if "routers.0." in k})
    want.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(tokens).logits, want(tokens).logits)
        # K = 1 of a C = 2 chain is a different function from the K = 2 MoE (the test is not vacuous)
        assert (got(tokens).logits - moe(tokens).logits).abs().max() > 1e-3


def test_upcycle_keeps_the_function_at_the_same_c_and_k_and_noises_only_new_routers(tmp_path):
    _, moe = _saved_moe(tmp_path)
    assert main(["convert", "import", "--from-checkpoint", str(tmp_path / "moe"),
                 "--output", str(tmp_path / "same")]) == 0
    _, same, _ = load_model(tmp_path / "same")
    tokens = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(same(tokens).logits, moe(tokens).logits)
    assert main(["convert", "import", "--from-checkpoint", str(tmp_path / "moe"), "--iterations", "3",
                 "--router-noise", "0.01", "--output", str(tmp_path / "noisy")]) == 0
    _, noisy, _ = load_model(tmp_path / "noisy")
    for layer, src in zip(noisy.coe_layers(), moe.coe_layers(), strict=True):
        base = src.routers[0]
        assert torch.equal(layer.routers[0].weight, base.weight)
        for r in layer.routers[1:]:
            assert 0.005 < ((r.weight - base.weight).std() / base.weight.std()) < 0.02
            assert torch.equal(r.expert_bias, base.expert_bias)  # the balancing state carries over as it is
        assert not torch.equal(layer.routers[1].weight, layer.routers[2].weight)


def test_init_from_a_missing_directory_fails_before_training(tmp_path, capsys):
    assert main(["train", "--init-from", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--init-from" in err and "nowhere" in err and "\n" not in err


def test_import_refuses_an_unknown_family_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["convert", "import", "--from-hf", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model_type='gpt2'" in err and "mixtral" in err and "\n" not in err


# ----------------------------------------------------------------------------- export: Hugging Face

CASES = {
    "default": ({}, {}),
    "dense-first-S0-shared-gating-tied": (dict(first_k_dense=1, tie_embeddings=True),
                                        dict(num_shared_experts=0, independent_gating=False, iterations=3)),
    "gqa-qknorm-bias-norm-outer": (dict(num_kv_heads=1, qk_norm=True, qkv_bias=True),
                                   dict(norm_topk_prob=True, outer_residual=True, inner_residual=False)),
    "sigmoid-bias-groups-k1-scaled": ({}, dict(router_score="sigmoid", expert_bias_rate=0.01, routing_groups=2,
                                               routing_group_topk=1, top_k=1, routed_scaling_factor=2.5)),
    "renorm-then-scale-k1": ({}, dict(gate_scaling="renorm_then_scale", norm_topk_prob=True, top_k=1,
                                      routed_scaling_factor=2.5)),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_export_of_any_architecture_loads_and_matches(tmp_path, case):
    from coe_dist.train.hf_export import export_hf

    model_kw, moe_kw = CASES[case]
    cfg = RunConfig(model=ModelConfig(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48,
                                      init_std=0.2, **model_kw),
                    moe=MoEConfig(num_experts=4, expert_hidden_size=16, **moe_kw))
    model = CoETransformer(cfg.model, cfg.moe, seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        for router in (r for layer in model.coe_layers() for r in layer.routers if r.expert_bias is not None):
            router.expert_bias.copy_(torch.randn(router.expert_bias.shape) * 0.2)  # as if trained: it must export
    export_hf(cfg, model, tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens).logits).abs().max() < 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Qwen2-MoE + tokenizer -> import C=2 -> `train --init-from` at ep 2 (1 step, lr ~0) -> export hf."""
    tmp = tmp_path_factory.mktemp("models")
    src = tmp / "qwen"
    hf_moe("qwen2_moe", seed=7).save_pretrained(src)
    tiny_tokenizer(src / "tokenizer.json")
    imported = tmp / "imported"
    assert main(["convert", "import", "--from-hf", str(src), "--iterations", "2", "--router-noise", "0.01",
                 "--output", str(imported)]) == 0
    run_dir = tmp / "run"
    proc = run_train(2, run_dir, "moe.ep_size=2", "train.steps=1", "train.seq_len=64", "train.micro_batch_size=2",
                     "train.dtype=fp32", "optim.lr=1e-12", "optim.min_lr=0", "optim.weight_decay=0",
                     "data.num_documents=200", "log.tensorboard=false", "log.eval_batches=1",
                     extra=("--init-from", str(imported)))
    exported = tmp / "hf"
    assert main(["convert", "export", "--checkpoint", str(run_dir), "--output", str(exported), "--format", "hf"]) == 0
    return {"imported": imported, "run": run_dir, "hf": exported, "log": proc.stdout}


def test_init_from_starts_a_new_run_at_ep2_from_the_import(run):
    from coe_dist.train import checkpoint

    _, imported, _ = load_model(run["imported"])
    step_0 = run["imported"] / "checkpoints" / "step_0"
    with pytest.raises(checkpoint.CheckpointError, match="--init-from"):  # an import is not a run to resume
        checkpoint.load(step_0, imported, engine=None)
    cfg, trained, ckpt = load_model(run["run"])
    assert ckpt.name == "step_1" and cfg.moe.ep_size == 1 and cfg.moe.iterations == 2
    assert "a new run: step 0" in run["log"]
    trained_params = dict(trained.named_parameters())
    for name, p in imported.named_parameters():  # lr 1e-12: one step moves no weight measurably
        assert torch.allclose(trained_params[name], p, atol=1e-6), name


def test_hf_export_of_a_run_loads_with_its_tokenizer_and_matches_eval_and_generate(run, capsys):
    out = run["hf"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "coe_dist" and config["architectures"] == ["CoeDistForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_coe_dist.CoeDistForCausalLM"
    for name in ("modeling_coe_dist.py", "configuration_coe_dist.py"):  # standalone: no coe_dist import
        assert not re.search(r"^\s*(from|import) coe_dist", (out / name).read_text(), re.M)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg, ours, _ = load_model(run["run"])
    assert len(load_file(str(out / "model.safetensors"))) == len(list(ours.parameters()))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens).logits).abs().max() < 1e-5

    from coe_dist.data.tokenizer import load_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # config.json has an auto_map
    prompt = "Tom has 3 apples and gets"
    ids = load_tokenizer(cfg.data.tokenizer).encode(prompt)
    assert tok(prompt)["input_ids"] == ids
    new = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    if new and new[-1] == config["eos_token_id"]:  # generate keeps the eos it stops at; coe-dist drops it
        new = new[:-1]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run["run"]), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == prompt + tok.decode(new) + "\n"
    assert len(set(new)) > 1  # a continuation that tells token choices apart


# ----------------------------------------------------------------------------- export: reference layout

def test_reference_export_names_every_mapped_weight_and_says_what_does_not(run, tmp_path, capsys):
    out = tmp_path / "ref"
    assert main(["convert", "export", "--checkpoint", str(run["run"]), "--output", str(out),
                 "--format", "reference"]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "multi-head latent attention" in note[0] and "shared_expert_gate" in note[0]
    cfg, ours, _ = load_model(run["run"])
    tensors = load_file(str(out / "model.safetensors"))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                     p + "mlp.gate.0.weight", p + "mlp.gate.1.weight", p + "mlp.shared_expert_gate.weight"}
        expected |= {f"{p}mlp.shared_experts.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")}
        expected |= {f"{p}mlp.experts.{j}.{x}.weight" for j in range(EXPERTS) for x in ("gate_proj", "up_proj",
                                                                                       "down_proj")}
    assert set(tensors) == expected
    assert torch.equal(tensors["model.layers.1.post_attention_layernorm.weight"], ours.layers[1].ffn_norm.weight)
    assert torch.equal(tensors["model.layers.0.mlp.experts.3.up_proj.weight"],
                       ours.layers[0].ffn.experts.w_gate_up_E2FD[3, WIDTH:])
    ref = json.loads((out / "config.json").read_text())
    assert (ref["vocab_size"], ref["hidden_size"], ref["num_attention_heads"], ref["inner_iter"],
            ref["n_shared_experts"], ref["moe_intermediate_size"]) == (VOCAB, HIDDEN, HEADS, 2, 1, WIDTH)


def test_reference_config_says_null_for_no_shared_experts():
    from coe_dist.train.reference_layout import reference_config

    assert reference_config(MoEConfig(num_shared_experts=0), ModelConfig())["n_shared_experts"] is None
    assert reference_config(MoEConfig(num_shared_experts=2), ModelConfig())["n_shared_experts"] == 2


def test_reference_round_trip_keeps_every_mapped_weight(tmp_path, capsys):
    cfg = RunConfig(model=ModelConfig(vocab_size=64, hidden_size=32, first_k_dense=1, num_layers=3),
                    moe=MoEConfig(num_experts=4, expert_hidden_size=16, num_shared_experts=0))
    from coe_dist.train import checkpoint

    model = CoETransformer(cfg.model, cfg.moe, seed=3)
    checkpoint.save(tmp_path / "run", 0, model, None, {"config": cfg.to_dict(), "optimizer_step": 0}, 1)
    assert main(["convert", "export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "ref"),
                 "--format", "reference"]) == 0
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["n_shared_experts"] is None
    # A reference checkpoint also holds its multi-head latent attention: a second shard with two such tensors.
    mla = {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight": torch.randn(24, 32) for i in (0, 1)}
    save_file(mla, str(tmp_path / "ref" / "model-attention.safetensors"))
    capsys.readouterr()
    assert main(["convert", "import", "--from-reference", str(tmp_path / "ref"), "--output", str(tmp_path / "b")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "its 2 attention tensors are left out" in notes[0]
    _, back, _ = load_model(tmp_path / "b")
    theirs = dict(back.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p) != (".attn." in name), name  # attention: fresh, all else: equal
