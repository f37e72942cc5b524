"""SimNPO, IdkDPO, ASU+IDK (hand-computed), RMU / asu_wmdp (tiny Llama), the RNA add-on, and the
Hydra composition of their configs."""

import copy
import math

import pytest
import torch

from pipeline.config import ConfigError, validate
from pipeline.methods import losses
from tests.test_config import _compose
from tests.test_methods import LN3, REFERENCE, STUDENT, BigramLM, batch, method


def seq(tokens, first_loss=1):
    """One sequence; labels on positions >= ``first_loss``."""
    ids = torch.tensor([tokens])
    labels = ids.clone()
    labels[:, :first_loss] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# -- SimNPO -----------------------------------------------------------------------------------------


def test_simnpo_single_token():
    m = method("simnpo")  # beta 4.5, delta 0
    assert m.uses_reference is False
    out = m.compute_loss(BigramLM(STUDENT), None, {"forget": batch(1), "retain": batch(0)})
    # mean log p = ln(3/4); L = -(2/4.5) logsigmoid(-4.5 ln(3/4)) = (2/4.5) ln(1 + 0.75^4.5)
    assert out.logs["forget_loss"] == pytest.approx(0.10763288823535098, abs=1e-6)
    # total = 0.125 * L_F + 1.0 * ln 4 (retain NLL of p(0|0) = 1/4)
    assert out.loss.item() == pytest.approx(0.125 * 0.10763288823535098 + math.log(4.0), abs=1e-6)


def test_simnpo_length_normalised_and_delta():
    # [0, 1, 0]: log p(1|0) = ln 3/4, log p(0|1) = ln 1/2 -> mean (ln .75 + ln .5) / 2
    lf = method("simnpo").forget_term(BigramLM(STUDENT), None, seq([0, 1, 0]))
    assert lf.item() == pytest.approx(0.04640025050401935, abs=1e-6)
    # delta inside the beta scaling (open-unlearning): (2/4.5) ln(1 + exp(4.5 (ln .75 + 0.5)))
    lf = method("simnpo", delta=0.5).forget_term(BigramLM(STUDENT), None, batch(1))
    assert lf.item() == pytest.approx(0.5692780050940944, abs=1e-6)


# -- IdkDPO -----------------------------------------------------------------------------------------


def test_idk_dpo_hand_computed():
    m = method("idk_dpo")  # beta 0.1
    assert m.uses_reference
    b = {"forget": batch(1), "forget_idk": batch(0), "retain": batch(0)}
    out = m.compute_loss(BigramLM(STUDENT), BigramLM(REFERENCE), b)
    # win (refusal = token 0): ln 1/4 - ln 1/2 = ln 1/2; lose (true = token 1): ln 3/4 - ln 1/2 = ln 3/2
    # L = -(2/0.1) logsigmoid(0.1 ln(1/3)) = 20 ln(1 + 3^0.1)
    assert out.logs["forget_loss"] == pytest.approx(14.991714461858814, abs=1e-5)
    assert out.loss.item() == pytest.approx(14.991714461858814 + math.log(4.0), abs=1e-5)
    assert set(b) == {"forget", "forget_idk", "retain"} and "forget_idk" not in b["forget"]  # not mutated


def test_idk_dpo_missing_view_is_a_clear_error():
    with pytest.raises(KeyError, match="forget_idk"):
        method("idk_dpo").compute_loss(BigramLM(STUDENT), BigramLM(REFERENCE), {"forget": batch(1), "retain": batch(0)})


def test_forget_views_encode_refusals_deterministically():
    from pipeline.data.tokenizer import build_word_tokenizer
    from pipeline.methods.idk_dpo import REFUSALS, pick_refusal

    rows = [{"question": f"who is person {i} ?", "answer": f"person {i} is a writer ."} for i in range(6)]
    tok = build_word_tokenizer([r["question"] + " " + r["answer"] for r in rows] + list(REFUSALS)
                               + ["question : answer :"])
    m = method("idk_dpo")
    views = m.forget_views(tok, rows, 64)
    assert list(views) == ["forget_idk"] and len(views["forget_idk"]) == 6
    assert views == m.forget_views(tok, rows, 64)  # deterministic
    for r, v in zip(rows, views["forget_idk"]):
        answer_ids = [t for t, lab in zip(v["input_ids"], v["labels"]) if lab != -100]
        text = tok.decode(answer_ids, skip_special_tokens=True)
        assert text.replace(" ", "") == pick_refusal(r["question"], REFUSALS).lower().replace(" ", "")
    custom = method("idk_dpo", idk_answers=["no idea ."]).forget_views(tok, rows[:1], 64)["forget_idk"][0]
    assert tok.decode([t for t, lab in zip(custom["input_ids"], custom["labels"]) if lab != -100],
                      skip_special_tokens=True) == "no idea ."


