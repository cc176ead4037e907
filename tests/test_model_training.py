"""Training stages (which weights learn) and the rectified-flow objective with its mask term."""

import pytest
import torch

from models.config import ObjectiveConfig
from models.objective import (
    banded_losses,
    draw_noise,
    flow_matching_loss,
    loss_parts,
    sample_condition_keep,
    sample_sigmas,
    shift_sigmas,
)
from models.spec import set_trainable, specification
from models.tiny import TINY_TEXT_DIM
from models.transformer import pack_mask

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
        "reference_latents": torch.randn(batch, 3, 16, 4, 6, generator=g),
        "photo_mask": torch.tensor([[True, True, False], [True, True, True]])[:batch],
    }


ADAPTER_PREFIXES = ("product_encoder.", "transformer.wan.patch_embedding.")


def expected_trainable(names, stage):
    adapter = {n for n in names if n.startswith(ADAPTER_PREFIXES) or ".processor." in n}
    blocks = {n for n in names if n.startswith("transformer.wan.blocks.")}
    return {"adapter": adapter, "full": adapter | blocks, "scratch": names}[stage]


def both_paths(tiny_cfg):
    """CLIP tokens and gated reference latents: every kind of new weight is in the model."""
    return specification(tiny_cfg.model_copy(update={"reference": "both", "reference_attention": "gated"}))


def open_gates(model):
    """Open the gates so that every trainable weight has a non-zero path to the loss."""
    with torch.no_grad():
        for block in model.transformer.wan.blocks:
            block.attn2.processor.gate.fill_(0.5)
            block.attn1.processor.gate.fill_(0.5)
            for lora in (block.attn1.processor.lora_q, block.attn1.processor.lora_k, block.attn1.processor.lora_v):
                lora.up.weight.normal_(std=0.1)


@pytest.mark.parametrize("stage", ["adapter", "full", "scratch"])
def test_exactly_the_stage_parameters_receive_gradients(tiny_cfg, stage):
    spec = both_paths(tiny_cfg)
    model = spec.build_generator()
    names = {n for n, _ in model.named_parameters()}
    trainable = set_trainable(model, spec.trainable_names(model, stage))
    assert trainable == expected_trainable(names, stage)
    # Sanity of the split itself: the product layers are adapters, Wan's own weights are not.
    assert {
        "product_encoder.query_tokens",
        "transformer.wan.blocks.1.attn2.processor.gate",
        "transformer.wan.blocks.1.attn1.processor.gate",
        "transformer.wan.blocks.1.attn1.processor.lora_k.up.weight",
    } <= trainable
    assert ("transformer.wan.blocks.0.attn1.to_q.weight" in trainable) == (stage != "adapter")
    embedders_and_head = {
        "transformer.wan.condition_embedder.text_embedder.linear_1.weight",
        "transformer.wan.proj_out.weight",
    }
    assert (embedders_and_head <= trainable) == (stage == "scratch")

    open_gates(model)
    cfg = ObjectiveConfig(
        drop_text_prob=0, drop_product_prob=0, drop_both_prob=0, masked_region_weight=1.0, mask_loss_weight=1.0
    )
    flow_matching_loss(spec, model, make_batch(), cfg, torch.Generator().manual_seed(0)).backward()
    # The last block's reference queries lead nowhere: reference tokens leave the model before the head.
    last = len(model.transformer.wan.blocks) - 1
    reaching = {n for n in trainable if not n.startswith(f"transformer.wan.blocks.{last}.attn1.processor.lora_q.")}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reaching <= with_grad <= trainable
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero == reaching


def test_unknown_stage_is_rejected(tiny_cfg):
    spec = specification(tiny_cfg)
    with pytest.raises(ValueError, match="unknown training stage"):
        spec.trainable_names(spec.build_generator(), "stage2")


class Oracle:
    """A specification whose model predicts velocities from x0: exact (sign 1) or wrong, and,
    with `wrong_inside`, wrong only inside the mask."""

    def __init__(self, clean, sign=1.0, wrong_inside=None):
        self.clean, self.sign, self.wrong_inside = clean, sign, wrong_inside

    def predict(self, model, batch, noisy, timestep, keep_text=None, keep_product=None):
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        velocity = self.sign * ((noisy - (1 - sigma) * self.clean) / sigma - self.clean)
        if self.wrong_inside is not None:
            velocity = velocity + self.wrong_inside * (batch["packed_mask"].mean(dim=1, keepdim=True) > 0)
        return velocity


