"""UniMatch's framework in the one training step, pinned against a transcription of its unimatch.py.

A small deterministic network (two encoder maps, a BatchNorm decoder, no dropout) and a
deterministic stand-in for the feature dropout (the maps halved) make the step's loss
reproducible by hand: the test computes UniMatch's loss line by line as its training script does
(partners' pseudo-labels in eval mode, two strong views CutMixed with the partner stream's own
strong views by two boxes, the feature perturbation of the encoder maps of labeled + weak images
decoded in one pass with the clean maps, each unlabeled term summed over confident pixels and
divided by the non-padding ones, (x + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2) and compares the loss,
its gradient w.r.t. every parameter (a detached branch leaves the value alone) and the BatchNorm
statistics. With ``loss_pixel_count = "per_process"`` on 2 simulated processes, each process's loss
is that transcription on its own batch, as unimatch.py on each GPU.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import ClassifierOutput, Perturbation, PerturbationContext, SegmentationNetwork
from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.cutmix import cutmix_boxes
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox_builtins.consistency_losses import PseudoLabelCrossEntropy
from sandbox.train.student_pass import StudentPass
from gradient_checks import ATOL, RTOL, assert_same_gradients, reached
from test_step_semantics import mean_gradients, simulated_processes

CLASSES, SIZE, SEED, STEP = 3, 16, 5, 7
UNIMATCH = {
    "pseudo_labels": "student", "strong_views": 2, "cutmix_partners": "stream", "perturbed_view": "weak",
    "perturb_at": "encoder", "supervised_weight": 0.5, "unsupervised_weight": 0.25, "perturbed_weight": 0.25,
    "unsupervised_normalisation": "image_pixels", "threshold_inclusive": True, "threshold": 0.4, "cutmix_p": 1.0,
    "warmup_iters": 0, "perturbation_start_iters": 0,
}


class TwoMapNetwork(SegmentationNetwork):
    """Encoder maps at strides 1 and 2, a decoder with a BatchNorm, a 1x1 classifier (no Mix BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.low, self.high = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.classifier = nn.Sequential()
        self.final = nn.Conv2d(4, CLASSES, 1)
        self.feature_channels = self.embedding_channels = 4

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.low.parameters(), *self.high.parameters()]

    def extract(self, images: Tensor) -> list[Tensor]:
        return [self.low(images), self.high(images)]

    def decode(self, maps: list[Tensor]) -> Tensor:
        low, high = maps
        return self.norm(low + F.interpolate(high, size=low.shape[-2:], mode="nearest"))

    def encode(self, images: Tensor) -> Tensor:
        return self.decode(self.extract(images))


class Halve(Perturbation):
    """A deterministic stand-in for UniMatch's Dropout2d(0.5): every map halved."""

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        return features * 0.5


def batches(seed: int = 0) -> tuple[LabeledBatch, UnlabeledBatch, UnlabeledBatch]:
    generator = torch.Generator().manual_seed(seed)

    def images(count: int = 2) -> Tensor:
        return torch.randn(count, 3, SIZE, SIZE, generator=generator)

    def padding() -> Tensor:
        mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
        mask[:, :, -3:] = torch.rand(2, 1, 1, generator=generator) > 0.3  # some images padded on the right
        return mask

    labeled = LabeledBatch(images(), torch.randint(0, CLASSES, (2, SIZE, SIZE), generator=generator))
    unlabeled = UnlabeledBatch(images(), images(), padding(), images())
    partners = UnlabeledBatch(images(), images(), padding(), images())
    return labeled, unlabeled, partners