# -- ASU+IDK ----------------------------------------------------------------------------------------


def test_asu_idk_skips_first_token_and_adds_idk_nll():
    ref = [[0.0, 0.0], [0.0, LN3]]  # after 0: (1/2, 1/2); after 1: (1/4, 3/4)
    m = method("asu_idk", tau=1.0, gamma=0.1, alpha=1.0, idk_weight=1.0)
    assert m.cfg.skip_first_answer_token is True
    b = {"forget": seq([0, 1, 0]), "forget_idk": batch(0), "retain": batch(0)}
    out = m.compute_loss(BigramLM(STUDENT), BigramLM(ref), b)
    # KL only at the 2nd answer token (after 1): KL((1/4,3/4) || (1/2,1/2)) = 1/4 ln 1/2 + 3/4 ln 3/2
    kl_f = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert out.logs["forget_loss"] == pytest.approx(kl_f, abs=1e-6)
    # IDK NLL: -ln p(0|0) = ln 4; retain KL after 0: KL((1/2,1/2) || (1/4,3/4)) = 1/2 ln(4/3)
    assert out.logs["idk_loss"] == pytest.approx(math.log(4.0), abs=1e-6)
    kl_r = 0.5 * math.log(4 / 3)
    assert out.logs["retain_loss"] == pytest.approx(kl_r, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * kl_f + math.log(4.0) + kl_r, abs=1e-6)
    assert out.logs["loss"] == pytest.approx(out.loss.item(), abs=1e-6)


# -- RMU / asu_wmdp on a tiny Llama -----------------------------------------------------------------


def tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.tempered_attention import enable_tempered_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.5)
    return enable_tempered_attention(LlamaForCausalLM(cfg))