def test_mask_loss_averages_over_the_masked_cells_alone():
    batch = make_batch()
    clean, generator = batch["latents"], torch.Generator().manual_seed(0)
    draw = draw_noise(clean.shape, ObjectiveConfig(), generator)
    parts = loss_parts(Oracle(clean, wrong_inside=1.0), None, batch, draw, ObjectiveConfig())
    masked = batch["packed_mask"].mean(dim=1, keepdim=True)
    # error 1 in every cell the mask touches: L_mask = 1 exactly, L_flow only its share of the cells
    assert parts.mask_error / parts.mask_weight == pytest.approx(1.0, abs=1e-5)
    assert parts.flow_error / parts.flow_weight == pytest.approx(float((masked > 0).float().mean()), abs=1e-5)
    assert torch.allclose(parts.inside, torch.ones(2), atol=1e-5) and parts.outside.abs().max() < 1e-6
    plain = parts.loss(ObjectiveConfig())
    assert parts.loss(ObjectiveConfig(mask_loss_weight=2.0)) == pytest.approx(float(plain) + 2.0, abs=1e-5)
    metrics = banded_losses(parts, draw.sigmas)
    assert metrics["loss_inside_mask"] == pytest.approx(1.0, abs=1e-5) and metrics["loss_outside_mask"] < 1e-6
    assert any(name.startswith("loss_inside_mask_s") for name in metrics)


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
    cfg = ObjectiveConfig(masked_region_weight=2.0, mask_loss_weight=1.0)
    assert flow_matching_loss(Oracle(clean), None, batch, cfg, torch.Generator().manual_seed(0)).item() < 1e-8
    assert flow_matching_loss(Oracle(clean, -1.0), None, batch, cfg, torch.Generator().manual_seed(0)).item() > 0.1


def test_loss_decreases_when_overfitting_one_batch(tiny_cfg):
    torch.manual_seed(0)
    spec = specification(tiny_cfg)
    model = spec.build_generator()
    trainable = set_trainable(model, spec.trainable_names(model, "full"))
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in trainable], lr=1e-2)
    batch = make_batch()
    cfg = ObjectiveConfig(drop_text_prob=0, drop_product_prob=0, drop_both_prob=0)
    draws = range(4)  # the batch is overfit together with 4 fixed noise/timestep draws

    def evaluate():
        with torch.no_grad():
            return sum(
                flow_matching_loss(spec, model, batch, cfg, torch.Generator().manual_seed(d)).item() for d in draws
            ) / len(draws)

    before = evaluate()
    for step in range(32):
        loss = flow_matching_loss(spec, model, batch, cfg, torch.Generator().manual_seed(step % len(draws)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("drop_product, gates_open", [(0.1, True), (0.85, False)])
def test_always_dropping_the_product_keeps_the_product_branch_exactly_closed(tiny_cfg, drop_product, gates_open):
    """The PoC's ablation B (docs/poc.md): with every sample's product dropped, the product and
    reference gates' gradients are exactly 0, so AdamW (weight decay included) leaves them at 0."""
    torch.manual_seed(0)
    spec = both_paths(tiny_cfg)
    model = spec.build_generator()
    trainable = set_trainable(model, spec.trainable_names(model, "full"))
    optimizer = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if n in trainable], lr=1e-2, weight_decay=0.01
    )
    cfg = ObjectiveConfig(
        drop_text_prob=0.15 if gates_open else 0.0,
        drop_product_prob=drop_product,
        drop_both_prob=0.05 if gates_open else 0.15,
    )
    for step in range(4):
        loss = flow_matching_loss(spec, model, make_batch(seed=step), cfg, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gates = [p for n, p in model.named_parameters() if n.endswith(".processor.gate")]
    assert gates and all(g.abs().sum().item() > 0 for g in gates) == gates_open
    if not gates_open:
        assert all(torch.equal(g, torch.zeros_like(g)) for g in gates)


def test_the_specification_is_the_one_place_that_loads_models_and_chooses_weights():
    """tasks/ and flows/ never load an encoder or a DiT, nor set which weights train: they ask
    models.spec.specification (docs/model.md, "One model specification per backend")."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("tasks", "flows")
        for path in sorted((root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".from_pretrained(" in line or ".requires_grad_(" in line
    ]
    assert offenders == []
