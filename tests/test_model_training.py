"""Training stages (which weights learn) and the rectified-flow objective."""

import pytest
import torch

from models.config import ObjectiveConfig
from models.objective import flow_matching_loss, sample_condition_keep, sample_sigmas, shift_sigmas
from models.tiny import TINY_TEXT_DIM
from models.training_stages import set_training_stage, trainable_parameter_names
from models.transformer import ProductVideoGenerator, pack_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(seed=0, batch=2, frames=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, frames, 32, 48)
    mask[..., 8:24, 16:40] = 1
    return {
        "latents": torch.randn(batch, 16, (frames - 1) // 4 + 1, 4, 6, generator=g),
        "masked_latents": torch.randn(batch, 16, (frames - 1) // 4 + 1, 4, 6, generator=g),
        "packed_mask": pack_mask(mask, (4, 6)),
        "text_embeds": torch.randn(batch, 16, TINY_TEXT_DIM, generator=g),
        "image_tokens": torch.randn(batch, 3, 17, 32, generator=g),
        "image_mask": torch.tensor([[True, True, False], [True, True, True]])[:batch],
    }


STAGE1_PREFIXES = ("product_encoder.", "transformer.wan.patch_embedding.")


def expected_trainable(names, stage):
    stage1 = {n for n in names if n.startswith(STAGE1_PREFIXES) or ".attn2.processor." in n}
    blocks = {n for n in names if n.startswith("transformer.wan.blocks.")}
    return stage1 if stage == 1 else stage1 | blocks


@pytest.mark.parametrize("stage", [1, 2])
def test_exactly_the_stage_parameters_receive_gradients(tiny_cfg, stage):
    model = ProductVideoGenerator.from_model_config(tiny_cfg)
    names = {n for n, _ in model.named_parameters()}
    trainable = set_training_stage(model, stage)
    assert trainable == trainable_parameter_names(model, stage) == expected_trainable(names, stage)
    # Sanity of the split itself: the product layers are in stage 1, Wan's own weights are not.
    assert "product_encoder.query_tokens" in trainable
    assert "transformer.wan.blocks.1.attn2.processor.gate" in trainable
    assert ("transformer.wan.blocks.0.attn1.to_q.weight" in trainable) == (stage == 2)
    assert "transformer.wan.condition_embedder.text_embedder.linear_1.weight" not in trainable
    assert "transformer.wan.proj_out.weight" not in trainable

    # Open the gates so that every trainable weight has a non-zero path to the loss.
    with torch.no_grad():
        for block in model.transformer.wan.blocks:
            block.attn2.processor.gate.fill_(0.5)
    cfg = ObjectiveConfig(drop_text_prob=0, drop_product_prob=0, drop_both_prob=0, masked_region_weight=1.0)
    flow_matching_loss(model, make_batch(), cfg, torch.Generator().manual_seed(0)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero == trainable


def test_unknown_stage_is_rejected(tiny_cfg):
    with pytest.raises(ValueError):
        trainable_parameter_names(torch.nn.Linear(1, 1), 3)


def test_timestep_distribution_and_shift():
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(20000, ObjectiveConfig(shift=1.0), g)
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    shifted = sample_sigmas(20000, ObjectiveConfig(shift=3.0), torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_sigmas(uniform, 3.0))  # same draws, shifted
    assert shifted.mean() > 0.6  # shift > 1 puts more mass at high noise
    logit = sample_sigmas(20000, ObjectiveConfig(timestep_sampling="logit_normal", shift=1.0), g)
    assert abs(logit.median().item() - 0.5) < 0.02 and (logit - 0.5).abs().mean() < (uniform - 0.5).abs().mean()


def test_condition_dropout_rates():
    cfg = ObjectiveConfig(drop_text_prob=0.2, drop_product_prob=0.3, drop_both_prob=0.1)
    keep_text, keep_product = sample_condition_keep(40000, cfg, torch.Generator().manual_seed(0))
    both = ((keep_text == 0) & (keep_product == 0)).float().mean()
    text_only = ((keep_text == 0) & (keep_product == 1)).float().mean()
    product_only = ((keep_text == 1) & (keep_product == 0)).float().mean()
    for rate, target in ((both, 0.1), (text_only, 0.2), (product_only, 0.3)):
        assert abs(rate.item() - target) < 0.01
    with pytest.raises(ValueError):
        sample_condition_keep(1, ObjectiveConfig(drop_text_prob=0.6, drop_product_prob=0.6))


def test_loss_is_zero_for_the_true_velocity_and_not_for_a_wrong_one():
    """An oracle that knows x0 recovers e from x_t and the timestep: if the objective noises with
    x_t = (1 - s) x0 + s e, passes 1000 s and targets e - x0, its loss is zero."""
    batch = make_batch()
    clean = batch["latents"]

    def oracle(sign):
        def model(noisy, masked, packed, timestep, *rest, **kwargs):
            sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
            noise = (noisy - (1 - sigma) * clean) / sigma
            return sign * (noise - clean)
        return model

    cfg = ObjectiveConfig(masked_region_weight=2.0)
    assert flow_matching_loss(oracle(1), batch, cfg, torch.Generator().manual_seed(0)).item() < 1e-8
    assert flow_matching_loss(oracle(-1), batch, cfg, torch.Generator().manual_seed(0)).item() > 0.1


def test_loss_decreases_when_overfitting_one_batch(tiny_cfg):
    torch.manual_seed(0)
    model = ProductVideoGenerator.from_model_config(tiny_cfg)
    trainable = set_training_stage(model, 2)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in trainable], lr=1e-2)
    batch = make_batch()
    cfg = ObjectiveConfig(drop_text_prob=0, drop_product_prob=0, drop_both_prob=0)
    draws = range(4)  # the batch is overfit together with 4 fixed noise/timestep draws

    def evaluate():
        with torch.no_grad():
            return sum(flow_matching_loss(model, batch, cfg, torch.Generator().manual_seed(d)).item()
                       for d in draws) / len(draws)

    before = evaluate()
    for step in range(32):
        loss = flow_matching_loss(model, batch, cfg, torch.Generator().manual_seed(step % len(draws)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("drop_product, gates_open", [(0.1, True), (0.85, False)])
def test_always_dropping_the_product_keeps_the_product_branch_exactly_closed(tiny_cfg, drop_product, gates_open):
    """The PoC's ablation B (docs/poc.md): with every sample's product dropped, the product gates'
    gradients are exactly 0, so AdamW (weight decay included) leaves them at their initial 0."""
    torch.manual_seed(0)
    model = ProductVideoGenerator.from_model_config(tiny_cfg)
    trainable = set_training_stage(model, 2)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in trainable], lr=1e-2,
                                  weight_decay=0.01)
    cfg = ObjectiveConfig(drop_text_prob=0.15 if gates_open else 0.0, drop_product_prob=drop_product,
                          drop_both_prob=0.05 if gates_open else 0.15)
    for step in range(4):
        loss = flow_matching_loss(model, make_batch(seed=step), cfg, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gates = [p for n, p in model.named_parameters() if n.endswith(".attn2.processor.gate")]
    assert gates and all(g.abs().sum().item() > 0 for g in gates) == gates_open
    if not gates_open:
        assert all(torch.equal(g, torch.zeros_like(g)) for g in gates)