def qa_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a padded row
    labels[2, 7:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_hidden_state_at_matches_output_hidden_states():
    model = tiny_llama()
    b = qa_batch()
    with torch.no_grad():
        hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        before = n_hooks(model)  # transformers installs its own recorders on the first such call
        for layer in range(3):  # the last entry of hidden_states is the final-norm output
            assert torch.allclose(losses.hidden_state_at(model, b, layer), hs[layer + 1], atol=1e-6)
    assert n_hooks(model) == before
    with pytest.raises(ValueError, match="allowed 0..3"):
        losses.hidden_state_at(model, b, 4)
    with pytest.raises(ValueError, match="decoder layers"):
        losses.decoder_layers(torch.nn.Linear(2, 2))


def n_hooks(model):
    """Forward hooks on the decoder layers (transformers installs its own output recorders once)."""
    return sum(len(blk._forward_hooks) for blk in losses.decoder_layers(model))


def _grads(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("name", ["rmu", "asu_wmdp"])
def test_layerwise_methods_train_only_selected_params(name):
    student = tiny_llama()
    reference = copy.deepcopy(student).requires_grad_(False)
    m = method(name, layer=2, **({"tau": 3.0} if name == "asu_wmdp" else {}))
    m.select_trainable(student)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    assert trainable == expected
    out = m.compute_loss(student, reference, {"forget": qa_batch(1), "retain": qa_batch(2)})
    assert torch.isfinite(out.loss) and out.logs["forget_loss"] > 0
    out.loss.backward()
    assert _grads(student) == expected
    assert _grads(reference) == set()


def test_update_layers_and_module_configurable():
    student = tiny_llama()
    method("rmu", layer=3, update_layers=[1, 3], update_module="mlp.up_proj").select_trainable(student)
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        "model.layers.1.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="update_module"):
        method("rmu", layer=2, update_module="mlp.nope").select_trainable(tiny_llama())
    with pytest.raises(ValueError, match="method.layer=7"):
        method("rmu").select_trainable(tiny_llama())


def test_rmu_forget_target_and_retain_zero_at_start():
    from pipeline.methods.rmu import control_vector

    student = tiny_llama()
    reference = copy.deepcopy(student).requires_grad_(False)
    m = method("rmu", layer=2)
    b = qa_batch(1)
    u = control_vector(32, 0)
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()
    assert torch.equal(u, control_vector(32, 0)) and not torch.equal(u, control_vector(32, 1))
    h = losses.hidden_state_at(student, b, 2).detach()
    mask = losses.token_mask(b)
    # by hand: per token mean_d (h - 6.5 u)^2, per-row mean over labelled tokens, mean over rows
    per_tok = ((h - 6.5 * u) ** 2).mean(-1)
    rows = [(per_tok[i][mask[i]]).mean() for i in range(3)]
    assert m.forget_term(student, reference, b).item() == pytest.approx(float(sum(rows) / 3), rel=1e-5)
    assert m.retain_term(student, reference, qa_batch(2)).item() == pytest.approx(0.0, abs=1e-10)


def test_asu_wmdp_forget_zero_at_tau_one_positive_tempered():
    student = tiny_llama()
    teacher = copy.deepcopy(student).requires_grad_(False)
    b = qa_batch(3)
    assert method("asu_wmdp", layer=2, tau=1.0).forget_term(student, teacher, b).item() == pytest.approx(0.0, abs=1e-10)
    assert method("asu_wmdp", layer=2, tau=3.0).forget_term(student, teacher, b).item() > 1e-4
    from pipeline.models.tempered_attention import get_temperatures

    assert all(t == 1.0 for t in get_temperatures(teacher))
    # retain is against the *untempered* original: 0 at the start whatever tau
    assert method("asu_wmdp", layer=2, tau=3.0).retain_term(student, teacher, b).item() == pytest.approx(0.0, abs=1e-10)


# -- RNA ------------------------------------------------------------------------------------------


def test_rna_noise_only_on_retain_when_enabled_and_removed():
    student = tiny_llama()
    reference = copy.deepcopy(student).requires_grad_(False)
    b = {"forget": qa_batch(1), "retain": qa_batch(2)}
    student(input_ids=b["forget"]["input_ids"])  # let transformers install its recorders first
    before = n_hooks(student)
    plain = method("grad_diff").compute_loss(student, reference, b).logs
    off = method("grad_diff", rna_noise=0.0, rna_layer=1).compute_loss(student, reference, b).logs
    assert off == plain
    torch.manual_seed(0)
    noisy = method("grad_diff", rna_noise=0.5, rna_layer=1).compute_loss(student, reference, b).logs
    assert noisy["forget_loss"] == pytest.approx(plain["forget_loss"], abs=1e-7)  # forget branch untouched
    assert abs(noisy["retain_loss"] - plain["retain_loss"]) > 1e-5
    assert n_hooks(student) == before  # hook removed
    # retain KL: the reference forward stays clean (student == reference -> only noise makes KL > 0)
    kl = method("asu_kl", tau=1.0, rna_noise=0.5, rna_layer=1).retain_term(student, reference, b["retain"])
    assert kl.item() > 1e-6
    # eval mode: no noise
    student.eval()
    assert method("asu_kl", tau=1.0, rna_noise=0.5, rna_layer=1).retain_term(
        student, reference, b["retain"]).item() == pytest.approx(0.0, abs=1e-10)
    # the hook is removed even when the retain loss raises
    student.train()
    bad = method("grad_diff", rna_noise=0.5, rna_layer=1)
    with pytest.raises(KeyError):  # no labels: fails after the noisy forward
        bad.retain_term(student, reference, {"input_ids": b["retain"]["input_ids"], "attention_mask": None})
    assert n_hooks(student) == before


# -- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,extra", [
    ("simnpo", []), ("idk_dpo", []), ("asu_idk", []),
    ("rmu", ["method.layer=2"]), ("asu_wmdp", ["method.layer=2"]),
])
def test_new_method_configs_compose_and_validate(name, extra):
    cfg = _compose([f"method={name}", "+exp=tofu_tiny", *extra])
    assert cfg.method.name == name
    validate(cfg)


def test_config_defaults():
    c = _compose(["method=simnpo"]).method
    assert (c.beta, c.delta, c.gamma, c.alpha, c.retain_loss) == (4.5, 0.0, 0.125, 1.0, "nll")
    c = _compose(["method=idk_dpo"]).method
    assert (c.beta, c.retain_loss) == (0.1, "nll")
    c = _compose(["method=asu_idk"]).method
    assert c.skip_first_answer_token is True and c.tau == 2.3
    c = _compose(["method=rmu"]).method
    assert (c.layer, c.steering_coeff, c.alpha, c.update_layers, c.update_module) == (7, 6.5, 1200.0, None, "mlp.down_proj")
    c = _compose(["method=asu_wmdp"]).method
    assert (c.layer, c.retain_loss, c.update_layers) == (7, "mse", None)
    c = _compose(["method=npo", "method.rna_noise=0.05", "method.rna_layer=1"]).method
    assert (c.rna_noise, c.rna_layer) == (0.05, 1)


