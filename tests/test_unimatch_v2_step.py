"""UniMatch V2's framework in the one training step, pinned against a transcription of its unimatch_v2.py.

The network is the ``dpt`` plugin (V2's DPT head) on a small DINOv2-shaped timm ViT with random
weights, its head built with BatchNorm (``use_bn``, an option of V2's DPT) so that the teacher's mode
shows in its predictions. The transcription follows unimatch_v2.py's iteration line by line: the EMA
model in eval mode predicts the weak view; each strong view is CutMixed with the batch flipped;
``pred_x = model(img_x)``, then one pass of ``cat(s1, s2)`` with ``comp_drop=True`` (dpt.py's masks:
Binomial(0.5) x 2 for the first half, 2 minus it for the second, ``int(bs // 2 * 0.5)`` pairs at 1,
one mask for the four maps); each strong term summed over pixels with confidence ``>=`` the
threshold and divided by the non-padding pixels; ``(loss_x + (s1 + s2) / 2) / 2``. The step and the
transcription draw the masks from torch's global generator, seeded alike; the CutMix boxes are the
step's (its generator), as in the UniMatch V1 test. The loss, d loss / d every parameter and the
BatchNorm statistics are compared.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.cutmix import cutmix_boxes
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox.train.student_pass import StudentPass
from sandbox_builtins.consistency_losses import PseudoLabelCrossEntropy
from sandbox_builtins.dpt import build_dpt
from sandbox_builtins.perturbations import ComplementaryChannelDropout, DensityDescending
from gradient_checks import ATOL, RTOL, assert_same_gradients, reached

CLASSES, SIZE, COUNT, SEED, STEP = 3, 56, 4, 5, 7
UNIMATCH_V2 = {
    "pseudo_labels": "teacher", "teacher_mode": "eval", "teacher_statistics": "ema", "strong_views": 2,
    "cutmix_partners": "flipped", "perturbed_view": "strong_in_place", "perturb_at": "encoder",
    "supervised_weight": 0.5, "unsupervised_weight": 0.5, "unsupervised_normalisation": "image_pixels",
    "threshold_inclusive": True, "threshold": 0.45, "cutmix_p": 1.0, "warmup_iters": 0, "perturbation_start_iters": 0,
}


def small_dpt() -> nn.Module:
    """V2's DPT head (with BatchNorm) on a 4-block DINOv2-shaped ViT of width 16, 4 x 4 patches at 56 pixels."""
    return build_dpt(
        CLASSES, use_bn=True, layers=[0, 1, 2, 3], features=8, out_channels=[4, 8, 16, 32],
        encoder_options={"embed_dim": 16, "depth": 4, "num_heads": 2, "img_size": SIZE},
    )


def networks() -> tuple[nn.Module, nn.Module]:
    """A student and an EMA model that differ (another average of students: other weights and statistics)."""
    torch.manual_seed(0)
    student = small_dpt().train()
    with torch.no_grad():  # confident enough that some pixels pass the threshold and some do not
        student.final.weight.mul_(4.0)
    ema = copy.deepcopy(student)
    with torch.no_grad():
        for parameter in ema.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
        for name, buffer in ema.named_buffers():
            if "running_var" in name:
                buffer.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buffer.normal_(0.0, 0.3)
    return student, ema


def batches(seed: int = 0) -> tuple[LabeledBatch, UnlabeledBatch]:
    generator = torch.Generator().manual_seed(seed)

    def images() -> Tensor:
        return torch.randn(COUNT, 3, SIZE, SIZE, generator=generator)

    padding = torch.zeros(COUNT, SIZE, SIZE, dtype=torch.bool)
    padding[:, :, -9:] = torch.rand(COUNT, 1, 1, generator=generator) > 0.4  # some crops padded on the right
    labeled = LabeledBatch(images(), torch.randint(0, CLASSES, (COUNT, SIZE, SIZE), generator=generator))
    return labeled, UnlabeledBatch(images(), images(), padding, images())