def unimatch_loss(model: nn.Module, labeled: LabeledBatch, unlabeled: UnlabeledBatch, mix: UnlabeledBatch) -> Tensor:
    """UniMatch's unimatch.py, one iteration, with the sandbox's CutMix boxes and ``Halve`` for Dropout2d."""
    threshold = UNIMATCH["threshold"]
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + STEP)
    box1 = cutmix_boxes(2, SIZE, SIZE, 1.0, generator)
    box2 = cutmix_boxes(2, SIZE, SIZE, 1.0, generator)
    img_x, mask_x = labeled.images, labeled.masks
    img_u_w, ignore_mask = unlabeled.weak, unlabeled.padding.long() * 255
    img_u_s1, img_u_s2 = unlabeled.strong.clone(), unlabeled.strong2.clone()
    ignore_mask_mix = mix.padding.long() * 255
    with torch.no_grad():
        model.eval()
        pred_u_w_mix = model(mix.weak).logits.detach()
        conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
        mask_u_w_mix = pred_u_w_mix.argmax(dim=1)
    img_u_s1[box1.unsqueeze(1).expand(img_u_s1.shape)] = mix.strong[box1.unsqueeze(1).expand(img_u_s1.shape)]
    img_u_s2[box2.unsqueeze(1).expand(img_u_s2.shape)] = mix.strong2[box2.unsqueeze(1).expand(img_u_s2.shape)]
    model.train()
    num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
    maps = model.extract(torch.cat((img_x, img_u_w)))  # model(torch.cat((img_x, img_u_w)), need_fp=True)
    decoded = model.decode([torch.cat((m, m * 0.5)) for m in maps])
    both = model.final(model.classifier(decoded))
    size = (SIZE, SIZE)
    preds = F.interpolate(both[: num_lb + num_ulb], size=size, mode="bilinear", align_corners=True)
    preds_fp = F.interpolate(both[num_lb + num_ulb :], size=size, mode="bilinear", align_corners=True)
    pred_x, pred_u_w = preds.split([num_lb, num_ulb])
    pred_u_w_fp = preds_fp[num_lb:]
    pred_u_s1, pred_u_s2 = model(torch.cat((img_u_s1, img_u_s2))).logits.chunk(2)
    pred_u_w = pred_u_w.detach()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
    terms = []
    for box, pred in ((box1, pred_u_s1), (box2, pred_u_s2)):
        mask_cut, conf_cut, ignore_cut = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
        mask_cut[box] = mask_u_w_mix[box]
        conf_cut[box] = conf_u_w_mix[box]
        ignore_cut[box] = ignore_mask_mix[box]
        loss_u = F.cross_entropy(pred, mask_cut, reduction="none")
        loss_u = loss_u * ((conf_cut >= threshold) & (ignore_cut != 255))
        terms.append(loss_u.sum() / (ignore_cut != 255).sum().item())
    loss_x = F.cross_entropy(pred_x, mask_x, ignore_index=255)  # configs/pascal.yaml: CELoss, ignore_index 255
    loss_u_w_fp = F.cross_entropy(pred_u_w_fp, mask_u_w, reduction="none")
    loss_u_w_fp = loss_u_w_fp * ((conf_u_w >= threshold) & (ignore_mask != 255))
    loss_u_w_fp = loss_u_w_fp.sum() / (ignore_mask != 255).sum().item()
    return (loss_x + terms[0] * 0.25 + terms[1] * 0.25 + loss_u_w_fp * 0.5) / 2.0


def test_the_step_computes_unimatchs_loss_and_its_gradients() -> None:
    """Loss within RTOL/ATOL, d loss / d every parameter within RTOL/ATOL, the same BatchNorm statistics."""
    torch.manual_seed(0)
    network = TwoMapNetwork()
    reference = copy.deepcopy(network)
    loss_fn = PseudoLabelCrossEntropy()
    method = MethodComponents(Halve(), None, loss_fn, loss_fn)
    step = SemiSupervisedStep(TrainSection(**UNIMATCH), method, 255, seed=SEED)
    labeled, unlabeled, partners = batches()
    network.train()
    loss, logs = step.semi_supervised(STEP, StudentPass(network), None, labeled, unlabeled, partners)
    expected = unimatch_loss(reference, labeled, unlabeled, partners)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    assert "loss_perturbed" in logs and float(logs["trusted_ratio"]) > 0.2, "the check covers trusted pixels"
    gradients = assert_same_gradients(loss, dict(network.named_parameters()), expected, dict(reference.named_parameters()))
    assert reached(gradients) == set(gradients), "every parameter's gradient is compared, none trivially zero"
    for name in ("running_mean", "running_var"):  # the same BatchNorm passes: partners in eval, two in train
        assert torch.allclose(getattr(network.norm, name), getattr(reference.norm, name))


def test_each_unimatch_difference_changes_the_loss() -> None:
    """Turning any one setting back to DDFP's changes the loss: the test above pins every one of them."""
    labeled, unlabeled, partners = batches()
    loss_fn = PseudoLabelCrossEntropy()

    def loss_with(**changes: object) -> float:
        torch.manual_seed(0)
        network = TwoMapNetwork().train()
        step = SemiSupervisedStep(TrainSection(**{**UNIMATCH, **changes}), MethodComponents(Halve(), None, loss_fn, loss_fn), 255, SEED)
        teacher = copy.deepcopy(network)
        return float(step.semi_supervised(STEP, StudentPass(network), teacher, labeled, unlabeled, partners)[0].detach())

    unimatch = loss_with()
    for change in ({"pseudo_labels": "teacher"}, {"strong_views": 1}, {"cutmix_partners": "batch"},
                   {"perturbed_view": "strong"}, {"perturb_at": "classifier"}, {"unsupervised_normalisation": "trusted_pixels"},
                   {"supervised_weight": 1.0}):
        assert abs(loss_with(**change) - unimatch) > 1e-6, change