@pytest.mark.parametrize("overrides,key", [
    (["method=rmu"], "method.layer"),  # layer 7 on the 4-layer tiny model
    (["method=asu_wmdp"], "method.layer"),
    (["method=rmu", "method.layer=2", "method.update_layers=[1,3]"], "method.update_layers"),
    (["method=rmu", "method.layer=2", "method.retain_loss=l2"], "method.retain_loss"),
    (["method=rmu", "method.layer=2", "method.steering_coeff=0"], "method.steering_coeff"),
    (["method=simnpo", "method.beta=0"], "method.beta"),
    (["method=idk_dpo", "method.idk_answers=[]"], "method.idk_answers"),
    (["method=npo", "method.rna_noise=-0.1"], "method.rna_noise"),
    (["method=npo", "method.rna_noise=0.1", "method.rna_layer=9"], "method.rna_layer"),
    # noise above the layer RMU's retain MSE reads: never applied (the pass stops there); was accepted
    (["method=rmu", "method.layer=1", "method.rna_noise=0.1", "method.rna_layer=2"], "method.rna_layer"),
    (["method=asu_wmdp", "method.layer=1", "method.rna_noise=0.1", "method.rna_layer=2"], "method.rna_layer"),
    # every tempered layer above the matched one: the forget loss would be 0 for any tau (was accepted)
    (["method=asu_wmdp", "method.layer=1", "method.teacher_layers=[2,3]"], "method.teacher_layers"),
])
def test_new_method_config_errors_name_the_key(overrides, key):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_refusals_drawn_per_use_vary_by_draw_and_agree_across_ranks_and_attempts(tmp_path):
    """idk_draw=per_use (open-unlearning draws a refusal each time a row is read): a row gets other
    refusals at other draws, and the draw depends on (seed, forget-stream position, row) only, so a fresh view
    (another rank, a resumed attempt) draws the same; the file's non-empty lines are the refusals."""
    from pipeline.data.tokenizer import build_word_tokenizer
    from pipeline.methods.idk_dpo import REFUSALS

    rows = [{"question": f"who is person {i} ?", "answer": f"person {i} is a writer ."} for i in range(6)]
    tok = build_word_tokenizer([r["question"] + " " + r["answer"] for r in rows] + list(REFUSALS)
                               + ["question : answer :"])
    lines = [r.lower() for r in REFUSALS[:4]]
    path = tmp_path / "idk.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n  " + "\n".join(lines[2:]) + "\n")
    m = method("idk_dpo", idk_answers_file=str(path), idk_draw="per_use")
    assert m.refusals() == tuple(lines)
    view = m.forget_views(tok, rows, 64, seed=7)["forget_idk"]
    again = m.forget_views(tok, rows, 64, seed=7)["forget_idk"]

    def answer(enc):
        return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100],
                          skip_special_tokens=True)

    drawn = {answer(view.for_draws([pos], [3])[0]).replace(" ", "") for pos in range(40)}
    assert drawn == {line.replace(" ", "") for line in lines}
    for start in (0, 5, 17):  # a row's draw depends on its position, not on the rows drawn beside it
        pos = [start, start + 1, start + 2]
        assert view.for_draws(pos, [0, 3, 5]) == again.for_draws(pos[::-1], [5, 3, 0])[::-1]
        assert view.for_draws(pos[1:2], [3]) == view.for_draws(pos, [0, 3, 5])[1:2]
        assert [e["index"] for e in view.for_draws(pos[:2], [4, 1])] == [4, 1]
    other = m.forget_views(tok, rows, 64, seed=8)["forget_idk"]
    assert [view.choice(s, 2) for s in range(20)] != [other.choice(s, 2) for s in range(20)]


@pytest.mark.parametrize("overrides, message", [
    ({"idk_answers_file": "/nonexistent/idk.jsonl"}, "is not a file"),
    ({"idk_answers_file": "EMPTY"}, "has no non-empty line"),
    ({"idk_answers_file": "EMPTY", "idk_answers": ["no ."]}, "use one of them"),
    ({"idk_draw": "per_epoch"}, "allowed values: per_question, per_use"),
])
def test_refusal_settings_are_checked(tmp_path, overrides, message):
    from omegaconf import OmegaConf

    from pipeline.methods.idk_dpo import IdkDPO, IdkDPOConfig

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    values = {k: (str(empty) if v == "EMPTY" else v) for k, v in overrides.items()}
    cfg = OmegaConf.merge(OmegaConf.structured(IdkDPOConfig), values)
    with pytest.raises(ConfigError, match=message):
        IdkDPO.validate_config(cfg, None)