def dpt_forward(model: nn.Module, x: Tensor, comp_drop: bool = False) -> Tensor:
    """dpt.py's ``DPT.forward``: the intermediate features, with ``comp_drop`` its complementary masks, the head."""
    patch_h, patch_w = x.shape[-2] // 14, x.shape[-1] // 14
    features = model.extract(x)  # get_intermediate_layers, as (B, C, h, w): the masks act per channel alike
    if comp_drop:
        bs, dim = features[0].shape[0], features[0].shape[1]
        dropout_mask1 = torch.distributions.binomial.Binomial(probs=0.5).sample((bs // 2, dim)) * 2.0
        dropout_mask2 = 2.0 - dropout_mask1
        dropout_prob = 0.5
        num_kept = int(bs // 2 * (1 - dropout_prob))
        kept_indexes = torch.randperm(bs // 2)[:num_kept]
        dropout_mask1[kept_indexes, :] = 1.0
        dropout_mask2[kept_indexes, :] = 1.0
        dropout_mask = torch.cat((dropout_mask1, dropout_mask2))
        features = [feature * dropout_mask[:, :, None, None] for feature in features]
    out = model.final(model.classifier(model.decode(features)))
    return F.interpolate(out, (patch_h * 14, patch_w * 14), mode="bilinear", align_corners=True)


def unimatch_v2_loss(model: nn.Module, model_ema: nn.Module, labeled: LabeledBatch, unlabeled: UnlabeledBatch) -> Tensor:
    """unimatch_v2.py, one iteration, with the step's CutMix boxes."""
    conf_thresh = UNIMATCH_V2["threshold"]
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + STEP)
    cutmix_box1 = cutmix_boxes(COUNT, SIZE, SIZE, 1.0, generator).long()
    cutmix_box2 = cutmix_boxes(COUNT, SIZE, SIZE, 1.0, generator).long()
    img_x, mask_x = labeled.images, labeled.masks
    img_u_w, img_u_s1, img_u_s2 = unlabeled.weak, unlabeled.strong.clone(), unlabeled.strong2.clone()
    ignore_mask = unlabeled.padding.long() * 255
    model_ema.eval()
    with torch.no_grad():
        pred_u_w = dpt_forward(model_ema, img_u_w).detach()
        conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
        mask_u_w = pred_u_w.argmax(dim=1)
    img_u_s1[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1] = img_u_s1.flip(0)[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1]
    img_u_s2[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1] = img_u_s2.flip(0)[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1]
    model.train()
    pred_x = dpt_forward(model, img_x)
    pred_u_s1, pred_u_s2 = dpt_forward(model, torch.cat((img_u_s1, img_u_s2)), comp_drop=True).chunk(2)
    terms = []
    for cutmix_box, pred_u_s in ((cutmix_box1, pred_u_s1), (cutmix_box2, pred_u_s2)):
        mask_u_w_cutmixed, conf_u_w_cutmixed, ignore_mask_cutmixed = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
        mask_u_w_cutmixed[cutmix_box == 1] = mask_u_w.flip(0)[cutmix_box == 1]
        conf_u_w_cutmixed[cutmix_box == 1] = conf_u_w.flip(0)[cutmix_box == 1]
        ignore_mask_cutmixed[cutmix_box == 1] = ignore_mask.flip(0)[cutmix_box == 1]
        loss_u_s = F.cross_entropy(pred_u_s, mask_u_w_cutmixed, reduction="none")
        loss_u_s = loss_u_s * ((conf_u_w_cutmixed >= conf_thresh) & (ignore_mask_cutmixed != 255))
        terms.append(loss_u_s.sum() / (ignore_mask_cutmixed != 255).sum().item())
    loss_x = F.cross_entropy(pred_x, mask_x, ignore_index=255)  # configs/pascal.yaml: CELoss, ignore_index 255
    loss_u_s = (terms[0] + terms[1]) / 2.0
    return (loss_x + loss_u_s) / 2.0


def step_loss(student: nn.Module, teacher: nn.Module, perturbation: nn.Module | None = None, **changes: object) -> tuple[Tensor, dict]:
    loss_fn = PseudoLabelCrossEntropy()
    method = MethodComponents(perturbation or ComplementaryChannelDropout(kept=0.5), None, loss_fn, loss_fn)
    step = SemiSupervisedStep(TrainSection(**{**UNIMATCH_V2, **changes}), method, 255, seed=SEED)
    torch.manual_seed(11)
    return step.semi_supervised(STEP, StudentPass(student), teacher, *batches())


def test_the_step_computes_unimatch_v2s_loss_and_its_gradients() -> None:
    """Loss and d loss / d every parameter within RTOL/ATOL, the same BatchNorm statistics; the teacher
    arrives in train mode and the step predicts with it in eval mode (``teacher_mode = "eval"``)."""
    student, ema = networks()
    reference, reference_ema = copy.deepcopy(student), copy.deepcopy(ema)
    loss, logs = step_loss(student, ema.train())
    torch.manual_seed(11)
    expected = unimatch_v2_loss(reference, reference_ema, *batches())
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    assert 0.1 < float(logs["trusted_ratio"]) < 0.9, "the check covers trusted and untrusted pixels"
    assert "loss_perturbed" not in logs, "in place: no view is added"
    gradients = assert_same_gradients(loss, dict(student.named_parameters()), expected, dict(reference.named_parameters()))
    assert reached(gradients) == set(gradients), "every parameter's gradient is compared, none trivially zero"
    for (name, ours), theirs in zip(student.named_buffers(), reference.buffers()):
        torch.testing.assert_close(ours, theirs, msg=name)  # two train-mode passes: the labeled, then the strong
    for ours, theirs in zip(ema.buffers(), reference_ema.buffers()):
        assert torch.equal(ours, theirs), "the eval-mode teacher's statistics are left alone"


@pytest.mark.parametrize("change", [
    {"teacher_mode": "train", "teacher_statistics": "student"},
    {"unsupervised_normalisation": "trusted_pixels"},
    {"cutmix_partners": "batch"},
    {"perturbed_view": "strong"},
    {"unsupervised_weight": 0.25},
])
def test_each_unimatch_v2_setting_changes_the_loss(change: dict) -> None:
    """Turning any one setting away from V2's changes the loss: the transcription test pins each of them
    (the teacher in train mode, trusted instead of non-padding pixels, rolled partners, a perturbed copy)."""
    student, ema = networks()
    v2 = float(step_loss(copy.deepcopy(student), copy.deepcopy(ema))[0].detach())
    assert abs(float(step_loss(student, ema, **change)[0].detach()) - v2) > 1e-5, change


def test_ddfp_in_place_of_the_dropout_moves_each_strong_image_at_the_classifier_input() -> None:
    """recipes/unimatch_v2_ddfp_pascal.toml's step: DDFP perturbs both strong views in place, at the
    classifier's input, with each view's trusted pixels; no view is added and the loss changes."""
    seen: list[Tensor] = []

    class Recording(DensityDescending):
        uses_density = False

        def forward(self, features: Tensor, context) -> Tensor | None:  # noqa: ANN001
            seen.append(context.valid)
            assert context.views == 2 and features.shape[0] == 2 * COUNT
            return features + 0.5

    student, ema = networks()
    clean = float(step_loss(copy.deepcopy(student), copy.deepcopy(ema), perturbation=Recording(), perturbation_start_iters=100)[0])
    loss, logs = step_loss(student, ema, perturbation=Recording(), perturb_at="classifier", log_every=1)
    assert len(seen) == 1 and seen[0].shape[0] == 2 * COUNT and 0 < float(seen[0].float().mean()) < 1
    assert "loss_perturbed" not in logs and "perturbation_relative_norm" in logs
    assert abs(float(loss) - clean) > 1e-5