def test_student_pseudo_labels_feed_a_classifier_perturbation_with_their_trusted_pixels() -> None:
    """UniMatch + DDFP's place: the weak view perturbed at the classifier input; the perturbation
    sees the trusted pixels of the student's own clean prediction of those images."""
    seen: list[Tensor] = []

    class Recording(Perturbation):
        def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
            seen.append(context.valid)
            assert isinstance(context.classify(features), ClassifierOutput)
            return features + 0.1

    torch.manual_seed(0)
    network = TwoMapNetwork().train()
    loss_fn = PseudoLabelCrossEntropy()
    step = SemiSupervisedStep(TrainSection(**{**UNIMATCH, "perturb_at": "classifier"}),
                              MethodComponents(Recording(), None, loss_fn, loss_fn), 255, SEED)
    labeled, unlabeled, partners = batches()
    step.semi_supervised(STEP, StudentPass(network), None, labeled, unlabeled, partners)
    with torch.no_grad():  # the same train-mode pass (batch statistics) as the step's pass over labeled + weak
        clean = network(torch.cat([labeled.images, unlabeled.weak])).logits[2:].softmax(dim=1)
    expected = (clean.max(dim=1).values >= UNIMATCH["threshold"]) & ~unlabeled.padding
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    assert 0 < expected.float().mean() < 1, "the check covers trusted and untrusted pixels"


def test_the_partners_are_labelled_in_eval_mode_before_any_train_mode_pass() -> None:
    """As unimatch.py: their pseudo-labels use the running statistics from before this step's passes."""
    torch.manual_seed(0)
    network = TwoMapNetwork()
    student = StudentPass(network)
    initial = network.norm.running_mean.clone()
    passes: list[tuple[bool, Tensor]] = []
    real_forward = student.forward

    def recording(images: Tensor, *args: object, **kwargs: object):  # noqa: ANN202
        passes.append((network.training, network.norm.running_mean.clone()))
        return real_forward(images, *args, **kwargs)

    student.forward = recording  # type: ignore[method-assign]
    loss_fn = PseudoLabelCrossEntropy()
    step = SemiSupervisedStep(TrainSection(**UNIMATCH), MethodComponents(Halve(), None, loss_fn, loss_fn), 255, SEED)
    labeled, unlabeled, partners = batches()
    student.train()
    step.semi_supervised(STEP, student, None, labeled, unlabeled, partners)
    assert [training for training, _ in passes] == [False, True, True]
    assert torch.equal(passes[0][1], initial), "no train-mode pass ran before the partners were labelled"
    assert network.training, "the student is back in train mode"


def test_per_process_normalisation_is_unimatchs_code_on_each_gpu() -> None:
    """unimatch.py on each GPU divides each term by that GPU's own pixels (its supervised mean, its
    non-padding pixels) and DDP averages the gradients: ``loss_pixel_count = "per_process"`` on 2
    simulated processes gives each process :func:`unimatch_loss` of its own batches, and the same
    averaged gradient of every parameter; their BatchNorms each normalise their own batch."""
    shares = [batches(), batches(seed=1)]
    shares[1][0].masks[:, :6] = 255  # process 1: some labeled pixels ignored,
    shares[1][1].padding[0, :, 4:] = True  # one of its unlabeled images 75% padding
    assert (shares[0][1].padding.sum(), (shares[0][0].masks != 255).sum()) != (
        shares[1][1].padding.sum(), (shares[1][0].masks != 255).sum())
    torch.manual_seed(0)
    network = TwoMapNetwork().train()
    networks = [copy.deepcopy(network) for _ in range(4)]  # the step's two, the transcription's two
    loss_fn = PseudoLabelCrossEntropy()
    settings = TrainSection(**UNIMATCH, loss_pixel_count="per_process")

    def process(rank: int) -> Callable[[], Tensor]:
        step = SemiSupervisedStep(settings, MethodComponents(Halve(), None, loss_fn, loss_fn), 255, SEED)
        return lambda: step.semi_supervised(STEP, StudentPass(networks[rank]), None, *shares[rank])[0]

    losses = simulated_processes([process(0), process(1)])
    expected = [unimatch_loss(networks[2 + rank], *shares[rank]) for rank in range(2)]
    for loss, reference in zip(losses, expected):
        torch.testing.assert_close(loss, reference, rtol=RTOL, atol=ATOL)
    ours, theirs = mean_gradients(losses, networks[:2]), mean_gradients(expected, networks[2:])
    for name, gradient in theirs.items():
        torch.testing.assert_close(ours[name], gradient, rtol=RTOL, atol=ATOL, msg=name)
    assert reached(ours) == set(ours), "every parameter's gradient is compared, none trivially zero"
